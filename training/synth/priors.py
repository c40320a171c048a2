"""Sample synthetic BRSET records from priors derived from the real label file.

The priors (`priors.json`, written by `scripts/derive_priors.py`) hold only aggregate statistics:
images per patient, demographics and their missingness by diabetes status, the joint (ICDR, SDRG)
distribution by diabetes status, how often a patient's images share a grade, pathology and assessment
rates by ICDR grade, and the rate of inadequate quality with and without an acquisition defect.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from index.records import ASSESSMENT_FIELDS, PATHOLOGY_FIELDS, Assessment, Eye, FundusRecord, Sex

PRIORS_PATH = Path(__file__).with_name("priors.json")
QUALITY_DEFECT_FIELDS = ("focus", "illumination", "image_field", "artifacts")


@cache
def load_priors(path: Path = PRIORS_PATH) -> dict[str, Any]:
    """The generator's priors as a plain dict (cached)."""
    return json.loads(path.read_text())


def _choice(rng: np.random.Generator, distribution: dict[str, float]) -> str:
    keys = list(distribution)
    probabilities = np.array([distribution[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=probabilities / probabilities.sum()))]


def _from_bins(rng: np.random.Generator, bins: dict[str, float]) -> float:
    low, high = (float(x) for x in _choice(rng, bins).split("-"))
    return float(rng.uniform(low, high))


def _patient_fields(rng: np.random.Generator, priors: dict[str, Any]) -> dict[str, Any]:
    diabetes = bool(rng.random() < priors["diabetes"])
    patient = priors["patient_by_diabetes"][str(diabetes)]
    both_missing = rng.random() < patient["age_and_comorbidities_missing"]
    age: float | None = None
    if not both_missing and rng.random() >= _conditional_missing(patient, "age_missing"):
        age = float(int(_from_bins(rng, patient["age_bins"])))
    comorbidities: str | None = None
    if not both_missing and rng.random() >= _conditional_missing(patient, "comorbidities_missing"):
        comorbidities = _choice(rng, patient["comorbidities"])
    diabetes_time: float | None = None
    if patient["diabetes_time_bins"] and rng.random() >= patient["diabetes_time_missing"]:
        years = _from_bins(rng, patient["diabetes_time_bins"])
        diabetes_time = round(years * 2) / 2 if years < 1 else float(int(years))
    insulin_value = _choice(rng, patient["insulin"])
    return {
        "patient_sex": Sex(int(_choice(rng, priors["sex"]))),
        "camera": _choice(rng, priors["camera"]),
        "nationality": _choice(rng, priors["nationality"]),
        "diabetes": diabetes,
        "patient_age": age,
        "comorbidities": comorbidities,
        "diabetes_time_y": diabetes_time,
        "insulin": None if insulin_value == "missing" else insulin_value == "True",
    }


def _conditional_missing(patient: dict[str, Any], key: str) -> float:
    """P(field missing | not both age and comorbidities missing)."""
    joint = patient["age_and_comorbidities_missing"]
    return max(0.0, (patient[key] - joint) / max(1e-9, 1.0 - joint))


def _image_fields(rng: np.random.Generator, priors: dict[str, Any], icdr: int) -> dict[str, Any]:
    flags = priors["flags_by_icdr"][str(icdr)]
    fields: dict[str, Any] = {name: bool(rng.random() < flags[name]) for name in PATHOLOGY_FIELDS}
    for name in ASSESSMENT_FIELDS:
        abnormal = rng.random() < flags[f"{name}_abnormal"]
        fields[name] = Assessment.ABNORMAL if abnormal else Assessment.NORMAL
    defect = any(fields[name] == Assessment.ABNORMAL for name in QUALITY_DEFECT_FIELDS)
    inadequate = rng.random() < priors["quality_inadequate"]["defect" if defect else "no_defect"]
    fields["quality_adequate"] = not inadequate
    return fields


def _eyes(rng: np.random.Generator, n_images: int, both_eyes_probability: float) -> list[Eye]:
    first = Eye.RIGHT if rng.random() < 0.5 else Eye.LEFT
    other = Eye.LEFT if first == Eye.RIGHT else Eye.RIGHT
    if n_images == 1:
        return [first]
    if n_images == 2 and rng.random() >= both_eyes_probability:
        return [first, first]
    return [first if i % 2 == 0 else other for i in range(n_images)]


def sample_records(
    n: int, seed: int, priors: dict[str, Any] | None = None, quality_defects: float = 0.0
) -> list[FundusRecord]:
    """Sample `n` records patient by patient (ids `synth000001`, patients `1`, `2`, ...).

    Deterministic for a seed. A patient's further images copy the patient's grade pair with the
    probability measured on BRSET, else draw a fresh pair, so grade marginals match the priors.
    `quality_defects` (0-1): the share of photographs additionally given one or two acquisition defects
    (`QUALITY_DEFECT_FIELDS`, each equally likely) and marked inadequate, for training a gradability
    check on more defects than BRSET's 12%; 0 keeps BRSET's own rates.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 <= quality_defects <= 1.0:
        raise ValueError(f"quality_defects must be between 0 and 1, got {quality_defects}")
    priors = priors or load_priors()
    rng = np.random.default_rng(seed)
    records: list[FundusRecord] = []
    patient_number = 0
    while len(records) < n:
        patient_number += 1
        n_images = min(int(_choice(rng, priors["images_per_patient"])), n - len(records))
        patient = _patient_fields(rng, priors)
        grades = priors["grades_by_diabetes"][str(patient["diabetes"])]
        pair = _choice(rng, grades)
        for eye in _eyes(rng, n_images, priors["two_images_both_eyes"]):
            if records and records[-1].patient_id == str(patient_number):
                if rng.random() >= priors["same_grade_probability"]:
                    pair = _choice(rng, grades)
            icdr, sdrg = (int(g) for g in pair.split(","))
            records.append(
                FundusRecord(
                    image_id=f"synth{len(records) + 1:06d}",
                    patient_id=str(patient_number),
                    exam_eye=eye,
                    dr_icdr=icdr,
                    dr_sdrg=sdrg,
                    **patient,
                    **_image_fields(rng, priors, icdr),
                )
            )
    if quality_defects > 0:
        defect_rng = np.random.default_rng([seed, 1])  # its own stream: the labels above stay as without it
        records = [_with_defects(r, defect_rng) if defect_rng.random() < quality_defects else r for r in records]
    return records


def _with_defects(record: FundusRecord, rng: np.random.Generator) -> FundusRecord:
    """The record with one or two acquisition defects set abnormal and its quality inadequate."""
    count = 1 if rng.random() < 0.7 else 2
    picked = rng.choice(len(QUALITY_DEFECT_FIELDS), size=count, replace=False)
    update: dict[str, Any] = {QUALITY_DEFECT_FIELDS[int(i)]: Assessment.ABNORMAL for i in picked}
    return record.model_copy(update={**update, "quality_adequate": False})
