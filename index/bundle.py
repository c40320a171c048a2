"""The bundle: the contract between offline training and the online system.

A folder that `retina-train export` writes and everything online reads:

    BUNDLE/manifest.json        this schema: what the graphs expect and produce, and a sha256 per file
    BUNDLE/image_encoder.onnx   pixels (B, 3, S, S) -> image_embedding (B, D), image_tokens (B, N, W)
    BUNDLE/text_encoder.onnx    input_ids, attention_mask (B, L) -> text_embedding (B, D), text_tokens (B, L, W)
                                and, optionally, text_record_embedding (B, D): the text against records (the
                                model's record head); a graph without it searches records with text_embedding
    BUNDLE/grader.onnx          image_tokens, text_tokens, attention_mask, tabular + presence flags (B,)
                                -> icdr_logits, sdrg_logits (B, 5), record_embedding (B, D)
    BUNDLE/tokenizer.json       the text tokenizer (Hugging Face `tokenizers` format)
    BUNDLE/image_encoder.ov-int8.xml/.bin, text_encoder.ov-int8.xml/.bin
                                optional (`retina-train export --openvino-int8`): the encoders as OpenVINO
                                INT8 IR, run by the `openvino` runtime (`manifest.openvino_int8`)
    BUNDLE/gate.onnx            optional (`retina-train gate fit`, then export): pixels prepared with
                                `manifest.gate.image` -> gate_probabilities (B, 6), the gradability gate
                                (`index.gate`)

Schema v2: each tower runs once per query. The grader reads the tokens the encoders already returned (their
second output) instead of raw pixels and ids, so a search embeds and grades with one pass of its tower, and
text-only grading never runs the image tower. Absent modalities are zeros hidden by their presence flag.
A v1 bundle (whose grader re-ran both towers) is refused with "export it again".

`manifest.calibration` (optional, `retina-train calibrate` then `export`): one temperature per grade head; the
probabilities are softmax(logits / T), or softmax(logits / T + b) where the calibration also has per-grade decision
offsets b (`calibrate --offsets-split`). A bundle without it gives softmax(logits), as before.

Loading verifies the schema version and every checksum and names exactly what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from index.gate import GateSpec
from index.preprocess import ImageSpec
from index.tabular import FeatureSpec

SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
GRADER = "grader.onnx"
TOKENIZER = "tokenizer.json"
REQUIRED_FILES = (IMAGE_ENCODER, TEXT_ENCODER, GRADER, TOKENIZER)
OPENVINO_INT8_IR = {IMAGE_ENCODER: "image_encoder.ov-int8.xml", TEXT_ENCODER: "text_encoder.ov-int8.xml"}
"""The OpenVINO INT8 IR file of each encoder, when the bundle has them (its weights: `ir_weights`)."""


def ir_weights(xml: str) -> str:
    """The weights file of an OpenVINO IR: the .bin beside its .xml."""
    return str(Path(xml).with_suffix(".bin"))


class BundleError(Exception):
    """A bundle that cannot be used: the message names the folder, the file and what is wrong."""


class TextSettings(BaseModel):
    """How text becomes the text encoder's input."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(gt=0)
    pad_token_id: int = Field(ge=0)


GRADE_COUNT = 5
"""Grades per head (ICDR 0-4, SDRG 0-4): one decision offset each."""


class DecisionOffsets(BaseModel):
    """Per-grade offsets b added to the temperature-scaled logits, softmax(logits / T + b), fitted to maximise
    the macro-F1 of the argmax grade (`retina-train calibrate --offsets-split`). The fit keeps grade 0's at 0 (the
    softmax ignores a shift of all logits). They move the decision between grades (precision against recall
    of the rare grades) without retraining."""

    model_config = ConfigDict(extra="forbid")

    icdr: list[float] = Field(min_length=GRADE_COUNT, max_length=GRADE_COUNT)
    sdrg: list[float] = Field(min_length=GRADE_COUNT, max_length=GRADE_COUNT)
    split: str
    """The split whose photographs they were fitted on (normally `train`: the validation split has too few
    photographs of the rare grades)."""
    items: dict[str, int]
    """Head -> labelled photographs the fit used (a sample of at most `per_grade` per ICDR grade)."""
    per_grade: int = Field(gt=0)
    """The most photographs of one ICDR grade the fit sampled; larger grades are weighted back to their share."""
    macro_f1_before: dict[str, float]
    """Head -> macro-F1 on the fitted sample (weighted to the split) with b = 0."""
    macro_f1_after: dict[str, float]
    """Head -> the same with the fitted b."""

    @field_validator("icdr", "sdrg")
    @classmethod
    def _finite(cls, offsets: list[float]) -> list[float]:
        if not all(math.isfinite(value) for value in offsets):
            raise ValueError("offsets must be finite numbers")
        return offsets


class Calibration(BaseModel):
    """Temperature scaling of the two grade heads (`retina-train calibrate`): the grader's logits are divided
    by each head's temperature before the softmax, T > 1 softening over-confident probabilities; with
    `offsets`, per-grade decision offsets are added after the division. The same model is
    `RUN/calibration.json`; it also says what it was fitted on and the expected calibration error (ECE,
    equal-width bins of top-label confidence) and negative log-likelihood it measured there."""

    model_config = ConfigDict(extra="forbid")

    icdr_temperature: float = Field(gt=0, allow_inf_nan=False)
    sdrg_temperature: float = Field(gt=0, allow_inf_nan=False)
    method: Literal["temperature"] = "temperature"
    inputs: list[str] = Field(default_factory=lambda: ["image"])
    """The modalities the fitted logits came from (the photograph alone: what `/grade` sees for an upload)."""
    archive: str
    """The archive the temperatures were fitted on (as given)."""
    split: str
    """Its split (normally `val`)."""
    items: dict[str, int]
    """Head -> how many labelled photographs the fit used."""
    weights_sha256: str | None = None
    """The checkpoint whose logits were fitted (an export of other weights refuses this calibration)."""
    bins: int = Field(default=15, gt=0)
    ece_before: dict[str, float]
    """Head -> ECE on the fitted split with T = 1."""
    ece_after: dict[str, float]
    """Head -> ECE on the fitted split with the fitted T."""
    nll_before: dict[str, float]
    nll_after: dict[str, float]
    created: str | None = None
    offsets: DecisionOffsets | None = None
    """Per-grade decision offsets (None: softmax(logits / T) alone)."""

    def temperature(self, head: str) -> float:
        """The temperature of a head, "icdr" or "sdrg"."""
        if head not in ("icdr", "sdrg"):
            raise ValueError(f"no grade head {head!r} (icdr or sdrg)")
        return self.icdr_temperature if head == "icdr" else self.sdrg_temperature

    def offsets_of(self, head: str) -> tuple[float, ...]:
        """The decision offsets of a head, "icdr" or "sdrg" (zeros when the calibration has none)."""
        self.temperature(head)  # ValueError for an unknown head
        if self.offsets is None:
            return (0.0,) * GRADE_COUNT
        return tuple(self.offsets.icdr if head == "icdr" else self.offsets.sdrg)


class OpenVinoInt8(BaseModel):
    """The encoders as OpenVINO INT8 IR (`retina-train export --openvino-int8`), and what their parity
    check measured. Both files of each IR are in `Manifest.files`, checked like every other file."""

    model_config = ConfigDict(extra="forbid")

    graphs: dict[str, str]
    """ONNX graph -> its IR (.xml; the weights are the .bin beside it)."""
    min_cosine: dict[str, float]
    """Output -> the smallest row-wise cosine to PyTorch fp32 on the parity samples (the check: >= 0.999)."""
    samples: int
    """How many parity samples the cosines come from."""
    calibration_items: int
    """How many training-split items NNCF calibrated on (never the parity samples)."""
    quantizer: str
    """What quantized them, with versions and settings."""
    needs_vnni: bool = False
    """True: weights in the full 8-bit range (exported on a CPU with VNNI or AMX), which saturate on CPUs
    without them, where the openvino runtime therefore does not use this IR. False: 7-bit weights, exact on
    every x86 CPU."""


class Manifest(BaseModel):
    """`manifest.json`: everything a request needs besides the graphs themselves."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    created: str
    model_name: str
    model_config_data: dict[str, Any] = Field(alias="model_config")
    precision: Literal["fp32", "int8", "bf16"]
    embedding_dim: int = Field(gt=0)
    icdr_names: list[str]
    sdrg_names: list[str]
    image: ImageSpec
    text: TextSettings
    feature_spec: FeatureSpec
    data_fingerprint: str
    weights_sha256: str | None = None  # the exported checkpoint (None in bundles written before it was recorded)
    metrics: dict[str, Any] = Field(default_factory=dict)
    calibration: Calibration | None = None  # absent: uncalibrated probabilities, softmax(logits) (and older bundles)
    opset: int
    exporter: str
    files: dict[str, str]  # file name -> sha256
    openvino_int8: OpenVinoInt8 | None = None  # absent: the bundle has no OpenVINO IR (and older bundles)
    gate: GateSpec | None = None  # absent: no gradability gate (bundles exported without one, and older ones)

    @property
    def fingerprint(self) -> str:
        """A short identity of the bundle: the sha256 of its graphs and tokenizer, combined."""
        digest = hashlib.sha256("".join(f"{k}:{v}" for k, v in sorted(self.files.items())).encode())
        return digest.hexdigest()[:16]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    sha = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def now_iso() -> str:
    """The current time in ISO 8601, UTC."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write `manifest.json` (by alias, so the JSON says `model_config`)."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=1, by_alias=True) + "\n")
    return path


def read_manifest(folder: Path) -> Manifest:
    """Read and check a bundle's manifest and files: schema version, presence, checksums."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle folder not found: {folder}")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST_FILE} (not a bundle written by `retina-train export`?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        raise BundleError(f"{path}: no integer schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema version {version} is newer than this software reads ({SCHEMA_VERSION}); "
            "upgrade retina-align"
        )
    if version < SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema version {version} is older than {SCHEMA_VERSION} (its grader re-runs both towers); "
            "re-export it with `retina-train export --run RUN --out BUNDLE`"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as error:
        raise BundleError(f"{path}: invalid manifest: {error}") from None
    ir = manifest.openvino_int8
    ir_files = [file for xml in ir.graphs.values() for file in (xml, ir_weights(xml))] if ir else []
    gate_files = [manifest.gate.file] if manifest.gate else []
    for name in (*REQUIRED_FILES, *ir_files, *gate_files):
        if name not in manifest.files:
            raise BundleError(f"{path}: lists no checksum for {name}")
    for name, expected in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{folder}: missing file {name}")
        actual = sha256_of(file)
        if actual != expected:
            raise BundleError(
                f"{folder}: checksum mismatch for {name} (manifest {expected[:12]}..., file {actual[:12]}...): "
                "the file was changed or corrupted after export"
            )
    return manifest
