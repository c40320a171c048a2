"""Typed records of a BRSET-layout archive and the label vocabularies shared by every package.

One `FundusRecord` is one row of a BRSET label file (one photograph). Field names follow BRSET's
columns, with the dataset's misspellings normalised (`iluminaton` -> `illumination`, `insuline` ->
`insulin`, `drusens` -> `drusen`). Missing values stay `None`; nothing is imputed here.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ICDR_NAMES: tuple[str, ...] = (
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
)
"""International Clinical DR scale, grades 0-4."""

SDRG_NAMES: tuple[str, ...] = (
    "R0 no retinopathy",
    "R1 background retinopathy",
    "R2 pre-proliferative retinopathy (4 or more blot haemorrhages in one hemi-field)",
    "R3 pre-proliferative retinopathy (blot haemorrhages in both hemi-fields, venous beading or IRMA)",
    "R4 proliferative retinopathy or post-laser",
)
"""Scottish Diabetic Retinopathy Grading scheme as BRSET codes it (4 = proliferative and post-laser)."""

REFERABLE_ICDR = 2
"""Referable diabetic retinopathy: ICDR grade >= 2 (moderate NPDR or worse)."""

Against = Literal["image", "record"]
"""What a search compares its query with: the photographs' embeddings, or the records' (photograph +
structured data, fused)."""


class Sex(IntEnum):
    """BRSET `patient_sex` codes."""

    MALE = 1
    FEMALE = 2


class Eye(IntEnum):
    """BRSET `exam_eye` codes."""

    RIGHT = 1
    LEFT = 2


class Assessment(IntEnum):
    """BRSET codes for the anatomical and quality assessments (`optic_disc`, `focus`, ...)."""

    NORMAL = 1
    ABNORMAL = 2


ASSESSMENT_FIELDS: tuple[str, ...] = (
    "optic_disc",
    "vessels",
    "macula",
    "focus",
    "illumination",
    "image_field",
    "artifacts",
)
"""Record fields holding an `Assessment` (1 normal / 2 abnormal)."""

PATHOLOGY_FIELDS: tuple[str, ...] = (
    "diabetic_retinopathy",
    "macular_edema",
    "scar",
    "nevus",
    "amd",
    "vascular_occlusion",
    "hypertensive_retinopathy",
    "drusen",
    "hemorrhage",
    "retinal_detachment",
    "myopic_fundus",
    "increased_cup_disc",
    "other",
)
"""Record fields holding a 0/1 pathology flag (BRSET's 13 pathology columns)."""


class FundusRecord(BaseModel):
    """One photograph of the archive with its labels and patient metadata.

    `narrative` is the clinical text stored with the record (synthetic archives carry one; a real
    BRSET archive does not, and training writes one from the labels).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_id: str = Field(min_length=1)
    patient_id: str = Field(min_length=1)
    camera: str | None = None
    patient_age: float | None = Field(default=None, ge=0, le=120)
    comorbidities: str | None = None
    diabetes_time_y: float | None = Field(default=None, ge=0, le=100)
    insulin: bool | None = None
    patient_sex: Sex | None = None
    exam_eye: Eye | None = None
    diabetes: bool | None = None
    nationality: str | None = None
    optic_disc: Assessment | None = None
    vessels: Assessment | None = None
    macula: Assessment | None = None
    dr_sdrg: int | None = Field(default=None, ge=0, le=4)
    dr_icdr: int | None = Field(default=None, ge=0, le=4)
    focus: Assessment | None = None
    illumination: Assessment | None = None
    image_field: Assessment | None = None
    artifacts: Assessment | None = None
    diabetic_retinopathy: bool | None = None
    macular_edema: bool | None = None
    scar: bool | None = None
    nevus: bool | None = None
    amd: bool | None = None
    vascular_occlusion: bool | None = None
    hypertensive_retinopathy: bool | None = None
    drusen: bool | None = None
    hemorrhage: bool | None = None
    retinal_detachment: bool | None = None
    myopic_fundus: bool | None = None
    increased_cup_disc: bool | None = None
    other: bool | None = None
    quality_adequate: bool | None = None
    narrative: str | None = None

    @property
    def referable(self) -> bool | None:
        """Referable DR (ICDR >= 2), or None when the ICDR grade is missing."""
        return None if self.dr_icdr is None else self.dr_icdr >= REFERABLE_ICDR
