"""The facts a narrative states, and which records of a gallery fit them.

`training.text.narratives.compose_narrative(record, seed)` returns a narrative together with its `StatedFacts`:
every fact the text states about the record, and nothing else. A fact is a `(kind, value)` pair:

==========================  ==============================  ==============================================
kind                        value                           a record fits it when
==========================  ==============================  ==============================================
``exam_eye``                "right" / "left"                its eye is that eye
``patient_sex``             "female" / "male"               its sex is that sex
``age_exact``               int (63)                        ``int(patient_age) == 63``
``age_decade``              int (60: "in her sixties")      ``int(patient_age) // 10 * 10 == 60``
``nationality``             str                             its nationality (stripped) is that text
``diabetes``                bool                            ``diabetes`` is that value
``diabetes_type``           "1" / "2"                       its comorbidities name that diabetes type
``diabetes_duration``       "12 years" / "6 months" /       its duration is written the same way
                            "newly diagnosed"               (`duration_words`: the text is rounded)
``insulin``                 bool                            ``insulin`` is that value
``comorbidities_none``      True                            its comorbidities say "none" (BRSET's ``0``)
``comorbidity``             frozenset of tokens             one of its comorbidity tokens is in the set
                                                            (the tokens the stated name can come from:
                                                            "hypothyroidism" <- hypothyroidism or
                                                            hipoitireoidismo)
``camera``                  str                             its camera (stripped) is that text
``dr_icdr``                 int 0-4                         its ICDR grade (stated by name or number, or
                                                            implied by an expert description unique to it)
``dr_icdr_in``              frozenset of ints               its ICDR grade is in the set (an expert
                                                            description shared by several grades; only
                                                            listed when the grade is not stated exactly)
``dr_sdrg``                 int 0-4                         its SDRG grade
pathology field             bool                            the flag (``macular_edema``, ``drusen``, ...;
(``records.PATHOLOGY_FIELDS``)                              False only for the stated negatives such as
                                                            "no macular oedema") has that value
assessment field            "normal" / "abnormal"           the assessment (``optic_disc``, ``focus``, ...)
(``records.ASSESSMENT_FIELDS``)                             has that value
``quality_adequate``        bool                            ``quality_adequate`` is that value
==========================  ==============================  ==============================================

A missing field never fits a fact about it. `record_fits` checks one record; `fitting_counts` counts, for
each query, the gallery records that fit its narrative (the evaluation's ceiling: a query whose text fits
n records can find its own at rank 1 with probability 1/n at best).

Not recorded, on purpose: what a noun might suggest ("woman" is also written for a child whose age the
text leaves out, so it states nothing about age), and inferences across fields that the records need not
obey (the SDRG R0 description "no diabetic lesions of any kind" states the SDRG grade, not the ICDR
grade). Leaving a fact out can only make more records fit, so the ceiling is never overstated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from index.knowledge import (
    COMORBIDITY_EXPANSIONS,
    COMORBIDITY_MISSING,
    COMORBIDITY_NONE,
    DIABETES_TOKENS,
    ICDR_DESCRIPTIONS,
    comorbidity_tokens,
)
from index.records import ASSESSMENT_FIELDS, PATHOLOGY_FIELDS, Assessment, Eye, FundusRecord, Sex

Fact = tuple[str, object]
"""One stated fact: (kind, value); see the module docstring for the kinds."""

FACT_KINDS: frozenset[str] = frozenset(
    {
        "exam_eye",
        "patient_sex",
        "age_exact",
        "age_decade",
        "nationality",
        "diabetes",
        "diabetes_type",
        "diabetes_duration",
        "insulin",
        "comorbidities_none",
        "comorbidity",
        "camera",
        "dr_icdr",
        "dr_icdr_in",
        "dr_sdrg",
        "quality_adequate",
        *PATHOLOGY_FIELDS,
        *ASSESSMENT_FIELDS,
    }
)
"""Every kind of fact a narrative can state."""

_EYE_WORDS: dict[Eye, str] = {Eye.RIGHT: "right", Eye.LEFT: "left"}
_SEX_WORDS: dict[Sex, str] = {Sex.FEMALE: "female", Sex.MALE: "male"}
_ASSESSMENT_WORDS: dict[Assessment, str] = {Assessment.NORMAL: "normal", Assessment.ABNORMAL: "abnormal"}


@dataclass(frozen=True)
class StatedFacts:
    """The facts one narrative states (hashable: equal texts' facts group together)."""

    facts: frozenset[Fact] = frozenset()

    def kinds(self) -> frozenset[str]:
        """The kinds of fact stated (e.g. {"exam_eye", "dr_icdr"})."""
        return frozenset(kind for kind, _ in self.facts)

    def __len__(self) -> int:
        return len(self.facts)


# ---------------------------------------------------------------------------------------------------
# Reading a record's fields as the narratives write them (shared with `training.text.narratives`).


def diabetes_type(tokens: Iterable[str] | None) -> str | None:
    """The diabetes type the comorbidity tokens state ("1"/"2"; the last one named wins), or None."""
    found: str | None = None
    for token in tokens or ():
        if DIABETES_TOKENS.get(token) is not None:
            found = DIABETES_TOKENS[token]
    return found


def format_duration(years: float) -> str:
    """A diabetes duration as written in a report: "12 years", "1.5 years", "6 months"."""
    if years < 1:
        months = max(1, round(years * 12))
        return f"{months} month" if months == 1 else f"{months} months"
    rounded = round(years, 1)
    if rounded == int(rounded):
        whole = int(rounded)
        return "1 year" if whole == 1 else f"{whole} years"
    return f"{rounded:.1f} years"


def duration_words(years: float) -> str:
    """What a narrative says about a diabetes duration: "newly diagnosed" for 0, else `format_duration`."""
    return "newly diagnosed" if years == 0 else format_duration(years)


@cache
def comorbidity_sources(name: str) -> frozenset[str]:
    """The comorbidity tokens a narrative's comorbidity name can come from.

    A listed token expands to one of its names (`COMORBIDITY_EXPANSIONS`); any other token is written as
    it is (lower-cased). Diabetes tokens are never listed as comorbidities.
    """
    sources = {
        token for token, names in COMORBIDITY_EXPANSIONS.items() if name in names and token not in DIABETES_TOKENS
    }
    as_written = (
        name == name.strip().lower()
        and "," not in name
        and name not in COMORBIDITY_EXPANSIONS
        and name not in DIABETES_TOKENS
        and name not in COMORBIDITY_NONE
        and name not in COMORBIDITY_MISSING
    )
    if as_written:
        sources.add(name)
    return frozenset(sources)


def icdr_description_fact(description: str) -> Fact:
    """The fact an expert ICDR description states: its grade, or the grades sharing that text."""
    grades = frozenset(grade for grade, texts in ICDR_DESCRIPTIONS.items() if description in texts)
    if not grades:
        raise ValueError(f"not an ICDR description: {description!r}")
    if len(grades) == 1:
        return ("dr_icdr", next(iter(grades)))
    return ("dr_icdr_in", grades)


def _non_diabetes_tokens(record: FundusRecord) -> list[str]:
    """The record's comorbidity tokens that a narrative may list (diabetes is said by its own clause)."""
    return [t for t in comorbidity_tokens(record.comorbidities) or () if t not in DIABETES_TOKENS]


def _stripped(text: str | None) -> str:
    return (text or "").strip()


# ---------------------------------------------------------------------------------------------------
# Which records fit.


def record_fits(record: FundusRecord, facts: StatedFacts) -> bool:
    """Whether every stated fact is true of `record` (a missing field fits no fact about it)."""
    return all(_fact_holds(record, kind, value) for kind, value in facts.facts)


def _fact_holds(record: FundusRecord, kind: str, value: object) -> bool:
    """Whether one fact is true of the record."""
    age = None if record.patient_age is None else int(record.patient_age)
    if kind == "exam_eye":
        return record.exam_eye is not None and _EYE_WORDS[record.exam_eye] == value
    if kind == "patient_sex":
        return record.patient_sex is not None and _SEX_WORDS[record.patient_sex] == value
    if kind == "age_exact":
        return age is not None and age == value
    if kind == "age_decade":
        return age is not None and age // 10 * 10 == value
    if kind == "nationality":
        return record.nationality is not None and _stripped(record.nationality) == value
    if kind in ("diabetes", "insulin", "quality_adequate") or kind in PATHOLOGY_FIELDS:
        flag = getattr(record, kind)
        return flag is not None and flag is value
    if kind == "diabetes_type":
        return diabetes_type(comorbidity_tokens(record.comorbidities)) == value
    if kind == "diabetes_duration":
        return record.diabetes_time_y is not None and duration_words(record.diabetes_time_y) == value
    if kind == "comorbidities_none":
        return value is True and comorbidity_tokens(record.comorbidities) == []
    if kind == "comorbidity":
        assert isinstance(value, frozenset)
        return any(token in value for token in _non_diabetes_tokens(record))
    if kind == "camera":
        return record.camera is not None and _stripped(record.camera) == value
    if kind == "dr_icdr":
        return record.dr_icdr is not None and record.dr_icdr == value
    if kind == "dr_icdr_in":
        assert isinstance(value, frozenset)
        return record.dr_icdr is not None and record.dr_icdr in value
    if kind == "dr_sdrg":
        return record.dr_sdrg is not None and record.dr_sdrg == value
    if kind in ASSESSMENT_FIELDS:
        assessment = getattr(record, kind)
        return assessment is not None and _ASSESSMENT_WORDS[assessment] == value
    raise ValueError(f"unknown fact kind: {kind!r}")


_TOKEN = "comorbidity token"
"""Index key (not a fact kind) for a record's comorbidity token: set-valued facts are unions of these."""


def _index_keys(record: FundusRecord) -> set[tuple[str, object]]:
    """The single-valued facts true of `record`, and one `_TOKEN` key per comorbidity token it has.

    A single-valued fact fits the record exactly when it is among these; a set-valued fact
    (``comorbidity``, ``dr_icdr_in``) fits when one of its members' keys is (see `_matching`).
    """
    keys: set[tuple[str, object]] = set()
    if record.exam_eye is not None:
        keys.add(("exam_eye", _EYE_WORDS[record.exam_eye]))
    if record.patient_sex is not None:
        keys.add(("patient_sex", _SEX_WORDS[record.patient_sex]))
    if record.patient_age is not None:
        age = int(record.patient_age)
        keys.add(("age_exact", age))
        keys.add(("age_decade", age // 10 * 10))
    if record.nationality is not None:
        keys.add(("nationality", _stripped(record.nationality)))
    for kind in ("diabetes", "insulin", "quality_adequate", *PATHOLOGY_FIELDS):
        flag = getattr(record, kind)
        if flag is not None:
            keys.add((kind, flag))
    tokens = comorbidity_tokens(record.comorbidities)
    type_named = diabetes_type(tokens)
    if type_named is not None:
        keys.add(("diabetes_type", type_named))
    if record.diabetes_time_y is not None:
        keys.add(("diabetes_duration", duration_words(record.diabetes_time_y)))
    if tokens == []:
        keys.add(("comorbidities_none", True))
    keys.update((_TOKEN, token) for token in _non_diabetes_tokens(record))
    if record.camera is not None:
        keys.add(("camera", _stripped(record.camera)))
    if record.dr_icdr is not None:
        keys.add(("dr_icdr", record.dr_icdr))
    if record.dr_sdrg is not None:
        keys.add(("dr_sdrg", record.dr_sdrg))
    for kind in ASSESSMENT_FIELDS:
        assessment = getattr(record, kind)
        if assessment is not None:
            keys.add((kind, _ASSESSMENT_WORDS[assessment]))
    return keys


def fitting_counts(
    query_records: Sequence[FundusRecord],
    query_facts: Sequence[StatedFacts],
    gallery: Sequence[FundusRecord],
) -> list[int]:
    """For each query, how many gallery records fit the facts its narrative states (`record_fits`).

    `query_records[i]` is the record query i was written from; it must fit its own facts (a check that
    the facts belong to the queries). The gallery is indexed once (fact -> positions of the records it is
    true of) and each distinct set of facts is answered by intersecting index entries, smallest first:
    about a second for 2000 queries against 2000 records.
    """
    if len(query_records) != len(query_facts):
        raise ValueError(f"{len(query_records)} query records but {len(query_facts)} sets of facts")
    for position, (record, stated) in enumerate(zip(query_records, query_facts, strict=True)):
        if not record_fits(record, stated):
            raise ValueError(f"query {position} ({record.image_id}) does not fit its own stated facts")
    index: dict[tuple[str, object], set[int]] = {}
    for position, record in enumerate(gallery):
        for key in _index_keys(record):
            index.setdefault(key, set()).add(position)
    answers: dict[StatedFacts, int] = {}
    counts = []
    for stated in query_facts:
        if stated not in answers:
            answers[stated] = _count_fitting(stated, index, len(gallery))
        counts.append(answers[stated])
    return counts


def _matching(fact: Fact, index: dict[tuple[str, object], set[int]]) -> set[int]:
    """The gallery positions whose record a fact fits (do not modify: may be an index entry)."""
    kind, value = fact
    if kind not in FACT_KINDS:
        raise ValueError(f"unknown fact kind: {kind!r}")
    if kind in ("comorbidity", "dr_icdr_in"):
        assert isinstance(value, frozenset)
        key_kind = _TOKEN if kind == "comorbidity" else "dr_icdr"
        union: set[int] = set()
        for member in value:
            union |= index.get((key_kind, member), set())
        return union
    return index.get(fact, set())


def _count_fitting(stated: StatedFacts, index: dict[tuple[str, object], set[int]], gallery_size: int) -> int:
    """How many gallery positions every stated fact fits (intersecting the smallest entries first)."""
    if not stated.facts:
        return gallery_size
    entries = sorted((_matching(fact, index) for fact in stated.facts), key=len)
    common = set(entries[0])
    for entry in entries[1:]:
        if not common:
            break
        common &= entry
    return len(common)
