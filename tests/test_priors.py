"""The record sampler matches BRSET's real distribution (through the shipped, derived priors)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from training.synth.priors import PRIORS_PATH, load_priors, sample_records

# From ../shared/data/README.md: ICDR counts 0-4 of the 16,266 BRSET rows.
BRSET_ICDR_SHARE = [c / 16266 for c in (15210, 162, 310, 190, 394)]
BRSET_AGE_MISSING_SHARE = 5445 / 16266


@pytest.fixture(scope="module")
def sample() -> list:
    return sample_records(20000, seed=11)


def test_icdr_distribution_matches_brset(sample: list) -> None:
    counts = Counter(r.dr_icdr for r in sample)
    for grade, share in enumerate(BRSET_ICDR_SHARE):
        assert abs(counts[grade] / len(sample) - share) < 0.006, (grade, counts)


def test_missingness_matches_brset_and_stays_missing(sample: list) -> None:
    age_missing = sum(r.patient_age is None for r in sample) / len(sample)
    assert abs(age_missing - BRSET_AGE_MISSING_SHARE) < 0.03
    # Non-diabetics have no diabetes duration and no insulin answer, as in BRSET.
    non_diabetic = [r for r in sample if r.diabetes is False]
    assert non_diabetic and all(r.diabetes_time_y is None for r in non_diabetic)


def test_patients_share_demographics_and_have_one_to_four_images(sample: list) -> None:
    by_patient: dict[str, list] = defaultdict(list)
    for record in sample:
        by_patient[record.patient_id].append(record)
    assert max(len(rows) for rows in by_patient.values()) <= 4
    assert 1.8 < len(sample) / len(by_patient) < 2.0  # BRSET: 16,266 images / 8,524 patients = 1.91
    for rows in by_patient.values():
        assert len({(r.patient_age, r.patient_sex, r.diabetes, r.comorbidities) for r in rows}) == 1
    two = [rows for rows in by_patient.values() if len(rows) == 2]
    both_eyes = sum(rows[0].exam_eye != rows[1].exam_eye for rows in two) / len(two)
    assert both_eyes > 0.9


def test_grades_correlate_between_a_patients_eyes(sample: list) -> None:
    by_patient: dict[str, list] = defaultdict(list)
    for record in sample:
        by_patient[record.patient_id].append(record.dr_icdr)
    multi = [g for g in by_patient.values() if len(g) > 1]
    sick = [g for g in multi if max(g) > 0]
    concordant_sick = sum(len(set(g)) == 1 for g in sick) / len(sick)
    assert concordant_sick > 0.4  # independent draws would give < 0.1 for a DR patient


def test_sampling_is_deterministic() -> None:
    assert sample_records(50, seed=4) == sample_records(50, seed=4)
    assert sample_records(50, seed=4) != sample_records(50, seed=5)


def test_priors_hold_only_aggregates() -> None:
    text = PRIORS_PATH.read_text()
    assert "img0" not in text  # no BRSET image id (img00001...) leaks into the shipped statistics
    assert set(load_priors()) >= {"grades_by_diabetes", "flags_by_icdr", "patient_by_diabetes"}


@pytest.mark.shared_data
def test_shipped_priors_are_what_the_script_derives(shared_data_dir: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from derive_priors import derive

    from index.archive.brset import read_labels

    records, _ = read_labels(shared_data_dir / "brset" / "labels-v1.0.0.csv")
    assert json.loads(json.dumps(derive(records))) == json.loads(PRIORS_PATH.read_text())
