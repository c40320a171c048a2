"""The metadata table of an index: one row per indexed photograph, keyed by its FAISS id (SQLite).

Columns: `id` (int64, the FAISS id), `image_id`, `path` (the photo, relative to the archive root),
`icdr`, `sdrg`, `exam_eye`, `patient_age` (the filterable fields, indexed), `labels` (JSON: ICDR, SDRG,
eye, age, sex, camera, image quality, the pathology flags, and the model's predicted grade probabilities when the
builder stored them) and `narrative`.

A table opened from a file is read-only; the first change copies it into memory, and `write` puts the
whole table into a new file (see `IndexStore.save` for how that file becomes the current one). One lock
serialises access, so the table can be shared between threads.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from index.records import PATHOLOGY_FIELDS, Eye, FundusRecord, Sex

EyeName = Literal["right", "left"]
SexName = Literal["male", "female"]
QualityName = Literal["adequate", "inadequate"]

ALLOWED_CACHE_SIZE = 64
"""How many filters' allowed ids `MetadataTable.allowed_ids` keeps."""

MAX_RECORD_ID = 2**63 - 1
"""The largest id an index holds: FAISS ids and SQLite integers are signed 64-bit."""
RecordId = Annotated[int, Field(strict=True, ge=0, le=MAX_RECORD_ID)]
"""An archived record's id, as a request gives it: a JSON integer (never a float, bool or string)."""
GradeValue = Annotated[int, Field(strict=True, ge=0, le=4)]
"""An ICDR or SDRG grade in a filter: an integer 0-4."""
AgeYears = Annotated[float, Field(ge=0, le=150, allow_inf_nan=False)]
"""An age in years in a filter: a finite number 0-150 (NaN and Infinity are refused)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    image_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    icdr INTEGER,
    sdrg INTEGER,
    exam_eye TEXT,
    patient_age REAL,
    labels TEXT NOT NULL,
    narrative TEXT
);
CREATE INDEX IF NOT EXISTS records_icdr ON records (icdr);
CREATE INDEX IF NOT EXISTS records_sdrg ON records (sdrg);
CREATE INDEX IF NOT EXISTS records_eye ON records (exam_eye);
CREATE INDEX IF NOT EXISTS records_age ON records (patient_age);
"""

COLUMNS = "id, image_id, path, icdr, sdrg, exam_eye, patient_age, labels, narrative"


class MetadataError(Exception):
    """A metadata table or a change to it that cannot be used; the message says why."""


class Labels(BaseModel):
    """What the archive says about one photograph (and, optionally, what the model predicts)."""

    model_config = ConfigDict(extra="forbid")

    icdr: int | None = Field(default=None, ge=0, le=4)
    sdrg: int | None = Field(default=None, ge=0, le=4)
    exam_eye: EyeName | None = None
    patient_age: float | None = None
    patient_sex: SexName | None = None
    camera: str | None = None
    quality: QualityName | None = None
    """The annotator's overall image quality (BRSET's `quality`)."""
    pathologies: dict[str, bool | None] = Field(default_factory=dict)
    predicted_icdr: list[float] | None = None
    """The model's ICDR grade probabilities for the record (photo + structured data)."""
    predicted_sdrg: list[float] | None = None


class MetadataRow(BaseModel):
    """One indexed photograph."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(ge=0)
    image_id: str = Field(min_length=1)
    path: str
    labels: Labels
    narrative: str | None = None


class Filters(BaseModel):
    """Which rows a search may return. Every given condition must hold; a row whose field is missing
    fails a condition on that field."""

    model_config = ConfigDict(extra="forbid")

    icdr: list[GradeValue] | None = Field(default=None, max_length=5, description="ICDR grades (any of).")
    sdrg: list[GradeValue] | None = Field(default=None, max_length=5, description="SDRG grades (any of).")
    exam_eye: EyeName | None = None
    age_min: AgeYears | None = None
    age_max: AgeYears | None = None

    @model_validator(mode="after")
    def _age_range_is_ordered(self) -> Filters:
        if self.age_min is not None and self.age_max is not None and self.age_min > self.age_max:
            raise ValueError(f"age_min ({self.age_min:g}) is more than age_max ({self.age_max:g})")
        return self

    def is_empty(self) -> bool:
        """True when no condition is set."""
        return all(value is None for value in self.model_dump().values())


FILTER_FIELDS: tuple[str, ...] = tuple(Filters.model_fields)


def parse_filters(items: Sequence[str]) -> Filters:
    """`["icdr=2", "icdr=3", "exam_eye=right", "age_min=40"]` -> Filters. A repeated list field
    (icdr, sdrg) accumulates, and `icdr=2,3` lists several grades. Raises MetadataError naming the item
    and, for an unknown field, the known ones."""
    values: dict[str, Any] = {}
    for item in items:
        field, sep, raw = item.partition("=")
        field, raw = field.strip(), raw.strip()
        if not sep or not field or not raw:
            raise MetadataError(f"filter {item!r}: expected FIELD=VALUE, e.g. icdr=2")
        if field not in FILTER_FIELDS:
            raise MetadataError(f"filter {item!r}: unknown field {field!r}; known fields: {', '.join(FILTER_FIELDS)}")
        if field in ("icdr", "sdrg"):
            values.setdefault(field, []).extend(_number(part.strip(), int) for part in raw.split(","))
        elif field in ("age_min", "age_max"):
            values[field] = _number(raw, float)
        else:
            values[field] = raw
    try:
        return Filters.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise MetadataError(f"invalid filter: {problems}") from None


def _number(raw: str, kind: type[int] | type[float]) -> int | float | str:
    """`raw` as an int or float when it is one, else unchanged (so the validation error names it)."""
    try:
        return kind(raw)
    except ValueError:
        return raw


def labels_of(record: FundusRecord) -> Labels:
    """The labels stored for an archive record."""
    return Labels(
        icdr=record.dr_icdr,
        sdrg=record.dr_sdrg,
        exam_eye=None if record.exam_eye is None else ("right" if record.exam_eye == Eye.RIGHT else "left"),
        patient_age=record.patient_age,
        patient_sex=None if record.patient_sex is None else ("male" if record.patient_sex == Sex.MALE else "female"),
        camera=record.camera,
        quality=None if record.quality_adequate is None else ("adequate" if record.quality_adequate else "inadequate"),
        pathologies={name: getattr(record, name) for name in PATHOLOGY_FIELDS},
    )


def row_of(identifier: int, record: FundusRecord, path: str) -> MetadataRow:
    """The metadata row of an archive record indexed under `identifier`, its photo at `path`."""
    return MetadataRow(id=identifier, image_id=record.image_id, path=path, labels=labels_of(record),
                       narrative=record.narrative)


class MetadataTable:
    """The rows of an index, looked up by id or image_id and filtered to allowed ids."""

    def __init__(self, connection: sqlite3.Connection, source: Path | None) -> None:
        self._connection = connection
        self._source = source
        self._lock = threading.Lock()
        self._allowed_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def in_memory(cls) -> MetadataTable:
        """A new, empty table in memory."""
        connection = sqlite3.connect(":memory:", check_same_thread=False)
        connection.executescript(SCHEMA)
        return cls(connection, None)

    @classmethod
    def open(cls, path: Path) -> MetadataTable:
        """Open a table file read-only (the first change copies it into memory)."""
        path = Path(path)
        if not path.is_file():
            raise MetadataError(f"metadata file not found: {path}")
        try:
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            connection.execute("SELECT id FROM records LIMIT 1").fetchall()
        except sqlite3.DatabaseError as error:
            raise MetadataError(f"{path}: not a metadata table ({error})") from None
        return cls(connection, path)

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> MetadataTable:
        """A table held in memory, from the bytes of a table file (`path` only names it in errors): what
        happens to the file afterwards cannot reach it."""
        connection = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            connection.deserialize(data)
            connection.execute("SELECT id FROM records LIMIT 1").fetchall()
        except sqlite3.DatabaseError as error:
            connection.close()
            raise MetadataError(f"{path}: not a metadata table ({error})") from None
        return cls(connection, None)

    # reading

    def __len__(self) -> int:
        with self._lock:
            return int(self._connection.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def ids(self) -> np.ndarray:
        """All ids, ascending."""
        with self._lock:
            rows = self._connection.execute("SELECT id FROM records ORDER BY id").fetchall()
        return np.array([row[0] for row in rows], dtype=np.int64)

    def get(self, ids: Iterable[int]) -> dict[int, MetadataRow]:
        """Rows by id (ids not in the table are absent from the result)."""
        wanted = sorted({int(i) for i in ids if int(i) >= 0})
        found: dict[int, MetadataRow] = {}
        with self._lock:
            for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                part = wanted[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self._connection.execute(f"SELECT {COLUMNS} FROM records WHERE id IN ({marks})", part)
                for row in rows.fetchall():
                    found[int(row[0])] = _row(row)
        return found

    def by_image_id(self, image_id: str) -> MetadataRow | None:
        """The row of a photograph by its archive image_id."""
        with self._lock:
            row = self._connection.execute(f"SELECT {COLUMNS} FROM records WHERE image_id = ?", (image_id,)).fetchone()
        return None if row is None else _row(row)

    def allowed_ids(self, filters: Filters | None) -> np.ndarray | None:
        """The ids passing `filters`, ascending (a read-only array); None when there is no condition
        (everything allowed). The answers for the last `ALLOWED_CACHE_SIZE` filters are kept until the table
        changes: a selective filter's thousands of ids cost milliseconds to read, on every search."""
        if filters is None or filters.is_empty():
            return None
        key = filters.model_dump_json()
        with self._lock:
            cached = self._allowed_cache.get(key)
            if cached is not None:
                self._allowed_cache.move_to_end(key)
                return cached
        clauses: list[str] = []
        params: list[Any] = []
        for column, values in (("icdr", filters.icdr), ("sdrg", filters.sdrg)):
            if values is not None:
                clauses.append(f"{column} IN ({','.join('?' * len(values))})" if values else "0")
                params.extend(values)
        if filters.exam_eye is not None:
            clauses.append("exam_eye = ?")
            params.append(filters.exam_eye)
        if filters.age_min is not None:
            clauses.append("patient_age >= ?")
            params.append(filters.age_min)
        if filters.age_max is not None:
            clauses.append("patient_age <= ?")
            params.append(filters.age_max)
        with self._lock:
            cursor = self._connection.execute(
                f"SELECT id FROM records WHERE {' AND '.join(clauses)} ORDER BY id", params
            )
            allowed = np.fromiter((row[0] for row in cursor), dtype=np.int64)
            allowed.setflags(write=False)
            self._allowed_cache[key] = allowed
            if len(self._allowed_cache) > ALLOWED_CACHE_SIZE:
                self._allowed_cache.popitem(last=False)
        return allowed

    # changing

    def insert(self, rows: Sequence[MetadataRow]) -> None:
        """Add rows. Raises MetadataError, changing nothing, when an id or image_id is already present
        (or repeated among `rows`)."""
        with self._lock:
            self._make_writable()
            self._allowed_cache.clear()
            try:
                with self._connection:  # one transaction: all rows or none
                    self._connection.executemany(
                        f"INSERT INTO records ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [_values(row) for row in rows],
                    )
            except sqlite3.IntegrityError as error:
                raise MetadataError(f"cannot add rows: {error} (ids and image_ids must be new)") from None

    def delete(self, ids: Iterable[int]) -> int:
        """Delete rows by id; returns how many were deleted."""
        wanted = [int(i) for i in ids]
        with self._lock:
            self._make_writable()
            self._allowed_cache.clear()
            with self._connection:
                deleted = 0
                for start in range(0, len(wanted), 500):
                    part = wanted[start : start + 500]
                    cursor = self._connection.execute(
                        f"DELETE FROM records WHERE id IN ({','.join('?' * len(part))})", part
                    )
                    deleted += cursor.rowcount
        return deleted

    def write(self, path: Path) -> None:
        """Write the whole table to the SQLite file `path` (an empty or absent file; use
        `index.atomic.atomic_target` to replace an existing table atomically)."""
        path = Path(path)
        with self._lock:
            target = sqlite3.connect(path)
            try:
                self._connection.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
            finally:
                target.close()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._connection.close()

    def _make_writable(self) -> None:
        # Called with the lock held: copy a read-only file table into memory before its first change.
        if self._source is None:
            return
        memory = sqlite3.connect(":memory:", check_same_thread=False)
        self._connection.backup(memory)
        self._connection.close()
        self._connection = memory
        self._source = None


def _values(row: MetadataRow) -> tuple[Any, ...]:
    labels = row.labels
    return (
        row.id,
        row.image_id,
        row.path,
        labels.icdr,
        labels.sdrg,
        labels.exam_eye,
        labels.patient_age,
        labels.model_dump_json(),
        row.narrative,
    )


def _row(values: tuple[Any, ...]) -> MetadataRow:
    return MetadataRow(
        id=int(values[0]),
        image_id=values[1],
        path=values[2],
        labels=Labels.model_validate_json(values[7]),
        narrative=values[8],
    )
