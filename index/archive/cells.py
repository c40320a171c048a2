"""The one parser of label-spreadsheet cells, shared by the BRSET reader and the dataset importer.

A cell parser takes the raw cell text and returns `(value, how it was repaired or None, why it was
rejected or None)`; a value of None with neither note means "missing". The rules for real, messy cells:

- Missing: an empty cell or `NA`, `nan`, `N/A` (any case).
- Numbers: a decimal comma (`0,5`) is read as a decimal point and the letter O as a zero (`1O` -> 10),
  each reported as a repair; a value outside the field's range is rejected. In a duration, Portuguese
  `não` ("no", without a duration) is missing, reported as a repair: 0 years would be a guess.
- Codes (grades, sex, eye, yes/no, ...): the code table is the caller's (BRSET's strict codes or the
  importer's wider vocabulary); an integer code written as `1.0` is repaired; listed spellings (such as
  Portuguese `sim`/`não` for yes/no) are read with a repair note; anything else is rejected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

ParseResult = tuple[Any, str | None, str | None]
"""(value, repair note, rejection reason)."""
Parser = Callable[[str], ParseResult]

MISSING_TOKENS: frozenset[str] = frozenset({"", "na", "nan", "n/a"})
"""Cell values (stripped, lower case) that mean "missing"."""

REPAIR_DECIMAL_COMMA = "decimal comma"
REPAIR_LETTER_O = "letter O read as zero"
REPAIR_NAO_DURATION = "Portuguese 'no' (no duration given) read as missing"
REPAIR_PORTUGUESE_YES_NO = "Portuguese 'sim'/'não' read as yes/no"
REPAIR_DECIMAL_CODE = "integer code written with a decimal point"

PORTUGUESE_NO: frozenset[str] = frozenset({"não", "nao"})
PORTUGUESE_YES_NO: dict[str, tuple[bool, str]] = {
    "sim": (True, REPAIR_PORTUGUESE_YES_NO),
    **{word: (False, REPAIR_PORTUGUESE_YES_NO) for word in PORTUGUESE_NO},
}
"""Spellings a yes/no column accepts with a repair note."""

NUMBER_RANGES: dict[str, tuple[float, float]] = {"patient_age": (0, 120), "diabetes_time_y": (0, 100)}
"""The numeric `FundusRecord` fields and the values accepted for each (years)."""

_PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
_COMMA_NUMBER = re.compile(r"[+-]?\d+,\d+")
_LETTER_O_NUMBER = re.compile(r"[\dOo]+(?:[.,][\dOo]+)?")
_DECIMAL_CODE = re.compile(r"(\d+)\.0+")


def is_missing(text: str) -> bool:
    """Whether a (stripped) cell means "missing"."""
    return text.lower() in MISSING_TOKENS


def parse_number(raw: str, low: float, high: float, nao_means_missing: bool = False) -> ParseResult:
    """A decimal number in [low, high], repairing decimal commas and the letter O."""
    text = raw.strip()
    if is_missing(text):
        return None, None, None
    repairs: list[str] = []
    if not _PLAIN_NUMBER.fullmatch(text):
        if nao_means_missing and text.lower() in PORTUGUESE_NO:
            return None, REPAIR_NAO_DURATION, None
        if _LETTER_O_NUMBER.fullmatch(text) and any(ch.isdigit() for ch in text) and any(ch in "Oo" for ch in text):
            text = text.replace("O", "0").replace("o", "0")
            repairs.append(REPAIR_LETTER_O)
        if _COMMA_NUMBER.fullmatch(text):
            text = text.replace(",", ".")
            repairs.append(REPAIR_DECIMAL_COMMA)
        if not _PLAIN_NUMBER.fullmatch(text):
            return None, None, "not a number"
    value = float(text)
    if not low <= value <= high:
        return None, None, f"outside {low:g}-{high:g}"
    return value, "; ".join(repairs) or None, None


def parse_field_number(field: str, raw: str) -> ParseResult:
    """`parse_number` with the range of a numeric `FundusRecord` field (`NUMBER_RANGES`); a diabetes
    duration reads Portuguese `não` as missing."""
    low, high = NUMBER_RANGES[field]
    return parse_number(raw, low, high, nao_means_missing=field == "diabetes_time_y")


def parse_code(
    raw: str, codes: Mapping[str, Any], expected: str, repairs: Mapping[str, tuple[Any, str]] | None = None
) -> ParseResult:
    """One of a fixed set of codes (`codes` maps the lower-case text to the value). `repairs` maps other
    spellings to (value, repair note). An integer code written as `1.0` is read as `1`, with a repair note."""
    key = raw.strip().lower()
    if key in codes:
        return codes[key], None, None
    if key in MISSING_TOKENS:
        return None, None, None
    match = _DECIMAL_CODE.fullmatch(key)
    if match and match.group(1) in codes:
        return codes[match.group(1)], REPAIR_DECIMAL_CODE, None
    if repairs and key in repairs:
        value, note = repairs[key]
        return value, note, None
    return None, None, f"expected {expected}"


def code_parser(
    codes: Mapping[str, Any], expected: str, repairs: Mapping[str, tuple[Any, str]] | None = None
) -> Parser:
    """`parse_code` bound to one code table."""

    def parse(raw: str) -> ParseResult:
        return parse_code(raw, codes, expected, repairs)

    return parse


def parse_text(raw: str) -> ParseResult:
    """Free text, stripped; missing tokens are None."""
    text = raw.strip()
    if is_missing(text):
        return None, None, None
    return text, None, None
