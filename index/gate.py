"""The gradability gate: is a photograph a fundus photograph, and good enough to grade?

Screening programmes decide this before grading (BRSET labels focus, illumination, image field and
artefacts for that reason). A small convolutional network (`training.gate`, exported as `gate.onnx` in
the bundle) reads the photograph prepared with its own `ImageSpec` (no illumination normalisation: dark
and uneven photographs must look dark and uneven to it) and gives six independent probabilities
(`GATE_OUTPUTS`):

- `fundus`: the photograph is a colour fundus photograph (trained against rendered and photographic
  non-fundus images);
- `adequate`: a fundus photograph of adequate quality (BRSET's `quality` column);
- `focus`, `illumination`, `image_field`, `artifacts`: each acquisition defect is present.

`assess` turns them into the answer a request gets (`Gradability`): `ok` when the photograph is a
fundus photograph of adequate quality at the thresholds the gate was trained with (`GateSpec`), the
probability that it is (`fundus x adequate`), and the reasons when it is not, in words. Pure numpy: the
service runs the graph through `index.embedder`, never torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from index.preprocess import ImageSpec

GATE_OUTPUTS: tuple[str, ...] = ("fundus", "adequate", "focus", "illumination", "image_field", "artifacts")
"""The gate graph's outputs, in order: independent sigmoid probabilities."""
DEFECTS: tuple[str, ...] = GATE_OUTPUTS[2:]
"""The acquisition defects the gate names (BRSET's quality columns)."""
NOT_FUNDUS = "not a fundus photograph"
REASONS: dict[str, str] = {
    "focus": "out of focus",
    "illumination": "poor or uneven illumination",
    "image_field": "off-centre or incomplete field",
    "artifacts": "artefacts (lashes, dust, glare)",
}
"""What each defect is called in an answer."""
INADEQUATE = "inadequate quality"
"""The reason given when the photograph is judged inadequate without any single defect passing its threshold."""


class GateSpec(BaseModel):
    """The gate as the bundle's manifest describes it (`manifest.gate`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(default="gate.onnx", pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    """The graph's file in the bundle (a plain name: never a path out of it)."""
    image: ImageSpec
    outputs: tuple[str, ...] = GATE_OUTPUTS
    fundus_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Below it, the photograph is not a fundus photograph."""
    adequate_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Below it, a fundus photograph is judged ungradable (chosen on the validation split)."""
    defect_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """At or above it, a defect is named among the reasons."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """What the gate's own evaluation measured (validation AUROCs, ...)."""
    trained_on: str = ""
    """The data it was trained on, in words."""


@dataclass(frozen=True)
class Gradability:
    """One photograph's gate answer."""

    ok: bool
    """A fundus photograph of adequate quality: its grade may be trusted as far as the photograph goes."""
    probability: float
    """P(fundus photograph) x P(adequate quality)."""
    fundus: bool
    """False: not a fundus photograph at all (no grade should be given)."""
    reasons: list[str] = field(default_factory=list)
    """Why it is not gradable, in words (empty when ok)."""
    probabilities: dict[str, float] = field(default_factory=dict)
    """Every gate output by name."""


def assess(probabilities: np.ndarray, spec: GateSpec) -> list[Gradability]:
    """The gate's probabilities (N, len(spec.outputs)) -> one `Gradability` per photograph."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(spec.outputs):
        raise ValueError(f"gate probabilities must have shape (N, {len(spec.outputs)}), got {probabilities.shape}")
    column = {name: i for i, name in enumerate(spec.outputs)}
    answers = []
    for row in probabilities:
        by_name = {name: round(float(row[i]), 4) for name, i in column.items()}
        p_fundus, p_adequate = float(row[column["fundus"]]), float(row[column["adequate"]])
        fundus = p_fundus >= spec.fundus_threshold
        ok = fundus and p_adequate >= spec.adequate_threshold
        reasons: list[str] = []
        if not fundus:
            reasons = [NOT_FUNDUS]
        elif not ok:
            reasons = [REASONS[d] for d in DEFECTS if d in column and row[column[d]] >= spec.defect_threshold]
            reasons = reasons or [INADEQUATE]
        answers.append(Gradability(ok=ok, probability=round(p_fundus * p_adequate, 4), fundus=fundus,
                                   reasons=reasons, probabilities=by_name))
    return answers


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, stable for large magnitudes."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


def reasons_text(answers: Sequence[Gradability]) -> list[str]:
    """One line per answer: "gradable" or the reasons joined (for logs and CLI output)."""
    return ["gradable" if a.ok else "; ".join(a.reasons) for a in answers]
