"""Embedding benchmark: images/s and texts/s of the image and text towers per engine, with cosine to fp32
and the roofline limit, for random-init models.

The PyTorch half (eager fp32 and bf16 autocast, FLOPs per item, bf16 matmul GFLOP/s, the ONNX export)
runs in a subprocess, `retina-train bench-embed`, because `index/` never imports torch; it is skipped
when torch is not installed. This half times the exported graphs with ONNX Runtime (fp32; int8 dynamic
quantization per tensor and per channel; the transformer optimizer, alone and before int8; IO binding)
and, when installed, OpenVINO (fp32, bf16, and INT8 after NNCF post-training quantization), all against
the same inputs and the same PyTorch fp32 embeddings. The INT8 IR is also timed through the service's own
code path, `index.runtimes.OpenVinoGraph`, with the latency hint `retina-serve` uses and the throughput
hint of `retina-index build` ("Embedder OpenVINO INT8" rows).

ONNX Runtime has no bf16 path on x86 CPUs: its CPU execution provider registers no bf16 arithmetic
kernel (onnxruntime#28768; its bf16 "fastmath" GEMM is arm64-only), so its reduced-precision options here
are int8.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from index import cpus
from index.cpus import available_cpus, cpu_flags
from index.quantize import quantize_int8

if TYPE_CHECKING:
    from index.runtimes import Performance

MIN_COSINE = 0.999
TARGETS: dict[tuple[str, str], float] = {("paper", "image"): 40.0, ("paper", "text"): 60.0}
"""items/s targets (at cosine >= MIN_COSINE to fp32) on the issue's 2-core CPU."""
MATMUL_SIZE = 2048
PEAK_ROUNDS = 4
OUTPUT_NAMES = {"image": "image_embedding", "text": "text_embedding"}
OPTIMIZER_LEVEL = 2
"""ORT's extended (hardware-independent) graph optimizations run before the Python fusions."""
OV_REQUEST_ITEMS = 8
"""OpenVINO runs a batch as asynchronous requests of this many items (2 requests of 8 for a batch of 16)."""

log = logging.getLogger(__name__)


def has_module(name: str) -> bool:
    """Whether `name` can be imported here (False also when an import hook refuses to look)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --- machine -------------------------------------------------------------------------------------


def cpu_threads() -> int:
    """CPUs this process may run on."""
    return available_cpus()


def cpu_model() -> str:
    """The CPU's model name, and which of the matrix extensions that matter here it has."""
    flags = cpu_flags() or set()
    wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    present = [f for f in wanted if f in flags]
    return f"{cpus.cpu_model()} ({', '.join(present) or 'no AVX-512'})"


def throughput(call: Callable[[], object], items: int, seconds: float, min_repeats: int = 2) -> tuple[float, int]:
    """(items/s, calls timed): one untimed warm-up call, then calls until `seconds` have passed (at least
    `min_repeats`)."""
    call()
    repeats = 0
    started = time.perf_counter()
    while repeats < min_repeats or time.perf_counter() - started < seconds:
        call()
        repeats += 1
    return items * repeats / (time.perf_counter() - started), repeats


def peak_rate(call: Callable[[], object], seconds: float, rounds: int = PEAK_ROUNDS) -> float:
    """Calls/s of the best of `rounds` short timings (a peak: the rounds that other processes slowed
    down are discarded)."""
    return max(throughput(call, 1, seconds / rounds, min_repeats=2)[0] for _ in range(rounds))


def numpy_matmul_gflops(size: int = MATMUL_SIZE, seconds: float = 1.0) -> float:
    """Measured fp32 GFLOP/s (2 per multiply-add) of a square numpy matmul (its BLAS, all threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    return 2.0 * size**3 * peak_rate(lambda: a @ b, seconds) / 1e9


def int8_matmul_gflops(size: int = MATMUL_SIZE, seconds: float = 1.0) -> float | None:
    """Measured int8 GOP/s (2 per multiply-add) of ONNX Runtime's MatMulInteger (uint8 x int8, the kernel
    its dynamic quantization uses); None without the `onnx` package to build the graph."""
    if not has_module("onnx"):
        return None
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 127, (size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "matmul_int8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), _ort_options(), providers=["CPUExecutionProvider"])
    feeds = {"a": rng.integers(0, 255, (size, size), dtype=np.uint8)}
    return 2.0 * size**3 * peak_rate(lambda: session.run(None, feeds), seconds) / 1e9


def roofline(gflops_per_second: float | None, gflop_per_item: float) -> float | None:
    """The compute limit in items/s: measured matmul GFLOP/s of the engine's precision / GFLOP per item."""
    if gflops_per_second is None or gflop_per_item <= 0:
        return None
    return gflops_per_second / gflop_per_item


def target_status(model: str, tower: str, items_per_second: float | None, cosine: float | None) -> str:
    """"met" / "not met" against the issue's target for this model and tower; "-" where none is set or the
    engine did not run."""
    target = TARGETS.get((model, tower))
    if target is None or items_per_second is None or cosine is None:
        return "-"
    return "met" if items_per_second >= target and cosine >= MIN_COSINE else "not met"


# --- results -------------------------------------------------------------------------------------


@dataclass
class EmbedRow:
    """One engine on one tower of one model."""

    model: str
    tower: str
    engine: str
    precision: str
    items_per_second: float | None
    min_cosine: float | None
    gflop_per_item: float
    roofline_items_per_second: float | None
    target: str
    note: str = ""

    def to_json(self) -> dict[str, object]:
        """The numbers, for the JSON report."""
        return asdict(self)


@dataclass
class Tower:
    """One exported tower with its inputs and PyTorch fp32 reference embeddings."""

    model: str
    name: str
    onnx: Path
    feeds: dict[str, np.ndarray]
    reference: np.ndarray
    gflop_per_item: float
    text_heads: int = 0
    text_hidden: int = 0
    openvino_int8: Path | None = None
    openvino_int8_note: str = ""

    @property
    def batch(self) -> int:
        """Items per batch."""
        return int(next(iter(self.feeds.values())).shape[0])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine between two (N, D) arrays."""
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return float((a * b).sum(axis=1).min())


@dataclass
class EngineResult:
    """What timing one engine gave (items/s None when it could not run; the note says why)."""

    engine: str
    precision: str
    items_per_second: float | None
    min_cosine: float | None
    note: str = ""


# --- ONNX Runtime --------------------------------------------------------------------------------


def _ort_options():  # noqa: ANN202 - onnxruntime is imported lazily
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = cpu_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _ort_session(path: Path):  # noqa: ANN202
    import onnxruntime as ort

    return ort.InferenceSession(str(path), _ort_options(), providers=["CPUExecutionProvider"])


def time_ort(tower: Tower, path: Path, engine: str, precision: str, seconds: float, io_binding: bool = False,
             note: str = "") -> EngineResult:
    """Time one ONNX graph with ONNX Runtime's CPU provider on the tower's batch."""
    session = _ort_session(path)
    if io_binding:
        output = np.empty_like(tower.reference)
        binding = session.io_binding()
        for name, value in tower.feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(OUTPUT_NAMES[tower.name], "cpu", 0, np.float32, list(output.shape),
                            output.ctypes.data)

        def call() -> None:
            session.run_with_iobinding(binding)

        call()
        got = output.copy()
    else:

        def call() -> None:
            session.run(None, tower.feeds)

        got = session.run(None, tower.feeds)[0]
    rate, _ = throughput(call, tower.batch, seconds)
    return EngineResult(engine, precision, rate, min_cosine(got, tower.reference), note)


def transformer_optimize(tower: Tower, target: Path) -> tuple[Path, str]:
    """ONNX Runtime's transformer optimizer (attention, LayerNorm and GELU fusion); returns the graph and
    the fused operators it reports."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = "bert" if tower.name == "text" else "vit"
    heads, hidden = (tower.text_heads, tower.text_hidden) if tower.name == "text" else (0, 0)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # it prints shape-inference failures
        optimized = optimize_model(str(tower.onnx), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                   opt_level=OPTIMIZER_LEVEL)
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(target))
    note = ", ".join(f"{k} {v}" for k, v in sorted(fused.items())) or "nothing fused"
    if not any("Attention" in k for k in fused):
        note += "; attention not fused (no pattern it knows in the dynamo export)"
    return target, note


def ort_engines(tower: Tower, workdir: Path, seconds: float, progress: Callable[[str], None]) -> list[EngineResult]:
    """Every ONNX Runtime option tried on one tower (see the module docstring)."""
    results: list[EngineResult] = []
    stem = workdir / f"{tower.model}-{tower.name}"

    def attempt(label: str, make: Callable[[], EngineResult]) -> None:
        progress(label)
        try:
            results.append(make())
        except Exception as error:  # noqa: BLE001 - one failing engine must not end the benchmark
            log.warning("%s failed: %s", label, error)
            results.append(EngineResult(label, "", None, None, f"failed: {type(error).__name__}: {error}"[:160]))

    attempt("ORT fp32", lambda: time_ort(tower, tower.onnx, "ORT fp32", "fp32", seconds))
    if not has_module("onnx"):
        results.append(EngineResult("ORT int8 dynamic", "int8", None, None, "skipped: the onnx package is missing"))
        return results
    int8 = stem.with_suffix(".int8.onnx")
    attempt("ORT int8 dynamic", lambda: time_ort(tower, quantize_int8(tower.onnx, int8), "ORT int8 dynamic",
                                                  "int8", seconds, note="per-tensor 7-bit weights"))
    attempt("ORT int8 dynamic + IO binding",
            lambda: time_ort(tower, int8, "ORT int8 dynamic + IO binding", "int8", seconds, io_binding=True))
    attempt("ORT int8 dynamic per-channel",
            lambda: time_ort(tower, quantize_int8(tower.onnx, stem.with_suffix(".int8pc.onnx"), per_channel=True),
                             "ORT int8 dynamic per-channel", "int8", seconds))
    optimized: dict[str, tuple[Path, str]] = {}

    def optimized_fp32() -> EngineResult:
        optimized["graph"] = transformer_optimize(tower, stem.with_suffix(".opt.onnx"))
        path, fused = optimized["graph"]
        return time_ort(tower, path, "ORT fp32 + transformer optimizer", "fp32", seconds, note=fused)

    attempt("ORT fp32 + transformer optimizer", optimized_fp32)
    if "graph" in optimized:
        path = optimized["graph"][0]
        attempt("ORT int8 dynamic + transformer optimizer",
                lambda: time_ort(tower, quantize_int8(path, stem.with_suffix(".opt.int8.onnx"), optimized=True),
                                 "ORT int8 dynamic + transformer optimizer", "int8", seconds))
    return results


# --- OpenVINO (optional) -------------------------------------------------------------------------


def _ov_batches(feeds: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    total = int(next(iter(feeds.values())).shape[0])
    return [{k: v[s : s + size] for k, v in feeds.items()} for s in range(0, total, size)]


def time_openvino(compiled, tower: Tower, engine: str, precision: str, seconds: float,  # noqa: ANN001
                  note: str = "") -> EngineResult:
    """Time a compiled OpenVINO model: the batch as asynchronous requests of `OV_REQUEST_ITEMS`."""
    import openvino as ov

    chunks = _ov_batches(tower.feeds, OV_REQUEST_ITEMS)
    outputs: list[np.ndarray | None] = [None] * len(chunks)
    queue = ov.AsyncInferQueue(compiled, len(chunks))

    def done(request, index: int) -> None:  # noqa: ANN001
        outputs[index] = request.get_output_tensor(0).data.copy()

    queue.set_callback(done)

    def call() -> None:
        for index, chunk in enumerate(chunks):
            queue.start_async(chunk, userdata=index)
        queue.wait_all()

    call()
    got = np.concatenate([o for o in outputs if o is not None])
    rate, _ = throughput(call, tower.batch, seconds)
    return EngineResult(engine, precision, rate, min_cosine(got, tower.reference), note)


def openvino_engines(tower: Tower, seconds: float, progress: Callable[[str], None]) -> list[EngineResult]:
    """OpenVINO on the same ONNX graph: fp32, bf16 (where the CPU has bf16 instructions), and INT8 after
    NNCF post-training quantization (done by `retina-train bench-embed`, calibrated on other inputs)."""
    if not has_module("openvino"):
        return [EngineResult("OpenVINO", "", None, None, "skipped: openvino is not installed")]
    import openvino as ov

    core = ov.Core()
    capabilities = set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    model = core.read_model(str(tower.onnx))
    results: list[EngineResult] = []
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        label = f"OpenVINO {precision}"
        if precision == "bf16" and "BF16" not in capabilities:
            results.append(EngineResult(label, precision, None, None, "skipped: the CPU has no bf16 support"))
            continue
        progress(label)
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "THROUGHPUT"}
        results.append(time_openvino(core.compile_model(model, "CPU", config), tower, label, precision, seconds))
    label = "OpenVINO INT8 (NNCF)"
    if tower.openvino_int8 is None:
        results.append(EngineResult(label, "int8", None, None, tower.openvino_int8_note))
        return results
    progress(label)
    quantized = core.read_model(str(tower.openvino_int8))
    # Operations left unquantized run in f32 (bf16 would add its own error to int8's).
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"}
    results.append(time_openvino(core.compile_model(quantized, "CPU", config), tower, label, "int8", seconds,
                                 tower.openvino_int8_note))
    for performance, user in (("latency", "retina-serve"), ("throughput", "retina-index build")):
        label = f"Embedder OpenVINO INT8 ({performance})"
        progress(label)
        results.append(time_embedder_graph(tower, tower.openvino_int8, label, performance,
                                           f"index.runtimes.OpenVinoGraph as {user} runs it", seconds))
    return results


def time_embedder_graph(tower: Tower, path: Path, engine: str, performance: Performance, note: str,
                        seconds: float) -> EngineResult:
    """Time the service's own code path: `index.runtimes.OpenVinoGraph` (what `Embedder` runs with runtime
    openvino) on `path`, one call per batch, with OpenVINO's `performance` hint."""
    from index.runtimes import OpenVinoGraph

    graph = OpenVinoGraph(path, performance)
    got = graph.run(tower.feeds)[OUTPUT_NAMES[tower.name]]
    rate, _ = throughput(lambda: graph.run(tower.feeds), tower.batch, seconds)
    note = f"{note}; {graph.requests} request(s) per batch"
    return EngineResult(engine, graph.precision, rate, min_cosine(got, tower.reference), note)


# --- the PyTorch half ----------------------------------------------------------------------------


def torch_available() -> bool:
    """Whether torch is installed (the PyTorch rows and the ONNX export need it)."""
    return has_module("torch")


def run_torch_half(model: str, out_dir: Path, batch_size: int, seconds: float) -> dict:
    """Run `retina-train bench-embed` for `model` in a subprocess; returns its JSON report."""
    report = out_dir / "report.json"
    command = [sys.executable, "-m", "training.cli", "bench-embed", "--config", model, "--out-dir", str(out_dir),
               "--json", str(report), "--batch-size", str(batch_size), "--seconds", str(seconds)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not report.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"`retina-train bench-embed --config {model}` failed (exit {result.returncode}):\n{tail}")
    return json.loads(report.read_text())


def towers_from_report(report: dict) -> list[Tower]:
    """The exported towers named in a `bench-embed` report, with their inputs and references."""
    data = np.load(report["inputs"])
    feeds = {
        "image": {"pixels": data["pixels"]},
        "text": {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]},
    }
    towers = []
    for name, tower in report["towers"].items():
        if "onnx" not in tower:
            continue
        towers.append(Tower(
            model=report["config"], name=name, onnx=Path(tower["onnx"]), feeds=feeds[name],
            reference=data[f"{name}_reference"], gflop_per_item=float(tower["gflop_per_item"]),
            text_heads=int(report.get("text_heads", 0)), text_hidden=int(report.get("text_hidden", 0)),
            openvino_int8=Path(tower["openvino_int8"]) if tower.get("openvino_int8") else None,
            openvino_int8_note=str(tower.get("openvino_int8_note", "")),
        ))
    return towers


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence ONNX Runtime's and the quantizer's warnings while the engines are prepared and timed."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    names = ("onnxruntime", "root")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


# --- one model, all engines ---------------------------------------------------------------------


@dataclass
class ModelBench:
    """Every engine measured on both towers of one model."""

    model: str
    report: dict
    results: dict[str, list[EngineResult]]
    gflop_per_item: dict[str, float]


def bench_model(
    model: str, workdir: Path, batch_size: int, seconds: float, progress: Callable[[str], None]
) -> ModelBench:
    """The PyTorch half in a subprocess (eager rows, FLOPs, ONNX export), then ONNX Runtime and OpenVINO
    on the exported towers. Needs torch (`torch_available`)."""
    out_dir = workdir / model
    progress(f"{model}: PyTorch eager fp32 / bf16, FLOPs, ONNX export (subprocess)")
    report = run_torch_half(model, out_dir, batch_size, seconds)
    results: dict[str, list[EngineResult]] = {}
    gflop: dict[str, float] = {}
    for name, tower in report["towers"].items():
        gflop[name] = float(tower["gflop_per_item"])
        results[name] = [
            EngineResult(e["engine"], e["precision"], e["items_per_second"], e["min_cosine"])
            for e in tower["engines"]
        ]
    with quiet_logs():
        for tower in towers_from_report(report):
            def step(label: str, tower: Tower = tower) -> None:
                progress(f"{model} {tower.name}: {label}")

            results[tower.name] += ort_engines(tower, out_dir, seconds, step)
            results[tower.name] += openvino_engines(tower, seconds, step)
    return ModelBench(model, report, results, gflop)


def embed_rows(bench: ModelBench, peaks: dict[str, float | None]) -> list[EmbedRow]:
    """Table rows of one model: each engine with its roofline (the measured matmul GFLOP/s of its
    precision, `peaks`, over the tower's GFLOP per item) and the target check."""
    rows = []
    for tower, results in bench.results.items():
        gflop = bench.gflop_per_item[tower]
        for result in results:
            rows.append(EmbedRow(
                model=bench.model, tower=tower, engine=result.engine, precision=result.precision,
                items_per_second=result.items_per_second, min_cosine=result.min_cosine, gflop_per_item=gflop,
                roofline_items_per_second=roofline(peaks.get(result.precision), gflop),
                target=target_status(bench.model, tower, result.items_per_second, result.min_cosine),
                note=result.note,
            ))
    return rows
