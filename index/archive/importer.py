"""Import a folder of fundus photographs plus a label spreadsheet into a BRSET-layout archive.

`retina-index import --images DIR --labels CSV --map MAPPING --out ARCHIVE` writes

    ARCHIVE/labels.csv               (BRSET v1.0.0 columns, `index.archive.brset.write_labels_csv`)
    ARCHIVE/fundus_photos/<image_id>.<ext>
    ARCHIVE/import_report.json       (`ImportReport`)

A `Mapping` says which column names the photo, how a cell becomes a file name, which columns fill which
`FundusRecord` fields (with optional value maps) and how a patient id and eye are derived from the image id.
Built-in mappings live in `index/archive/mappings/*.json` (EyePACS/Kaggle, APTOS 2019, IDRiD grading, Messidor-2);
a user mapping is a JSON (or YAML, when PyYAML is installed) file with the same schema.

Photos are copied (or hard/sym-linked) and never modified; every photo is decoded once with
`index.preprocess.decode_image` and skipped, with the reason, when it cannot be read. Duplicate image ids,
rows without a photo and photos without a row are reported, not fatal. Labels the source lacks stay None.
The archive is built in a temporary folder beside ARCHIVE and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from index.archive.brset import PHOTO_SUFFIXES, PHOTOS_DIR, write_labels_csv
from index.archive.cells import MISSING_TOKENS, NUMBER_RANGES, parse_code, parse_field_number, parse_text
from index.atomic import fsync_dir
from index.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from index.records import ASSESSMENT_FIELDS, PATHOLOGY_FIELDS, Assessment, Eye, FundusRecord, Sex

REPORT_NAME = "import_report.json"
"""The import report written inside the archive."""

LABELS_NAME = "labels.csv"
"""The label file written inside the archive (BRSET v1.0.0 name)."""

AUTO = "auto"
"""`--map auto`: pick the built-in mapping whose required columns are all present."""

LinkMode = Literal["copy", "hardlink", "symlink"]
ColumnNames = Annotated[
    list[str], Field(min_length=1), BeforeValidator(lambda value: [value] if isinstance(value, str) else value)
]
"""One spreadsheet column name, or several (the first present is used); a single name may be given bare."""

_BOOL_FIELDS = frozenset({*PATHOLOGY_FIELDS, "insulin", "diabetes", "quality_adequate"})
_MAPPABLE_FIELDS = frozenset(FundusRecord.model_fields) - {"image_id"}

_BOOLEANS: dict[str, bool] = {
    **dict.fromkeys(("1", "yes", "y", "true", "t", "sim", "adequate", "gradable"), True),
    **dict.fromkeys(("0", "no", "n", "false", "f", "não", "nao", "inadequate", "ungradable"), False),
}
_EYES = {"1": Eye.RIGHT, "right": Eye.RIGHT, "r": Eye.RIGHT, "od": Eye.RIGHT,
         "2": Eye.LEFT, "left": Eye.LEFT, "l": Eye.LEFT, "os": Eye.LEFT}
_SEXES = {"1": Sex.MALE, "m": Sex.MALE, "male": Sex.MALE, "2": Sex.FEMALE, "f": Sex.FEMALE, "female": Sex.FEMALE}
_ASSESSMENTS = {"1": Assessment.NORMAL, "normal": Assessment.NORMAL, "2": Assessment.ABNORMAL,
                "abnormal": Assessment.ABNORMAL}
_GRADES = {str(grade): grade for grade in range(5)}
_CODES: dict[str, tuple[dict[str, Any], str]] = {
    "dr_icdr": (_GRADES, "a grade 0-4"),
    "dr_sdrg": (_GRADES, "a grade 0-4"),
    "exam_eye": (_EYES, "right/left (or 1/2, od/os)"),
    "patient_sex": (_SEXES, "1/2 or male/female"),
    **{name: (_BOOLEANS, "0/1 or yes/no") for name in _BOOL_FIELDS},
    **{name: (_ASSESSMENTS, "1 (normal) or 2 (abnormal)") for name in ASSESSMENT_FIELDS},
}
"""The coded fields' vocabulary: cell text (lower case) -> value, and what is expected."""
_MAX_LISTED_LINES = 20


class ArchiveImportError(Exception):
    """An import that cannot run at all (bad paths, unknown mapping, columns matching no mapping, a
    non-empty output without `overwrite`); the message says what was found and what was expected."""




# --- mappings -----------------------------------------------------------------------------------


def _names(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _norm(name: str) -> str:
    return name.replace("\ufeff", "").strip().lower()


class FieldRule(BaseModel):
    """One label column -> one `FundusRecord` field."""

    model_config = ConfigDict(extra="forbid")

    column: ColumnNames
    """Accepted column names (header match is case-insensitive and trimmed); the first present is used."""
    field: str
    required: bool = False
    """Auto-detection needs this column; an import with `required` columns absent is an error."""
    values: dict[str, Any] | None = None
    """Cell text (case-insensitive, trimmed) -> value; a cell not listed (and not empty/NA) is rejected."""

    @field_validator("field")
    @classmethod
    def _known_field(cls, value: str) -> str:
        if value not in _MAPPABLE_FIELDS:
            raise ValueError(f"unknown record field {value!r}; known: {', '.join(sorted(_MAPPABLE_FIELDS))}")
        return value

    @field_validator("values")
    @classmethod
    def _lower_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else {_norm(str(key)): item for key, item in value.items()}


class PatientRule(BaseModel):
    """A regular expression searched in the image id; group `patient` is the patient id and the optional
    group `eye` the eye (right/left, r/l, od/os, 1/2). Ids it does not match keep patient id = image id."""

    model_config = ConfigDict(extra="forbid")

    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as error:
            raise ValueError(f"pattern {value!r} is not a regular expression: {error}") from None
        if "patient" not in compiled.groupindex:
            raise ValueError(f"pattern {value!r} has no (?P<patient>...) group")
        return value


class Mapping(BaseModel):
    """How a label spreadsheet becomes `FundusRecord`s (the schema of `index/archive/mappings/*.json`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    image_column: ColumnNames
    """Accepted names of the column naming the photo (with or without a file extension)."""
    extensions: list[str] = list(PHOTO_SUFFIXES)
    """Suffixes tried, in order, when a cell has no photo extension (`10_left` -> `10_left.jpeg`)."""
    fields: list[FieldRule] = []
    patient: PatientRule | None = None

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        return [item.lower() if item.startswith(".") else f".{item.lower()}" for item in value]

    @model_validator(mode="after")
    def _one_rule_per_field(self) -> Mapping:
        counts = Counter(rule.field for rule in self.fields)
        repeated = sorted(field for field, count in counts.items() if count > 1)
        if repeated:
            raise ValueError(f"fields filled by more than one rule: {', '.join(repeated)}")
        return self

    def required_columns(self) -> list[list[str]]:
        """Column alternatives that must be present: the image column, then each required field's."""
        return [self.image_column] + [rule.column for rule in self.fields if rule.required]

    def describe_columns(self) -> str:
        """The required columns as text, e.g. `image + level|icdr`."""
        return " + ".join("|".join(names) for names in self.required_columns())


BUILTIN_MAPPINGS: tuple[str, ...] = ("eyepacs", "aptos2019", "idrid", "messidor2")
"""Names of the built-in mappings (files `index/archive/mappings/<name>.json`), in auto-detection order."""


def builtin_mapping(name: str) -> Mapping:
    """A built-in mapping by name; raises ArchiveImportError for an unknown name."""
    if name not in BUILTIN_MAPPINGS:
        raise ArchiveImportError(f"unknown mapping {name!r}; known: {', '.join(BUILTIN_MAPPINGS)}, or a JSON file")
    text = resources.files("index.archive").joinpath("mappings", f"{name}.json").read_text(encoding="utf-8")
    return Mapping.model_validate_json(text)


def load_mapping(spec: str | Path) -> Mapping:
    """A mapping from a built-in name or a JSON/YAML file path. Raises ArchiveImportError with the reason."""
    text_spec = str(spec)
    if text_spec in BUILTIN_MAPPINGS:
        return builtin_mapping(text_spec)
    path = Path(spec)
    if not path.is_file():
        raise ArchiveImportError(
            f"--map {text_spec!r} is neither a known mapping ({', '.join(BUILTIN_MAPPINGS)}, {AUTO}) nor a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                raise ArchiveImportError(f"{path}: YAML mappings need PyYAML; write the mapping as JSON") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ArchiveImportError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ArchiveImportError(f"{path}: not a readable mapping file: {error}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    try:
        return Mapping.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'mapping'}: {e['msg']}" for e in error.errors())
        raise ArchiveImportError(f"{path}: not a valid mapping: {problems}") from None


def _find_column(header: list[str], names: list[str]) -> int | None:
    normalised = [_norm(column) for column in header]
    for name in names:
        with contextlib.suppress(ValueError):
            return normalised.index(_norm(name))
    return None


def mapping_matches(mapping: Mapping, header: list[str]) -> bool:
    """Whether every required column of `mapping` is in `header` (case-insensitive, trimmed)."""
    return all(_find_column(header, names) is not None for names in mapping.required_columns())


def detect_mapping(header: list[str], source: str = "the label file") -> Mapping:
    """The built-in mapping whose required columns are all in `header`; with several, the one using the
    most columns. Raises ArchiveImportError listing the columns found and the mappings known when none fits."""
    candidates = [builtin_mapping(name) for name in BUILTIN_MAPPINGS]
    matching = [mapping for mapping in candidates if mapping_matches(mapping, header)]
    if not matching:
        known = "; ".join(f"{mapping.name} ({mapping.describe_columns()})" for mapping in candidates)
        found = ", ".join(repr(column.strip()) for column in header) or "none"
        raise ArchiveImportError(
            f"the columns of {source} match no mapping. Columns found: {found}. Mappings known: {known}. "
            "Pass --map NAME, or --map FILE.json describing your columns (see README: Use your own archive)."
        )

    def used(mapping: Mapping) -> int:
        rules = [mapping.image_column] + [rule.column for rule in mapping.fields]
        return sum(_find_column(header, names) is not None for names in rules)

    return max(matching, key=used)  # max keeps the first of equals: BUILTIN_MAPPINGS order


# --- report -------------------------------------------------------------------------------------


class SkippedFile(BaseModel):
    """A photo file not imported, with the reason (unsupported type, unreadable image)."""

    file: str
    reason: str
    image_id: str | None = None
    line: int | None = None


class RowProblem(BaseModel):
    """A label row not imported: no photo, a duplicate id, or no usable image id."""

    line: int
    image_id: str | None
    reason: str


class RejectedValue(BaseModel):
    """Cells of one column holding the same value that could not be read (the field stays None)."""

    column: str
    field: str
    value: str
    reason: str
    count: int
    lines: list[int]
    """The first 20 line numbers."""


class ImportReport(BaseModel):
    """What an import did (written as ARCHIVE/import_report.json)."""

    mapping: str
    labels_path: str
    images_dir: str
    archive: str
    link: str
    rows: int
    """Data rows of the label file (blank lines not counted)."""
    imported: int
    patients: int
    columns_used: dict[str, str]
    """Column name in the file -> record field (`image_id` for the image column)."""
    columns_ignored: list[str]
    skipped: list[SkippedFile] = []
    duplicates: list[RowProblem] = []
    rows_without_photo: list[RowProblem] = []
    rejected_rows: list[RowProblem] = []
    photos_without_row: list[str] = []
    rejected_values: list[RejectedValue] = []
    linked_as_copy: int = 0
    """Photos copied because a hard link was impossible (another file system)."""
    icdr_counts: dict[str, int]
    """Imported records per ICDR grade, keys "0".."4" and "missing"."""


# --- values -------------------------------------------------------------------------------------


def convert_value(field: str, value: Any) -> Any:
    """A cell (or a value-map result) as the `FundusRecord` field's value; None for missing. Raises
    ValueError with the reason for a value the field cannot hold. The cell rules are the BRSET reader's
    (`index.archive.cells`), with a wider vocabulary of codes (right/left, od/os, male/female, true/false)."""
    if value is None:
        return None
    if isinstance(value, bool):
        if field in _BOOL_FIELDS:
            return value
        value = int(value)
    text = str(value)
    if field in NUMBER_RANGES:
        parsed, _, error = parse_field_number(field, text)
    elif field in _CODES:
        codes, expected = _CODES[field]
        parsed, _, error = parse_code(text, codes, expected)
    else:
        parsed, _, error = parse_text(text)
    if error is not None:
        raise ValueError(error)
    return parsed


class _Rejections:
    def __init__(self) -> None:
        self.groups: dict[tuple[str, str, str, str], list[int]] = {}

    def add(self, column: str, field: str, value: str, reason: str, line: int) -> None:
        self.groups.setdefault((column, field, value, reason), []).append(line)

    def report(self) -> list[RejectedValue]:
        return [
            RejectedValue(column=column, field=field, value=value, reason=reason, count=len(lines),
                          lines=lines[:_MAX_LISTED_LINES])
            for (column, field, value, reason), lines in self.groups.items()
        ]


def _eye_value(text: str) -> Eye | None:
    return _EYES.get(text.strip().lower())


# --- reading the label file --------------------------------------------------------------------


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) of a CSV/TSV/semicolon file; blank rows dropped."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ArchiveImportError(f"{path}: cannot read the label file: {error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if path.suffix.lower() in (".xls", ".xlsx", ".ods") or raw[:2] == b"PK":
        raise ArchiveImportError(f"{path}: a spreadsheet workbook; save it as CSV first")
    first = text.splitlines()[0] if text else ""
    delimiter = max(",;\t", key=first.count) if first else ","
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = cells
            continue
        rows.append((reader.line_num, cells))
    if header is None:
        raise ArchiveImportError(f"{path}: the label file is empty (no header row)")
    return header, rows


def _list_folder(images: Path) -> dict[str, str]:
    """Lower-case file name -> file name, for the regular non-hidden files of a folder."""
    files: dict[str, str] = {}
    with os.scandir(images) as entries:
        for entry in sorted(entries, key=lambda item: item.name):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            files.setdefault(entry.name.lower(), entry.name)
    return files


def _resolve_file(cell: str, mapping: Mapping, files: dict[str, str]) -> tuple[str, str | None]:
    """(image id, file name in the folder or None) for an image cell."""
    stem, suffix = os.path.splitext(cell)
    if cell.lower() in files:
        return (stem if suffix else cell), files[cell.lower()]
    if suffix.lower() in PHOTO_SUFFIXES:
        # `x.jpg` listed, `x.jpeg` present: the id is the stem either way.
        for extension in mapping.extensions:
            name = files.get(f"{stem}{extension}".lower())
            if name is not None:
                return stem, name
        return stem, None
    for extension in mapping.extensions:
        name = files.get(f"{cell}{extension}".lower())
        if name is not None:
            return cell, name
    return cell, None


# --- import -------------------------------------------------------------------------------------


def _check_paths(images: Path, labels: Path, out: Path, overwrite: bool) -> None:
    if not images.is_dir():
        raise ArchiveImportError(f"--images {images}: not a folder")
    if not labels.is_file():
        raise ArchiveImportError(f"--labels {labels}: not a file")
    if out.exists() and not out.is_dir():
        raise ArchiveImportError(f"--out {out}: exists and is not a folder")
    resolved = out.resolve()
    for source in (images.resolve(), labels.resolve()):
        if source == resolved or resolved in source.parents:
            raise ArchiveImportError(f"--out {out} holds the source {source}; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArchiveImportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _place_photo(source: Path, target: Path, data: bytes, link: LinkMode) -> bool:
    """Put one photo into the archive; True when a hard link fell back to a copy."""
    if link == "symlink":
        os.symlink(source.resolve(), target)
        return False
    if link == "hardlink":
        try:
            os.link(source, target)
            return False
        except OSError:
            pass
    target.write_bytes(data)
    shutil.copystat(source, target)
    return link == "hardlink"


def import_archive(
    images: Path,
    labels: Path,
    out: Path,
    mapping: Mapping | str = AUTO,
    link: LinkMode = "copy",
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import a photo folder and a label file into a BRSET-layout archive at `out` and return the report.

    `mapping` is a `Mapping`, a built-in name, a mapping file path or `auto`. `progress(done, total)` is
    called per photo. Raises ArchiveImportError when the import cannot run at all; problems with single rows or
    files are reported in the returned `ImportReport` (also written to `out/import_report.json`).
    """
    images, labels, out = Path(images), Path(labels), Path(out)
    _check_paths(images, labels, out, overwrite)
    header, rows = _read_table(labels)
    if isinstance(mapping, Mapping):
        chosen = mapping
    elif str(mapping) == AUTO:
        chosen = detect_mapping(header, str(labels))
    else:
        chosen = load_mapping(mapping)
    missing = [names for names in chosen.required_columns() if _find_column(header, names) is None]
    if missing:
        found = ", ".join(repr(column.strip()) for column in header)
        raise ArchiveImportError(
            f"{labels}: mapping {chosen.name!r} needs column(s) {', '.join('|'.join(n) for n in missing)}; "
            f"columns found: {found}"
        )

    image_index = _find_column(header, chosen.image_column)
    assert image_index is not None
    rules = [(rule, index) for rule in chosen.fields if (index := _find_column(header, rule.column)) is not None]
    columns_used = {header[image_index].strip(): "image_id"} | {header[i].strip(): r.field for r, i in rules}
    used_indexes = {image_index} | {index for _, index in rules}
    columns_ignored = [column.strip() for i, column in enumerate(header) if i not in used_indexes and column.strip()]
    pattern = re.compile(chosen.patient.pattern) if chosen.patient else None

    files = _list_folder(images)
    labels_name = labels.name.lower() if labels.resolve().parent == images.resolve() else None
    rejections = _Rejections()
    first_line: dict[str, int] = {}
    used_files: set[str] = set()
    pending: list[tuple[int, FundusRecord, str]] = []
    duplicates: list[RowProblem] = []
    without_photo: list[RowProblem] = []
    rejected_rows: list[RowProblem] = []

    for line, cells in rows:
        cell = cells[image_index].strip() if image_index < len(cells) else ""
        if cell.lower() in MISSING_TOKENS:
            rejected_rows.append(RowProblem(line=line, image_id=None, reason="no image id"))
            continue
        if "/" in cell or "\\" in cell or cell in (".", ".."):
            rejected_rows.append(RowProblem(line=line, image_id=cell, reason="image id is not a plain file name"))
            continue
        image_id, file_name = _resolve_file(cell, chosen, files)
        if image_id in first_line:
            duplicates.append(RowProblem(line=line, image_id=image_id,
                                         reason=f"duplicate image id (first on line {first_line[image_id]})"))
            continue
        first_line[image_id] = line
        if file_name is None:
            without_photo.append(RowProblem(line=line, image_id=image_id, reason="no photo file in the folder"))
            continue
        used_files.add(file_name.lower())
        values: dict[str, Any] = {"image_id": image_id, "patient_id": image_id}
        if pattern is not None and (match := pattern.search(image_id)):
            values["patient_id"] = match.group("patient")
            if "eye" in pattern.groupindex and match.group("eye") is not None:
                values["exam_eye"] = _eye_value(match.group("eye"))
        for rule, index in rules:
            raw = cells[index].strip() if index < len(cells) else ""
            try:
                if rule.values is not None and raw.lower() not in MISSING_TOKENS:
                    if raw.lower() not in rule.values:
                        raise ValueError(f"not in the value map ({', '.join(rule.values)})")
                    value = convert_value(rule.field, rule.values[raw.lower()])
                else:
                    value = convert_value(rule.field, raw)
            except ValueError as error:
                rejections.add(header[index].strip(), rule.field, raw, str(error), line)
                continue
            if value is not None or rule.field not in values:
                values[rule.field] = value
        try:
            record = FundusRecord.model_validate(values)
        except ValidationError as error:
            bad = {str(problem["loc"][0]) for problem in error.errors() if problem["loc"]}
            for field in bad - {"image_id", "patient_id"}:
                column = next((header[i].strip() for r, i in rules if r.field == field), field)
                rejections.add(column, field, str(values.get(field)), "out of range", line)
                values[field] = None
            try:
                record = FundusRecord.model_validate(values)
            except ValidationError:
                rejected_rows.append(RowProblem(line=line, image_id=image_id, reason="image id not usable"))
                continue
        pending.append((line, record, file_name))

    skipped: list[SkippedFile] = []
    photos_without_row: list[str] = []
    for lower, name in files.items():
        if lower in used_files or lower == labels_name:
            continue
        suffix = os.path.splitext(name)[1].lower()
        if suffix in PHOTO_SUFFIXES:
            photos_without_row.append(name)
        else:
            reason = f"unsupported file type {suffix!r}" if suffix else "no file extension"
            skipped.append(SkippedFile(file=name, reason=f"{reason} (no label row either)"))

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.import-"))
    try:
        photos_dir = temp / PHOTOS_DIR
        photos_dir.mkdir()
        imported: list[FundusRecord] = []
        linked_as_copy = 0
        for done, (line, record, file_name) in enumerate(pending, start=1):
            source = images / file_name
            suffix = os.path.splitext(file_name)[1].lower()
            if suffix not in PHOTO_SUFFIXES:
                skipped.append(SkippedFile(file=file_name, image_id=record.image_id, line=line,
                                           reason=f"unsupported file type {suffix or '(none)'!r}"))
            else:
                try:
                    data = source.read_bytes()
                    decode_image(data, max_pixels=max_pixels)
                except (ImageDecodeError, OSError) as error:
                    skipped.append(SkippedFile(file=file_name, image_id=record.image_id, line=line,
                                               reason=str(error)))
                else:
                    linked_as_copy += _place_photo(source, photos_dir / f"{record.image_id}{suffix}", data, link)
                    imported.append(record)
            if progress is not None:
                progress(done, len(pending))

        counts = Counter("missing" if record.dr_icdr is None else str(record.dr_icdr) for record in imported)
        report = ImportReport(
            mapping=chosen.name, labels_path=str(labels), images_dir=str(images), archive=str(out), link=link,
            rows=len(rows), imported=len(imported), patients=len({record.patient_id for record in imported}),
            columns_used=columns_used, columns_ignored=columns_ignored, skipped=skipped, duplicates=duplicates,
            rows_without_photo=without_photo, rejected_rows=rejected_rows, photos_without_row=photos_without_row,
            rejected_values=rejections.report(), linked_as_copy=linked_as_copy,
            icdr_counts={key: counts.get(key, 0) for key in ("0", "1", "2", "3", "4", "missing")},
        )
        write_labels_csv(imported, temp / LABELS_NAME)
        (temp / REPORT_NAME).write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.chmod(temp, 0o755)  # mkdtemp creates 0700
        _swap_into_place(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return report


def _swap_into_place(temp: Path, out: Path) -> None:
    """Rename the finished `temp` folder to `out`, replacing an existing `out` only after it is complete."""
    aside: Path | None = None
    if out.is_dir():
        if any(out.iterdir()):
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.rmdir(aside)
            os.rename(out, aside)
        else:
            os.rmdir(out)
    os.rename(temp, out)
    fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
