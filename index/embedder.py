"""The bundle's models on ONNX Runtime or OpenVINO: photographs, texts and records -> embeddings and grades.

Used by the index builder (`retina-index build`) and the service. Everything that turns raw input into
model input comes from the bundle: image size and normalisation (`index.preprocess` with
`manifest.image`), the tokenizer (`tokenizer.json` through the `tokenizers` library, truncated
to `manifest.text.max_length` and padded with `manifest.text.pad_token_id`, which gives the ids the
training tokenizer gave) and the tabular feature spec (`manifest.feature_spec`). No torch here.

Runtimes (`index.runtimes`): "onnxruntime" (the default) runs the three ONNX graphs in ONNX Runtime.
Execution providers: CUDA first when onnxruntime offers it and `device` is not "cpu", else CPU. What is
reported (`Embedder.providers`) is what each session actually runs on: onnxruntime-gpu silently falls
back to CPU when the CUDA libraries do not match, and that fallback is logged as a warning.
"openvino" (the `openvino` extra; CPU only) runs the encoders' OpenVINO INT8 IR when the bundle has it
(`retina-train export --openvino-int8`) and this CPU runs it exactly (an IR with full-range 8-bit weights
needs VNNI), else their fp32 ONNX graphs on OpenVINO (with a note in `notes`), and the grader's fp32 ONNX
graph on OpenVINO too. `Embedder.runtimes` says per graph what runs it (e.g.
"OpenVINO CPU int8").

Calibration: when the manifest has one (`Manifest.calibration`, `retina-train calibrate`), every grade's
probabilities are softmax(logits / T) with the head's temperature, plus the per-grade decision offsets b,
softmax(logits / T + b), where the calibration has them; `Embedder.calibrated` and `Grades.calibrated` say so;
otherwise softmax(logits).

Thread-safety: after `__init__` an `Embedder` holds only read-only state (the graphs, whose `run` is
thread-safe, see `index.runtimes`, and a configured tokenizer), so one instance may serve several threads
at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

from index.bundle import GRADER, IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER, BundleError, Manifest, read_manifest
from index.cpus import available_cpus
from index.gate import Gradability, assess, fundus_layout
from index.preprocess import ImageSpec, batch_model_inputs
from index.records import ICDR_NAMES, REFERABLE_ICDR, SDRG_NAMES, Against, FundusRecord
from index.runtimes import (
    RUNTIMES,
    Graph,
    OnnxRuntimeGraph,
    OpenVinoGraph,
    Performance,
    Runtime,
    cpu_has_vnni,
    openvino_module,
)
from index.tokens import configure_tokenizer, configured_as

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GRAPHS = (IMAGE_ENCODER, TEXT_ENCODER, GRADER)

Device = Literal["auto", "cpu", "cuda"]
Structured = FundusRecord | Mapping[str, object]


@dataclass(frozen=True)
class TextEmbedding:
    """Embeddings of texts (against photographs and against records), and which texts were cut to the
    model's maximum length."""

    vectors: np.ndarray  # (N, D) float32, L2-normalised: searches photographs
    truncated: list[bool]  # True where the text had more than max_length tokens (the rest was ignored)
    record_vectors: np.ndarray | None = None  # (N, D): searches records; None: `vectors` do both

    def against(self, target: Against) -> np.ndarray:
        """The vectors that search `target` ("image" or "record")."""
        return self.record_vectors if target == "record" and self.record_vectors is not None else self.vectors


@dataclass(frozen=True)
class Grades:
    """ICDR and SDRG grade probabilities (and the record embedding) from the modalities given.

    `referable` is the argmax ICDR grade >= 2 (moderate NPDR or worse): the rule the evaluation's
    referable sensitivity and specificity are measured with. `referable_probability` is
    P(ICDR >= 2) = P(2) + P(3) + P(4), the score its AUROC is measured with. `calibrated`: the probabilities
    are softmax(logits / T) with the bundle's temperatures (`Manifest.calibration`), else softmax(logits).
    """

    icdr_probabilities: np.ndarray  # (5,)
    sdrg_probabilities: np.ndarray  # (5,)
    record_embedding: np.ndarray  # (D,) the fused CLS of the given modalities, projected and normalised
    modalities: list[str]  # of "image", "text", "structured"
    image_embedding: np.ndarray | None = None  # (D,) the photograph's search vector, when one was given
    icdr_names: tuple[str, ...] = ICDR_NAMES
    sdrg_names: tuple[str, ...] = SDRG_NAMES
    calibrated: bool = False  # the probabilities are temperature-scaled (the bundle's `calibration`)
    text_truncated: bool = False
    gradability: Gradability | None = None  # the gate's answer on the photograph (None: no photograph or no gate)

    @property
    def icdr_grade(self) -> int:
        """The most probable ICDR grade (0-4)."""
        return int(np.argmax(self.icdr_probabilities))

    @property
    def sdrg_grade(self) -> int:
        """The most probable SDRG grade (0-4)."""
        return int(np.argmax(self.sdrg_probabilities))

    @property
    def icdr_name(self) -> str:
        """The name of the most probable ICDR grade."""
        return self.icdr_names[self.icdr_grade]

    @property
    def sdrg_name(self) -> str:
        """The name of the most probable SDRG grade."""
        return self.sdrg_names[self.sdrg_grade]

    @property
    def referable_probability(self) -> float:
        """P(ICDR >= 2)."""
        return float(self.icdr_probabilities[REFERABLE_ICDR:].sum())

    @property
    def referable(self) -> bool:
        """Referable DR: the most probable ICDR grade is 2 or more."""
        return self.icdr_grade >= REFERABLE_ICDR


@dataclass(frozen=True)
class SearchQuery:
    """One query through its tower once: the search vector, and the grades fused from the same pass."""

    vector: np.ndarray  # (D,) float32, L2-normalised: searches photographs (and records, without the next)
    grades: Grades
    truncated: bool = False  # a text cut to the model's max_length
    record_vector: np.ndarray | None = None  # (D,) a text's own vector against records (its record head)

    def against(self, target: Against) -> np.ndarray:
        """The vector that searches `target` ("image" or "record")."""
        return self.record_vector if target == "record" and self.record_vector is not None else self.vector


@dataclass(frozen=True)
class RecordEmbeddings:
    """Archive records (photograph + structured data) through the image tower once and the grader."""

    image_vectors: np.ndarray  # (N, D) what the photographs show
    record_vectors: np.ndarray  # (N, D) photograph + structured data, fused
    icdr: np.ndarray  # (N, 5) probabilities
    sdrg: np.ndarray  # (N, 5)


@dataclass(frozen=True)
class _TowerOutput:
    vectors: np.ndarray  # (N, D)
    tokens: np.ndarray  # (N, T, W) for the grader
    record_vectors: np.ndarray | None = None  # (N, D) a text's embedding against records, where the graph has one


@dataclass(frozen=True)
class Tokens:
    """Text encoder input: ids and mask padded to the longest text, and which texts were truncated."""

    input_ids: np.ndarray  # (N, L) int64
    attention_mask: np.ndarray  # (N, L) int64
    truncated: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class GradeInput:
    """What one grading request gives: any subset of a photograph, a clinical text and structured data."""

    image: Image.Image | None = None
    text: str | None = None
    structured: Structured | None = None

    @property
    def modalities(self) -> list[str]:
        """The modalities given, of "image", "text", "structured"."""
        given = (("image", self.image), ("text", self.text), ("structured", self.structured))
        return [name for name, value in given if value is not None]


def is_valid_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (U+D800..U+DFFF), which no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stability, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def choose_providers(device: Device) -> list[str]:
    """The execution providers to ask ONNX Runtime for, best first."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ValueError(
            f"device 'cuda' asked for, but this onnxruntime offers only {available}: install onnxruntime-gpu "
            "(the `gpu` extra) in place of onnxruntime, or use device 'auto' or 'cpu'"
        )
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class Embedder:
    """A bundle's three graphs (image encoder, text encoder, grader) on one runtime, its tokenizer and its
    specs."""

    def __init__(
        self, bundle: Path, device: Device = "auto", threads: int | None = None, spin: bool = True,
        runtime: Runtime = "onnxruntime", performance: Performance = "latency",
    ) -> None:
        """Load and verify the bundle at `bundle` (checksums, schema) and open its graphs.

        `threads`: intra-op threads per graph (None: the CPUs this process may use,
        `index.cpus.available_cpus`, which respects taskset and container CPU quotas).
        `spin`: let ONNX Runtime's worker threads spin between runs: the lowest latency when nothing else
        needs the cores (batch jobs); off in the service, whose event loop and searches share them.
        `runtime`: "onnxruntime" or "openvino" (CPU only; see the module docstring).
        `performance`: OpenVINO's performance hint, "latency" (the service) or "throughput" (batch builds);
        ONNX Runtime ignores it.
        Raises BundleError for a bad bundle, ValueError for a bad device or runtime, RuntimeUnavailable
        for runtime "openvino" without openvino installed (`index.runtimes.RuntimeUnavailable`).
        """
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be {' or '.join(RUNTIMES)}, not {runtime!r}")
        self.bundle = Path(bundle)
        self.manifest: Manifest = read_manifest(self.bundle)
        self.fingerprint: str = self.manifest.fingerprint
        self.dim: int = self.manifest.embedding_dim
        self.image_spec: ImageSpec = self.manifest.image
        self.max_length: int = self.manifest.text.max_length
        self.runtime: Runtime = runtime
        self.threads: int = threads or available_cpus()
        self.notes: list[str] = []
        """What an operator should know about how the graphs run (e.g. no OpenVINO IR in the bundle)."""
        if runtime == "openvino":
            self._graphs = self._open_openvino(device, self.threads, performance)
        else:
            self._graphs = self._open_onnxruntime(device, self.threads, spin)
        self.providers: dict[str, str] = {name: graph.provider for name, graph in self._graphs.items()}
        """What each graph runs on: the ONNX Runtime execution provider, or "OpenVINO CPU"."""
        self.runtimes: dict[str, str] = {name: graph.description for name, graph in self._graphs.items()}
        """What runs each graph, with its precision: e.g. "ONNX Runtime CPUExecutionProvider fp32",
        "OpenVINO CPU int8"."""
        self.calibrated: bool = self.manifest.calibration is not None
        """Whether the grade probabilities are calibrated: softmax(logits / T) with the manifest's temperatures."""
        calibration = self.manifest.calibration
        self.temperatures: tuple[float, float] = (
            (calibration.icdr_temperature, calibration.sdrg_temperature) if calibration else (1.0, 1.0)
        )
        """(ICDR, SDRG) temperatures the grader's logits are divided by (1.0, 1.0 when uncalibrated)."""
        self.offsets: dict[str, np.ndarray] | None = (
            {head: np.asarray(calibration.offsets_of(head), np.float64) for head in ("icdr", "sdrg")}
            if calibration is not None and calibration.offsets is not None else None
        )
        """Head -> the decision offsets added after the temperature (None: the calibration has none)."""
        self._tabular_width = self.manifest.feature_spec.width
        self._image_token_shape = self._token_shape("image_tokens")
        self._text_token_shape = self._token_shape("text_tokens")
        self._tokenizer = self._load_tokenizer()

    def _open_onnxruntime(self, device: Device, threads: int | None, spin: bool) -> dict[str, Graph]:
        """The three ONNX graphs in ONNX Runtime, on CUDA when asked for or available."""
        wanted = choose_providers(device)
        graphs: dict[str, Graph] = {}
        for name in self._graph_names():
            precision = self.manifest.precision if name in GRAPHS else "fp32"  # the gate is never quantized
            try:
                graph = OnnxRuntimeGraph(self.bundle / name, wanted, threads, spin, precision)
            except Exception as error:  # onnxruntime raises its own exception types for a bad graph
                raise BundleError(f"{self.bundle}: ONNX Runtime cannot load {name}: {error}") from None
            graphs[name] = graph
            if wanted[0] == CUDA and graph.provider != CUDA:
                log.warning(
                    "%s: CUDA was %s but ONNX Runtime runs on %s (CUDA/cuDNN libraries missing or mismatched?)",
                    name, "asked for" if device == "cuda" else "available", graph.provider,
                )
        return graphs

    def _open_openvino(self, device: Device, threads: int | None, performance: Performance) -> dict[str, Graph]:
        """The encoders' OpenVINO INT8 IR where the bundle has it (else their ONNX graphs) and the grader's
        ONNX graph, compiled by OpenVINO for the CPU."""
        if device not in ("auto", "cpu"):
            raise ValueError(f"the openvino runtime runs on the CPU: use device auto or cpu, not {device!r}")
        if performance not in ("latency", "throughput"):
            raise ValueError(f"performance must be latency or throughput, not {performance!r}")
        openvino_module()  # RuntimeUnavailable, naming the extra, before anything is read
        ir = self.manifest.openvino_int8.graphs if self.manifest.openvino_int8 else {}
        if not ir:
            self.notes.append(
                "runtime openvino: this bundle has no OpenVINO INT8 IR (export it with `retina-train export "
                "--openvino-int8`), so the encoders run their fp32 ONNX graphs on OpenVINO"
            )
            log.warning("%s", self.notes[-1])
        elif self.manifest.openvino_int8 and self.manifest.openvino_int8.needs_vnni and not cpu_has_vnni():
            ir = {}
            self.notes.append(
                "runtime openvino: this bundle's OpenVINO INT8 IR has full-range 8-bit weights (exported on a CPU "
                "with VNNI), which saturate on this CPU without VNNI, so the encoders run their fp32 ONNX graphs on "
                "OpenVINO; export with --openvino-int8 on a CPU without VNNI for an IR with 7-bit weights"
            )
            log.warning("%s", self.notes[-1])
        graphs: dict[str, Graph] = {}
        for name in self._graph_names():
            file = ir.get(name, name)
            try:
                graphs[name] = OpenVinoGraph(self.bundle / file, performance, threads)
            except Exception as error:  # openvino raises its own exception types for a bad graph
                raise BundleError(f"{self.bundle}: OpenVINO cannot load {file}: {error}") from None
        return graphs

    def _graph_names(self) -> tuple[str, ...]:
        """The graphs to open: the three of every bundle, and the gate where the bundle has one."""
        return (*GRAPHS, self.manifest.gate.file) if self.manifest.gate else GRAPHS

    # --- public API -------------------------------------------------------------------------------

    @property
    def has_gate(self) -> bool:
        """Whether the bundle has a gradability gate (`index.gate`)."""
        return self.manifest.gate is not None

    def check_gradability(self, images: Sequence[Image.Image]) -> list[Gradability]:
        """Photographs -> the gate's answer for each: a fundus photograph? gradable? why not?
        Raises ValueError when the bundle has no gate (`has_gate`)."""
        spec = self.manifest.gate
        if spec is None:
            raise ValueError(f"{self.bundle}: this bundle has no gradability gate (export a run with a gate)")
        if not images:
            return []
        out = self._graphs[spec.file].run({"pixels": batch_model_inputs(images, spec.image)})
        layouts = [fundus_layout(image) for image in images] if spec.layout_rule else None
        return assess(out["gate_probabilities"], spec, layouts)


    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Photographs (RGB PIL images, e.g. from `index.preprocess.decode_image`) -> (N, D) float32,
        L2-normalised, preprocessed with the bundle's image spec."""
        _check_batch_size(batch_size)
        chunks = [
            self._run_image(batch_model_inputs(images[start : start + batch_size], self.image_spec)).vectors
            for start in range(0, len(images), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def embed_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Already preprocessed pixels (N, 3, S, S) (`index.preprocess.to_model_input`) -> (N, D) float32."""
        _check_batch_size(batch_size)
        pixels = self._check_pixels(pixels)
        chunks = [self._run_image(pixels[start : start + batch_size]).vectors
                  for start in range(0, len(pixels), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def grade_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Already preprocessed pixels (N, 3, S, S) (`index.preprocess.to_model_input`) -> (ICDR (N, 5), SDRG
        (N, 5)) probabilities from the photograph alone, in batches of `batch_size` (image tower, then the
        grader on its tokens). What `index.explain` grades occluded copies of a photograph with."""
        _check_batch_size(batch_size)
        pixels = self._check_pixels(pixels)
        icdr_parts, sdrg_parts = [], []
        for start in range(0, len(pixels), batch_size):
            tower = self._run_image(pixels[start : start + batch_size])
            n = len(tower.vectors)
            icdr, sdrg, _ = self._run_grader(
                n, image_tokens=tower.tokens, image=np.ones(n, bool), text=np.zeros(n, bool),
                tabular_present=np.zeros(n, bool),
            )
            icdr_parts.append(icdr)
            sdrg_parts.append(sdrg)
        if not icdr_parts:
            empty = np.zeros((0, len(self.manifest.icdr_names)), np.float32)
            return empty, np.zeros((0, len(self.manifest.sdrg_names)), np.float32)
        return np.concatenate(icdr_parts), np.concatenate(sdrg_parts)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> TextEmbedding:
        """Texts -> (N, D) float32 L2-normalised embeddings and a truncation flag per text.

        Raises ValueError for a text that is empty, whitespace only, or has no token the tokenizer reads.
        """
        _check_batch_size(batch_size)
        vectors, record_vectors, truncated = [], [], []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start : start + batch_size], first_index=start)
            tower = self._run_text(tokens)
            vectors.append(tower.vectors)
            if tower.record_vectors is not None:
                record_vectors.append(tower.record_vectors)
            truncated += tokens.truncated
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return TextEmbedding(vectors=matrix, truncated=truncated,
                             record_vectors=np.concatenate(record_vectors) if record_vectors else None)

    def embed_records(
        self, images: Sequence[Image.Image], structured: Sequence[Structured], batch_size: int = 32
    ) -> RecordEmbeddings:
        """Archive records (photograph + structured data, no text): each photograph through the image tower
        once, its tokens and the structured data through the grader. Returns the image embeddings, the record
        embeddings and the ICDR/SDRG probabilities. `structured` holds FundusRecords or mappings with the
        same field names."""
        _check_batch_size(batch_size)
        if len(images) != len(structured):
            raise ValueError(f"{len(images)} images but {len(structured)} structured records")
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for start in range(0, len(images), batch_size):
            tower = self._run_image(batch_model_inputs(images[start : start + batch_size], self.image_spec))
            tabular = self.manifest.feature_spec.transform(structured[start : start + batch_size])
            n = len(tower.vectors)
            icdr, sdrg, record = self._run_grader(
                n, image_tokens=tower.tokens, tabular=tabular, image=np.ones(n, bool), text=np.zeros(n, bool),
                tabular_present=np.ones(n, bool),
            )
            parts.append((tower.vectors, record, icdr, sdrg))
        if not parts:
            empty = np.zeros((0, len(self.manifest.icdr_names)), np.float32)
            vectors = np.zeros((0, self.dim), np.float32)
            return RecordEmbeddings(vectors, vectors.copy(), empty, empty.copy())
        return RecordEmbeddings(*(np.concatenate([part[i] for part in parts]) for i in range(4)))

    def record_embeddings(
        self, images: Sequence[Image.Image], structured: Sequence[Structured], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record embeddings (N, D), ICDR probabilities (N, 5), SDRG probabilities (N, 5)) of archive
        records: `embed_records` without the image embeddings."""
        records = self.embed_records(images, structured, batch_size)
        return records.record_vectors, records.icdr, records.sdrg

    def query_images(self, images: Sequence[Image.Image]) -> list[SearchQuery]:
        """Photographs as search queries: one image-tower pass gives both the search vector and (through
        the grader, from the same tokens) the grades."""
        if not images:
            return []
        tower = self._run_image(batch_model_inputs(images, self.image_spec))
        n = len(images)
        icdr, sdrg, record = self._run_grader(
            n, image_tokens=tower.tokens, image=np.ones(n, bool), text=np.zeros(n, bool),
            tabular_present=np.zeros(n, bool),
        )
        gated: list[Gradability | None] = list(self.check_gradability(images)) if self.has_gate else [None] * n
        return [
            SearchQuery(tower.vectors[i], self._grades(icdr[i], sdrg[i], record[i], ["image"], gradability=gated[i]))
            for i in range(n)
        ]

    def query_texts(self, texts: Sequence[str]) -> list[SearchQuery]:
        """Clinical texts as search queries: one text-tower pass gives the search vector and the grades.
        Raises ValueError for an unreadable text (see `tokenize`)."""
        if not texts:
            return []
        tokens = self.tokenize(texts)
        tower = self._run_text(tokens)
        n = len(texts)
        icdr, sdrg, record = self._run_grader(
            n, text_tokens=tower.tokens, attention_mask=tokens.attention_mask, image=np.zeros(n, bool),
            text=np.ones(n, bool), tabular_present=np.zeros(n, bool),
        )
        return [
            SearchQuery(tower.vectors[i], self._grades(icdr[i], sdrg[i], record[i], ["text"], tokens.truncated[i]),
                        tokens.truncated[i],
                        None if tower.record_vectors is None else tower.record_vectors[i])
            for i in range(n)
        ]

    def grade(
        self, image: Image.Image | None = None, text: str | None = None, structured: Structured | None = None
    ) -> Grades:
        """ICDR and SDRG probabilities from any subset (at least one) of a photograph, a clinical text and
        structured data. Absent modalities are hidden from the joint transformer by its presence flags."""
        return self.grade_many([GradeInput(image=image, text=text, structured=structured)])[0]

    def grade_many(self, inputs: Sequence[GradeInput]) -> list[Grades]:
        """`grade` for several inputs in one grader run; each input may give a different subset of
        modalities (the presence flags are per row). Raises ValueError for an input with no modality or
        an empty text."""
        if not inputs:
            return []
        n = len(inputs)
        for i, item in enumerate(inputs):
            if not item.modalities:
                raise ValueError(f"input {i}: grading needs at least one of image, text or structured data")
        image_tokens = text_tokens = attention_mask = None
        image_vectors: list[np.ndarray | None] = [None] * n
        with_image = [i for i, item in enumerate(inputs) if item.image is not None]
        gated: list[Gradability | None] = [None] * n
        if with_image:
            photographs = [inputs[i].image for i in with_image]
            tower = self._run_image(batch_model_inputs(photographs, self.image_spec))  # type: ignore[arg-type]
            image_tokens = np.zeros((n, *tower.tokens.shape[1:]), np.float32)
            image_tokens[with_image] = tower.tokens
            if self.has_gate:
                for i, answer in zip(with_image, self.check_gradability(photographs), strict=True):  # type: ignore[arg-type]
                    gated[i] = answer
            for row, i in enumerate(with_image):
                image_vectors[i] = tower.vectors[row]
        with_text = [i for i, item in enumerate(inputs) if item.text is not None]
        truncated = [False] * n
        if with_text:
            tokens = self.tokenize([inputs[i].text for i in with_text])  # type: ignore[misc]
            text_tower = self._run_text(tokens)
            text_tokens = np.zeros((n, *text_tower.tokens.shape[1:]), np.float32)
            text_tokens[with_text] = text_tower.tokens
            attention_mask = np.zeros((n, tokens.attention_mask.shape[1]), np.int64)
            attention_mask[with_text] = tokens.attention_mask
            for row, i in enumerate(with_text):
                truncated[i] = tokens.truncated[row]
        tabular = np.zeros((n, self._tabular_width), np.float32)
        with_structured = [i for i, item in enumerate(inputs) if item.structured is not None]
        if with_structured:
            tabular[with_structured] = self.manifest.feature_spec.transform(
                [inputs[i].structured for i in with_structured]
            )
        icdr, sdrg, record = self._run_grader(
            n, image_tokens=image_tokens, text_tokens=text_tokens, attention_mask=attention_mask, tabular=tabular,
            image=np.array([item.image is not None for item in inputs]),
            text=np.array([item.text is not None for item in inputs]),
            tabular_present=np.array([item.structured is not None for item in inputs]),
        )
        return [
            Grades(
                icdr_probabilities=icdr[i],
                sdrg_probabilities=sdrg[i],
                record_embedding=record[i],
                modalities=item.modalities,
                image_embedding=image_vectors[i],
                icdr_names=tuple(self.manifest.icdr_names),
                sdrg_names=tuple(self.manifest.sdrg_names),
                calibrated=self.calibrated,
                text_truncated=truncated[i],
                gradability=gated[i],
            )
            for i, item in enumerate(inputs)
        ]

    def tokenize(self, texts: Sequence[str], first_index: int = 0) -> Tokens:
        """Texts -> the text encoder's input (the ids the training tokenizer gives: [CLS] ... [SEP],
        truncated to max_length, padded to the longest). Raises ValueError for a text that is empty, not
        valid Unicode (a lone surrogate, which JSON's \\ud800 escapes can carry) or has no readable word,
        naming it by position (`first_index` + its index), never by its content."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {first_index + i}: expected a string, got {type(text).__name__}")
            if not text.strip():
                raise ValueError(f"text {first_index + i}: empty text")
            if not is_valid_unicode(text):
                raise ValueError(f"text {first_index + i}: not valid Unicode (it holds a lone surrogate code point)")
        encodings = self._tokenizer.encode_batch(list(texts))
        for i, encoding in enumerate(encodings):
            if not any(special == 0 for special in encoding.special_tokens_mask):
                raise ValueError(f"text {first_index + i}: no readable word (none that the model's tokenizer knows)")
        return Tokens(
            input_ids=np.array([e.ids for e in encodings], dtype=np.int64),
            attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int64),
            truncated=[bool(e.overflowing) for e in encodings],
        )

    # --- internals --------------------------------------------------------------------------------

    def _load_tokenizer(self) -> Tokenizer:
        path = self.bundle / TOKENIZER
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for a bad file
            raise BundleError(f"{self.bundle}: cannot read {TOKENIZER}: {error}") from None
        expected = (self.max_length, self.manifest.text.pad_token_id)
        found = configured_as(tokenizer)
        if found is None:
            # A bundle exported before tokenizer.json carried its settings: set them from the manifest.
            try:
                return configure_tokenizer(tokenizer, *expected)
            except ValueError as error:
                raise BundleError(f"{self.bundle}: {TOKENIZER}: {error}") from None
        if found != expected:
            raise BundleError(
                f"{self.bundle}: {TOKENIZER} truncates at {found[0]} tokens and pads with id {found[1]}, but the "
                f"manifest says {expected[0]} and {expected[1]}: re-export with `retina-train export`"
            )
        return tokenizer

    def _grades(
        self, icdr: np.ndarray, sdrg: np.ndarray, record: np.ndarray, modalities: list[str], truncated: bool = False,
        gradability: Gradability | None = None,
    ) -> Grades:
        return Grades(icdr_probabilities=icdr, sdrg_probabilities=sdrg, record_embedding=record,
                      modalities=modalities, icdr_names=tuple(self.manifest.icdr_names),
                      sdrg_names=tuple(self.manifest.sdrg_names), text_truncated=truncated,
                      gradability=gradability,
                      calibrated=self.calibrated)

    def _token_shape(self, name: str) -> tuple[int, ...]:
        """The fixed trailing dimensions of a grader input (image_tokens: (N, W); text_tokens: (1, W) for
        an absent text)."""
        shape = self._graphs[GRADER].inputs[name]
        width = shape[-1]
        if not isinstance(width, int):
            raise BundleError(f"{self.bundle}: {GRADER} input {name} has no fixed width ({shape})")
        if name == "text_tokens":
            return (1, width)
        if not isinstance(shape[1], int):
            raise BundleError(f"{self.bundle}: {GRADER} input {name} has no fixed token count ({shape})")
        return (shape[1], width)

    def _check_pixels(self, pixels: np.ndarray) -> np.ndarray:
        size = self.image_spec.size
        array = np.asarray(pixels)
        if array.ndim != 4 or array.shape[1:] != (3, size, size):
            raise ValueError(f"pixels must have shape (N, 3, {size}, {size}), got {array.shape}")
        return np.ascontiguousarray(array, dtype=np.float32)

    def _run_image(self, pixels: np.ndarray) -> _TowerOutput:
        out = self._graphs[IMAGE_ENCODER].run({"pixels": self._check_pixels(pixels)})
        return _TowerOutput(np.ascontiguousarray(out["image_embedding"], dtype=np.float32), out["image_tokens"])

    def _run_text(self, tokens: Tokens) -> _TowerOutput:
        out = self._graphs[TEXT_ENCODER].run({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
        record = out.get("text_record_embedding")  # bundles exported before the record head lack it
        return _TowerOutput(np.ascontiguousarray(out["text_embedding"], dtype=np.float32), out["text_tokens"],
                            None if record is None else np.ascontiguousarray(record, dtype=np.float32))

    def _run_grader(
        self, n: int, *, image_tokens: np.ndarray | None = None, text_tokens: np.ndarray | None = None,
        attention_mask: np.ndarray | None = None, tabular: np.ndarray | None = None, image: np.ndarray,
        text: np.ndarray, tabular_present: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The joint transformer over the towers' tokens; an absent input is zeros, hidden by its flag."""
        if image_tokens is None:
            image_tokens = np.zeros((n, *self._image_token_shape), np.float32)
        if text_tokens is None:
            text_tokens = np.zeros((n, *self._text_token_shape), np.float32)
            attention_mask = np.zeros((n, 1), np.int64)
        if tabular is None:
            tabular = np.zeros((n, self._tabular_width), np.float32)
        out = self._graphs[GRADER].run(
            {
                "image_tokens": np.ascontiguousarray(image_tokens, dtype=np.float32),
                "text_tokens": np.ascontiguousarray(text_tokens, dtype=np.float32),
                "attention_mask": attention_mask,
                "tabular": np.ascontiguousarray(tabular, dtype=np.float32),
                "image_present": image.astype(bool),
                "text_present": text.astype(bool),
                "tabular_present": tabular_present.astype(bool),
            },
        )
        return (softmax(self._scaled("icdr", out["icdr_logits"])), softmax(self._scaled("sdrg", out["sdrg_logits"])),
                np.ascontiguousarray(out["record_embedding"], dtype=np.float32))

    def _scaled(self, head: str, logits: np.ndarray) -> np.ndarray:
        """logits / T (+ b with decision offsets): the calibration; (T = 1, no b) leaves them as they are."""
        scaled = np.asarray(logits, np.float64) / self.temperatures[0 if head == "icdr" else 1]
        return scaled + self.offsets[head] if self.offsets is not None else scaled


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
