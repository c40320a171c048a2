"""`retina-train bench-embed`: the PyTorch half of `retina-index bench` (which cannot import torch).

For one config at random init it measures, on fixed inputs (a batch of images, and texts of exactly
`SEQ_LEN` tokens): the image and text towers' FLOPs per item, PyTorch eager throughput in fp32 and in
bf16 autocast (with cosine to fp32), and this machine's matmul GFLOP/s in fp32 and bf16. It exports both
towers to ONNX (the bundle's exporter, `training.export`) and saves the inputs with their fp32 embeddings,
so `retina-index bench` times ONNX Runtime (and OpenVINO) on the same graphs and compares to the same
reference. Everything is reported in one JSON file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from index.bench.embed import throughput
from index.bundle import IMAGE_ENCODER, TEXT_ENCODER
from training.bench.step import NUMERIC_COLUMNS, TABULAR_WIDTH  # any width: the towers do not read it
from training.export import ImageEncoder, TextEncoder, _export_graph
from training.hardware import choose_precision
from training.model.factory import create_model
from training.model.model import RetinaAlignModel
from training.openvino_int8 import missing_packages, quantize_to_ir

SEQ_LEN = 128
INPUTS_FILE = "inputs.npz"
MATMUL_SIZE = 2048
PEAK_ROUNDS = 4
CALIBRATION_ITEMS = 32


@dataclass(frozen=True)
class EngineTiming:
    """Throughput of one engine on one tower."""

    engine: str
    precision: str
    items_per_second: float
    min_cosine: float
    batches: int


def bench_inputs(model: RetinaAlignModel, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
    """Fixed inputs: smooth random images in the normalised pixel range, and full-length random texts
    (non-special token ids, every position attended)."""
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision.image.size
    coarse = torch.rand(batch_size, 3, size // 16, size // 16, generator=generator)
    pixels = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (pixels * 2 - 1 + 0.05 * torch.randn(batch_size, 3, size, size, generator=generator)).clamp(-1, 1)
    low = max(model.config.text.special_token_ids) + 1
    input_ids = torch.randint(low, model.text.vocab_size, (batch_size, SEQ_LEN), generator=generator)
    return {"pixels": pixels, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two (N, D) tensors."""
    return nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


EMULATED_MATMUL_SIZE = 256
"""The matmul side used for bf16 on a CPU without native bf16: emulated, a 2048^3 bf16 matmul took about a
minute a call here (an 11-minute benchmark); the rate at 256 is as telling (very low) in a fraction of a second."""


def matmul_gflops(dtype: torch.dtype, size: int | None = None, seconds: float = 2.0) -> float:
    """Measured GFLOP/s (2 per multiply-add) of a square matmul in `dtype` on all torch threads. The side
    is MATMUL_SIZE, or EMULATED_MATMUL_SIZE for bf16 on a CPU that does not do bf16 natively."""
    if size is None:
        emulated = dtype == torch.bfloat16 and choose_precision("auto", torch.device("cpu")).precision != "bf16"
        size = EMULATED_MATMUL_SIZE if emulated else MATMUL_SIZE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    # The best of a few short rounds: a peak, whatever other processes took from the CPU meanwhile.
    rate = max(throughput(lambda: torch.mm(a, b), 1, seconds / PEAK_ROUNDS)[0] for _ in range(PEAK_ROUNDS))
    return 2.0 * size**3 * rate / 1e9


def _unfuse_attention(model: RetinaAlignModel) -> None:
    """Explicit attention matmuls: FlopCounterMode does not count CPU scaled-dot-product attention (it
    missed 1.4 of ViT-B/16's 35.1 GFLOP), and the ONNX export needs BERT's eager attention anyway."""
    model.text.encoder.set_attn_implementation("eager")
    for module in model.image.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


def gflop_per_item(encode: Callable[..., Tensor], *one_item: Tensor) -> float:
    """FLOPs (2 per multiply-add, matmuls and convolutions) of one forward pass on one item, in GFLOP."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encode(*one_item)
    return counter.get_total_flops() / 1e9


def _time_tower(
    encode: Callable[..., Tensor], inputs: tuple[Tensor, ...], seconds: float
) -> tuple[Tensor, list[EngineTiming]]:
    """The fp32 reference embeddings and eager timings (fp32, bf16 autocast) of one tower."""
    batch = inputs[0].shape[0]
    with torch.inference_mode():
        reference = encode(*inputs)
        fp32, fp32_batches = throughput(lambda: encode(*inputs), batch, seconds)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = encode(*inputs)
            bf16, bf16_batches = throughput(lambda: encode(*inputs), batch, seconds)
    timings = [
        EngineTiming("torch eager", "fp32", fp32, 1.0, fp32_batches),
        EngineTiming("torch eager bf16 autocast", "bf16", bf16, float(cosine_rows(reduced, reference).min()),
                     bf16_batches),
    ]
    return reference.float(), timings


def openvino_int8(onnx_path: Path, calibration: dict[str, np.ndarray], target: Path) -> str:
    """NNCF post-training INT8 quantization of an ONNX graph into an OpenVINO IR at `target` (.xml + .bin),
    calibrated one item at a time on `calibration` (other inputs than the timed ones), with the bundle
    export's policy (`training.openvino_int8`). Returns "" on success, else why nothing was written (openvino
    and nncf are optional). Done here rather than in `retina-index bench` because nncf imports torch when
    present."""
    if missing_packages():
        return "skipped: install openvino and nncf for this row"
    count = int(next(iter(calibration.values())).shape[0])
    quantize_to_ir(onnx_path, [{k: v[i : i + 1] for k, v in calibration.items()} for i in range(count)], target)
    return ""


def _export_towers(
    model: RetinaAlignModel, inputs: dict[str, Tensor], out_dir: Path, towers: dict[str, dict[str, object]]
) -> None:
    """Export both towers to ONNX (the bundle's exporter) and, where openvino and nncf are installed,
    quantize each to an OpenVINO INT8 IR; record the paths (and why a quantization is missing) in `towers`."""
    with torch.no_grad():
        _export_graph(ImageEncoder(model), IMAGE_ENCODER, (inputs["pixels"],), out_dir, ["image_embedding"])
        _export_graph(TextEncoder(model), TEXT_ENCODER, (inputs["input_ids"], inputs["attention_mask"]), out_dir,
                      ["text_embedding"])
    calibration = {k: v.numpy() for k, v in bench_inputs(model, CALIBRATION_ITEMS, seed=1).items()}
    feeds = {"image": {"pixels": calibration["pixels"]},
             "text": {k: calibration[k] for k in ("input_ids", "attention_mask")}}
    for tower, graph in (("image", IMAGE_ENCODER), ("text", TEXT_ENCODER)):
        towers[tower]["onnx"] = str(out_dir / graph)
        target = out_dir / f"{tower}.openvino_int8.xml"
        try:
            why = openvino_int8(out_dir / graph, feeds[tower], target)
        except Exception as error:  # noqa: BLE001 - an optional engine failing must not end the benchmark
            why = f"failed: {type(error).__name__}: {error}"[:200]
        towers[tower]["openvino_int8"] = "" if why else str(target)
        towers[tower]["openvino_int8_note"] = why or f"NNCF as the export, calibrated on {CALIBRATION_ITEMS} inputs"


def run_embed_bench(
    config: str, out_dir: Path, batch_size: int = 16, seconds: float = 5.0, export: bool = True
) -> dict[str, object]:
    """Measure one config (random init) and write the ONNX towers and reference embeddings to `out_dir`.

    Returns the report (also what `retina-train bench-embed --json` writes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(config, tabular_width=TABULAR_WIDTH, numeric_columns=NUMERIC_COLUMNS,
                         pretrained=False).float().eval()
    inputs = bench_inputs(model, batch_size)
    image_inputs = (inputs["pixels"],)
    text_inputs = (inputs["input_ids"], inputs["attention_mask"])
    # Eager timings with the towers' default (fused) attention, as a PyTorch server would run them.
    image_reference, image_timings = _time_tower(model.encode_image, image_inputs, seconds)
    text_reference, text_timings = _time_tower(model.encode_text, text_inputs, seconds)
    _unfuse_attention(model)
    towers: dict[str, dict[str, object]] = {
        "image": {
            "gflop_per_item": gflop_per_item(model.encode_image, inputs["pixels"][:1]),
            "input": f"{batch_size} x 3 x {model.config.vision.image.size} x {model.config.vision.image.size}",
            "engines": [asdict(t) for t in image_timings],
        },
        "text": {
            "gflop_per_item": gflop_per_item(model.encode_text, inputs["input_ids"][:1], inputs["attention_mask"][:1]),
            "input": f"{batch_size} x {SEQ_LEN} tokens",
            "engines": [asdict(t) for t in text_timings],
        },
    }
    np.savez(
        out_dir / INPUTS_FILE,
        pixels=inputs["pixels"].numpy(),
        input_ids=inputs["input_ids"].numpy(),
        attention_mask=inputs["attention_mask"].numpy(),
        image_reference=image_reference.numpy(),
        text_reference=text_reference.numpy(),
    )
    if export:
        _export_towers(model, inputs, out_dir, towers)
    text_config = model.text.encoder.config
    peak_seconds = min(2.0, max(seconds, 0.2))
    return {
        "config": config,
        "embed_dim": model.config.embed_dim,
        "batch_size": batch_size,
        "seq_len": SEQ_LEN,
        "text_heads": int(text_config.num_attention_heads),
        "text_hidden": int(text_config.hidden_size),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "matmul_gflops": {"fp32": matmul_gflops(torch.float32, seconds=peak_seconds),
                          "bf16": matmul_gflops(torch.bfloat16, seconds=peak_seconds)},
        "inputs": str(out_dir / INPUTS_FILE),
        "towers": towers,
    }


def write_report(report: dict[str, object], path: Path) -> None:
    """Write the report as JSON."""
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
