"""One graph on one inference engine: ONNX Runtime or OpenVINO, behind the same small interface.

`index.embedder.Embedder` opens each of the bundle's graphs as one of these, and `retina-index bench` times
the OpenVINO one as it is (the service's own code path). Each class takes feeds (input name -> array) and
returns the outputs by name, and says which inputs and outputs the graph has with the static parts of their
shapes (a dynamic dimension is None).

OpenVINO is optional (the `openvino` extra): it is imported only when an `OpenVinoGraph` is made, and its
absence raises `RuntimeUnavailable` naming the extra. No torch here.

Thread-safety: `OnnxRuntimeGraph.run` is ONNX Runtime's `InferenceSession.run`, safe from several threads
at once. `OpenVinoGraph.run` keeps a pool of infer requests (an `AsyncInferQueue` of the compiled model's
optimal size) and lets one call at a time use it, under a lock: a call splits its batch over every request
of the pool, so concurrent calls would only queue for the same CPU streams anyway.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort

from index.cpus import cpu_flags

Runtime = Literal["onnxruntime", "openvino"]
RUNTIMES: tuple[Runtime, ...] = ("onnxruntime", "openvino")
Performance = Literal["latency", "throughput"]
Shape = tuple[int | None, ...]
OPENVINO_INSTALL = "pip install 'retina-align[openvino]'"
OPENVINO_DEVICE = "CPU"


class RuntimeUnavailable(RuntimeError):
    """The chosen inference engine is not installed; the message says how to install it."""


class Graph(Protocol):
    """What `Embedder` needs of one graph on one engine."""

    provider: str
    """What runs the graph: the ONNX Runtime execution provider, or "OpenVINO CPU"."""
    precision: str
    """fp32, or int8 for a quantized graph."""
    inputs: dict[str, Shape]
    outputs: dict[str, Shape]

    @property
    def description(self) -> str:
        """What runs the graph, e.g. "ONNX Runtime CPUExecutionProvider fp32" or "OpenVINO CPU int8"."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on `feeds` (input name -> array); the outputs by name."""
        ...


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""CPU flags of int8 dot-product instructions that do not saturate (VNNI, AMX)."""


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has VNNI or AMX int8 instructions (its /proc/cpuinfo flags; False where unreadable).
    Without them (x86 with AVX2 or AVX-512 only), int8 kernels multiply u8 x s8 pairs into saturating
    16-bit sums, and weights quantized to the full 8-bit range lose accuracy there."""
    return bool(VNNI_FLAGS & (cpu_flags(cpuinfo) or set()))


def static_shape(dims: Sequence[object]) -> Shape:
    """A shape with every dimension that is not a fixed integer (a symbol, -1, None) as None."""
    return tuple(dim if isinstance(dim, int) and dim >= 0 else None for dim in dims)


# --- ONNX Runtime ------------------------------------------------------------------------------------


class OnnxRuntimeGraph:
    """An ONNX graph in an ONNX Runtime `InferenceSession` (full graph optimisation, quiet logs)."""

    def __init__(self, path: Path, providers: Sequence[str], threads: int | None = None, spin: bool = True,
                 precision: str = "fp32") -> None:
        """`providers`: ONNX Runtime execution providers, best first. `threads`: intra-op threads (None: one
        per core). `spin`: let the worker threads spin between runs. `precision`: the graph's, as the bundle
        states it (reported in `description`)."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0
        options.log_severity_level = 3
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.provider: str = self.session.get_providers()[0]
        self.precision = precision
        self.inputs = {item.name: static_shape(item.shape) for item in self.session.get_inputs()}
        self.outputs = {item.name: static_shape(item.shape) for item in self.session.get_outputs()}

    @property
    def description(self) -> str:
        """"ONNX Runtime <execution provider> <precision>"."""
        return f"ONNX Runtime {self.provider} {self.precision}"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`InferenceSession.run` with the outputs by name."""
        return dict(zip(self.outputs, self.session.run(None, dict(feeds)), strict=True))


# --- OpenVINO ----------------------------------------------------------------------------------------


def openvino_module() -> ModuleType:
    """The `openvino` package, or RuntimeUnavailable naming the extra that installs it."""
    try:
        import openvino
    except ImportError as error:
        raise RuntimeUnavailable(
            f"the openvino runtime needs the openvino package, which is not installed ({error}): "
            f"{OPENVINO_INSTALL}"
        ) from None
    return openvino


@functools.cache
def _core() -> Any:  # noqa: ANN401 - openvino.Core, imported lazily
    """One OpenVINO Core per process (it loads the device plugins once)."""
    return openvino_module().Core()


class OpenVinoGraph:
    """An ONNX graph or OpenVINO IR (.xml, its weights in the .bin beside it) compiled for OpenVINO's CPU
    plugin with f32 inference precision: operations a quantized IR leaves unquantized stay fp32 (bf16
    would add its own error to int8's).

    `performance` is OpenVINO's performance hint: "latency" (one stream on every core: the service's single
    queries and small batches) or "throughput" (several streams side by side: batch jobs). A call's batch is
    split evenly over the compiled model's optimal number of infer requests (1 for latency, one per stream
    for throughput), which run in parallel."""

    def __init__(self, path: Path, performance: Performance = "latency", threads: int | None = None) -> None:
        """Read and compile `path`. `threads`: OpenVINO's inference threads (None: its default, every core).
        Raises RuntimeUnavailable without openvino; OpenVINO's own errors for a graph it cannot read."""
        if performance not in ("latency", "throughput"):
            raise ValueError(f"performance must be latency or throughput, not {performance!r}")
        ov = openvino_module()
        core = _core()
        model = core.read_model(str(path))
        config: dict[str, object] = {"PERFORMANCE_HINT": performance.upper(), "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.path = Path(path)
        self.provider = f"OpenVINO {OPENVINO_DEVICE}"
        self.performance = performance
        self.precision = "int8" if any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) else "fp32"
        self.compiled = core.compile_model(model, OPENVINO_DEVICE, config)
        self.inputs = {port.get_any_name(): _ov_shape(port) for port in self.compiled.inputs}
        self.outputs = {port.get_any_name(): _ov_shape(port) for port in self.compiled.outputs}
        self.requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self._queue.set_callback(self._done)
        self._results: dict[int, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        """"OpenVINO CPU <precision>"."""
        return f"{self.provider} {self.precision}"

    def _done(self, request: Any, chunk: int) -> None:  # noqa: ANN401 - openvino.InferRequest
        """The queue's callback: keep a copy of a finished request's outputs (the request is reused)."""
        self._results[chunk] = {name: request.get_tensor(name).data.copy() for name in self.outputs}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the batch in `feeds` as up to `requests` parallel infer requests; the outputs by name."""
        rows = int(next(iter(feeds.values())).shape[0])
        if rows == 0:
            raise ValueError("an empty batch")
        size = math.ceil(rows / self.requests)
        starts = range(0, rows, size)
        with self._lock:
            self._results = {}
            try:
                for chunk, start in enumerate(starts):
                    self._queue.start_async({name: value[start : start + size] for name, value in feeds.items()},
                                            userdata=chunk)
            finally:  # even when a start failed: no request of this call may finish into the next call's results
                self._queue.wait_all()
            parts = [self._results[chunk] for chunk in range(len(starts))]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in self.outputs}


def _ov_shape(port: Any) -> Shape:  # noqa: ANN401 - openvino.Output
    """The static parts of an OpenVINO port's shape (dynamic dimensions as None)."""
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        return ()
    return tuple(dim.get_length() if dim.is_static else None for dim in shape)
