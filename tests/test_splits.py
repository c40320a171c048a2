"""Patient-level splits: disjoint by patient, stratified by grade, deterministic."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from index.archive.brset import read_labels
from index.records import FundusRecord
from training.splits import check_patient_disjoint, load_splits, make_splits, save_splits
from training.synth.priors import sample_records


def _grades(records: list[FundusRecord], ids: list[str]) -> Counter:
    grade_of = {r.image_id: r.dr_icdr for r in records}
    return Counter(grade_of[i] for i in ids)


def test_splits_are_patient_disjoint_and_cover_every_image() -> None:
    records = sample_records(2000, seed=3)
    splits = make_splits(records, seed=0)
    check_patient_disjoint(records, splits)
    assert sorted(i for ids in splits.values() for i in ids) == sorted(r.image_id for r in records)
    sizes = {name: len(ids) for name, ids in splits.items()}
    assert abs(sizes["train"] / 2000 - 0.7) < 0.02
    assert abs(sizes["test"] / 2000 - 0.15) < 0.02


def test_every_split_gets_every_grade() -> None:
    records = sample_records(3000, seed=5)
    splits = make_splits(records, seed=1)
    for name in ("train", "val", "test"):
        grades = _grades(records, splits[name])
        assert all(grades[g] > 0 for g in range(5)), (name, grades)


def test_splits_are_deterministic_for_a_seed() -> None:
    records = sample_records(500, seed=2)
    assert make_splits(records, seed=7) == make_splits(records, seed=7)
    assert make_splits(records, seed=7) != make_splits(records, seed=8)


def test_disjointness_check_catches_a_straddling_patient() -> None:
    records = [
        FundusRecord(image_id="a", patient_id="p1", dr_icdr=0),
        FundusRecord(image_id="b", patient_id="p1", dr_icdr=0),
    ]
    with pytest.raises(ValueError, match="patient"):
        check_patient_disjoint(records, {"train": ["a"], "val": [], "test": ["b"]})


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="fractions"):
        make_splits(sample_records(10, seed=0), fractions=(0.5, 0.5, 0.5))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    splits = make_splits(sample_records(100, seed=0))
    save_splits(splits, tmp_path / "splits.json")
    assert load_splits(tmp_path / "splits.json") == splits
    (tmp_path / "bad.json").write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="bad.json"):
        load_splits(tmp_path / "bad.json")


@pytest.mark.shared_data
def test_real_label_file_splits_keep_patients_together(shared_data_dir: Path) -> None:
    records, _ = read_labels(shared_data_dir / "brset" / "labels-v1.0.0.csv")
    splits = make_splits(records, seed=0)
    check_patient_disjoint(records, splits)
    split_of = {image_id: name for name, ids in splits.items() for image_id in ids}
    patients = {name: {r.patient_id for r in records if split_of[r.image_id] == name} for name in splits}
    assert not patients["train"] & patients["test"]
    assert not patients["train"] & patients["val"]
    assert not patients["val"] & patients["test"]
    for name in ("train", "val", "test"):
        assert all(_grades(records, splits[name])[g] > 0 for g in range(5))
