"""Clinical narratives written from a record: the paper's "knowledge-enhanced" text.

`write_narrative(record, seed)` writes a few sentences as a clinician might in a screening report, from
the record's labels and metadata: eye, sex, age, diabetes and its duration, insulin, comorbidities,
camera, the ICDR grade (by name, number and/or the expert description of what the grade looks like),
sometimes the SDRG grade, the pathology flags, abnormal anatomy and image-quality problems.

Ten templates, paraphrases and synonyms vary the wording; each optional clause is dropped with some
probability and the clauses are shuffled, so a text encoder cannot rely on positions. The text is a
pure function of (record, seed). Three guarantees make it usable as a retrieval query:

- a field that is missing is never stated, and a stated value is always the record's value;
- nothing that identifies a record (image id, patient id, file name) is ever written;
- at most `MAX_WORDS` words, so it fits the text encoder's 128 tokens.

`compose_narrative(record, seed)` returns the same text together with the facts it states
(`training.text.narrative_facts.StatedFacts`): the evaluation counts how many records of a gallery fit a
query's narrative (`fitting_counts`). `stated_icdr_grades` and `stated_sdrg_grades` parse the grades a
text claims (for tests and checks).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from index.knowledge import (
    ABBREVIATIONS,
    AMERICAN_SPELLINGS,
    ASSESSMENT_ABNORMAL,
    ASSESSMENT_NORMAL,
    COMORBIDITY_EXPANSIONS,
    COMORBIDITY_MISSING,
    DIABETES_TOKENS,
    ICDR_DESCRIPTIONS,
    ICDR_GRADE_NAMES,
    PATHOLOGY_ABSENT,
    PATHOLOGY_PRESENT,
    QUALITY,
    SDRG_DESCRIPTIONS,
    SDRG_GRADE_NAMES,
    comorbidity_tokens,
)
from index.records import Assessment, Eye, FundusRecord, Sex
from training.text.narrative_facts import (
    Fact,
    StatedFacts,
    comorbidity_sources,
    diabetes_type,
    duration_words,
    fitting_counts,
    format_duration,
    icdr_description_fact,
    record_fits,
)

__all__ = [
    "MAX_WORDS",
    "NARRATIVE_TEMPLATE_COUNT",
    "StatedFacts",
    "compose_narrative",
    "fitting_counts",
    "record_fits",
    "stated_icdr_grades",
    "stated_sdrg_grades",
    "write_narrative",
]

MAX_WORDS = 110
"""Upper bound on a narrative's length in words (the text encoder reads 128 tokens)."""

_DECADES: dict[int, str] = {
    2: "twenties",
    3: "thirties",
    4: "forties",
    5: "fifties",
    6: "sixties",
    7: "seventies",
    8: "eighties",
    9: "nineties",
}
_ADULT_AGE = 18


@dataclass(frozen=True)
class _Item:
    """One optional history fact: a noun phrase for prose, a (key, value) pair for the key-value template,
    and the facts it states."""

    phrase: str
    key: str
    value: str
    facts: tuple[Fact, ...] = ()


@dataclass(frozen=True)
class _Clause:
    """One finding or quality statement (a noun phrase) and the fact it states."""

    text: str
    fact: Fact


@dataclass(frozen=True)
class _Facts:
    """What one narrative states, already chosen (and paraphrased) from the record.

    The `*_facts` fields and the clauses' facts are what each part states (`_stated_facts`); they never
    change the text.
    """

    eye: str | None = None  # "right" / "left"
    sex: str | None = None  # "female" / "male"
    age: int | None = None
    subject: str | None = None  # noun phrase without article: "63-year-old woman"
    subject_facts: tuple[Fact, ...] = ()  # what `subject` states (the key-value template uses sex and age)
    history: tuple[_Item, ...] = ()
    camera: str | None = None
    grade: str | None = None  # ICDR grade by name and/or number
    grade_detail: str | None = None  # expert description of the ICDR grade
    icdr: int | None = None  # the grade `grade` names
    sdrg: str | None = None
    sdrg_grade: int | None = None  # the grade `sdrg` names
    findings: tuple[_Clause, ...] = ()
    quality: tuple[_Clause, ...] = ()

    @property
    def finding_texts(self) -> tuple[str, ...]:
        """The findings as noun phrases."""
        return tuple(clause.text for clause in self.findings)

    @property
    def quality_texts(self) -> tuple[str, ...]:
        """The image-quality statements as noun phrases."""
        return tuple(clause.text for clause in self.quality)


def _stable_seed(seed: int, image_id: str) -> int:
    """A seed from (seed, image_id) that is the same in every process (unlike the salted `hash()`)."""
    digest = hashlib.sha256(f"{seed}\x1f{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _article(phrase: str) -> str:
    """The indefinite article for a phrase ("an 80-year-old", "a 63-year-old", "an elderly")."""
    digits = re.match(r"\d+", phrase)
    if digits:
        number = int(digits.group())
        vowel = str(number).startswith("8") or number in (11, 18)
    else:
        vowel = phrase[:1].lower() in "aeiou"
    return "an" if vowel else "a"


def _with_article(phrase: str) -> str:
    """The phrase preceded by its indefinite article."""
    return f"{_article(phrase)} {phrase}"


def _cap(text: str) -> str:
    """The text with its first character upper-cased (the rest untouched: keeps "ICDR", "MAs")."""
    return text[:1].upper() + text[1:]


def _join(items: list[str], rng: random.Random) -> str:
    """Join phrases as a list: "a, b and c" or "a; b; c"."""
    if len(items) <= 1:
        return "".join(items)
    if rng.random() < 0.7:
        return ", ".join(items[:-1]) + " and " + items[-1]
    return "; ".join(items)


def _sentences(parts: list[str | None]) -> str:
    """Capitalise each non-empty part, end it with a full stop, and join them with spaces."""
    out = []
    for part in parts:
        if not part:
            continue
        part = _cap(part.strip())
        out.append(part if part.endswith(".") else part + ".")
    return " ".join(out)


@dataclass(frozen=True)
class _Subject:
    """The patient as a noun phrase, the sex word and age chosen for it, and the facts the phrase states."""

    phrase: str | None
    sex: str | None
    age: int | None
    facts: tuple[Fact, ...]


def _subject(record: FundusRecord, rng: random.Random) -> _Subject:
    """The patient's noun phrase, sex and age, each part kept with some probability."""
    age = int(record.patient_age) if record.patient_age is not None and rng.random() < 0.8 else None
    sex = record.patient_sex if rng.random() < 0.85 else None
    sex_word = None if sex is None else ("female" if sex == Sex.FEMALE else "male")
    decade = _DECADES.get(age // 10) if age is not None else None
    child = age is not None and age < _ADULT_AGE
    phrase: str | None
    decade_form: str | None = None
    if sex is not None:
        if sex == Sex.FEMALE:
            noun = rng.choice(["girl", "female patient"] if child else ["woman", "female patient", "woman"])
            pronoun = "her"
        else:
            noun = rng.choice(["boy", "male patient"] if child else ["man", "male patient", "man"])
            pronoun = "his"
        if age is None:
            phrase = noun
        else:
            forms = [f"{age}-year-old {noun}", f"{noun} aged {age}", f"{age}-year-old {sex_word} patient"]
            if decade is not None:
                decade_form = f"{noun} in {pronoun} {decade}"
                forms.append(decade_form)
            phrase = rng.choice(forms)
    elif age is not None:
        forms = [f"{age}-year-old patient", f"patient aged {age}"]
        if decade is not None:
            decade_form = f"patient in their {decade}"
            forms.append(decade_form)
        phrase = rng.choice(forms)
    else:
        phrase = None
    facts: list[Fact] = []
    if sex_word is not None:
        facts.append(("patient_sex", sex_word))
    if age is not None:
        # A "girl"/"boy" is always given an exact age, so the noun adds nothing the age does not say.
        facts.append(("age_decade", age // 10 * 10) if phrase == decade_form else ("age_exact", age))
    nationality = (record.nationality or "").strip()
    if nationality and nationality.lower() not in COMORBIDITY_MISSING and rng.random() < 0.08:
        phrase = f"{phrase or 'patient'} from {nationality}"
        facts.append(("nationality", nationality))
    return _Subject(phrase, sex_word, age, tuple(facts))


def _history(record: FundusRecord, rng: random.Random) -> list[_Item]:
    """Diabetes (type, duration), insulin and comorbidity items, each kept with some probability."""
    items: list[_Item] = []
    tokens = comorbidity_tokens(record.comorbidities)
    type_named = diabetes_type(tokens)
    if tokens:
        # Diabetes named among the comorbidities is said by the diabetes clause only, and only when the
        # diabetes field is yes: otherwise it would assert (or contradict) the diabetes field.
        tokens = [t for t in tokens if t not in DIABETES_TOKENS]

    if record.diabetes is True and rng.random() < 0.8:
        kind = f"type {type_named} " if type_named and rng.random() < 0.8 else ""
        value = "yes" + (f", type {kind.split()[1]}" if kind else "")
        duration = record.diabetes_time_y if rng.random() < 0.75 else None
        stated: list[Fact] = [("diabetes", True)]
        if kind:
            stated.append(("diabetes_type", type_named))
        if duration is not None:
            stated.append(("diabetes_duration", duration_words(duration)))
        if duration is not None and duration == 0:
            phrase = f"newly diagnosed {kind}diabetes"
            value += ", newly diagnosed"
        elif duration is not None:
            span = format_duration(duration)
            phrase = rng.choice(
                [
                    f"{kind}diabetes for {span}",
                    f"{kind}diabetes mellitus for {span}",
                    f"{kind}diabetes of {span} duration",
                    f"known {kind}diabetes for {span}",
                ]
            )
            value += f", {span}"
        else:
            phrase = rng.choice([f"{kind}diabetes mellitus", f"known {kind}diabetes", f"{kind}diabetes"])
        items.append(_Item(phrase, "Diabetes", value, tuple(stated)))
    elif record.diabetes is False and rng.random() < 0.8:
        phrase = rng.choice(["no diabetes", "no history of diabetes", "no known diabetes"])
        items.append(_Item(phrase, "Diabetes", "no", (("diabetes", False),)))

    if record.insulin is not None and rng.random() < 0.65:
        if record.insulin:
            phrase = rng.choice(["insulin therapy", "insulin treatment", "insulin use"])
        else:
            phrase = rng.choice(["no insulin therapy", "no insulin use"])
        items.append(_Item(phrase, "Insulin", "yes" if record.insulin else "no", (("insulin", record.insulin),)))

    raw_none = tokens == [] and comorbidity_tokens(record.comorbidities) == []
    if tokens is not None and rng.random() < 0.6:
        if raw_none:
            phrase = rng.choice(["no comorbidities reported", "no known comorbidities"])
            items.append(_Item(phrase, "Comorbidities", "none reported", (("comorbidities_none", True),)))
        elif tokens:
            names: list[str] = []
            for token in tokens:
                name = rng.choice(COMORBIDITY_EXPANSIONS.get(token, (token,)))
                if name not in names:
                    names.append(name)
            names = names[:4]
            listed = _join(names, rng)
            phrase = rng.choice([listed, listed, f"comorbid {listed}"])
            named = tuple(("comorbidity", comorbidity_sources(name)) for name in names)
            items.append(_Item(phrase, "Comorbidities", ", ".join(names), named))
    rng.shuffle(items)
    return items


def _icdr(record: FundusRecord, rng: random.Random) -> tuple[str | None, str | None]:
    """(grade by name and/or number, expert description) for the ICDR grade; either may be None."""
    grade = record.dr_icdr
    if grade is None:
        return None, None
    name = rng.choice(ICDR_GRADE_NAMES[grade])
    number = rng.choice(
        [f"ICDR grade {grade}", f"ICDR {grade}", f"grade {grade} on the ICDR scale", f"ICDR level {grade}"]
    )
    detail = rng.choice(ICDR_DESCRIPTIONS[grade])
    u = rng.random()
    if u < 0.35:
        stated: str | None = name
    elif u < 0.50:
        stated = number
    elif u < 0.72:
        stated = rng.choice([f"{name} (ICDR {grade})", f"{number}, {name}", f"{name} ({number})"])
    elif u < 0.85:
        return name, detail
    elif u < 0.97:
        return None, detail
    else:
        return None, None
    return stated, detail if rng.random() < 0.35 else None


def _sdrg(record: FundusRecord, rng: random.Random) -> str | None:
    """The SDRG grade (always with its code "R0".."R4"), stated in about 40% of narratives."""
    grade = record.dr_sdrg
    if grade is None or rng.random() >= 0.4:
        return None
    name = rng.choice(SDRG_GRADE_NAMES[grade])
    detail = rng.choice(SDRG_DESCRIPTIONS[grade])
    return rng.choice(
        [
            f"SDRG R{grade}",
            f"R{grade} on the Scottish grading scheme",
            f"SDRG R{grade} ({name})",
            f"Scottish grade R{grade}, {name}",
            f"SDRG R{grade}: {detail}",
        ]
    )


def _findings(record: FundusRecord, rng: random.Random) -> list[_Clause]:
    """Pathology flags, abnormal (rarely normal) anatomy, as noun phrases: positives first, at most 5."""
    positives: list[_Clause] = []
    negatives: list[_Clause] = []
    if record.dr_icdr is None and record.diabetic_retinopathy and rng.random() < 0.8:
        text = rng.choice(PATHOLOGY_PRESENT["diabetic_retinopathy"])
        positives.append(_Clause(text, ("diabetic_retinopathy", True)))
    for name, phrases in PATHOLOGY_PRESENT.items():
        if name == "diabetic_retinopathy":
            continue
        value = getattr(record, name)
        if value is True and rng.random() < 0.9:
            positives.append(_Clause(rng.choice(phrases), (name, True)))
        elif value is False and name in PATHOLOGY_ABSENT:
            if rng.random() < (0.25 if name == "macular_edema" else 0.04):
                negatives.append(_Clause(rng.choice(PATHOLOGY_ABSENT[name]), (name, False)))
    # A "normal" statement is skipped when a set flag says otherwise about the same structure.
    conflicts = {
        "optic_disc": record.increased_cup_disc is True,
        "macula": any(getattr(record, f) is True for f in ("macular_edema", "amd", "drusen")),
        "vessels": record.vascular_occlusion is True
        or record.hypertensive_retinopathy is True
        or (record.dr_icdr or 0) >= 3,
    }
    for name in ("optic_disc", "vessels", "macula"):
        value = getattr(record, name)
        if value == Assessment.ABNORMAL and rng.random() < 0.75:
            positives.append(_Clause(rng.choice(ASSESSMENT_ABNORMAL[name]), (name, "abnormal")))
        elif value == Assessment.NORMAL and not conflicts[name] and rng.random() < 0.08:
            negatives.append(_Clause(rng.choice(ASSESSMENT_NORMAL[name]), (name, "normal")))
    rng.shuffle(positives)
    rng.shuffle(negatives)
    return (positives + negatives)[:5]


def _quality(record: FundusRecord, rng: random.Random) -> list[_Clause]:
    """Image-quality statements: inadequate quality and defects (often), adequate quality (rarely)."""
    items: list[_Clause] = []
    if record.quality_adequate is False and rng.random() < 0.85:
        items.append(_Clause(rng.choice(QUALITY[False]), ("quality_adequate", False)))
    elif record.quality_adequate is True and rng.random() < 0.12:
        items.append(_Clause(rng.choice(QUALITY[True]), ("quality_adequate", True)))
    defects = []
    for name in ("focus", "illumination", "image_field", "artifacts"):
        if getattr(record, name) == Assessment.ABNORMAL and rng.random() < 0.7:
            defects.append(_Clause(rng.choice(ASSESSMENT_ABNORMAL[name]), (name, "abnormal")))
    rng.shuffle(defects)
    return items + defects[:3]


def _choose_facts(record: FundusRecord, rng: random.Random) -> _Facts:
    """Decide what the narrative says about the record (each optional clause kept with a probability)."""
    eye = None
    if record.exam_eye is not None and rng.random() < 0.9:
        eye = "right" if record.exam_eye == Eye.RIGHT else "left"
    subject = _subject(record, rng)
    history = _history(record, rng)
    camera = (record.camera or "").strip()
    keep_camera = bool(camera) and camera.lower() not in COMORBIDITY_MISSING and rng.random() < 0.3
    grade, grade_detail = _icdr(record, rng)
    sdrg = _sdrg(record, rng)
    return _Facts(
        eye=eye,
        sex=subject.sex,
        age=subject.age,
        subject=subject.phrase,
        subject_facts=subject.facts,
        history=tuple(history),
        camera=camera if keep_camera else None,
        grade=grade,
        grade_detail=grade_detail,
        icdr=record.dr_icdr if grade else None,
        sdrg=sdrg,
        sdrg_grade=record.dr_sdrg if sdrg else None,
        findings=tuple(_findings(record, rng)),
        quality=tuple(_quality(record, rng)),
    )


def _stated_facts(facts: _Facts, key_value: bool) -> StatedFacts:
    """The facts a narrative written from `facts` states.

    Every template writes every part of `facts`; they differ only in the patient: the key-value template
    writes sex and exact age as fields, the others write the subject phrase (which may give the age as
    a decade, and the nationality).
    """
    stated: set[Fact] = set()
    if facts.eye is not None:
        stated.add(("exam_eye", facts.eye))
    if key_value:
        if facts.sex is not None:
            stated.add(("patient_sex", facts.sex))
        if facts.age is not None:
            stated.add(("age_exact", facts.age))
    else:
        stated.update(facts.subject_facts)
    for item in facts.history:
        stated.update(item.facts)
    if facts.camera:
        stated.add(("camera", facts.camera))
    if facts.grade:
        stated.add(("dr_icdr", facts.icdr))
    if facts.grade_detail:
        implied = icdr_description_fact(facts.grade_detail)
        # A description shared by several grades adds nothing to a grade stated exactly.
        if not (facts.grade and implied[0] == "dr_icdr_in"):
            stated.add(implied)
    if facts.sdrg:
        stated.add(("dr_sdrg", facts.sdrg_grade))
    stated.update(clause.fact for clause in (*facts.findings, *facts.quality))
    return StatedFacts(frozenset(stated))


def _shrink(facts: _Facts) -> _Facts | None:
    """The facts with one low-priority part removed, or None when nothing optional is left."""
    if facts.camera:
        return replace(facts, camera=None)
    if len(facts.quality) > 1:
        return replace(facts, quality=facts.quality[:-1])
    if len(facts.findings) > 2:
        return replace(facts, findings=facts.findings[:-1])
    if len(facts.history) > 1:
        return replace(facts, history=facts.history[:-1])
    if facts.sdrg:
        return replace(facts, sdrg=None)
    if facts.grade and facts.grade_detail:
        return replace(facts, grade_detail=None)
    if facts.findings:
        return replace(facts, findings=facts.findings[:-1])
    if facts.history:
        return replace(facts, history=())
    if facts.quality:
        return replace(facts, quality=())
    return None


# ---------------------------------------------------------------------------------------------------
# Sentence pieces shared by the templates. Each returns None when it has nothing to say.


def _eye_words(facts: _Facts, rng: random.Random) -> str | None:
    """ "right eye", sometimes with its abbreviation: "left eye (OS)"."""
    if facts.eye is None:
        return None
    if rng.random() < 0.15:
        return f"{facts.eye} eye ({'OD' if facts.eye == 'right' else 'OS'})"
    return f"{facts.eye} eye"


def _history_phrase(facts: _Facts, rng: random.Random) -> str | None:
    """The history items as one list phrase."""
    if not facts.history:
        return None
    return _join([item.phrase for item in facts.history], rng)


def _history_sentence(facts: _Facts, rng: random.Random) -> str | None:
    """The history items as a sentence of their own."""
    listed = _history_phrase(facts, rng)
    if listed is None:
        return None
    return rng.choice(["history: ", "clinical history: ", "medical history: ", "patient history: "]) + listed


def _subject_with_history(facts: _Facts, rng: random.Random, article: bool) -> str | None:
    """ "a 63-year-old woman with diabetes for 12 years and insulin therapy" (or the parts present)."""
    subject = facts.subject
    listed = _history_phrase(facts, rng)
    if subject is None and listed is None:
        return None
    if subject is None:
        subject = "patient"
    head = _with_article(subject) if article else subject
    return head if listed is None else f"{head} with {listed}"


def _graded_as(grade: str) -> str:
    """ "graded as moderate NPDR", or "classified as grade 2 on the ICDR scale" (no "graded as grade")."""
    verb = "classified" if grade.lower().startswith("grade") else "graded"
    return f"{verb} as {grade}"


def _grade_sentence(facts: _Facts, rng: random.Random, labelled: bool = True) -> str | None:
    """The ICDR grade and/or its expert description as a sentence (`labelled`: may start "diagnosis:")."""
    grade, detail = facts.grade, facts.grade_detail
    if grade and detail:
        return rng.choice(
            [
                f"{grade}, with {detail}",
                f"{grade}: {detail}",
                f"{detail}, consistent with {grade}",
                f"{_graded_as(grade)} ({detail})",
            ]
        )
    if grade:
        forms = [_graded_as(grade), grade, f"consistent with {grade}"]
        if labelled:
            forms += [f"diagnosis: {grade}", f"DR grade: {grade}"]
        return rng.choice(forms)
    if detail:
        return rng.choice([detail, f"the fundus shows {detail}"] + ([f"seen: {detail}"] if labelled else []))
    return None


def _findings_sentence(facts: _Facts, rng: random.Random) -> str | None:
    """The findings as a sentence."""
    if not facts.findings:
        return None
    listed = _join(list(facts.finding_texts), rng)
    return rng.choice(
        [
            f"findings include {listed}",
            f"also {listed}",
            f"additional findings: {listed}",
            f"noted: {listed}",
            f"present: {listed}",
        ]
    )


def _quality_sentence(facts: _Facts, rng: random.Random) -> str | None:
    """The image-quality statements as a sentence."""
    if not facts.quality:
        return None
    listed = _join(list(facts.quality_texts), rng)
    return rng.choice([f"quality: {listed}", listed, f"image quality notes: {listed}"])


def _camera_sentence(facts: _Facts, rng: random.Random) -> str | None:
    """The camera as a sentence."""
    if not facts.camera:
        return None
    return rng.choice(
        [
            f"acquired with a {facts.camera} camera",
            f"camera: {facts.camera}",
            f"imaged on a {facts.camera}",
            f"taken with the {facts.camera}",
        ]
    )


def _shuffled(parts: list[str | None], rng: random.Random) -> list[str | None]:
    """The parts in random order."""
    parts = list(parts)
    rng.shuffle(parts)
    return parts


# ---------------------------------------------------------------------------------------------------
# Templates: each writes the whole narrative from the chosen facts.


def _t_photograph(facts: _Facts, rng: random.Random) -> str:
    """ "Fundus photograph of the right eye of a 63-year-old woman with ... . <body>" """
    head = rng.choice(
        ["Fundus photograph", "Colour fundus photograph", "Retinal photograph", "Colour fundus image"]
    )
    eye = _eye_words(facts, rng)
    if eye:
        head += f" of the {eye}"
    history_inline = rng.random() < 0.5
    if facts.subject or (history_inline and facts.history):
        who = _subject_with_history(facts, rng, article=True) if history_inline else None
        who = who or _with_article(facts.subject or "patient")
        head += f" of {who}"
    history = None if history_inline else _history_sentence(facts, rng)
    body = _shuffled(
        [
            _grade_sentence(facts, rng),
            facts.sdrg,
            _findings_sentence(facts, rng),
            _quality_sentence(facts, rng),
            _camera_sentence(facts, rng),
            history,
        ],
        rng,
    )
    return _sentences([head, *body])


def _t_eye_first(facts: _Facts, rng: random.Random) -> str:
    """ "Right eye, 63-year-old woman. <body>" (the header shrinks to what is present)."""
    eye = _eye_words(facts, rng)
    head_parts = [p for p in (_cap(eye) if eye else None, facts.subject) if p]
    body = _shuffled(
        [
            _grade_sentence(facts, rng),
            facts.sdrg,
            _findings_sentence(facts, rng),
            _quality_sentence(facts, rng),
            _camera_sentence(facts, rng),
            _history_sentence(facts, rng),
        ],
        rng,
    )
    return _sentences([", ".join(head_parts), *body])


def _t_screening_report(facts: _Facts, rng: random.Random) -> str:
    """ "Screening report: 63-year-old woman with ...; left eye imaged. <body>" """
    head = rng.choice(["Screening report", "DR screening report", "Retinal screening report"])
    eye = _eye_words(facts, rng)
    parts = [_subject_with_history(facts, rng, article=False), f"{eye} imaged" if eye else None]
    parts = [p for p in _shuffled(parts, rng) if p]
    body = _shuffled(
        [
            _grade_sentence(facts, rng),
            facts.sdrg,
            _findings_sentence(facts, rng),
            _quality_sentence(facts, rng),
            _camera_sentence(facts, rng),
        ],
        rng,
    )
    return _sentences([f"{head}: {'; '.join(parts)}" if parts else head, *body])


def _t_findings_impression(facts: _Facts, rng: random.Random) -> str:
    """ "[63-year-old woman, right eye.] Findings: ... Impression: ..." """
    eye = _eye_words(facts, rng)
    eye_in_findings = eye is not None and rng.random() < 0.4
    intro = [p for p in (facts.subject, None if eye_in_findings else eye) if p]
    observed = [p for p in (facts.grade_detail, *facts.finding_texts, *facts.quality_texts) if p]
    findings = None
    if observed:
        label = f"Findings ({facts.eye} eye)" if eye_in_findings else "Findings"
        findings = f"{label}: {_join(observed, rng)}"
    elif eye_in_findings:
        intro.append(eye or "")
    impression_parts = [p for p in (facts.grade, facts.sdrg) if p]
    impression = f"Impression: {'; '.join(impression_parts)}" if impression_parts else None
    pre = [", ".join(intro) if intro else None, _history_sentence(facts, rng), _camera_sentence(facts, rng)]
    if rng.random() < 0.3:
        return _sentences([findings, impression, *_shuffled(pre, rng)])
    return _sentences([*pre, findings, impression])


def _t_patient_first(facts: _Facts, rng: random.Random) -> str:
    """ "A 63-year-old woman with ... . The right eye shows ... <body>" """
    who = _subject_with_history(facts, rng, article=True)
    eye = _eye_words(facts, rng)
    shown = [p for p in (facts.grade_detail, *facts.finding_texts) if p]
    where = f"the {eye}" if eye else "the fundus"
    if shown:
        middle = f"{where} shows {_join(shown, rng)}"
    else:
        middle = f"imaging of {where}" if eye else None
    grade = facts.grade
    grade_sentence = rng.choice([_graded_as(grade), f"impression: {grade}", grade]) if grade else None
    rest = _shuffled([facts.sdrg, _quality_sentence(facts, rng), _camera_sentence(facts, rng)], rng)
    return _sentences([who, middle, grade_sentence, *rest])


def _t_key_value(facts: _Facts, rng: random.Random) -> str:
    """ "Eye: right. Sex: female. Age: 63. Diabetes: yes, 12 years. Grade: moderate NPDR. ..." """
    pairs: list[tuple[str, str]] = []
    if facts.eye:
        pairs.append(("Eye", facts.eye))
    if facts.sex:
        pairs.append(("Sex", facts.sex))
    if facts.age is not None:
        pairs.append(("Age", str(facts.age)))
    pairs.extend((item.key, item.value) for item in facts.history)
    if facts.camera:
        pairs.append(("Camera", facts.camera))
    if facts.grade:
        pairs.append(("Grade", facts.grade))
    if facts.grade_detail:
        pairs.append(("Retina", facts.grade_detail))
    if facts.sdrg:
        pairs.append(("Scottish grading", facts.sdrg))
    if facts.findings:
        pairs.append(("Other findings", ", ".join(facts.finding_texts)))
    if facts.quality:
        pairs.append(("Image", ", ".join(facts.quality_texts)))
    rng.shuffle(pairs)
    if not pairs:
        return "Fundus photograph."
    separator = rng.choice([". ", "; ", " | "])
    text = separator.join(f"{key}: {value}" for key, value in pairs)
    return text if text.endswith(".") else text + "."


def _t_impression_first(facts: _Facts, rng: random.Random) -> str:
    """ "Moderate NPDR in the right eye of a 63-year-old woman. <body>" """
    eye = _eye_words(facts, rng)
    lead = facts.grade or facts.grade_detail
    where = []
    if eye:
        where.append(f"the {eye}")
    if facts.subject:
        where.append(_with_article(facts.subject))
    location = " of ".join(where)
    if lead and location:
        head: str | None = f"{lead} in {location}"
    elif lead:
        head = lead
    elif location:
        head = f"photograph of {location}"
    else:
        head = None
    detail = facts.grade_detail if facts.grade and facts.grade_detail else None
    detail_sentence = rng.choice([f"the fundus shows {detail}", f"seen: {detail}"]) if detail else None
    body = _shuffled(
        [
            detail_sentence,
            facts.sdrg,
            _findings_sentence(facts, rng),
            _quality_sentence(facts, rng),
            _camera_sentence(facts, rng),
            _history_sentence(facts, rng),
        ],
        rng,
    )
    return _sentences([head, *body])


def _t_screening_line(facts: _Facts, rng: random.Random) -> str:
    """ "Retinal screening, left eye: PDR. ... Patient: 63-year-old woman, diabetes for 12 years." """
    head = rng.choice(["Retinal screening", "Eye screening", "Fundus screening"])
    eye = _eye_words(facts, rng)
    if eye:
        head += f", {eye}"
    grade = _grade_sentence(facts, rng, labelled=False)
    first = f"{head}: {grade}" if grade else head
    patient_parts = [p for p in (facts.subject, _history_phrase(facts, rng)) if p]
    patient = f"patient details: {', '.join(patient_parts)}" if patient_parts else None
    body = _shuffled(
        [
            facts.sdrg,
            _findings_sentence(facts, rng),
            _quality_sentence(facts, rng),
            _camera_sentence(facts, rng),
        ],
        rng,
    )
    if rng.random() < 0.5:
        return _sentences([first, *body, patient])
    return _sentences([patient, first, *body])


def _t_fundus_shows(facts: _Facts, rng: random.Random) -> str:
    """ "The right fundus of a 63-year-old woman shows ... Graded as ... <body>" """
    head = f"the {facts.eye} fundus" if facts.eye else "the fundus"
    if facts.subject:
        head += f" of {_with_article(facts.subject)}"
    shown = [p for p in (facts.grade_detail, *facts.finding_texts) if p]
    first = f"{head} shows {_join(shown, rng)}" if shown else f"{head} was photographed"
    grade = facts.grade
    grade_sentence = rng.choice([_graded_as(grade), f"overall: {grade}", grade]) if grade else None
    body = _shuffled(
        [
            grade_sentence,
            facts.sdrg,
            _quality_sentence(facts, rng),
            _camera_sentence(facts, rng),
            _history_sentence(facts, rng),
        ],
        rng,
    )
    return _sentences([first, *body])


def _t_imaging_of(facts: _Facts, rng: random.Random) -> str:
    """ "Imaging of the left eye in a 63-year-old woman with ... . <body>" """
    eye = _eye_words(facts, rng)
    head = f"imaging of the {eye}" if eye else "retinal imaging"
    who = _subject_with_history(facts, rng, article=True)
    if who:
        head += f" in {who}"
    body = _shuffled(
        [
            _grade_sentence(facts, rng),
            facts.sdrg,
            _findings_sentence(facts, rng),
            _quality_sentence(facts, rng),
            _camera_sentence(facts, rng),
        ],
        rng,
    )
    return _sentences([head, *body])


_TEMPLATES: tuple[Callable[[_Facts, random.Random], str], ...] = (
    _t_photograph,
    _t_eye_first,
    _t_screening_report,
    _t_findings_impression,
    _t_patient_first,
    _t_key_value,
    _t_impression_first,
    _t_screening_line,
    _t_fundus_shows,
    _t_imaging_of,
)

NARRATIVE_TEMPLATE_COUNT: int = len(_TEMPLATES)
"""How many distinct templates (sentence structures) `write_narrative` chooses from."""


def _restyle(text: str, american: bool, abbreviations: dict[str, str]) -> str:
    """Apply one narrative's spelling (British/American) and synonym choices throughout its text."""
    for term, alternative in abbreviations.items():
        text = re.sub(rf"\b{re.escape(term)}\b", alternative, text)
    if american:
        for british, us in AMERICAN_SPELLINGS:
            text = text.replace(british, us).replace(_cap(british), _cap(us))
    return text


def write_narrative(record: FundusRecord, seed: int) -> str:
    """Write a clinical narrative for `record`, deterministic for (record, seed).

    The text states only the record's own values (never a missing field, never an identifier), varies
    template, wording and clause order with the seed, and has at most `MAX_WORDS` words.
    """
    return compose_narrative(record, seed)[0]


def compose_narrative(record: FundusRecord, seed: int) -> tuple[str, StatedFacts]:
    """The narrative `write_narrative(record, seed)` writes, with the facts it states.

    `record_fits(record, facts)` holds for the record itself; other records fit when every stated fact is
    true of them (`training.text.narrative_facts`). Word-level truncation, the last resort for a text still over
    `MAX_WORDS` once every optional part is dropped, is not reflected in the facts (it needs a patient
    nationality of dozens of words).
    """
    text, facts, key_value = _compose(record, seed)
    return text, _stated_facts(facts, key_value)


def _compose(record: FundusRecord, seed: int) -> tuple[str, _Facts, bool]:
    """(text, the parts it was written from, whether the key-value template wrote it)."""
    rng = random.Random(_stable_seed(seed, record.image_id))
    facts = _choose_facts(record, rng)
    template = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
    render_seed = rng.getrandbits(64)
    american = rng.random() < 0.5
    abbreviations = {term: rng.choice(alts) for term, alts in ABBREVIATIONS if rng.random() < 0.3}
    while True:
        # The same render seed each pass: shrinking removes a part without reshuffling the rest.
        text = _restyle(template(facts, random.Random(render_seed)), american, abbreviations)
        if len(text.split()) <= MAX_WORDS:
            return text, facts, template is _t_key_value
        smaller = _shrink(facts)
        if smaller is None:
            return " ".join(text.split()[:MAX_WORDS]), facts, template is _t_key_value
        facts = smaller


# ---------------------------------------------------------------------------------------------------
# Parsing what a text claims (for tests and data checks).

_ICDR_NAME_PATTERNS: dict[int, re.Pattern[str]] = {
    0: re.compile(r"\bno (?:apparent |signs of |evidence of )?(?:diabetic retinopathy|DR)\b", re.IGNORECASE),
    1: re.compile(r"\bmild (?:non-proliferative (?:diabetic retinopathy|DR)|NPDR)\b", re.IGNORECASE),
    2: re.compile(r"\bmoderate (?:non-proliferative (?:diabetic retinopathy|DR)|NPDR)\b", re.IGNORECASE),
    3: re.compile(r"\bsevere (?:non-proliferative (?:diabetic retinopathy|DR)|NPDR)\b", re.IGNORECASE),
    4: re.compile(r"(?<![-\w])(?:proliferative (?:diabetic retinopathy|DR)\b|PDR\b)", re.IGNORECASE),
}
_ICDR_NUMBER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\bICDR(?: grade| level)?:? ([0-4])\b", re.IGNORECASE),
    re.compile(r"\bgrade ([0-4])\b", re.IGNORECASE),
)
_SDRG_PATTERN = re.compile(r"\bR([0-4])\b")


def stated_icdr_grades(text: str) -> set[int]:
    """The ICDR grades a text names, by name ("moderate NPDR", "PDR") or number ("ICDR grade 2")."""
    grades = {grade for grade, pattern in _ICDR_NAME_PATTERNS.items() if pattern.search(text)}
    for pattern in _ICDR_NUMBER_PATTERNS:
        grades.update(int(match) for match in pattern.findall(text))
    return grades


def stated_sdrg_grades(text: str) -> set[int]:
    """The SDRG grades a text names by code ("R0".."R4"; the narratives always write the code)."""
    return {int(match) for match in _SDRG_PATTERN.findall(text)}
