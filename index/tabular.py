"""The tabular feature spec: which structured fields the model reads, and how they become numbers.

Shared by training (fit on the training split, fed to the tabular MLP) and serving (the fitted spec
travels in the bundle as JSON and turns a request's structured fields into the same vector). Numpy only.

Inputs (the paper's "structured patient data": demographics and clinical history, known before anyone
looks at the photograph):

- numeric: `patient_age`, `diabetes_time_y`, standardised with the training split's mean and std, each
  with a missing indicator. A missing value is written as 0 (the mean) *and* flagged 1 in its indicator
  column, so the model always knows it is missing; it is never silently imputed.
- one-hot with an explicit "missing" column: `patient_sex`, `exam_eye` (acquisition metadata),
  `diabetes`, `insulin`, and `camera` (open vocabulary: the training split's most frequent models plus an
  "other" column).
- `comorbidities`: BRSET's comma-separated free text, multi-hot over the training split's most frequent
  tokens (spelling variants folded with `index.knowledge.COMORBIDITY_EXPANSIONS`), plus "other",
  "none reported" and "missing" columns.

Deliberately NOT inputs, because they are what the model predicts or are read off the photograph:
`dr_icdr`, `dr_sdrg` (the targets), the 13 pathology flags (`diabetic_retinopathy` is a near copy of
ICDR > 0, `hemorrhage` and `macular_edema` are DR lesions, the rest are findings on the image), the
anatomical and quality assessments and `quality_adequate` (an annotator's reading of the image). Feeding
any of them would let the record embedding and the grader copy the answer. `nationality` is constant in
BRSET and carries nothing; identifiers (`image_id`, `patient_id`) and the narrative never enter.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from index.knowledge import canonical_comorbidities
from index.records import Eye, FundusRecord, Sex

NUMERIC_FIELDS: tuple[str, ...] = ("patient_age", "diabetes_time_y")
"""Numeric inputs, standardised, each with a missing indicator."""

FIXED_CATEGORIES: dict[str, tuple[str, ...]] = {
    "patient_sex": ("female", "male"),
    "exam_eye": ("left", "right"),
    "diabetes": ("no", "yes"),
    "insulin": ("no", "yes"),
}
"""Categorical inputs with a closed vocabulary (plus a "missing" column each)."""

OPEN_CATEGORICAL_FIELDS: tuple[str, ...] = ("camera",)
"""Categorical inputs whose vocabulary is fitted (plus "other" and "missing" columns)."""

MISSING = "missing"
OTHER = "other"
NONE_REPORTED = "none reported"

Record = FundusRecord | Mapping[str, Any]
"""A record to transform: a `FundusRecord`, or a mapping with the same field names (e.g. a request)."""


class NumericFeature(BaseModel):
    """A standardised number: (value - mean) / std, plus a missing indicator."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: Literal["patient_age", "diabetes_time_y"]
    mean: float
    std: float = Field(gt=0)


class CategoricalFeature(BaseModel):
    """A one-hot over `categories`, plus "other" (when `open_vocabulary`) and "missing" columns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: Literal["patient_sex", "exam_eye", "diabetes", "insulin", "camera"]
    categories: tuple[str, ...]
    open_vocabulary: bool


class ComorbidityFeature(BaseModel):
    """A multi-hot over the fitted comorbidity `tokens`, plus "other", "none reported" and "missing"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: tuple[str, ...]


class FeatureSpec(BaseModel):
    """The fitted tabular feature spec; JSON-serialisable (`model_dump_json` / `model_validate_json`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    numeric: tuple[NumericFeature, ...]
    categorical: tuple[CategoricalFeature, ...]
    comorbidities: ComorbidityFeature

    @property
    def columns(self) -> list[str]:
        """Name of every output column, in order (`field` or `field=category`)."""
        names: list[str] = []
        for num in self.numeric:
            names += [num.field, f"{num.field}={MISSING}"]
        for cat in self.categorical:
            names += [f"{cat.field}={c}" for c in _slots(cat)]
        slots = (*self.comorbidities.tokens, OTHER, NONE_REPORTED, MISSING)
        names += [f"comorbidities={t}" for t in slots]
        return names

    @property
    def numeric_value_columns(self) -> list[int]:
        """The columns that hold the standardised numeric values (each followed by its missing flag)."""
        return [2 * i for i in range(len(self.numeric))]

    @property
    def width(self) -> int:
        """Number of output columns."""
        return len(self.columns)

    def transform(self, records: Sequence[Record]) -> np.ndarray:
        """Turn records into a float32 array (len(records), width); raises ValueError on a bad value."""
        out = np.zeros((len(records), self.width), dtype=np.float32)
        for row, record in enumerate(records):
            out[row] = self._transform_one(record)
        return out

    def _transform_one(self, record: Record) -> np.ndarray:
        values: list[float] = []
        for num in self.numeric:
            x = _number(record, num.field)
            values += [0.0, 1.0] if x is None else [(x - num.mean) / num.std, 0.0]
        for cat in self.categorical:
            slots = _slots(cat)
            key = _category(record, cat.field)
            if key is None:
                key = MISSING
            elif key not in cat.categories:
                if not cat.open_vocabulary:
                    expected = list(cat.categories)
                    raise ValueError(f"{cat.field}: unexpected value {key!r}, expected one of {expected}")
                key = OTHER
            values += [1.0 if slot == key else 0.0 for slot in slots]
        tokens = canonical_comorbidities(_get(record, "comorbidities"))
        known = self.comorbidities.tokens
        multi_hot = [0.0] * (len(known) + 3)
        if tokens is None:
            multi_hot[-1] = 1.0
        elif not tokens:
            multi_hot[-2] = 1.0
        for token in tokens or ():
            multi_hot[known.index(token) if token in known else len(known)] = 1.0
        return np.asarray(values + multi_hot, dtype=np.float32)


def fit_feature_spec(
    records: Sequence[Record], max_cameras: int = 8, max_comorbidities: int = 16, min_count: int = 5
) -> FeatureSpec:
    """Fit the spec on the training split: numeric mean/std, camera and comorbidity vocabularies.

    A camera or comorbidity token joins the vocabulary when it appears at least `min_count` times (the
    most frequent first, at most `max_cameras` / `max_comorbidities`); rarer values map to "other".
    """
    numeric = []
    for field in NUMERIC_FIELDS:
        xs = np.asarray([x for r in records if (x := _number(r, field)) is not None], dtype=np.float64)
        mean = float(xs.mean()) if xs.size else 0.0
        std = float(xs.std()) if xs.size > 1 else 0.0
        numeric.append(NumericFeature(field=field, mean=mean, std=std if std > 1e-6 else 1.0))

    categorical = [
        CategoricalFeature(field=field, categories=cats, open_vocabulary=False)
        for field, cats in FIXED_CATEGORIES.items()
    ]
    for field in OPEN_CATEGORICAL_FIELDS:
        counts = Counter(c for r in records if (c := _category(r, field)) is not None)
        cats = _frequent(counts, max_cameras, min_count)
        categorical.append(CategoricalFeature(field=field, categories=cats, open_vocabulary=True))

    token_counts = Counter(t for r in records for t in canonical_comorbidities(_get(r, "comorbidities")) or ())
    tokens = _frequent(token_counts, max_comorbidities, min_count)
    return FeatureSpec(
        numeric=tuple(numeric),
        categorical=tuple(categorical),
        comorbidities=ComorbidityFeature(tokens=tokens),
    )


def _slots(cat: CategoricalFeature) -> tuple[str, ...]:
    return (*cat.categories, OTHER, MISSING) if cat.open_vocabulary else (*cat.categories, MISSING)


def _frequent(counts: Counter[str], limit: int, min_count: int) -> tuple[str, ...]:
    # Ties broken by name so that the spec does not depend on record order.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(name for name, n in ranked[:limit] if n >= min_count)


def _get(record: Record, field: str) -> Any:
    return record.get(field) if isinstance(record, Mapping) else getattr(record, field)


def _number(record: Record, field: str) -> float | None:
    value = _get(record, field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    return None if math.isnan(value) else float(value)


def _category(record: Record, field: str) -> str | None:
    """The category key of a field's value, or None when missing."""
    value = _get(record, field)
    if value is None:
        return None
    if field == "patient_sex":
        return _enum_name(Sex, value, field)
    if field == "exam_eye":
        return _enum_name(Eye, value, field)
    if field in ("diabetes", "insulin"):
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
            return value.strip().lower()
        raise ValueError(f"{field}: expected yes/no, got {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected text, got {value!r}")
    return value.strip() or None


def _enum_name(enum: type[Sex] | type[Eye], value: Any, field: str) -> str:
    if isinstance(value, str):
        name = value.strip().lower()
        if name in {member.name.lower() for member in enum}:
            return name
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return enum(value).name.lower()
        except ValueError:
            pass
    raise ValueError(f"{field}: unexpected value {value!r}, expected one of {[m.name.lower() for m in enum]}")
