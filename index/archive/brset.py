"""Read and write BRSET-layout archives: a label CSV plus `fundus_photos/<image_id>.jpg`.

An archive is a folder holding `labels.csv` (BRSET v1.0.0) or `labels_brset.csv` (v1.0.1) and a
`fundus_photos/` folder. The reader turns each CSV row into a `FundusRecord` and writes a `ParseReport`
saying, per column, which values were missing, which were repaired (and how) and which were rejected
(with their CSV line numbers, as a text editor shows them: the header is line 1).

Rules for the real, messy values of BRSET (see ../shared/data/README.md):

- Missing: an empty cell or `NA`, `nan`, `N/A` (any case) is None and counted as missing, never 0.
- Numbers (`patient_age`, `diabetes_time_y`): a decimal comma (`0,5`, `10,00`) is read as a decimal
  point and the letter O as a zero (`1O` -> 10); both are counted as repaired. `Não` in
  `diabetes_time_y` ("no", without a duration) is read as missing and counted as repaired and missing:
  it says the duration was not given, and 0 years would be a guess. Ages outside 0-120 and durations
  outside 0-100 years are rejected.
- yes/no fields (`insuline`, `diabetes`): `yes`/`no` in any case; Portuguese `sim`/`não` are repaired.
- Codes: sex and eye 1/2, assessments 1 normal / 2 abnormal, DR grades 0-4, pathology flags 0/1,
  quality `Adequate`/`Inadequate` (any case). An integer code written as `1.0` is repaired; anything
  else (such as the one `bv` in `optic_disc`) is rejected: the field is None and the value is listed
  with its line number.
- Text (`camera`, `comorbidities`, `nationality`) is kept as written, stripped (`0` stays `"0"`).
- A row without `image_id` or `patient_id`, with a wrong number of cells, with an `image_id` that is
  not a plain file name, or repeating an earlier `image_id` is rejected as a whole and listed.
  Column statistics count the rows that became records.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from index.archive.cells import (
    PORTUGUESE_YES_NO,
    Parser,
    ParseResult,
    code_parser,
    is_missing,
    parse_field_number,
    parse_text,
)
from index.records import (
    ASSESSMENT_FIELDS,
    ICDR_NAMES,
    PATHOLOGY_FIELDS,
    SDRG_NAMES,
    Assessment,
    Eye,
    FundusRecord,
    Sex,
)

LABEL_FILE_NAMES: tuple[str, ...] = ("labels.csv", "labels_brset.csv")
"""Label file names: BRSET v1.0.0, then v1.0.1."""

PHOTOS_DIR = "fundus_photos"
"""Folder of the photographs, inside the archive folder."""

PHOTO_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
"""Accepted photo file suffixes (any case), in order of preference."""

COLUMN_TO_FIELD: dict[str, str] = {
    "image_id": "image_id",
    "patient_id": "patient_id",
    "camera": "camera",
    "patient_age": "patient_age",
    "comorbidities": "comorbidities",
    "diabetes_time_y": "diabetes_time_y",
    "insuline": "insulin",
    "patient_sex": "patient_sex",
    "exam_eye": "exam_eye",
    "diabetes": "diabetes",
    "nationality": "nationality",
    "optic_disc": "optic_disc",
    "vessels": "vessels",
    "macula": "macula",
    "DR_SDRG": "dr_sdrg",
    "DR_ICDR": "dr_icdr",
    "focus": "focus",
    "iluminaton": "illumination",
    "image_field": "image_field",
    "artifacts": "artifacts",
    "diabetic_retinopathy": "diabetic_retinopathy",
    "macular_edema": "macular_edema",
    "scar": "scar",
    "nevus": "nevus",
    "amd": "amd",
    "vascular_occlusion": "vascular_occlusion",
    "hypertensive_retinopathy": "hypertensive_retinopathy",
    "drusens": "drusen",
    "hemorrhage": "hemorrhage",
    "retinal_detachment": "retinal_detachment",
    "myopic_fundus": "myopic_fundus",
    "increased_cup_disc": "increased_cup_disc",
    "other": "other",
    "quality": "quality_adequate",
}
"""BRSET v1.0.0 column name -> `FundusRecord` field, in BRSET's column order (34 columns)."""

NARRATIVE_COLUMN = "narrative"
"""Optional extra column holding `FundusRecord.narrative` (written by the synthetic generator)."""

FIELD_TO_COLUMN: dict[str, str] = {
    **{field: column for column, field in COLUMN_TO_FIELD.items()},
    "narrative": NARRATIVE_COLUMN,
}
"""`FundusRecord` field -> BRSET v1.0.0 column name (and `narrative`)."""

COLUMN_ALIASES: dict[str, str] = {
    "illuminaton": "iluminaton",  # BRSET v1.0.1 spells it `Illuminaton`
    "illumination": "iluminaton",
    "insulin": "insuline",
    "drusen": "drusens",
}
"""Other spellings (lower case) accepted for a BRSET column, mapped to the v1.0.0 name."""

REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "patient_id")
"""Columns a label file must have; any other column may be absent (its fields are then None)."""

MAX_LISTED_LINES = 20
"""How many line numbers a report keeps per repair or rejection group (the count is always exact)."""


class ArchiveError(Exception):
    """An archive or label file that cannot be read; the message names the file (and line) and what
    was expected."""


# --- report -------------------------------------------------------------------------------------


class RepairGroup(BaseModel):
    """Values of one column repaired the same way."""

    how: str
    count: int
    lines: list[int]
    """The first `MAX_LISTED_LINES` line numbers."""
    examples: list[str]
    """Up to five distinct original values."""


class RejectGroup(BaseModel):
    """Cells of one column holding the same unparseable value (the field is None)."""

    value: str
    reason: str
    count: int
    lines: list[int]
    """The first `MAX_LISTED_LINES` line numbers."""


class ColumnReport(BaseModel):
    """What happened to the values of one column (over the rows that became records)."""

    column: str
    """The column name as spelled in the file."""
    field: str
    """The `FundusRecord` field it fills."""
    missing: int = 0
    """Cells that ended up None without being rejected (empty, `NA`, or repaired to missing)."""
    repaired: list[RepairGroup] = []
    rejected: list[RejectGroup] = []

    @property
    def n_repaired(self) -> int:
        """Number of repaired cells."""
        return sum(group.count for group in self.repaired)

    @property
    def n_rejected(self) -> int:
        """Number of rejected cells."""
        return sum(group.count for group in self.rejected)


class RejectedRow(BaseModel):
    """A CSV row that did not become a record."""

    line: int
    image_id: str | None
    reason: str


class DuplicateId(BaseModel):
    """An `image_id` on several rows: the first row is kept, the others are rejected."""

    image_id: str
    kept_line: int
    rejected_lines: list[int]


class ParseReport(BaseModel):
    """Everything a reader noticed in an archive's label file (and, after `read_archive`, its photos)."""

    labels_path: str
    total_rows: int
    """Data rows in the file (blank lines not counted)."""
    records: int
    patients: int
    columns: list[ColumnReport]
    """One entry per recognised column present in the file, in file order."""
    missing_columns: list[str]
    """BRSET v1.0.0 columns absent from the file (their fields are None in every record)."""
    extra_columns: list[str]
    """Columns of the file that were not recognised and were ignored."""
    rejected_rows: list[RejectedRow]
    """Every row that did not become a record, duplicates included."""
    duplicates: list[DuplicateId]
    icdr_counts: dict[str, int]
    """Records per ICDR grade, keys "0".."4" and "missing"."""
    sdrg_counts: dict[str, int]
    """Records per SDRG grade, keys "0".."4" and "missing"."""
    photos_checked: bool = False
    photos_dir_found: bool | None = None
    rows_without_photo: list[str] = []
    """Image ids of records with no photo file."""
    photos_without_row: list[str] = []
    """File names in `fundus_photos/` whose name matches no record."""

    @property
    def rejected_total(self) -> int:
        """Cells rejected over all columns (their fields are None); whole rejected rows not included."""
        return sum(column.n_rejected for column in self.columns)

    @property
    def repaired_total(self) -> int:
        """Cells repaired over all columns."""
        return sum(column.n_repaired for column in self.columns)

    def column(self, name: str) -> ColumnReport | None:
        """The report of a column, by its name in the file, its BRSET name or its record field."""
        field = _header_to_field(name) or name
        for col in self.columns:
            if col.field == field:
                return col
        return None

    def render(self) -> str:
        """A readable plain-text report (what `retina-index describe` prints)."""
        return _render_report(self)


# --- value parsers ------------------------------------------------------------------------------

def _parse_narrative(raw: str) -> ParseResult:
    # Kept verbatim (not stripped) so that a written narrative reads back identical.
    if is_missing(raw.strip()):
        return None, None, None
    return raw, None, None


_ASSESSMENT_CODES = {"1": Assessment.NORMAL, "2": Assessment.ABNORMAL}
_GRADE_CODES = {str(grade): grade for grade in range(5)}

_YES_NO = {"yes": True, "no": False}

_PARSERS: dict[str, Parser] = {
    "image_id": parse_text,
    "patient_id": parse_text,
    "camera": parse_text,
    "patient_age": partial(parse_field_number, "patient_age"),
    "comorbidities": parse_text,
    "diabetes_time_y": partial(parse_field_number, "diabetes_time_y"),
    "insulin": code_parser(_YES_NO, "yes or no", PORTUGUESE_YES_NO),
    "patient_sex": code_parser({"1": Sex.MALE, "2": Sex.FEMALE}, "1 (male) or 2 (female)"),
    "exam_eye": code_parser({"1": Eye.RIGHT, "2": Eye.LEFT}, "1 (right) or 2 (left)"),
    "diabetes": code_parser(_YES_NO, "yes or no", PORTUGUESE_YES_NO),
    "nationality": parse_text,
    "dr_sdrg": code_parser(_GRADE_CODES, "an SDRG grade 0-4"),
    "dr_icdr": code_parser(_GRADE_CODES, "an ICDR grade 0-4"),
    "quality_adequate": code_parser({"adequate": True, "inadequate": False}, "Adequate or Inadequate"),
    "narrative": _parse_narrative,
}
for _field in ASSESSMENT_FIELDS:
    _PARSERS[_field] = code_parser(_ASSESSMENT_CODES, "1 (normal) or 2 (abnormal)")
for _field in PATHOLOGY_FIELDS:
    _PARSERS[_field] = code_parser({"0": False, "1": True}, "0 or 1")


def _normalise_header(name: str) -> str:
    return name.replace("\ufeff", "").strip().lower()


_HEADER_TO_FIELD: dict[str, str] = {column.lower(): field for column, field in COLUMN_TO_FIELD.items()}
_HEADER_TO_FIELD.update({alias: COLUMN_TO_FIELD[column] for alias, column in COLUMN_ALIASES.items()})
_HEADER_TO_FIELD[NARRATIVE_COLUMN] = "narrative"
_HEADER_TO_FIELD.update({field: field for field in FIELD_TO_COLUMN})


def _header_to_field(name: str) -> str | None:
    return _HEADER_TO_FIELD.get(_normalise_header(name))


# --- reading ------------------------------------------------------------------------------------


class _ColumnStats:
    """Mutable counters behind one `ColumnReport`."""

    def __init__(self, column: str, field: str) -> None:
        self.column = column
        self.field = field
        self.missing = 0
        self.repairs: dict[str, tuple[list[int], list[int], list[str]]] = {}
        self.rejects: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def add_repair(self, how: str, line: int, raw: str) -> None:
        count, lines, examples = self.repairs.setdefault(how, ([0], [], []))
        count[0] += 1
        if len(lines) < MAX_LISTED_LINES:
            lines.append(line)
        if raw not in examples and len(examples) < 5:
            examples.append(raw)

    def add_reject(self, raw: str, reason: str, line: int) -> None:
        count, lines = self.rejects.setdefault((raw, reason), ([0], []))
        count[0] += 1
        if len(lines) < MAX_LISTED_LINES:
            lines.append(line)

    def to_report(self) -> ColumnReport:
        return ColumnReport(
            column=self.column,
            field=self.field,
            missing=self.missing,
            repaired=[
                RepairGroup(how=how, count=count[0], lines=lines, examples=examples)
                for how, (count, lines, examples) in self.repairs.items()
            ],
            rejected=[
                RejectGroup(value=value, reason=reason, count=count[0], lines=lines)
                for (value, reason), (count, lines) in self.rejects.items()
            ],
        )


def _map_header(csv_path: Path, header: list[str]) -> tuple[list[tuple[int, str]], list[str]]:
    """Map header cells to record fields: ([(cell index, field)], unrecognised column names)."""
    mapped: list[tuple[int, str]] = []
    extra: list[str] = []
    seen: dict[str, str] = {}
    for index, name in enumerate(header):
        field = _header_to_field(name)
        if field is None:
            extra.append(name.replace("\ufeff", "").strip())
            continue
        if field in seen:
            raise ArchiveError(
                f"{csv_path}, line 1: columns {seen[field]!r} and {name!r} both give the field {field!r}"
            )
        seen[field] = name
        mapped.append((index, field))
    present = {field for _, field in mapped}
    missing_required = [column for column in REQUIRED_COLUMNS if COLUMN_TO_FIELD[column] not in present]
    if missing_required:
        found = ", ".join(name.replace("\ufeff", "").strip() for name in header) or "(none)"
        raise ArchiveError(
            f"{csv_path}: missing required column(s) {', '.join(missing_required)}; columns found: {found}"
        )
    return mapped, extra


def _grade_counts(values: list[int | None]) -> dict[str, int]:
    counts = {str(grade): 0 for grade in range(5)}
    counts["missing"] = 0
    for value in values:
        counts["missing" if value is None else str(value)] += 1
    return counts


def _row_problem(image_id: str | None, patient_id: str | None, first_line: dict[str, int]) -> str | None:
    """Why a row cannot become a record at all, or None when its ids are usable."""
    if image_id is None:
        return "image_id is missing"
    if patient_id is None:
        return "patient_id is missing"
    if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
        return "image_id is not a plain file name"
    if image_id in first_line:
        return f"duplicate image_id (first on line {first_line[image_id]})"
    return None


def _first_non_utf8_line(path: Path) -> int:
    """The line holding the first byte that is not UTF-8 (1 if the whole file decodes)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return data.count(b"\n", 0, error.start) + 1
    return 1


def read_labels(csv_path: Path) -> tuple[list[FundusRecord], ParseReport]:
    """Read a BRSET label CSV into records and a parse report (photos are not checked).

    Raises `ArchiveError` when the file is missing, not UTF-8, not CSV, or lacks a required column.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ArchiveError(f"label file not found: {csv_path}")
    records: list[FundusRecord] = []
    rejected_rows: list[RejectedRow] = []
    first_line: dict[str, int] = {}
    duplicate_lines: dict[str, list[int]] = {}
    total_rows = 0
    try:
        with csv_path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ArchiveError(f"{csv_path}: the file is empty (expected a header line)")
            mapped, extra = _map_header(csv_path, header)
            stats = [
                _ColumnStats(header[index].replace("\ufeff", "").strip(), field) for index, field in mapped
            ]
            parsers = [_PARSERS[field] for _, field in mapped]
            id_slot = next(slot for slot, (_, field) in enumerate(mapped) if field == "image_id")
            patient_slot = next(slot for slot, (_, field) in enumerate(mapped) if field == "patient_id")
            n_cells = len(header)
            while True:
                line = reader.line_num + 1  # first line of the next row (a quoted cell may span lines)
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:
                    raise ArchiveError(f"{csv_path}, line {line}: not valid CSV ({error})") from error
                if not row:
                    continue  # blank line
                total_rows += 1
                if len(row) != n_cells:
                    image_id = row[mapped[id_slot][0]].strip() if len(row) > mapped[id_slot][0] else None
                    reason = f"expected {n_cells} cells, found {len(row)}"
                    rejected_rows.append(RejectedRow(line=line, image_id=image_id or None, reason=reason))
                    continue
                image_id = parse_text(row[mapped[id_slot][0]])[0]
                patient_id = parse_text(row[mapped[patient_slot][0]])[0]
                reason = _row_problem(image_id, patient_id, first_line)
                if reason is not None:
                    if image_id in first_line:
                        duplicate_lines.setdefault(image_id, []).append(line)
                    rejected_rows.append(RejectedRow(line=line, image_id=image_id, reason=reason))
                    continue

                values: dict[str, Any] = {}
                notes: list[tuple[int, str, str | None, str | None]] = []
                missing: list[int] = []
                for slot, (index, field) in enumerate(mapped):
                    raw = row[index]
                    value, repaired, rejected = parsers[slot](raw)
                    if value is not None:
                        values[field] = value
                    elif rejected is None:
                        missing.append(slot)
                    if repaired is not None or rejected is not None:
                        notes.append((slot, raw, repaired, rejected))
                try:
                    record = FundusRecord(**values)
                except ValidationError as error:  # not expected: the parsers enforce the same limits
                    problem = "; ".join(f"{item['loc']}: {item['msg']}" for item in error.errors())
                    rejected_rows.append(RejectedRow(line=line, image_id=image_id, reason=problem))
                    continue
                records.append(record)
                first_line[image_id] = line
                for slot in missing:
                    stats[slot].missing += 1
                for slot, raw, repaired, rejected in notes:
                    if repaired is not None:
                        stats[slot].add_repair(repaired, line, raw)
                    if rejected is not None:
                        stats[slot].add_reject(raw, rejected, line)
    except UnicodeDecodeError as error:
        raise ArchiveError(f"{csv_path}, line {_first_non_utf8_line(csv_path)}: not UTF-8 text") from error

    present = {field for _, field in mapped}
    report = ParseReport(
        labels_path=str(csv_path),
        total_rows=total_rows,
        records=len(records),
        patients=len({record.patient_id for record in records}),
        columns=[column_stats.to_report() for column_stats in stats],
        missing_columns=[column for column, field in COLUMN_TO_FIELD.items() if field not in present],
        extra_columns=extra,
        rejected_rows=rejected_rows,
        duplicates=[
            DuplicateId(image_id=image_id, kept_line=first_line[image_id], rejected_lines=lines)
            for image_id, lines in duplicate_lines.items()
        ],
        icdr_counts=_grade_counts([record.dr_icdr for record in records]),
        sdrg_counts=_grade_counts([record.dr_sdrg for record in records]),
    )
    return records, report


def find_labels_file(root: Path) -> Path:
    """The label file of an archive folder: `labels.csv` (v1.0.0) or `labels_brset.csv` (v1.0.1).

    Raises `ArchiveError` when the folder is missing, holds neither file, or holds both.
    """
    root = Path(root)
    if not root.exists():
        raise ArchiveError(f"archive folder not found: {root}")
    if not root.is_dir():
        raise ArchiveError(f"not a folder: {root} (expected an archive folder)")
    found = [root / name for name in LABEL_FILE_NAMES if (root / name).is_file()]
    if len(found) > 1:
        raise ArchiveError(
            f"{root}: both {' and '.join(path.name for path in found)} exist; keep only one label file"
        )
    if not found:
        csv_files = sorted(path.name for path in root.glob("*.csv"))
        seen = ", ".join(csv_files) if csv_files else "no CSV file"
        raise ArchiveError(
            f"{root}: no label file (expected labels.csv for BRSET v1.0.0 or labels_brset.csv for "
            f"v1.0.1; found {seen})"
        )
    return found[0]


def _photo_suffix_rank(name: str) -> int | None:
    suffix = os.path.splitext(name)[1].lower()
    return PHOTO_SUFFIXES.index(suffix) if suffix in PHOTO_SUFFIXES else None


def _list_photos(photos_dir: Path) -> dict[str, list[str]]:
    """Photo files of a folder grouped by stem, preferred first; hidden files are ignored."""
    by_stem: dict[str, list[tuple[int, str]]] = {}
    if not photos_dir.is_dir():
        return {}
    with os.scandir(photos_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rank = _photo_suffix_rank(entry.name)
            if rank is None or not entry.is_file():
                continue
            stem = os.path.splitext(entry.name)[0]
            # An exact ".jpg" beats ".JPG", which beats the other suffixes.
            exact = 0 if entry.name.endswith(".jpg") else 1
            by_stem.setdefault(stem, []).append((rank * 2 + exact, entry.name))
    return {stem: [name for _, name in sorted(names)] for stem, names in by_stem.items()}


@dataclass(frozen=True)
class Archive:
    """A BRSET-layout archive: its folder, label file, records and parse report."""

    root: Path
    labels_path: Path
    records: list[FundusRecord]
    report: ParseReport

    @property
    def photos_dir(self) -> Path:
        """The `fundus_photos/` folder (it may not exist)."""
        return self.root / PHOTOS_DIR

    @cached_property
    def _record_ids(self) -> frozenset[str]:
        return frozenset(record.image_id for record in self.records)

    @cached_property
    def _photo_files(self) -> dict[str, list[str]]:
        # Listed once, at the first lookup that needs more than `<image_id>.jpg`.
        return _list_photos(self.photos_dir)

    def photo_path(self, image_id: str) -> Path | None:
        """The photo file of a record of this archive, or None (unknown id or no photo file).

        `<image_id>.jpg` is preferred, then `.jpeg`, `.png`, `.tif`, `.tiff` in any case.
        """
        if image_id not in self._record_ids:
            return None
        path = self.photos_dir / f"{image_id}.jpg"
        if path.is_file():
            return path
        for name in self._photo_files.get(image_id, []):
            path = self.photos_dir / name
            if path.is_file():
                return path
        return None


def read_archive(root: Path, check_photos: bool = True) -> Archive:
    """Read an archive folder: its labels and, if `check_photos`, a cross-check with `fundus_photos/`.

    A missing `fundus_photos/` folder is not fatal: every row is then reported without a photo.
    Raises `ArchiveError` for a missing folder or label file, or an unreadable label file.
    """
    root = Path(root)
    labels_path = find_labels_file(root)
    records, report = read_labels(labels_path)
    if check_photos:
        photos_dir = root / PHOTOS_DIR
        photos = _list_photos(photos_dir)
        ids = {record.image_id for record in records}
        report = report.model_copy(
            update={
                "photos_checked": True,
                "photos_dir_found": photos_dir.is_dir(),
                "rows_without_photo": [
                    record.image_id for record in records if record.image_id not in photos
                ],
                "photos_without_row": sorted(
                    name for stem, names in photos.items() if stem not in ids for name in names
                ),
            }
        )
    return Archive(root=root, labels_path=labels_path, records=records, report=report)


# --- writing ------------------------------------------------------------------------------------


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _format_cell(field: str, value: Any) -> str:
    """BRSET's spelling of one record value; `NA` for missing."""
    if value is None:
        return "NA"
    if field in ("insulin", "diabetes"):
        return "yes" if value else "no"
    if field == "quality_adequate":
        return "Adequate" if value else "Inadequate"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):  # enums (IntEnum) and grades
        return str(int(value))
    if isinstance(value, float):
        return _format_number(value)
    return str(value)


def write_labels_csv(records: Sequence[FundusRecord], path: Path) -> None:
    """Write records as a BRSET v1.0.0 label CSV, atomically (a temporary file, then a rename).

    Columns in BRSET order with BRSET codes (yes/no, 1/2, Adequate/Inadequate, 0/1, `NA` for
    missing), plus a trailing `narrative` column when any record has one. The parent folder is
    created if needed. Raises ValueError on a repeated image_id (the file could not be read back).

    `read_labels` gives the records back equal, except for text the reader cannot tell apart from
    a missing value or normalises: a text field that is empty or `NA`/`nan`/`N/A` reads back as
    None, and surrounding spaces of text fields other than `narrative` are stripped.
    """
    path = Path(path)
    seen: set[str] = set()
    for record in records:
        if record.image_id in seen:
            raise ValueError(f"duplicate image_id {record.image_id!r}: not writing {path}")
        seen.add(record.image_id)
    fields = list(COLUMN_TO_FIELD.values())
    header = list(COLUMN_TO_FIELD)
    if any(record.narrative is not None for record in records):
        fields.append("narrative")
        header.append(NARRATIVE_COLUMN)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for record in records:
                writer.writerow([_format_cell(field, getattr(record, field)) for field in fields])
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


# --- rendering ----------------------------------------------------------------------------------


def _lines_text(lines: list[int], count: int) -> str:
    text = ", ".join(str(line) for line in lines)
    more = count - len(lines)
    word = "line" if count == 1 else "lines"
    return f"{word} {text}" + (f" (+{more:,} more)" if more > 0 else "")


def _names_text(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return shown + (f" (+{more:,} more)" if more > 0 else "")


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


def _render_grades(title: str, names: tuple[str, ...], counts: dict[str, int]) -> list[str]:
    # Name last, so that SDRG's long names do not push the numbers apart.
    total = sum(counts.values())
    out = [f"{title:<10} {'count':>8} {'share':>7}  name"]
    for grade, name in enumerate(names):
        count = counts.get(str(grade), 0)
        out.append(f"{grade:<10} {count:>8,} {_percent(count, total):>7}  {name}")
    missing = counts.get("missing", 0)
    out.append(f"{'missing':<10} {missing:>8,} {_percent(missing, total):>7}")
    return out


def _render_report(report: ParseReport) -> str:
    out: list[str] = [f"Label file: {report.labels_path}"]
    out.append(
        f"Rows: {report.total_rows:,}   records: {report.records:,}   "
        f"rejected rows: {len(report.rejected_rows):,}   patients: {report.patients:,}"
    )
    out.append(
        "Columns absent from the file (all None): "
        + (", ".join(report.missing_columns) if report.missing_columns else "none")
    )
    if report.extra_columns:
        out.append("Columns not recognised (ignored): " + ", ".join(report.extra_columns))
    if report.photos_checked:
        if not report.photos_dir_found:
            out.append(f"Photos: no {PHOTOS_DIR}/ folder, so no record has a photo")
        else:
            out.append(
                f"Photos: {len(report.rows_without_photo):,} rows without a photo, "
                f"{len(report.photos_without_row):,} photos without a row"
            )
            if report.rows_without_photo:
                out.append("  rows without a photo: " + _names_text(report.rows_without_photo))
            if report.photos_without_row:
                out.append("  photos without a row: " + _names_text(report.photos_without_row))
    else:
        out.append("Photos: not checked")

    if report.rejected_rows:
        out.append("")
        out.append(f"Rejected rows ({len(report.rejected_rows):,}):")
        for row in report.rejected_rows[:MAX_LISTED_LINES]:
            out.append(f"  line {row.line}: {row.image_id or '(no image_id)'}: {row.reason}")
        if len(report.rejected_rows) > MAX_LISTED_LINES:
            out.append(f"  (+{len(report.rejected_rows) - MAX_LISTED_LINES:,} more)")

    out.append("")
    width = max([len(column.column) for column in report.columns] + [6])
    out.append(f"{'column':<{width}} {'missing':>8} {'share':>7} {'repaired':>9} {'rejected':>9}")
    for column in report.columns:
        out.append(
            f"{column.column:<{width}} {column.missing:>8,} {_percent(column.missing, report.records):>7} "
            f"{column.n_repaired:>9,} {column.n_rejected:>9,}"
        )
        for repair in column.repaired:
            examples = ", ".join(repr(example) for example in repair.examples)
            out.append(
                f"    repaired {repair.count:,} x {repair.how} (e.g. {examples}): "
                f"{_lines_text(repair.lines, repair.count)}"
            )
        for reject in column.rejected:
            out.append(
                f"    rejected {reject.count:,} x {reject.value!r} ({reject.reason}): "
                f"{_lines_text(reject.lines, reject.count)}"
            )

    out.append("")
    out.extend(_render_grades("ICDR grade", ICDR_NAMES, report.icdr_counts))
    out.append("")
    out.extend(_render_grades("SDRG grade", SDRG_NAMES, report.sdrg_counts))
    return "\n".join(out)
