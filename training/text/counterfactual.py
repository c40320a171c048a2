"""Counterfactual records: the same record with one stated fact made false.

Hard negatives for text -> record retrieval. A narrative states some of its record's structured facts (age,
sex, eye, camera, diabetes, insulin, duration, comorbidities); in a batch of random records these rarely
matter, since the other records already differ in grade or eye. A counterfactual keeps the photograph and
every other field, and changes one stated fact so that the record no longer fits the text
(`narrative_facts.record_fits` is false): scored against the text, it teaches both the text and the record
embedding to carry that fact. Only fields the tabular features encode are changed (the photograph is
shared with the positive, so a changed image fact would be a contradiction, not a negative).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from index.knowledge import comorbidity_tokens
from index.records import Eye, FundusRecord, Sex
from training.text.narrative_facts import StatedFacts, record_fits

_FLIPPED_EYE = {Eye.LEFT: Eye.RIGHT, Eye.RIGHT: Eye.LEFT}
_FLIPPED_SEX = {Sex.FEMALE: Sex.MALE, Sex.MALE: Sex.FEMALE}
MAX_AGE = 100


@dataclass(frozen=True)
class CounterfactualPool:
    """Values seen in the training records that a counterfactual may take (cameras, comorbidity texts)."""

    cameras: tuple[str, ...]
    comorbidities: tuple[str, ...]

    @classmethod
    def from_records(cls, records: Sequence[FundusRecord]) -> CounterfactualPool:
        """The distinct cameras and non-empty comorbidity texts of `records`, in a stable order."""
        cameras = sorted({r.camera.strip() for r in records if r.camera and r.camera.strip()})
        comorbidities = sorted({r.comorbidities for r in records if comorbidity_tokens(r.comorbidities)})
        return cls(tuple(cameras), tuple(comorbidities))


Update = dict[str, object] | None
Change = Callable[[FundusRecord, random.Random, CounterfactualPool], Update]


def _other_age(record: FundusRecord, rng: random.Random, pool: CounterfactualPool, far: bool) -> Update:
    if record.patient_age is None:
        return None
    age = int(record.patient_age)
    offsets = [d for d in range(-20, 21) if (abs(d) >= 10 if far else 0 < abs(d) <= 12) and 0 < age + d <= MAX_AGE]
    return {"patient_age": float(age + rng.choice(offsets))} if offsets else None


def _other_duration(record: FundusRecord, rng: random.Random, pool: CounterfactualPool) -> Update:
    if record.diabetes_time_y is None:
        return None
    return {"diabetes_time_y": float(max(0, round(record.diabetes_time_y) + rng.choice([-6, -3, -2, 2, 3, 6, 10])))}


def _other_camera(record: FundusRecord, rng: random.Random, pool: CounterfactualPool) -> Update:
    others = [c for c in pool.cameras if c != (record.camera or "").strip()]
    return {"camera": rng.choice(others)} if others else None


def _other_comorbidities(record: FundusRecord, rng: random.Random, pool: CounterfactualPool) -> Update:
    others = [c for c in pool.comorbidities if c != record.comorbidities]
    return {"comorbidities": rng.choice(others)} if others else None


CHANGES: dict[str, Change] = {
    "exam_eye": lambda r, rng, p: {"exam_eye": _FLIPPED_EYE[r.exam_eye]} if r.exam_eye else None,
    "patient_sex": lambda r, rng, p: {"patient_sex": _FLIPPED_SEX[r.patient_sex]} if r.patient_sex else None,
    "age_exact": lambda r, rng, p: _other_age(r, rng, p, far=False),
    "age_decade": lambda r, rng, p: _other_age(r, rng, p, far=True),
    "diabetes": lambda r, rng, p: {"diabetes": not r.diabetes} if r.diabetes is not None else None,
    "insulin": lambda r, rng, p: {"insulin": not r.insulin} if r.insulin is not None else None,
    "diabetes_duration": _other_duration,
    "camera": _other_camera,
    "comorbidities_none": _other_comorbidities,
    "comorbidity": lambda r, rng, p: {"comorbidities": "0"},
}
"""For each kind of stated fact held in the tabular features: how to change the record so it may stop fitting."""


def counterfactual(
    record: FundusRecord, facts: StatedFacts, rng: random.Random, pool: CounterfactualPool
) -> FundusRecord | None:
    """`record` with one of the facts the text states made false (the kind drawn at random among those that
    can be changed), or None when no stated fact can be."""
    kinds = sorted(facts.kinds() & CHANGES.keys())
    rng.shuffle(kinds)
    for kind in kinds:
        update = CHANGES[kind](record, rng, pool)
        if update is None:
            continue
        changed = record.model_copy(update=update)
        if not record_fits(changed, facts):
            return changed
    return None
