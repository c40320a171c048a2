"""An index on disk and in memory: two vector indexes over the same ids plus the metadata table.

    INDEX/index.json        `IndexInfo`: the commit marker, written last, naming the current files
    INDEX/image.faiss       image-only embeddings (what the photograph shows)
    INDEX/record.faiss      record embeddings (photograph + the archive's structured data)
    INDEX/metadata.sqlite   `index.metadata`: id -> image_id, photo path, labels, narrative

An on-disk build (`retina-index build --ondisk`, for indexes larger than memory) adds
`image.faiss.ivfdata` and `record.faiss.ivfdata`: the inverted lists, memory-mapped when opened, which
makes the index read-only (`index.ivf_build`).

With `store: "milvus"` (`retina-index build --store milvus`) the two vector indexes live in two Milvus
collections instead of the .faiss files (`index.milvus_store`); `index.json` names their URI and
collections, and the folder holds only the metadata table and `index.json`.

Atomicity: every file is written atomically (`index.atomic`), and `index.json` is written last. A folder
without `index.json` is an unfinished build, which `open_index` refuses. `IndexStore.save` never
overwrites the files that `index.json` names: it writes the next generation's files under new names
(`image.g2.faiss`, ...), then replaces `index.json` to point at them (the commit), then deletes the old
generation. A crash at any moment leaves `index.json` naming a complete, consistent set of files.

An index belongs to the bundle that embedded it: `open_index` refuses any other bundle, naming both
fingerprints, because vectors of two different models are not comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from index.atomic import atomic_target, write_text_atomic
from index.bundle import now_iso, sha256_of
from index.ivf_build import IVFDATA_SUFFIX
from index.metadata import Filters, MetadataError, MetadataRow, MetadataTable
from index.records import Against
from index.vector_index import IndexKind, SearchParams, VectorIndex, VectorIndexError

INDEX_SCHEMA_VERSION = 1
INFO_FILE = "index.json"
PARTIAL_DIR = ".partial"
NORM_TOLERANCE = 1e-3
"""Vectors added to an index must have unit L2 norm within this tolerance (inner product = cosine)."""

AGAINST: tuple[Against, ...] = ("image", "record")


class IndexStoreError(Exception):
    """An index folder that cannot be opened, or a change that cannot be made; the message says why."""


StoreKind = Literal["faiss", "milvus"]


class IndexFiles(BaseModel):
    """The files of the current generation, relative to the index folder (a Milvus-backed index has no
    vector files: `image` and `record` are None)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None
    record: str | None
    metadata: str
    image_data: str | None = None
    """An on-disk IVF index (`build --ondisk`): the memory-mapped inverted lists of `image`."""
    record_data: str | None = None

    def names(self) -> list[str]:
        """The file names of this generation (those that exist for its store)."""
        names = (self.image, self.image_data, self.record, self.record_data, self.metadata)
        return [name for name in names if name is not None]


def files_for(generation: int, store: StoreKind = "faiss", ondisk: bool = False) -> IndexFiles:
    """File names of a generation: plain names for the build (generation 1), suffixed after that. An
    on-disk IVF index also has each index's `.ivfdata` file (`index.ivf_build`)."""
    suffix = "" if generation == 1 else f".g{generation}"
    if store == "milvus":
        return IndexFiles(image=None, record=None, metadata=f"metadata{suffix}.sqlite")
    image, record = f"image{suffix}.faiss", f"record{suffix}.faiss"
    return IndexFiles(image=image, record=record, metadata=f"metadata{suffix}.sqlite",
                      image_data=f"{image}{IVFDATA_SUFFIX}" if ondisk else None,
                      record_data=f"{record}{IVFDATA_SUFFIX}" if ondisk else None)


class MilvusInfo(BaseModel):
    """Where a Milvus-backed index keeps its vectors: the URI (a milvus-lite file, resolved, or a server
    `http://HOST:19530`) and the collection of each embedding. Credentials are never recorded (a server's
    token comes from the environment, `MILVUS_TOKEN`)."""

    model_config = ConfigDict(extra="forbid")

    uri: str
    collections: dict[Against, str]
    pymilvus_version: str
    server: str
    """What answered the build: "milvus-lite X.Y.Z" or the server's version."""


class VectorIndexInfo(BaseModel):
    """One of the two vector indexes, as built."""

    model_config = ConfigDict(extra="forbid")

    kind: IndexKind
    ntotal: int
    parameters: dict[str, int | str]
    search: SearchParams
    """The per-call search parameters used by default (chosen at build time to reach the target recall)."""
    recall_at_10: float
    recall_note: str
    device: str


class SkippedPhoto(BaseModel):
    """An archive record that was not indexed, and why."""

    model_config = ConfigDict(extra="forbid")

    id: int
    image_id: str
    reason: str


class IndexCounts(BaseModel):
    """How many records the archive had, how many were indexed and how many skipped."""

    model_config = ConfigDict(extra="forbid")

    archive_records: int
    indexed: int
    skipped: int


class IndexInfo(BaseModel):
    """`index.json`: what an index holds and how it was made."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    created: str
    updated: str | None = None
    generation: int = Field(ge=1)
    bundle_fingerprint: str
    bundle_path: str
    archive_root: str
    dim: int
    counts: IndexCounts
    indexes: dict[Against, VectorIndexInfo]
    files: IndexFiles
    store: StoreKind = "faiss"
    """Where the vectors are: the FAISS files of `files`, or the Milvus collections of `milvus`."""
    milvus: MilvusInfo | None = None
    skipped: list[SkippedPhoto]
    build_seconds: float
    images_per_second: float
    """Embedding throughput of the run that finished the build (photos embedded / embedding time)."""
    providers: dict[str, str]
    """What each graph ran on, as actually used: the ONNX Runtime execution provider, or "OpenVINO CPU"."""
    runtimes: dict[str, str] = Field(default_factory=dict)
    """What ran each graph, with its precision, e.g. "OpenVINO CPU int8" (empty in indexes built before it
    was recorded)."""
    faiss_version: str = faiss.__version__
    sha256: dict[str, str] | None = None
    """The integrity record: hex sha256 of each file in `files`, by file name, written with them. Indexes
    built before it existed have none; `open_index` then loads them unverified and says so."""


class HasFingerprint(Protocol):
    """Anything that names a bundle by fingerprint (an `index.embedder.Embedder`)."""

    fingerprint: str


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    score: float
    row: MetadataRow


def read_info(folder: Path) -> IndexInfo:
    """Read and check `index.json`. Raises IndexStoreError naming the file and what is wrong (an
    unfinished build is named as such)."""
    folder = Path(folder)
    path = folder / INFO_FILE
    if not path.is_file():
        if (folder / PARTIAL_DIR).is_dir():
            raise IndexStoreError(
                f"{folder}: unfinished build (no {INFO_FILE}); finish it with `retina-index build ... --resume`"
            )
        raise IndexStoreError(f"{folder}: not an index (no {INFO_FILE})")
    try:
        info = IndexInfo.model_validate_json(path.read_text())
    except ValidationError as error:
        raise IndexStoreError(f"{path}: invalid index description: {error}") from None
    if info.schema_version != INDEX_SCHEMA_VERSION:
        raise IndexStoreError(
            f"{path}: schema version {info.schema_version}, this software reads {INDEX_SCHEMA_VERSION}; "
            "rebuild the index"
        )
    return info


def file_digests(folder: Path, files: IndexFiles) -> dict[str, str]:
    """The integrity record of a generation's files: {file name: hex sha256}."""
    return {name: sha256_of(Path(folder) / name) for name in files.names()}


class IndexIntegrityError(IndexStoreError):
    """An index file whose bytes are not the ones its `index.json` records (changed, truncated, swapped)."""


def _integrity_error(folder: Path, name: str) -> IndexIntegrityError:
    return IndexIntegrityError(
        f"{folder}: {name} is not the file this index was built with (its sha256 differs from the one "
        f"{INFO_FILE} records): it was changed, truncated or replaced; restore it or rebuild the index"
    )


def _verified_bytes(folder: Path, name: str, expected: str | None) -> bytes:
    path = Path(folder) / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexStoreError(f"{folder}: {name} is missing (named by {INFO_FILE})") from None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise _integrity_error(folder, name)
    return data


def _verify_file(folder: Path, name: str, expected: str | None) -> None:
    path = Path(folder) / name
    if not path.is_file():
        raise IndexStoreError(f"{folder}: {name} is missing (named by {INFO_FILE})")
    if expected is not None and sha256_of(path) != expected:
        raise _integrity_error(folder, name)


def write_info(folder: Path, info: IndexInfo) -> None:
    """Write `index.json` atomically: the commit of an index's files."""
    write_text_atomic(Path(folder) / INFO_FILE, info.model_dump_json(indent=1) + "\n")


def open_index(
    folder: Path, bundle: HasFingerprint | str | None, device: Literal["auto", "cpu"] = "auto",
    in_memory: bool = False, milvus_uri: str | None = None,
) -> IndexStore:
    """Open an index for the bundle `bundle` (an Embedder, or a bundle fingerprint; None skips the check).

    Every file is checked against the integrity record of `index.json` (its sha256) when it has one.
    With `in_memory` the metadata table is held in memory too (as the vector indexes always are), loaded
    from the very bytes that were verified: a server then answers from a consistent, verified copy
    whatever happens to the files on disk.

    Raises IndexStoreError when the index was built with another bundle (naming both fingerprints), is
    unfinished, a file is not the one recorded (IndexIntegrityError), or its files disagree.

    An index with `store: "milvus"` searches its Milvus collections (`index.milvus_store`, the `milvus`
    extra); `milvus_uri` replaces the URI recorded in `index.json` (the same server seen from elsewhere).
    """
    folder = Path(folder)
    info = read_info(folder)
    if bundle is not None:
        expected = bundle if isinstance(bundle, str) else bundle.fingerprint
        if expected != info.bundle_fingerprint:
            raise IndexStoreError(
                f"{folder} was built with bundle {info.bundle_fingerprint} ({info.bundle_path}), but the bundle "
                f"given is {expected}: vectors of different models are not comparable; use the bundle it was "
                "built with or rebuild the index"
            )
    digests = info.sha256 or {}
    if info.sha256 is not None and set(digests) != set(info.files.names()):
        raise IndexIntegrityError(f"{folder}: the integrity record of {INFO_FILE} does not name its files")
    if info.store == "milvus":
        from index.milvus_store import open_milvus_index  # pymilvus only for Milvus-backed indexes

        return open_milvus_index(folder, info, _open_metadata(folder, info, in_memory), milvus_uri)
    try:
        files = info.files
        if files.image is None or files.record is None:
            raise IndexStoreError(f"{folder}: {INFO_FILE} names no FAISS files for a FAISS-backed index")
        if files.image_data is not None or files.record_data is not None:
            image, record = _open_ondisk(folder, files, digests)
        else:
            image = VectorIndex.from_bytes(_verified_bytes(folder, files.image, digests.get(files.image)),
                                           folder / files.image, device)
            record = VectorIndex.from_bytes(_verified_bytes(folder, files.record, digests.get(files.record)),
                                            folder / files.record, device)
    except VectorIndexError as error:
        raise IndexStoreError(f"{folder}: {error}") from None
    metadata = _open_metadata(folder, info, in_memory)
    counts = {"image.faiss": image.ntotal, "record.faiss": record.ntotal, "metadata": len(metadata)}
    if len(set(counts.values()) | {info.counts.indexed}) != 1:
        raise IndexStoreError(
            f"{folder}: files disagree: {INFO_FILE} says {info.counts.indexed} indexed, found "
            + ", ".join(f"{name} {count}" for name, count in counts.items())
        )
    return IndexStore(folder, info, image, record, metadata)


def _open_ondisk(folder: Path, files: IndexFiles, digests: dict[str, str]) -> tuple[VectorIndex, VectorIndex]:
    """The two indexes of an on-disk build: every file verified (its sha256, streamed: the `.ivfdata`
    files may be far larger than memory), then opened with their lists memory-mapped. Unlike the in-memory
    kinds, what is served is the file itself: a change to it after this check reaches the searches."""
    opened = []
    for index_name, data_name in ((files.image, files.image_data), (files.record, files.record_data)):
        if index_name is None or data_name is None:
            raise IndexStoreError(f"{folder}: {INFO_FILE} names an on-disk index without its data file")
        for name in (index_name, data_name):
            _verify_file(folder, name, digests.get(name))
        index = VectorIndex.load(folder / index_name, device="cpu")
        if not index.ondisk:
            raise IndexStoreError(f"{folder}: {index_name} is not an on-disk index, but {INFO_FILE} says it is")
        opened.append(index)
    return opened[0], opened[1]


def _open_metadata(folder: Path, info: IndexInfo, in_memory: bool) -> MetadataTable:
    """The verified metadata table of an index (in memory, or read-only on disk)."""
    name = info.files.metadata
    expected = (info.sha256 or {}).get(name)
    try:
        if in_memory:
            return MetadataTable.from_bytes(_verified_bytes(folder, name, expected), folder / name)
        _verify_file(folder, name, expected)  # opened on disk (to be changed): its digest is read in chunks
        return MetadataTable.open(folder / name)
    except MetadataError as error:
        raise IndexStoreError(f"{folder}: {error}") from None


class IndexStore:
    """An open index: search, add and remove by id, save atomically.

    Searches may run from several threads at once; `add`, `remove` and `save` take a lock against each
    other but must not overlap with searches (an online service changes nothing; changes are offline).
    """

    def __init__(
        self, folder: Path, info: IndexInfo, image: VectorIndex, record: VectorIndex, metadata: MetadataTable
    ) -> None:
        self.folder = Path(folder)
        self.info = info
        self.image = image
        self.record = record
        self.metadata = metadata
        self._write_lock = threading.Lock()

    @property
    def verified(self) -> bool:
        """True when the files were checked against an integrity record at load."""
        return self.info.sha256 is not None

    @property
    def ntotal(self) -> int:
        """Number of indexed photographs."""
        return self.image.ntotal

    def vectors(self, against: Against) -> VectorIndex:
        """The vector index searched for `against`: "image" or "record"."""
        if against not in AGAINST:
            raise IndexStoreError(f"against must be one of {', '.join(AGAINST)}, not {against!r}")
        return self.image if against == "image" else self.record

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        against: Against = "image",
        filters: Filters | None = None,
        params: SearchParams | None = None,
    ) -> list[list[Hit]]:
        """The `k` nearest indexed photographs of each query vector (L2-normalised, (D,) or (N, D)),
        restricted by `filters`; `params` default to the ones chosen at build time."""
        index = self.vectors(against)
        allowed = self.metadata.allowed_ids(filters)
        scores, ids = index.search(queries, k, params or self.info.indexes[against].search, allowed)
        return self._hits(scores, ids)

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Search results (scores, ids; id -1 for none) with their metadata rows; ids without a row are left out."""
        rows = self.metadata.get(ids[ids >= 0].tolist())
        return [
            [Hit(int(i), float(s), rows[int(i)]) for s, i in zip(score_row, id_row, strict=True) if int(i) in rows]
            for score_row, id_row in zip(scores, ids, strict=True)
        ]

    def add(
        self, ids: np.ndarray, image_vectors: np.ndarray, record_vectors: np.ndarray, rows: list[MetadataRow]
    ) -> None:
        """Add photographs: their ids, image and record embeddings (L2-normalised) and metadata rows (in
        the same order, `rows[i].id == ids[i]`). Ids and image_ids must be new. Call `save` to persist."""
        self._check_writable("add")
        identifiers = check_additions(ids, image_vectors, record_vectors, rows)
        with self._write_lock:
            try:
                self.metadata.insert(rows)  # checks that ids and image_ids are new, atomically
            except MetadataError as error:
                raise IndexStoreError(f"add: {error}") from None
            try:
                self.image.add(image_vectors, identifiers)
                self.record.add(record_vectors, identifiers)
            except VectorIndexError as error:
                self.image.remove(identifiers)
                self.metadata.delete(identifiers.tolist())
                raise IndexStoreError(f"add: {error}") from None
            self._update_counts()

    def remove(self, ids: np.ndarray) -> int:
        """Remove photographs by id from both vector indexes and the metadata. Raises IndexStoreError,
        changing nothing, when an id is not in the index. Call `save` to persist."""
        self._check_writable("remove")
        identifiers = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        with self._write_lock:
            self._check_present(identifiers)
            self.image.remove(identifiers)
            self.record.remove(identifiers)
            removed = self.metadata.delete(identifiers.tolist())
            self._update_counts()
        return removed

    def _check_writable(self, what: str) -> None:
        if self.info.files.image_data is not None:
            raise IndexStoreError(
                f"{what}: {self.folder} is an on-disk index (memory-mapped inverted lists), which is read-only; "
                "rebuild it with `retina-index build` to change it"
            )

    def _check_present(self, identifiers: np.ndarray) -> None:
        present = set(self.metadata.get(identifiers.tolist()))
        unknown = [int(i) for i in identifiers if int(i) not in present]
        if unknown:
            more = " ..." if len(unknown) > 10 else ""
            raise IndexStoreError(f"remove: ids not in the index: {unknown[:10]}{more}")

    def _update_counts(self) -> None:
        counts = self.info.counts.model_copy(update={"indexed": self.image.ntotal})
        indexes = {
            name: info.model_copy(update={"ntotal": self.vectors(name).ntotal})
            for name, info in self.info.indexes.items()
        }
        self.info = self.info.model_copy(update={"counts": counts, "indexes": indexes})

    def save(self) -> None:
        """Persist the index atomically: the next generation's files, then `index.json` (the commit),
        then the previous generation's files are deleted."""
        self._check_writable("save")
        with self._write_lock:
            generation = self.info.generation + 1
            files = files_for(generation, self.info.store)
            old = self.info.files
            for name in files.names():  # leftovers of a save that crashed before its commit
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()
            self._save_vectors(files)
            with atomic_target(self.folder / files.metadata) as temp:
                self.metadata.write(temp)
            info = self.info.model_copy(update={
                "generation": generation, "files": files, "updated": now_iso(),
                "sha256": file_digests(self.folder, files),
            })
            write_info(self.folder, info)
            self.info = info
            self.metadata.close()
            self.metadata = MetadataTable.open(self.folder / files.metadata)
            for name in old.names():
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()

    def _save_vectors(self, files: IndexFiles) -> None:
        assert files.image is not None and files.record is not None
        self.image.save(self.folder / files.image)
        self.record.save(self.folder / files.record)


def check_additions(
    ids: np.ndarray, image_vectors: np.ndarray, record_vectors: np.ndarray, rows: list[MetadataRow]
) -> np.ndarray:
    """The ids of an `add` as int64, after checking that ids, vectors and rows agree and that the vectors
    are L2-normalised; raises IndexStoreError saying what does not."""
    identifiers = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(identifiers)
    if not (len(image_vectors) == len(record_vectors) == len(rows) == n):
        raise IndexStoreError(
            f"add: {n} ids, {len(image_vectors)} image vectors, {len(record_vectors)} record vectors, "
            f"{len(rows)} rows: they must be equal"
        )
    if [row.id for row in rows] != identifiers.tolist():
        raise IndexStoreError("add: rows[i].id must equal ids[i]")
    for name, vectors in (("image", image_vectors), ("record", record_vectors)):
        norms = np.linalg.norm(np.asarray(vectors, dtype=np.float32).reshape(n, -1), axis=1)
        if n and np.abs(norms - 1.0).max() > NORM_TOLERANCE:
            raise IndexStoreError(
                f"add: {name} vectors must be L2-normalised (norms {norms.min():.3f}..{norms.max():.3f})"
            )
    return identifiers
