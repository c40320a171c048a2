"""`retina-train export`: a trained run -> a bundle of ONNX graphs, checked against PyTorch.

Three graphs, each exported on its own (open_clip's advice for ONNX), and each tower run once per query
(bundle schema v2): the image encoder (pixels -> image embedding and the image tokens the joint transformer
reads), the text encoder (ids, mask -> text embedding, text tokens and the text embedding that searches
records) and the grader (the joint transformer over those tokens + the structured data, with presence
flags, so one graph serves every modality subset and also yields the record embedding; it never runs a
tower). The exporter is pinned:
`torch.onnx.export(dynamo=True)` at opset 18 (the TorchScript exporter mis-traced transformers 5's BERT
here: 0.08 max error), fixed image size, dynamic batch and sequence axes.

Parity: ONNX Runtime is run against PyTorch on real inputs from the archive's validation split, end to
end as the service runs it (the grader fed with the ONNX towers' tokens), twice: every modality present,
and each row with another modality subset present; an fp32 bundle fails above a max abs difference of
1e-4 on the embeddings. A reduced-precision bundle (int8:
ONNX Runtime dynamic quantization of the weights) must keep cosine >= 0.999 to fp32 and change
text->image R@10 on the validation split by at most 1 point; both numbers are reported.

OpenVINO INT8 (`openvino_int8=True`, `retina-train export --openvino-int8`; fp32 bundles only): the two
encoders are also NNCF-quantized into OpenVINO IR (`training.openvino_int8`), calibrated on up to
`OV_CALIBRATION_ITEMS` training-split items that are not parity samples, and checked as the `openvino`
runtime runs them (`index.runtimes.OpenVinoGraph`): each IR's embedding, and the record embedding of the
grader (fp32 on OpenVINO) fed with the IR's tokens, must keep cosine >= 0.999 (min over the parity rows) to
PyTorch fp32, else the export fails (ExportError) and no bundle is written. The IR files are listed in the
manifest's `files` and the cosines in `manifest.openvino_int8`. The weights' range follows this CPU
(`training.openvino_int8`): 8-bit with VNNI (`needs_vnni`: not used on CPUs without it), else 7-bit.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from index.archive.brset import read_archive
from index.bundle import (
    GRADER,
    IMAGE_ENCODER,
    OPENVINO_INT8_IR,
    SCHEMA_VERSION,
    TEXT_ENCODER,
    TOKENIZER,
    Calibration,
    Manifest,
    OpenVinoInt8,
    TextSettings,
    ir_weights,
    now_iso,
    sha256_of,
    write_manifest,
)
from index.quantize import EXPORT_OP_TYPES, quantize_int8
from index.records import ICDR_NAMES, SDRG_NAMES
from index.runtimes import OpenVinoGraph
from training.calibration import check_weights
from training.data import BatchBuilder, stored_narrative
from training.evaluation.metrics import instance_recall, summarise
from training.gate.export import export_gate
from training.model.model import RetinaAlignModel
from training.openvino_int8 import INSTALL, full_range, missing_packages, quantize_to_ir, quantizer_description
from training.run import MODEL_FILE, LoadedRun, load_run, split_for_evaluation
from training.splits import load_splits
from training.tokenizer import batch_tokenizer

log = logging.getLogger(__name__)

OPSET = 18
EXPORTER = f"torch.onnx.export(dynamo=True, opset_version={OPSET}), torch {torch.__version__}"
FP32_TOLERANCE = 1e-4
MIN_COSINE = 0.999
MAX_RECALL_CHANGE = 0.01
PARITY_SAMPLES = 64
OV_CALIBRATION_ITEMS = 128
"""Training-split items NNCF calibrates the OpenVINO INT8 IR on (fewer when the split is smaller)."""
BATCH = 16

Precision = Literal["fp32", "int8"]


class ExportError(RuntimeError):
    """The exported graphs disagree with PyTorch beyond the stated tolerance."""


class ImageEncoder(nn.Module):
    """pixels -> L2-normalised image embedding (the tower alone, as `retina-train bench-embed` times it)."""

    def __init__(self, model: RetinaAlignModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) -> L2-normalised text embedding (the tower alone)."""

    def __init__(self, model: RetinaAlignModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class ImageGraph(nn.Module):
    """The bundle's image encoder: pixels -> (L2-normalised image embedding, image tokens for the grader)."""

    def __init__(self, model: RetinaAlignModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode_image_for_fusion(pixels)


class TextGraph(nn.Module):
    """The bundle's text encoder: (input_ids, attention_mask) -> (text embedding against photographs, text
    tokens, text embedding against records: the record head's, or the first output again without one)."""

    def __init__(self, model: RetinaAlignModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image_side, record_side, tokens = self.model.encode_text_for_search(input_ids, attention_mask)
        return image_side, tokens, record_side


class Grader(nn.Module):
    """The towers' tokens (image, text) + structured data, any subset present (flags per sample) -> ICDR
    and SDRG logits and the record embedding (the fused CLS projected; for archive records, image +
    structured data). It runs no tower: their tokens come from the two encoders' second outputs."""

    def __init__(self, model: RetinaAlignModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        image_tokens: Tensor,
        text_tokens: Tensor,
        attention_mask: Tensor,
        tabular: Tensor,
        image_present: Tensor,
        text_present: Tensor,
        tabular_present: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        fused = self.model.fuse_tokens(
            image_tokens=image_tokens, text_tokens=text_tokens, attention_mask=attention_mask, tabular=tabular,
            image_present=image_present, text_present=text_present, tabular_present=tabular_present,
        )
        return fused.icdr_logits, fused.sdrg_logits, self.model.search_record_embedding(fused)


class FullGrader(nn.Module):
    """The PyTorch reference of the grader chain: raw inputs through the towers and the joint transformer
    (what the exported encoders + grader must reproduce together)."""

    def __init__(self, model: RetinaAlignModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, tabular: Tensor, image_present: Tensor,
        text_present: Tensor, tabular_present: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        fused = self.model.fuse(
            pixels=pixels, input_ids=input_ids, attention_mask=attention_mask, tabular=tabular,
            image_present=image_present, text_present=text_present, tabular_present=tabular_present,
        )
        return fused.icdr_logits, fused.sdrg_logits, self.model.search_record_embedding(fused)


@dataclass
class ParityReport:
    """What the export check measured."""

    precision: str
    max_abs_diff: dict[str, float]
    min_cosine: dict[str, float]
    recall_at_10_fp32: float | None = None
    recall_at_10_exported: float | None = None
    samples: int = 0
    openvino_int8: dict[str, float] | None = None
    """With --openvino-int8: output -> min cosine to PyTorch fp32 of the openvino runtime on the INT8 IR."""

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [f"parity on {self.samples} validation samples ({self.precision}):"]
        for name in self.max_abs_diff:
            diff, cosine = self.max_abs_diff[name], self.min_cosine[name]
            out.append(f"  {name:28s} max |diff| {diff:.2e}   min cosine {cosine:.6f}")
        if self.recall_at_10_fp32 is not None:
            out.append(f"  text->image R@10 on val: PyTorch fp32 {self.recall_at_10_fp32:.4f}, "
                       f"exported {self.recall_at_10_exported:.4f}")
        if self.openvino_int8 is not None:
            out.append(f"OpenVINO INT8 IR (runtime openvino) on the same {self.samples} samples:")
            out += [f"  {name:28s} min cosine {cosine:.6f}" for name, cosine in self.openvino_int8.items()]
        return out


SUBSETS: tuple[tuple[bool, bool, bool], ...] = tuple(itertools.product((True, False), repeat=3))[:-1]
"""Every non-empty subset of (image, text, tabular) as presence flags."""
SUBSET_SUFFIX = " (subsets)"
"""Suffix of the grader outputs checked with mixed presence flags (each row another subset)."""


def _presence(size: int, mixed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Presence flags (image, text, tabular) per sample: all present, or cycling through `SUBSETS`.

    Always three distinct tensors: torch.export takes one tensor object passed for several inputs as one
    input, so `(ones, ones, ones)` exported a grader that ignored image_present and text_present."""
    if mixed:
        rows = torch.tensor([SUBSETS[i % len(SUBSETS)] for i in range(size)], dtype=torch.bool)
    else:
        rows = torch.ones(size, 3, dtype=torch.bool)
    return rows[:, 0].clone(), rows[:, 1].clone(), rows[:, 2].clone()


def _distinct_text_length(model: RetinaAlignModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """`batch` with its text padded (pad ids, mask 0) to a length no fixed dimension of the graphs has.

    A guard against torch.export's duck sizing (dimensions of equal size in the example may be given one
    symbol, tying the sequence axis to a fixed width or to the batch). The static sequence axis first seen
    in the grader's export came from the named dynamic_axes, fixed in `_export_graph`; this keeps an
    accidental size match from doing the same."""
    fixed = {*batch["pixels"].shape[1:], *batch["tabular"].shape[1:], model.config.embed_dim, model.search_dim,
             model.config.fusion.width, batch["pixels"].shape[0]}
    with torch.no_grad():
        fixed |= set(model.encode_image_for_fusion(batch["pixels"][:1])[1].shape[1:])
    length = batch["input_ids"].shape[1]
    extra = 0
    while length + extra in fixed or length + extra <= 1:
        extra += 1
    if not extra:
        return batch
    pad = model.config.text.pad_token_id
    rows = batch["input_ids"].shape[0]
    padded = dict(batch)
    padding = torch.full((rows, extra), pad, dtype=batch["input_ids"].dtype)
    padded["input_ids"] = torch.cat([batch["input_ids"], padding], 1)
    padded["attention_mask"] = torch.cat(
        [batch["attention_mask"], torch.zeros((rows, extra), dtype=batch["attention_mask"].dtype)], 1
    )
    return padded


def _example_inputs(model: RetinaAlignModel, batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, ...]]:
    """Example inputs of each graph (the grader's: the towers' tokens of the same batch)."""
    batch = _distinct_text_length(model, batch)
    flags = _presence(batch["pixels"].shape[0], mixed=False)
    with torch.no_grad():
        _, image_tokens = model.encode_image_for_fusion(batch["pixels"])
        _, text_tokens = model.encode_text_for_fusion(batch["input_ids"], batch["attention_mask"])
    return {
        IMAGE_ENCODER: (batch["pixels"],),
        TEXT_ENCODER: (batch["input_ids"], batch["attention_mask"]),
        GRADER: (image_tokens, text_tokens, batch["attention_mask"], batch["tabular"], *flags),
    }


INPUT_NAMES = {
    IMAGE_ENCODER: ["pixels"],
    TEXT_ENCODER: ["input_ids", "attention_mask"],
    GRADER: ["image_tokens", "text_tokens", "attention_mask", "tabular", "image_present", "text_present",
             "tabular_present"],
}
OUTPUT_NAMES = {
    IMAGE_ENCODER: ["image_embedding", "image_tokens"],
    TEXT_ENCODER: ["text_embedding", "text_tokens", "text_record_embedding"],
    GRADER: ["icdr_logits", "sdrg_logits", "record_embedding"],
}
DYNAMIC_AXES = {
    "pixels": {0: "batch"},
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "image_tokens": {0: "batch"},
    "text_tokens": {0: "batch", 1: "sequence"},
    "tabular": {0: "batch"},
    "image_present": {0: "batch"},
    "text_present": {0: "batch"},
    "tabular_present": {0: "batch"},
    "image_embedding": {0: "batch"},
    "text_embedding": {0: "batch"},
    "text_record_embedding": {0: "batch"},
    "icdr_logits": {0: "batch"},
    "sdrg_logits": {0: "batch"},
    "record_embedding": {0: "batch"},
}


def _export_graph(
    module: nn.Module, name: str, inputs: tuple[Tensor, ...], out: Path, output_names: list[str] | None = None
) -> None:
    """Export `module` as the graph `name` (its input names from INPUT_NAMES; outputs from OUTPUT_NAMES
    unless given)."""
    outputs = output_names or OUTPUT_NAMES[name]
    # torch.export's own form of the dynamic axes: with dynamic_axes' named dims, the converted shapes of the
    # grader's text_tokens and attention_mask (both "sequence") traced the sequence axis as static.
    dynamic_shapes = tuple(
        {axis: torch.export.Dim.DYNAMIC for axis in DYNAMIC_AXES.get(input_name, {})}
        for input_name in INPUT_NAMES[name]
    )
    torch.onnx.export(
        module,
        inputs,
        str(out / name),
        input_names=INPUT_NAMES[name],
        output_names=outputs,
        dynamic_shapes=dynamic_shapes,
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _ort_feeds(name: str, inputs: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in zip(INPUT_NAMES[name], inputs, strict=True)}


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return (a * b).sum(axis=1)


def _quantize_int8(folder: Path) -> None:
    for name in (IMAGE_ENCODER, TEXT_ENCODER, GRADER):
        source = folder / name
        quantized = folder / f"{name}.int8"
        quantize_int8(source, quantized, per_channel=True, op_types=EXPORT_OP_TYPES)
        os.replace(quantized, source)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _parity(run: LoadedRun, folder: Path, batches: list[dict[str, Tensor]], precision: str) -> ParityReport:
    """ONNX Runtime against PyTorch, end to end as the service runs it: the encoders on raw inputs, the
    grader on the ONNX encoders' tokens, against the PyTorch model on the raw inputs; the grader twice
    (every modality present; each row another subset)."""
    model = run.model
    sessions = {name: _session(folder / name) for name in (IMAGE_ENCODER, TEXT_ENCODER, GRADER)}
    reference: dict[str, list[np.ndarray]] = {}
    exported: dict[str, list[np.ndarray]] = {}

    def keep(names: list[str], torch_out: tuple[Tensor, ...], onnx_out: list[np.ndarray], suffix: str = "") -> None:
        for output, t, o in zip(names, torch_out, onnx_out, strict=True):
            reference.setdefault(output + suffix, []).append(t.float().numpy())
            exported.setdefault(output + suffix, []).append(o)

    for batch in batches:
        pixels, input_ids, tabular = batch["pixels"], batch["input_ids"], batch["tabular"]
        mask = batch["attention_mask"]
        with torch.no_grad():
            image_ref = model.encode_image_for_fusion(pixels)
            text_ref = TextGraph(model)(input_ids, mask)
        image_got = sessions[IMAGE_ENCODER].run(None, {"pixels": pixels.numpy()})
        text_got = sessions[TEXT_ENCODER].run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
        keep(["image_embedding"], image_ref[:1], image_got[:1])
        keep(["text_embedding"], text_ref[:1], text_got[:1])
        keep(["text_record_embedding"], text_ref[2:], text_got[2:])
        for suffix in ("", SUBSET_SUFFIX):
            flags = _presence(pixels.shape[0], mixed=bool(suffix))
            with torch.no_grad():
                torch_out = FullGrader(model)(pixels, input_ids, mask, tabular, *flags)
            feeds = dict(zip(INPUT_NAMES[GRADER], (image_got[1], text_got[1], mask.numpy(), tabular.numpy(),
                                                   *(f.numpy() for f in flags)), strict=True))
            keep(OUTPUT_NAMES[GRADER], torch_out, sessions[GRADER].run(None, feeds), suffix)
    diffs, cosines = {}, {}
    for output in reference:
        ref, got = np.concatenate(reference[output]), np.concatenate(exported[output])
        diffs[output] = float(np.abs(ref - got).max())
        cosines[output] = float(_cosine_rows(ref, got).min())
    report = ParityReport(precision, diffs, cosines, samples=sum(b["pixels"].shape[0] for b in batches))
    texts_ref, images_ref = np.concatenate(reference["text_embedding"]), np.concatenate(reference["image_embedding"])
    texts_got, images_got = np.concatenate(exported["text_embedding"]), np.concatenate(exported["image_embedding"])
    report.recall_at_10_fp32 = instance_recall(texts_ref, images_ref, ks=(10,))["R@10"]
    report.recall_at_10_exported = instance_recall(texts_got, images_got, ks=(10,))["R@10"]
    return report


def _check(report: ParityReport) -> None:
    embeddings = ("image_embedding", "text_embedding", "text_record_embedding", "record_embedding",
                  "record_embedding" + SUBSET_SUFFIX)
    if report.precision == "fp32":
        worst = max(report.max_abs_diff[e] for e in embeddings)
        if worst > FP32_TOLERANCE:
            raise ExportError(f"ONNX Runtime differs from PyTorch by {worst:.2e} > {FP32_TOLERANCE} on embeddings\n"
                              + "\n".join(report.lines()))
    else:
        worst = min(report.min_cosine[e] for e in embeddings)
        if worst < MIN_COSINE:
            raise ExportError(f"{report.precision} embeddings reach cosine {worst:.5f} < {MIN_COSINE} to fp32")
        change = abs((report.recall_at_10_exported or 0) - (report.recall_at_10_fp32 or 0))
        if change > MAX_RECALL_CHANGE:
            raise ExportError(
                f"{report.precision} changes text->image R@10 on val by {change:.4f} > {MAX_RECALL_CHANGE}"
            )


def _calibration_items(batches: list[dict[str, Tensor]]) -> dict[str, list[dict[str, np.ndarray]]]:
    """One feed dict per item for each encoder (a text cut to its own length, as a single query is)."""
    items: dict[str, list[dict[str, np.ndarray]]] = {IMAGE_ENCODER: [], TEXT_ENCODER: []}
    for batch in batches:
        for i in range(batch["pixels"].shape[0]):
            items[IMAGE_ENCODER].append({"pixels": batch["pixels"][i : i + 1].numpy()})
            length = int(batch["attention_mask"][i].sum())
            items[TEXT_ENCODER].append({"input_ids": batch["input_ids"][i : i + 1, :length].numpy(),
                                        "attention_mask": batch["attention_mask"][i : i + 1, :length].numpy()})
    return items


def _openvino_parity(run: LoadedRun, folder: Path, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """Min row cosine to PyTorch fp32 of what the openvino runtime returns from the INT8 IR (the service's
    own `OpenVinoGraph`): each encoder's embedding, and the record embedding of the grader (its fp32 ONNX
    graph on OpenVINO) fed with the IR's tokens, every modality present."""
    model = run.model
    image = OpenVinoGraph(folder / OPENVINO_INT8_IR[IMAGE_ENCODER])
    text = OpenVinoGraph(folder / OPENVINO_INT8_IR[TEXT_ENCODER])
    grader = OpenVinoGraph(folder / GRADER)
    reference: dict[str, list[np.ndarray]] = {}
    exported: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        pixels, input_ids, tabular = batch["pixels"], batch["input_ids"], batch["tabular"]
        mask = batch["attention_mask"]
        flags = _presence(pixels.shape[0], mixed=False)
        with torch.no_grad():
            image_ref = model.encode_image_for_fusion(pixels)[0]
            text_ref, _, text_record_ref = TextGraph(model)(input_ids, mask)
            record_ref = FullGrader(model)(pixels, input_ids, mask, tabular, *flags)[2]
        image_got = image.run({"pixels": pixels.numpy()})
        text_got = text.run({"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
        feeds = dict(zip(INPUT_NAMES[GRADER], (image_got["image_tokens"], text_got["text_tokens"], mask.numpy(),
                                               tabular.numpy(), *(f.numpy() for f in flags)), strict=True))
        record_got = grader.run(feeds)["record_embedding"]
        for name, ref, got in (("image_embedding", image_ref, image_got["image_embedding"]),
                               ("text_embedding", text_ref, text_got["text_embedding"]),
                               ("text_record_embedding", text_record_ref, text_got["text_record_embedding"]),
                               ("record_embedding", record_ref, record_got)):
            reference.setdefault(name, []).append(ref.float().numpy())
            exported.setdefault(name, []).append(got)
    return {name: float(_cosine_rows(np.concatenate(reference[name]), np.concatenate(exported[name])).min())
            for name in reference}


def _export_openvino_int8(
    run: LoadedRun, folder: Path, calibration: list[dict[str, Tensor]], parity: list[dict[str, Tensor]]
) -> OpenVinoInt8:
    """Quantize both encoders of the fp32 ONNX graphs in `folder` into OpenVINO INT8 IR beside them and
    check them (`_openvino_parity`); raises ExportError below MIN_COSINE."""
    items = _calibration_items(calibration)
    for graph, xml in OPENVINO_INT8_IR.items():
        quantize_to_ir(folder / graph, items[graph], folder / xml)
    cosines = _openvino_parity(run, folder, parity)
    samples = sum(b["pixels"].shape[0] for b in parity)
    worst = min(cosines, key=cosines.__getitem__)
    if cosines[worst] < MIN_COSINE:
        measured = ", ".join(f"{name} {cosine:.5f}" for name, cosine in cosines.items())
        raise ExportError(
            f"the OpenVINO INT8 IR reaches cosine {cosines[worst]:.5f} < {MIN_COSINE} to PyTorch fp32 on {worst} "
            f"({measured}; {samples} parity samples): export without --openvino-int8"
        )
    return OpenVinoInt8(graphs=dict(OPENVINO_INT8_IR), min_cosine=cosines, samples=samples,
                        calibration_items=len(items[IMAGE_ENCODER]), quantizer=quantizer_description(),
                        needs_vnni=full_range())


def _batches(builder: BatchBuilder, texts: list[str]) -> list[dict[str, Tensor]]:
    """The split in batches of BATCH rows."""
    size = len(texts)
    return [builder.batch(np.arange(s, min(size, s + BATCH)), texts[s : s + BATCH]) for s in range(0, size, BATCH)]


GATE_FOLDER = "gate"
"""Where a run (or a shipped model) keeps its gradability gate, when it has one."""


def run_gate_folder(run_dir: Path) -> Path | None:
    """The run's own gate folder (`RUN/gate/`), or None when it has none."""
    folder = Path(run_dir) / GATE_FOLDER
    return folder if folder.is_dir() else None


def export_bundle(run_dir: Path, archive_dir: Path, splits_path: Path, out: Path,
                  precision: Precision = "fp32", split: str = "val", openvino_int8: bool = False,
                  gate: Path | None = None, grade_calibration: Calibration | None = None) -> ParityReport:
    """Export a run to a bundle at `out` (written to a temporary folder and moved into place only
    after the parity check passes). Raises ExportError when the check fails.

    `gate`: a trained gradability gate's folder (`retina-train gate fit`), exported as `gate.onnx`; by
    default the run's own `gate/` folder when it has one, else the bundle has no gate.

    `openvino_int8`: also write the encoders as OpenVINO INT8 IR, checked (see the module docstring); fp32
    only (the openvino runtime runs the grader's fp32 graph), and needs the `openvino` extra (ValueError).

    `grade_calibration`: the grade heads' temperatures (`retina-train calibrate`, `training.calibration`) for the
    manifest; ValueError when they were fitted on other weights than the run's."""
    if openvino_int8:
        if precision != "fp32":
            raise ValueError("the OpenVINO INT8 IR goes with precision fp32 (the openvino runtime runs the "
                             f"grader's fp32 ONNX graph), not {precision}")
        if missing_packages():
            raise ValueError(f"the OpenVINO INT8 IR needs {' and '.join(missing_packages())}: {INSTALL}")
    torch.manual_seed(0)
    run = load_run(run_dir)
    if grade_calibration is not None:
        check_weights(grade_calibration, sha256_of(run.files.checkpoint / MODEL_FILE))
    model = run.model.float().eval()
    # The SDPA path of transformers' BERT decides at trace time whether a padding mask is needed (no
    # padding in the example batch: no mask), which a traced graph would then never apply.
    model.text.encoder.set_attn_implementation("eager")
    archive = read_archive(archive_dir)
    splits = load_splits(splits_path)
    ids = (splits.get(split) or splits["train"])[:PARITY_SAMPLES]
    data = split_for_evaluation(archive, ids, run)
    config = model.config
    builder = BatchBuilder(data, run.tokenizer, config.vision.image, config.text.max_length)
    batches = _batches(builder, [stored_narrative(r) for r in data.records])
    calibration: list[dict[str, Tensor]] = []
    if openvino_int8:
        checked = set(ids)
        calibration_ids = [i for i in splits["train"] if i not in checked][:OV_CALIBRATION_ITEMS]
        if not calibration_ids:
            raise ValueError(f"no training-split items outside the {split} parity samples to calibrate "
                             "the OpenVINO INT8 IR on")
        calibration_data = split_for_evaluation(archive, calibration_ids, run)
        calibration_builder = BatchBuilder(calibration_data, run.tokenizer, config.vision.image,
                                           config.text.max_length)
        calibration = _batches(calibration_builder, [stored_narrative(r) for r in calibration_data.records])

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=Path(out).parent))
    try:
        example = _example_inputs(model, batches[0])
        modules = {IMAGE_ENCODER: ImageGraph(model), TEXT_ENCODER: TextGraph(model), GRADER: Grader(model)}
        for name, module in modules.items():
            module.eval()  # the wrappers too: a stem's BatchNorm must export with its running statistics
            _export_graph(module, name, example[name], staging)
        if precision == "int8":
            fp32_report = _parity(run, staging, batches, "fp32")
            _check(fp32_report)
            _quantize_int8(staging)
        report = _parity(run, staging, batches, precision)
        _check(report)
        openvino = _export_openvino_int8(run, staging, calibration, batches) if openvino_int8 else None
        if openvino is not None:
            report.openvino_int8 = openvino.min_cosine
        # The bundle's tokenizer.json carries its truncation and padding (`index.tokens`).
        batch_tokenizer(run.tokenizer, config.text.max_length).save(str(staging / TOKENIZER))
        files = [IMAGE_ENCODER, TEXT_ENCODER, GRADER, TOKENIZER]
        gate_folder = gate if gate is not None else run_gate_folder(Path(run_dir))
        gate_spec = None
        if gate_folder is not None:
            try:
                gate_spec = export_gate(gate_folder, staging, OPSET)
            except (FileNotFoundError, RuntimeError) as error:
                raise ExportError(f"gradability gate: {error}") from None
            files.append(gate_spec.file)
        if openvino is not None:
            files += [file for xml in openvino.graphs.values() for file in (xml, ir_weights(xml))]
        metrics_path = Path(run_dir) / "eval-test" / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            created=now_iso(),
            model_name=config.name,
            model_config=json.loads(config.model_dump_json()),
            precision=precision,
            embedding_dim=run.model.search_dim,
            icdr_names=list(ICDR_NAMES),
            sdrg_names=list(SDRG_NAMES),
            image=config.vision.image,
            text=TextSettings(max_length=config.text.max_length, pad_token_id=config.text.pad_token_id),
            feature_spec=run.spec,
            data_fingerprint=run.info["fingerprint"],
            weights_sha256=sha256_of(run.files.checkpoint / MODEL_FILE),
            metrics=dict(summarise(metrics)),
            calibration=grade_calibration,
            opset=OPSET,
            exporter=EXPORTER,
            files={name: sha256_of(staging / name) for name in files},
            openvino_int8=openvino,
            gate=gate_spec,
        )
        write_manifest(staging, manifest)
        staging.chmod(0o755)
        if Path(out).exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
