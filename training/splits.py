"""Patient-level train/val/test splits, stratified by ICDR grade.

A patient never straddles two splits: all images of a patient go where the patient goes. Patients are
stratified by their worst ICDR grade (missing grades form their own stratum), and within a stratum each
patient joins the split furthest below its target share of images, so rare grades reach every split.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from index.records import FundusRecord

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)

Splits = dict[str, list[str]]


def make_splits(
    records: Sequence[FundusRecord],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Splits:
    """Split image ids into train/val/test by patient, stratified by worst ICDR grade."""
    if len(fractions) != len(SPLIT_NAMES) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    by_patient: dict[str, list[FundusRecord]] = defaultdict(list)
    for record in records:
        by_patient[record.patient_id].append(record)

    strata: dict[int, list[str]] = defaultdict(list)
    for patient_id, rows in by_patient.items():
        grades = [r.dr_icdr for r in rows if r.dr_icdr is not None]
        strata[max(grades) if grades else -1].append(patient_id)

    rng = random.Random(seed)
    splits: Splits = {name: [] for name in SPLIT_NAMES}
    for stratum in sorted(strata):
        patients = sorted(strata[stratum])
        rng.shuffle(patients)
        total = sum(len(by_patient[p]) for p in patients)
        assigned = [0] * len(SPLIT_NAMES)
        for patient_id in patients:
            # The split with the largest shortfall against its target share takes the patient.
            deficits = [fraction * total - done for fraction, done in zip(fractions, assigned, strict=True)]
            target = max(range(len(SPLIT_NAMES)), key=lambda i: (deficits[i], -i))
            assigned[target] += len(by_patient[patient_id])
            splits[SPLIT_NAMES[target]].extend(r.image_id for r in by_patient[patient_id])
    return {name: sorted(ids) for name, ids in splits.items()}


def check_patient_disjoint(records: Sequence[FundusRecord], splits: Splits) -> None:
    """Raise ValueError if any patient has images in two splits or an image is in none or two."""
    split_of_image: dict[str, str] = {}
    for name, ids in splits.items():
        for image_id in ids:
            if image_id in split_of_image:
                raise ValueError(f"image {image_id} is in both {split_of_image[image_id]} and {name}")
            split_of_image[image_id] = name
    split_of_patient: dict[str, str] = {}
    for record in records:
        name = split_of_image.get(record.image_id)
        if name is None:
            raise ValueError(f"image {record.image_id} is in no split")
        seen = split_of_patient.setdefault(record.patient_id, name)
        if seen != name:
            raise ValueError(f"a patient has images in both {seen} and {name}")


def save_splits(splits: Splits, path: Path) -> None:
    """Write splits as a JSON object (split name -> image ids), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(splits, indent=1) + "\n")
    os.replace(tmp, path)


def load_splits(path: Path) -> Splits:
    """Read a splits file, checking it is a JSON object of split name -> list of image ids."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: splits file not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not all(
        isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in data.values()
    ):
        raise ValueError(f"{path}: expected a JSON object of split name -> list of image ids")
    return data
