"""Request and response models of the HTTP API (they are also its OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from index.metadata import Filters, Labels
from index.records import Against

NOT_BLANK = r"\S"
"""A text must hold at least one character that is not white space."""
Modality = Literal["image", "text", "structured"]
GateMode = Literal["refuse", "report"]


class TextSearchRequest(BaseModel):
    """`POST /search/text`."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(
        pattern=NOT_BLANK, description="A clinical description, e.g. 'moderate NPDR with hard exudates, left eye'."
    )
    k: int = Field(default=10, strict=True, ge=1, description="How many neighbours (at most the service's max_k).")
    filters: Filters | None = Field(default=None, description="Only return archived cases that match.")
    against: Against = Field(
        default="image",
        description="image: the photographs' own embeddings (what they show); record: photo + structured data.",
    )


def text_search_request(max_k: int, max_text_chars: int) -> type[TextSearchRequest]:
    """`TextSearchRequest` with this service's limits in its schema, so that the OpenAPI document says
    exactly what the server accepts (k <= max_k, text <= max_text_chars characters)."""
    return create_model(
        "TextSearchRequest",
        __base__=TextSearchRequest,
        __doc__=TextSearchRequest.__doc__,
        text=(str, Field(pattern=NOT_BLANK, max_length=max_text_chars,
                         description=TextSearchRequest.model_fields["text"].description)),
        k=(int, Field(default=10, strict=True, ge=1, le=max_k, description="How many neighbours.")),
    )


class StructuredFields(BaseModel):
    """Structured patient data a grading request may give (all optional; unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    patient_age: float | None = Field(default=None, ge=0, le=120, allow_inf_nan=False)
    patient_sex: Literal["female", "male"] | None = None
    exam_eye: Literal["left", "right"] | None = None
    diabetes: bool | None = None
    diabetes_time_y: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    insulin: bool | None = None
    camera: str | None = Field(default=None, max_length=200)
    comorbidities: str | None = Field(default=None, max_length=2000)


class GradeProbability(BaseModel):
    """One grade of a scale and its probability."""

    grade: int
    name: str
    probability: float


class GradePrediction(BaseModel):
    """The most probable grade of a scale, and the probability of every grade."""

    grade: int
    name: str
    probabilities: list[GradeProbability]


class Predicted(BaseModel):
    """Predicted ICDR and SDRG grades, and whether that means referable DR (ICDR >= 2)."""

    icdr: GradePrediction
    sdrg: GradePrediction
    referable: bool
    referable_probability: float = Field(description="P(ICDR >= 2)")
    calibrated: bool = Field(default=False, description="The probabilities are temperature-scaled on a validation "
                             "split, with per-grade decision offsets where the bundle's calibration has them (see "
                             "/ready); false: the model's raw softmax.")


class Gradable(BaseModel):
    """The gradability gate's answer on the photograph (`index.gate`)."""

    ok: bool = Field(description="A fundus photograph of adequate quality: gradable.")
    probability: float = Field(description="P(fundus photograph) x P(adequate quality).")
    fundus: bool = Field(description="False: not a fundus photograph at all.")
    recognised: bool = Field(
        default=True, description="The gate's network itself took it for a fundus photograph; false where only the "
        "layout rule did (a kind of photograph it was not trained on: its quality judgement may not apply)."
    )
    reasons: list[str] = Field(description="Why it is not gradable, e.g. 'out of focus' (empty when ok).")
    probabilities: dict[str, float] = Field(
        description="Each gate output: fundus, adequate, and each defect (focus, illumination, image_field, artifacts)."
    )


class NeighbourConsensus(BaseModel):
    """The neighbours' consensus: the ICDR grades of the k archived photographs nearest the query photograph
    (image->image over the whole archive: the request's filters and `against` do not apply), beside the model's
    grade. Neighbours without an ICDR grade do not vote; the photograph itself, when it is in the archive
    (similarity >= 1 - 1e-6), is left out. Ties: the larger summed similarity, then the more severe grade."""

    k: int = Field(description="Neighbours taken (the photograph itself left out).")
    known: int = Field(description="Of those, how many have an ICDR grade (the voters).")
    counts: list[int] = Field(description="Voters per ICDR grade 0..4 (they sum to `known`).")
    grade: int | None = Field(description="The majority ICDR grade (None when no neighbour has a grade).")
    name: str | None = Field(description="The majority grade's name.")
    share: float | None = Field(description="The share of the voters for the majority grade.")
    referable_share: float | None = Field(description="The share of the voters that are referable (ICDR >= 2).")
    referable: bool | None = Field(description="At least half the voters are referable.")
    agrees: bool | None = Field(description="The majority grade is the model's ICDR grade.")
    referable_agrees: bool | None = Field(description="The referable verdict is the model's (its grade >= 2).")
    duplicates: int = Field(description="Archived photographs left out as the query photograph itself.")
    mean_similarity: float | None = Field(description="The mean cosine similarity of the neighbours taken.")


class Neighbour(BaseModel):
    """One archived case near the query."""

    id: int
    image_id: str
    score: float = Field(description="Cosine similarity to the query (1 is identical).")
    labels: Labels
    narrative: str | None
    image_url: str


class SearchResponse(BaseModel):
    """Neighbours of a query and the grades predicted from it."""

    neighbours: list[Neighbour]
    predicted: Predicted
    gradable: Gradable | None = Field(
        default=None, description="The photograph's gradability (None: a text query, or a bundle without a gate)."
    )
    consensus: NeighbourConsensus | None = Field(
        default=None, description="A photograph's query: its nearest archived photographs' grades (consensus_k).",
    )
    against: Against
    index_size: int
    text_truncated: bool = False
    notes: list[str] = Field(default_factory=list, description="What a person should know about this answer.")
    took_ms: float


class GradeResponse(BaseModel):
    """`POST /grade`: the grades from the modalities given."""

    icdr: GradePrediction
    sdrg: GradePrediction
    referable: bool
    referable_probability: float
    gradable: Gradable | None = Field(
        default=None, description="The photograph's gradability (None: no photograph, or a bundle without a gate)."
    )
    calibrated: bool = Field(default=False, description="The probabilities are temperature-scaled on a validation "
                             "split, with per-grade decision offsets where the bundle's calibration has them (see "
                             "/ready); false: the model's raw softmax.")
    modalities: list[Modality]
    consensus: NeighbourConsensus | None = Field(
        default=None, description="With a photograph: its nearest archived photographs' grades (consensus_k).",
    )
    text_truncated: bool = False
    notes: list[str] = Field(default_factory=list)
    took_ms: float


class HeatmapPeak(BaseModel):
    """The heatmap's strongest cell: its row and column, and its centre in photograph pixels."""

    row: int
    col: int
    x: float
    y: float


class Heatmap(BaseModel):
    """An occlusion heatmap and how to lay it on the uploaded photograph (pixels: x right, y down)."""

    rows: int
    cols: int
    values: list[list[float]] = Field(
        description="rows x cols, each in [0, 1]: the fall of the target probability when the cell is hidden, "
                    "over the largest fall (0: hiding it lowers nothing)."
    )
    x: list[float] = Field(description="Each column's centre, photograph pixels.")
    y: list[float] = Field(description="Each row's centre, photograph pixels.")
    cell_size: float = Field(description="A cell's side in photograph pixels (the last row and column may be cut "
                                         "by the square's edge).")
    square_box: list[float] = Field(
        description="[left, top, right, bottom] of the square the model sees, in photograph pixels: the field-of-"
                    "view crop padded to a square, so it may reach beyond the photograph. The grid tiles it from "
                    "its top-left corner."
    )
    field_of_view_box: list[float] = Field(description="[left, top, right, bottom] of the field-of-view crop.")
    peak: HeatmapPeak
    window: int = Field(description="Occlusion window, model-input pixels.")
    stride: int = Field(description="Occlusion stride (= a cell's side), model-input pixels.")
    input_size: int = Field(description="Side of the model input, pixels.")


class ExplainTarget(BaseModel):
    """The probability the heatmap explains: P(ICDR >= grade), grade = max(1, the predicted ICDR grade)."""

    grade: int
    name: str = Field(description="e.g. 'P(ICDR >= 2)'.")
    probability: float = Field(description="On the photograph as it is.")
    max_drop: float = Field(description="The largest fall of that probability when one cell is hidden (the "
                                        "heatmap's 1.0).")


class ExplainResponse(BaseModel):
    """`POST /explain`: the photograph's grades and where on it the evidence for the ICDR grade lies."""

    icdr: GradePrediction
    sdrg: GradePrediction
    referable: bool
    referable_probability: float
    gradable: Gradable | None = Field(
        default=None, description="The photograph's gradability (None: a bundle without a gate)."
    )
    calibrated: bool = Field(default=False, description="The probabilities are temperature-scaled on a validation "
                             "split, with per-grade decision offsets where the bundle's calibration has them (see "
                             "/ready); false: the model's raw softmax.")
    target: ExplainTarget
    heatmap: Heatmap
    occlusions: int = Field(description="Occluded copies of the photograph graded.")
    explain_ms: float = Field(description="Time spent computing the heatmap in the model thread.")
    notes: list[str] = Field(default_factory=list, description="What a person should know about this answer.")
    took_ms: float


class Health(BaseModel):
    """`GET /healthz`."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """`GET /readyz`: what is loaded, or why not yet."""

    ready: bool
    detail: str | None = None
    warnings: list[str] = Field(default_factory=list, description="What an operator should know, e.g. files "
                                "changed on disk under the running server.")
    bundle: str | None = Field(default=None, description="The bundle folder's name.")
    bundle_fingerprint: str | None = None
    index: str | None = Field(default=None, description="The index folder's name.")
    index_generation: int | None = None
    index_verified: bool | None = Field(default=None, description="Its files matched their integrity record.")
    index_fingerprint: str | None = Field(default=None, description="The bundle fingerprint the index was built with.")
    index_size: int | None = None
    index_kinds: dict[str, str] | None = None
    providers: dict[str, str] | None = Field(
        default=None, description="What each graph runs on: the ONNX Runtime execution provider, or OpenVINO CPU."
    )
    runtime: str | None = Field(default=None, description="The inference engine chosen: onnxruntime or openvino.")
    runtimes: dict[str, str] | None = Field(
        default=None, description="What runs each graph, with its precision, e.g. 'OpenVINO CPU int8'."
    )
    calibration: dict[str, float] | None = Field(
        default=None, description="The grade heads' temperatures ({'icdr': T, 'sdrg': T}) when the bundle's "
        "probabilities are calibrated, else null.",
    )
    decision_offsets: dict[str, list[float]] | None = Field(
        default=None, description="Per-grade offsets b added to the scaled logits, softmax(logits / T + b), when "
        "the bundle's calibration has them ({'icdr': [b0..b4], 'sdrg': [...]}), fitted for macro-F1; else null.",
    )
    vector_store: str | None = Field(default=None, description="Where the vectors are searched: faiss or milvus.")
    faiss_device: str | None = Field(default=None, description="FAISS store: where searches run (cpu or gpu).")
    embedding_dim: int | None = None
    max_text_tokens: int | None = None
    icdr_names: list[str] | None = None
    sdrg_names: list[str] | None = None
    gradability_gate: bool | None = Field(default=None, description="The bundle has a gradability gate: photographs "
                                          "are checked (`gradable` in the answers).")


class ErrorResponse(BaseModel):
    """Every error: a message a person can act on, and for invalid fields, where each problem is."""

    detail: str
    errors: list[dict[str, str]] | None = None
