"""Clinical narratives: deterministic, varied, and never stating anything the record does not say."""

from __future__ import annotations

import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from index.knowledge import ICDR_DESCRIPTIONS, PATHOLOGY_PRESENT, SDRG_DESCRIPTIONS
from index.records import ASSESSMENT_FIELDS, PATHOLOGY_FIELDS, Assessment, Eye, FundusRecord, Sex
from training.text.narratives import (
    MAX_WORDS,
    NARRATIVE_TEMPLATE_COUNT,
    stated_icdr_grades,
    stated_sdrg_grades,
    write_narrative,
)

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(12)
COMORBIDITIES = (
    "0",
    "SAH",
    "diabetes, SAH",
    "diabetes",
    "diabetes1",
    "diabetes1, SAH, hypothyroidism",
    "hypothyroidism",
    "SAH, acute myocardium infarct",
    "lupus, hydroxychloroquine",
    "encephalic vascular accident",
    "DPOC, tabagism",
)
CAMERAS = ("Canon CR", "NIKON NF5050")


def maybe(rng: random.Random, value: object, p_none: float = 0.2) -> object:
    """`value`, or None with probability `p_none`."""
    return None if rng.random() < p_none else value


def random_record(rng: random.Random, index: int, **overrides: object) -> FundusRecord:
    """A record with random values in every field (each possibly missing), grades drawn independently."""
    fields: dict[str, object] = {
        "image_id": f"img{77000 + index}",
        "patient_id": f"P-{4200 + index}",
        "camera": maybe(rng, rng.choice(CAMERAS)),
        "patient_age": maybe(rng, rng.choice([rng.randint(5, 99), round(rng.uniform(10, 100), 1)]), 0.3),
        "comorbidities": maybe(rng, rng.choice(COMORBIDITIES), 0.4),
        "diabetes_time_y": maybe(rng, rng.choice([0, 0.5, 0.25, 1, 2.5, rng.randint(1, 40)]), 0.3),
        "insulin": maybe(rng, rng.random() < 0.5, 0.3),
        "patient_sex": maybe(rng, rng.choice(list(Sex))),
        "exam_eye": maybe(rng, rng.choice(list(Eye))),
        "diabetes": maybe(rng, rng.random() < 0.5),
        "nationality": maybe(rng, "Brazil"),
        "dr_icdr": maybe(rng, rng.randint(0, 4), 0.1),
        "dr_sdrg": maybe(rng, rng.randint(0, 4), 0.1),
        "quality_adequate": maybe(rng, rng.random() < 0.7),
    }
    for name in ASSESSMENT_FIELDS:
        fields[name] = maybe(rng, Assessment.ABNORMAL if rng.random() < 0.3 else Assessment.NORMAL)
    for name in PATHOLOGY_FIELDS:
        fields[name] = maybe(rng, rng.random() < 0.2)
    fields.update(overrides)
    return FundusRecord(**fields)


def records(count: int, seed: int = 0, **overrides: object) -> list[FundusRecord]:
    """`count` random records (deterministic for `seed`)."""
    rng = random.Random(seed)
    return [random_record(rng, i, **overrides) for i in range(count)]


def full_record(**overrides: object) -> FundusRecord:
    """A record with every field present (BRSET-like values)."""
    fields: dict[str, object] = {
        "image_id": "img77777",
        "patient_id": "P-4242",
        "camera": "Canon CR",
        "patient_age": 63,
        "comorbidities": "diabetes1, SAH",
        "diabetes_time_y": 12,
        "insulin": True,
        "patient_sex": Sex.FEMALE,
        "exam_eye": Eye.RIGHT,
        "diabetes": True,
        "nationality": "Brazil",
        "dr_icdr": 2,
        "dr_sdrg": 2,
        "quality_adequate": True,
        **{name: Assessment.NORMAL for name in ASSESSMENT_FIELDS},
        **{name: False for name in PATHOLOGY_FIELDS},
    }
    fields.update(overrides)
    return FundusRecord(**fields)


def texts(record: FundusRecord, seeds: range = SEEDS) -> list[str]:
    """The record's narratives for several seeds."""
    return [write_narrative(record, seed) for seed in seeds]


# --- determinism and variety -------------------------------------------------------------------------


def test_same_record_and_seed_give_the_same_text() -> None:
    for record in records(50):
        assert write_narrative(record, 3) == write_narrative(record, 3)


def test_text_does_not_depend_on_the_process_hash_salt() -> None:
    record = full_record()
    code = (
        "from tests.test_narratives import full_record; from training.text.narratives import write_narrative; "
        "print(write_narrative(full_record(), 5))"
    )
    outputs = set()
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        outputs.add(result.stdout.strip())
    assert outputs == {write_narrative(record, 5)}


def test_different_seeds_give_different_texts() -> None:
    sample = records(100)
    differing = sum(write_narrative(r, 0) != write_narrative(r, 1) for r in sample)
    assert differing >= 90
    assert len(set(texts(full_record(), range(30)))) >= 28


def opening(text: str) -> str:
    """The first two words, with eye side and numbers neutralised (so "Right eye"/"Left eye" count once)."""
    words = re.sub(r"\d+", "N", text).lower().split()[:2]
    return re.sub(r"\b(right|left)\b", "EYE", " ".join(words)).strip(",.:;")


def test_many_templates_and_openings_appear() -> None:
    assert NARRATIVE_TEMPLATE_COUNT >= 8
    openings = {opening(write_narrative(r, 0)) for r in records(200)}
    assert len(openings) >= 12, sorted(openings)


def test_synonyms_and_spellings_vary_but_stay_consistent_within_a_text() -> None:
    record = full_record(dr_icdr=2, hemorrhage=True, macular_edema=True)
    all_texts = texts(record, range(200))
    joined = " ".join(all_texts)
    assert "haemorrhage" in joined and "hemorrhage" in joined
    assert "oedema" in joined and "edema" in joined
    for text in all_texts:
        assert not ("haemorrhage" in text and "hemorrhage" in text), text
        assert not ("oedema" in text and re.search(r"\bedema", text)), text


# --- a missing field is never stated; a stated value is the record's value ---------------------------

SEX_WORDS = {
    Sex.FEMALE: re.compile(r"\b(woman|women|female|girl|lady|she|her)\b", re.IGNORECASE),
    Sex.MALE: re.compile(r"\b(man|men|male|boy|gentleman|he|his|him)\b", re.IGNORECASE),
}
EYE_WORDS = {
    Eye.RIGHT: re.compile(r"\b(right|OD)\b", re.IGNORECASE),
    Eye.LEFT: re.compile(r"\b(left|OS)\b", re.IGNORECASE),
}
EXACT_AGE = re.compile(r"(\d+)-year-old|\baged (\d+)|\bage:? (\d+)", re.IGNORECASE)
DECADE_AGE = re.compile(
    r"\bin (?:his|her|their) (twenties|thirties|forties|fifties|sixties|seventies|eighties|nineties)"
)
DECADE_START = {
    "twenties": 20,
    "thirties": 30,
    "forties": 40,
    "fifties": 50,
    "sixties": 60,
    "seventies": 70,
    "eighties": 80,
    "nineties": 90,
}
DURATION = re.compile(r"(\d+(?:\.\d+)?) (years?|months?)\b")
INSULIN_YES = re.compile(r"(?<!no )\binsulin (?:therapy|treatment|use)\b|\bInsulin: yes\b")
INSULIN_NO = re.compile(r"\bno insulin\b|\bInsulin: no\b")
DIABETES_YES = re.compile(
    r"(?<!no )\bknown (?:type 1 )?diabetes\b|\bdiabetes (?:mellitus|for|of)\b|\btype 1 diabetes\b"
    r"|\bDiabetes: yes\b|\bnewly diagnosed\b"
)
DIABETES_NO = re.compile(r"\bno (?:known |history of )?diabetes\b|\bnon-diabetic\b|\bDiabetes: no\b")
CAMERA_WORDS = re.compile(r"\b(camera|Canon|NIKON|imaged on|taken with)\b", re.IGNORECASE)


def test_missing_fields_are_never_stated() -> None:
    for record in records(400, seed=1):
        for seed in range(3):
            text = write_narrative(record, seed)
            if record.patient_sex is None:
                assert not (SEX_WORDS[Sex.FEMALE].search(text) or SEX_WORDS[Sex.MALE].search(text)), text
            if record.exam_eye is None:
                assert not (EYE_WORDS[Eye.RIGHT].search(text) or EYE_WORDS[Eye.LEFT].search(text)), text
            if record.patient_age is None:
                assert "year-old" not in text and not EXACT_AGE.search(text), text
                assert not DECADE_AGE.search(text), text
            if record.diabetes_time_y is None:
                assert not DURATION.search(text) and "newly diagnosed" not in text, text
            if record.insulin is None:
                assert "insulin" not in text.lower(), text
            if record.diabetes is None:
                assert not DIABETES_YES.search(text) and not DIABETES_NO.search(text), text
            if record.camera is None:
                assert not CAMERA_WORDS.search(text), text
            if record.dr_icdr is None:
                assert stated_icdr_grades(text) == set(), text
                assert not re.search(r"\b(mild|moderate|severe|NPDR|PDR|ICDR)\b", text, re.IGNORECASE), text
            if record.dr_sdrg is None:
                assert stated_sdrg_grades(text) == set() and "SDRG" not in text, text
            assert not re.search(r"\b(None|nan|NA|unknown|not recorded|missing)\b", text), text


def test_stated_values_are_the_records_values() -> None:
    seen = {"age": 0, "decade": 0, "duration": 0, "sex": 0, "eye": 0}
    for record in records(400, seed=2):
        for seed in range(3):
            text = write_narrative(record, seed)
            if record.patient_sex is not None:
                other = Sex.MALE if record.patient_sex == Sex.FEMALE else Sex.FEMALE
                assert not SEX_WORDS[other].search(text), text
                seen["sex"] += bool(SEX_WORDS[record.patient_sex].search(text))
            if record.exam_eye is not None:
                other_eye = Eye.LEFT if record.exam_eye == Eye.RIGHT else Eye.RIGHT
                assert not EYE_WORDS[other_eye].search(text), text
                seen["eye"] += bool(EYE_WORDS[record.exam_eye].search(text))
            if record.patient_age is not None:
                for match in EXACT_AGE.finditer(text):
                    assert int(next(g for g in match.groups() if g)) == int(record.patient_age), text
                    seen["age"] += 1
                for match in DECADE_AGE.finditer(text):
                    assert DECADE_START[match.group(1)] == int(record.patient_age) // 10 * 10, text
                    seen["decade"] += 1
            for match in DURATION.finditer(text):
                assert record.diabetes is True and record.diabetes_time_y is not None, text
                value, unit = float(match.group(1)), match.group(2)
                years = value / 12 if unit.startswith("month") else value
                tolerance = 1 / 24 if unit.startswith("month") else 0.051
                assert abs(years - record.diabetes_time_y) <= tolerance, text
                seen["duration"] += 1
            if "newly diagnosed" in text:
                assert record.diabetes_time_y == 0, text
            if record.insulin is True:
                assert not INSULIN_NO.search(text), text
            if record.insulin is False:
                assert not INSULIN_YES.search(text), text
            if record.diabetes is False:
                assert not DIABETES_YES.search(text), text
            if record.diabetes is True:
                assert not DIABETES_NO.search(text), text
    # The checks above must have had something to check.
    assert all(count > 50 for count in seen.values()), seen


def test_fractional_durations_are_written_correctly() -> None:
    for duration, expected in ((0.5, "6 months"), (0.25, "3 months"), (1.5, "1.5 years"), (12, "12 years")):
        record = full_record(diabetes_time_y=duration)
        assert any(expected in text for text in texts(record, range(40))), duration
    newly = full_record(diabetes_time_y=0)
    assert any("newly diagnosed" in text for text in texts(newly, range(40)))


# --- grades ------------------------------------------------------------------------------------------

# Written independently of the parser: the words that name each ICDR grade.
ICDR_WORDS: dict[int, re.Pattern[str]] = {
    0: re.compile(r"\bno (?:apparent |signs of |evidence of )?(?:diabetic retinopathy|DR)\b", re.IGNORECASE),
    1: re.compile(r"\bmild\b", re.IGNORECASE),
    2: re.compile(r"\bmoderate\b", re.IGNORECASE),
    3: re.compile(r"\bsevere\b", re.IGNORECASE),
    # "proliferative" but not inside "non-proliferative" / "pre-proliferative", or the abbreviation.
    4: re.compile(r"(?<![-\w])proliferative (?:diabetic retinopathy|DR)\b|\bPDR\b", re.IGNORECASE),
}
ICDR_NUMBERS = re.compile(r"\bICDR(?: grade| level)?:? ([0-9])\b|\bgrade ([0-9])\b", re.IGNORECASE)
NON_PROLIFERATIVE = re.compile(r"\bnon-proliferative\b|\bNPDR\b", re.IGNORECASE)


@pytest.mark.parametrize("grade", range(5))
def test_a_stated_icdr_grade_is_always_the_records_grade(grade: int) -> None:
    sample = records(150, seed=10 + grade, dr_icdr=grade)
    named = 0
    total = 0
    for record in sample:
        for seed in range(4):
            text = write_narrative(record, seed)
            total += 1
            for other, pattern in ICDR_WORDS.items():
                if other != grade:
                    assert not pattern.search(text), (grade, other, text)
            for match in ICDR_NUMBERS.finditer(text):
                assert int(next(g for g in match.groups() if g)) == grade, text
            if grade in (0, 4):
                assert not NON_PROLIFERATIVE.search(text), text
            stated = stated_icdr_grades(text)
            assert stated <= {grade}, text
            named += stated == {grade}
    # The grade is named (by name or number) in most narratives, so the checks above are not vacuous.
    assert named / total >= 0.7, named / total


# Words that only the expert description of each grade uses (for a record with no other finding).
DESCRIPTION_WORDS: dict[int, re.Pattern[str]] = {
    0: re.compile(r"\bno (?:microaneurysms|MAs|micro-aneurysms|abnormalities attributable|diabetic lesions)"),
    1: re.compile(r"microaneurysms|\bMAs\b|micro-aneurysms"),
    2: re.compile(r"\bblot\b|exudates|cotton|soft exudates"),
    3: re.compile(r"4-2-1|quadrant|venous beading"),
    4: re.compile(r"neovasculari[sz]ation|new vessels|vitreous|laser"),
}


@pytest.mark.parametrize("grade", range(5))
def test_icdr_grade_information_is_present_most_of_the_time(grade: int) -> None:
    record = full_record(dr_icdr=grade, dr_sdrg=None)
    informative = 0
    description_only = 0
    for text in texts(record, range(200)):
        has_description = bool(DESCRIPTION_WORDS[grade].search(text))
        has_grade = stated_icdr_grades(text) == {grade}
        informative += has_grade or has_description
        description_only += has_description and not has_grade
    assert informative >= 185, informative
    assert description_only >= 10, description_only


@pytest.mark.parametrize("grade", range(5))
def test_a_stated_sdrg_grade_is_always_the_records_grade(grade: int) -> None:
    sample = records(100, seed=20 + grade, dr_sdrg=grade)
    stated_count = 0
    for record in sample:
        for seed in range(4):
            text = write_narrative(record, seed)
            codes = {int(c) for c in re.findall(r"\bR([0-9])\b", text)}
            assert codes <= {grade}, text
            stated_count += bool(codes)
            assert stated_sdrg_grades(text) <= {grade}, text
            if grade != 1:
                assert not re.search(r"\bbackground\b", text, re.IGNORECASE), text
            if grade not in (2, 3):
                assert "pre-proliferative" not in text, text
            if grade != 4:
                assert not re.search(r"(?<![-\w])proliferative (?:or|retinopathy)|post-laser", text), text
            if grade == 2:
                assert "both" not in text or "hemi-field" not in text, text
    assert 0.2 <= stated_count / (len(sample) * 4) <= 0.7


def test_expert_descriptions_follow_the_grading_rules() -> None:
    assert any("microaneurysm" in d for d in ICDR_DESCRIPTIONS[1])
    assert any("4-2-1" in d for d in ICDR_DESCRIPTIONS[3])
    assert any("four quadrants" in d for d in ICDR_DESCRIPTIONS[3])
    assert any("neovascularisation" in d for d in ICDR_DESCRIPTIONS[4])
    assert any("one hemi-field" in d for d in SDRG_DESCRIPTIONS[2])
    assert any("both" in d and "hemi-field" in d for d in SDRG_DESCRIPTIONS[3])
    assert any("post-laser" in d for d in SDRG_DESCRIPTIONS[4])
    assert set(PATHOLOGY_PRESENT) == set(PATHOLOGY_FIELDS)


# --- pathologies, comorbidities, quality -------------------------------------------------------------

PATHOLOGY_WORDS: dict[str, str] = {
    "macular_edema": r"macular o?edema",
    "scar": r"\bscar\b",
    "nevus": r"\bna?evus\b",
    "amd": r"\bAMD\b|age-related macular degeneration",
    "vascular_occlusion": r"occlusion",
    "hypertensive_retinopathy": r"hypertensive retinopathy",
    "drusen": r"\bdrusen\b",
    "hemorrhage": r"ha?emorrhage",
    "retinal_detachment": r"detach",
    "myopic_fundus": r"myopic",
    "increased_cup_disc": r"\bcup",
    "other": r"\b(another|additional unspecified)\b",
}


@pytest.mark.parametrize("name", sorted(PATHOLOGY_WORDS))
def test_set_pathology_flags_are_described(name: str) -> None:
    record = full_record(dr_icdr=0, dr_sdrg=0, **{name: True})
    mentioned = sum(bool(re.search(PATHOLOGY_WORDS[name], t)) for t in texts(record, range(40)))
    assert mentioned >= 28, (name, mentioned)


def test_macular_edema_absent_is_only_ever_negated() -> None:
    record = full_record(macular_edema=False)
    negated = 0
    for text in texts(record, range(200)):
        mentions = len(re.findall(r"macular o?edema", text))
        negations = len(re.findall(r"\bno (?:signs of |clinically evident )?macular o?edema", text))
        assert mentions == negations, text
        negated += negations
    assert negated >= 10
    present = full_record(macular_edema=True)
    for text in texts(present, range(100)):
        assert not re.search(r"\bno (?:signs of |clinically evident )?macular o?edema", text), text


def test_abnormal_assessments_and_quality_are_reported() -> None:
    abnormal = {name: Assessment.ABNORMAL for name in ("optic_disc", "vessels", "macula")}
    record = full_record(**abnormal)
    optic = sum("optic" in t for t in texts(record, range(40)))
    assert optic >= 20
    poor = full_record(quality_adequate=False, focus=Assessment.ABNORMAL, artifacts=Assessment.ABNORMAL)
    poor_texts = texts(poor, range(40))
    assert sum(bool(re.search(r"inadequate|poor-quality", t)) for t in poor_texts) >= 28
    assert sum(bool(re.search(r"focus|blurred", t)) for t in poor_texts) >= 20
    assert sum(bool(re.search(r"artefact|artifact", t)) for t in poor_texts) >= 20
    for text in texts(full_record(quality_adequate=True), range(100)):
        assert not re.search(r"inadequate|poor-quality|blurred|artefact|artifact", text), text


def test_comorbidities_are_expanded() -> None:
    record = full_record(comorbidities="diabetes1, SAH, acute myocardium infarct")
    joined = " ".join(texts(record, range(60)))
    assert "SAH" not in joined and "diabetes1" not in joined and "myocardium infarct" not in joined
    assert "hypertension" in joined
    assert "type 1 diabetes" in joined
    assert re.search(r"myocardial infarction|heart attack", joined)
    none_reported = full_record(comorbidities="0")
    none_texts = texts(none_reported, range(60))
    assert any(re.search(r"no (?:known )?comorbidities", t) for t in none_texts)
    assert not any(re.search(r"\b0\b", t) for t in none_texts)


def test_diabetes_named_in_comorbidities_is_not_stated_when_the_diabetes_field_is_not_yes() -> None:
    for diabetes in (None, False):
        record = full_record(comorbidities="diabetes1, SAH", diabetes=diabetes, diabetes_time_y=None)
        for text in texts(record, range(60)):
            assert not DIABETES_YES.search(text), text
            assert "type 1" not in text, text


# --- identifiers, positions, length ------------------------------------------------------------------


def test_no_identifier_ever_appears() -> None:
    record = full_record(image_id="img77777", patient_id="P-4242")
    for text in texts(record, range(100)):
        assert "77777" not in text and "4242" not in text and "img" not in text.lower(), text
    for record in records(300, seed=3):
        text = write_narrative(record, 0)
        assert record.image_id not in text and record.patient_id not in text, text
        assert not re.search(r"\.(jpg|jpeg|png)\b|fundus_photos", text), text


def eye_position(text: str) -> float:
    """Where the eye is first stated, as a fraction of the text's words."""
    words = text.split()
    index = next(i for i, w in enumerate(words) if re.search(r"\b(right|left)\b", w, re.IGNORECASE))
    return index / len(words)


def test_the_eye_clause_moves_between_seeds() -> None:
    record = full_record()
    positions = [
        eye_position(t) for t in texts(record, range(60)) if re.search(r"\bright\b", t, re.IGNORECASE)
    ]
    assert len(positions) >= 45
    assert min(positions) == 0.0
    assert max(positions) >= 0.5
    assert len({round(p, 2) for p in positions}) >= 10


def test_clause_order_is_shuffled() -> None:
    record = full_record(dr_icdr=3, drusen=True, camera="Canon CR", insulin=True)
    orders = set()
    for text in texts(record, range(200)):
        found = {
            "grade": text.lower().find("severe"),
            "drusen": text.find("drusen"),
            "insulin": text.lower().find("insulin"),
        }
        if all(position >= 0 for position in found.values()):
            orders.add(tuple(sorted(found, key=found.__getitem__)))
    assert len(orders) >= 5, orders


def test_sentences_are_shuffled_within_one_template() -> None:
    record = full_record(dr_icdr=3, quality_adequate=False)
    orders = set()
    for text in texts(record, range(1500)):
        if not re.match(r"Right eye(?: \(OD\))?, ", text):  # the eye-first template only
            continue
        grade, camera = text.lower().find("severe"), text.find("Canon CR")
        if grade >= 0 and camera >= 0:
            orders.add(grade < camera)
    assert orders == {True, False}


def test_length_bounds() -> None:
    typical = [write_narrative(r, s) for r in records(300, seed=4) for s in range(2)]
    counts = [len(t.split()) for t in typical]
    assert max(counts) <= MAX_WORDS <= 120
    assert min(counts) >= 1
    assert 20 <= statistics.median(counts) <= 90
    heavy = full_record(
        comorbidities="SAH, hypothyroidism, lupus, asthma, dyslipidemia, arrhythmia",
        quality_adequate=False,
        **{name: Assessment.ABNORMAL for name in ASSESSMENT_FIELDS},
        **{name: True for name in PATHOLOGY_FIELDS},
        dr_icdr=3,
        dr_sdrg=3,
    )
    heavy_counts = [len(t.split()) for t in texts(heavy, range(100))]
    assert max(heavy_counts) <= MAX_WORDS
    assert statistics.median(heavy_counts) >= 40
    empty = FundusRecord(image_id="img77777", patient_id="P-4242")
    assert write_narrative(empty, 0).strip()
