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

A photograph also counts as a fundus photograph when it has a fundus camera's layout and colour
(`fundus_layout`: a bright field with dark corners, red over green over blue), whatever the network
says. The network learns fundus photographs from rendered ones only; on real photographs it is unsure
(measured on the EyePACS sample, README "Trust"), and a real photograph must never be refused as "not a
fundus photograph" for looking unlike a rendering. The rule refuses none of scikit-image's sample images
and accepts every rendered and nearly every real fundus photograph tried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from index.preprocess import FOV_THRESHOLD, ImageSpec

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
    layout_rule: bool = True
    """Also count a photograph with a fundus camera's layout and colour as a fundus photograph
    (`fundus_layout`)."""
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
    """P(fundus photograph) x P(adequate quality); P(fundus photograph) is 1 where the layout rule holds."""
    fundus: bool
    """False: not a fundus photograph at all (no grade should be given)."""
    recognised: bool = True
    """The network itself took it for a fundus photograph (False where only the layout rule did: a kind of
    photograph the gate was not trained on, whose quality judgement may not apply)."""
    reasons: list[str] = field(default_factory=list)
    """Why it is not gradable, in words (empty when ok)."""
    probabilities: dict[str, float] = field(default_factory=dict)
    """Every gate output by name."""


LAYOUT_SIDE = 96
"""The layout rule looks at a thumbnail of this many pixels on its longer side."""
DARK_CORNER = 0.25
"""A corner (a square of 12% of the shorter side) is dark when less than this share of it is in the field."""


def fundus_layout(image: Image.Image) -> bool:
    """Whether a photograph looks like a fundus camera's: a bright field filling 25-97% of the frame, at
    least three dark corners, and red over green over blue inside the field (red >= 1.03 x green and
    >= 1.1 x blue: an orange-red retina, not a grey, green or blue scene)."""
    small = image.convert("RGB")
    small.thumbnail((LAYOUT_SIDE, LAYOUT_SIDE))
    rgb = np.asarray(small, dtype=np.float32) / 255
    brightness = rgb.mean(axis=-1)
    reference = float(np.percentile(brightness, 99))
    if reference < 0.05:
        return False
    field = brightness > FOV_THRESHOLD * reference
    corner = max(2, round(min(field.shape) * 0.12))
    corners = (field[:corner, :corner], field[:corner, -corner:], field[-corner:, :corner], field[-corner:, -corner:])
    dark_corners = sum(float(c.mean()) < DARK_CORNER for c in corners)
    share = float(field.mean())
    red, green, blue = (float(rgb[..., channel][field].mean()) for channel in range(3))
    return dark_corners >= 3 and 0.25 <= share <= 0.97 and red >= 1.03 * green and red >= 1.1 * blue and green >= blue


def assess(
    probabilities: np.ndarray, spec: GateSpec, layouts: Sequence[bool] | None = None
) -> list[Gradability]:
    """The gate's probabilities (N, len(spec.outputs)) -> one `Gradability` per photograph. `layouts`:
    `fundus_layout` of each photograph (used when `spec.layout_rule`; None: not checked)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(spec.outputs):
        raise ValueError(f"gate probabilities must have shape (N, {len(spec.outputs)}), got {probabilities.shape}")
    if layouts is not None and len(layouts) != len(probabilities):
        raise ValueError(f"{len(layouts)} layouts for {len(probabilities)} photographs")
    column = {name: i for i, name in enumerate(spec.outputs)}
    answers = []
    for index, row in enumerate(probabilities):
        by_name = {name: round(float(row[i]), 4) for name, i in column.items()}
        p_fundus, p_adequate = float(row[column["fundus"]]), float(row[column["adequate"]])
        recognised = p_fundus >= spec.fundus_threshold
        if spec.layout_rule and layouts is not None:
            by_name["fundus_layout"] = float(layouts[index])
            if layouts[index]:
                p_fundus = 1.0  # the rule is not a probability: where it holds, the photograph is a fundus photograph
        fundus = p_fundus >= spec.fundus_threshold
        ok = fundus and p_adequate >= spec.adequate_threshold
        reasons: list[str] = []
        if not fundus:
            reasons = [NOT_FUNDUS]
        elif not ok:
            reasons = [REASONS[d] for d in DEFECTS if d in column and row[column[d]] >= spec.defect_threshold]
            reasons = reasons or [INADEQUATE]
        answers.append(Gradability(ok=ok, probability=round(p_fundus * p_adequate, 4), fundus=fundus,
                                   reasons=reasons, probabilities=by_name, recognised=recognised))
    return answers

