"""Derive the synthetic generator's priors from a real BRSET label file.

Only aggregate statistics leave this script (probabilities and histograms); no row of the label file is
copied. The output is `training/synth/priors.json`, which the generator ships with.

    python scripts/derive_priors.py ../shared/data/brset/labels-v1.0.0.csv training/synth/priors.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from index.archive.brset import read_labels
from index.records import ASSESSMENT_FIELDS, PATHOLOGY_FIELDS, Assessment, FundusRecord

AGE_EDGES = list(range(0, 105, 5))
DIABETES_TIME_EDGES = [0, 1, 2, 5, 10, 15, 20, 25, 30, 40, 61]
TOP_COMORBIDITIES = 30


def _normalise(counter: Counter) -> dict[str, float]:
    total = sum(counter.values())
    return {str(key): round(count / total, 6) for key, count in sorted(counter.items(), key=str)}


def _histogram(values: list[float], edges: list[int]) -> dict[str, float]:
    counts: Counter = Counter()
    for value in values:
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            if low <= value < high:
                counts[f"{low}-{high}"] += 1
                break
    return _normalise(counts)


def _patient_priors(patients: list[FundusRecord]) -> dict:
    ages = [p.patient_age for p in patients if p.patient_age is not None]
    times = [p.diabetes_time_y for p in patients if p.diabetes_time_y is not None]
    comorbidities = Counter(p.comorbidities for p in patients if p.comorbidities is not None)
    top = dict(comorbidities.most_common(TOP_COMORBIDITIES))
    n = len(patients)
    return {
        "patients": n,
        "age_missing": round(sum(p.patient_age is None for p in patients) / n, 6),
        "age_bins": _histogram(ages, AGE_EDGES),
        "comorbidities_missing": round(sum(p.comorbidities is None for p in patients) / n, 6),
        # Age and comorbidities are missing together in BRSET (the same intake form).
        "age_and_comorbidities_missing": round(
            sum(p.patient_age is None and p.comorbidities is None for p in patients) / n, 6
        ),
        "comorbidities": _normalise(Counter(top)),
        "diabetes_time_missing": round(sum(p.diabetes_time_y is None for p in patients) / n, 6),
        "diabetes_time_bins": _histogram(times, DIABETES_TIME_EDGES) if times else {},
        "insulin": _normalise(Counter("missing" if p.insulin is None else str(p.insulin) for p in patients)),
    }


def derive(records: list[FundusRecord]) -> dict:
    """Aggregate statistics of a BRSET label file, as the generator's priors."""
    by_patient: dict[str, list[FundusRecord]] = defaultdict(list)
    for record in records:
        by_patient[record.patient_id].append(record)
    first_rows = [rows[0] for rows in by_patient.values()]

    grades_by_diabetes: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        if record.dr_icdr is not None and record.dr_sdrg is not None:
            grades_by_diabetes[str(record.diabetes)][f"{record.dr_icdr},{record.dr_sdrg}"] += 1

    # Probability that a further image of a patient copies the patient's grade pair, solved from the
    # observed concordance c = q + (1 - q) * sum(p^2) of patients with several images.
    multi = [rows for rows in by_patient.values() if len(rows) > 1]
    concordance = sum(len({(r.dr_icdr, r.dr_sdrg) for r in rows}) == 1 for rows in multi) / len(multi)
    all_pairs = Counter(f"{r.dr_icdr},{r.dr_sdrg}" for r in records)
    chance = sum((c / len(records)) ** 2 for c in all_pairs.values())
    same_grade_probability = (concordance - chance) / (1 - chance)

    flags_by_icdr: dict[str, dict[str, float]] = {}
    for grade in range(5):
        rows = [r for r in records if r.dr_icdr == grade]
        flags: dict[str, float] = {}
        for name in PATHOLOGY_FIELDS:
            known = [getattr(r, name) for r in rows if getattr(r, name) is not None]
            flags[name] = round(sum(known) / len(known), 6) if known else 0.0
        for name in ASSESSMENT_FIELDS:
            known = [getattr(r, name) for r in rows if getattr(r, name) is not None]
            flags[f"{name}_abnormal"] = (
                round(sum(v == Assessment.ABNORMAL for v in known) / len(known), 6) if known else 0.0
            )
        flags_by_icdr[str(grade)] = flags

    def has_defect(record: FundusRecord) -> bool:
        return any(
            getattr(record, name) == Assessment.ABNORMAL
            for name in ("focus", "illumination", "image_field", "artifacts")
        )

    inadequate: dict[str, float] = {}
    for label, subset in (("defect", True), ("no_defect", False)):
        rows = [r for r in records if has_defect(r) == subset and r.quality_adequate is not None]
        inadequate[label] = round(sum(not r.quality_adequate for r in rows) / len(rows), 6)

    return {
        "source": f"BRSET labels: {len(records)} rows, {len(by_patient)} patients (aggregates only)",
        "images_per_patient": _normalise(Counter(len(rows) for rows in by_patient.values())),
        "two_images_both_eyes": round(
            sum(len({r.exam_eye for r in rows}) == 2 for rows in by_patient.values() if len(rows) == 2)
            / max(1, sum(len(rows) == 2 for rows in by_patient.values())),
            6,
        ),
        "sex": _normalise(Counter(str(int(p.patient_sex)) for p in first_rows if p.patient_sex)),
        "camera": _normalise(Counter(p.camera for p in first_rows if p.camera)),
        "nationality": _normalise(Counter(p.nationality for p in first_rows if p.nationality)),
        "diabetes": round(sum(bool(p.diabetes) for p in first_rows) / len(first_rows), 6),
        "patient_by_diabetes": {
            str(flag): _patient_priors([p for p in first_rows if p.diabetes is flag]) for flag in (True, False)
        },
        "grades_by_diabetes": {key: _normalise(counter) for key, counter in grades_by_diabetes.items()},
        "same_grade_probability": round(same_grade_probability, 6),
        "flags_by_icdr": flags_by_icdr,
        "quality_inadequate": inadequate,
    }


def main() -> None:
    """Read a BRSET label file and write the derived priors as JSON."""
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/derive_priors.py LABELS_CSV OUT_JSON")
    records, _ = read_labels(Path(sys.argv[1]))
    priors = derive(records)
    Path(sys.argv[2]).write_text(json.dumps(priors, indent=1) + "\n")
    print(f"wrote {sys.argv[2]} from {len(records)} rows")


if __name__ == "__main__":
    main()
