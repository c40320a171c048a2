"""Milvus as the index's vector store (the `milvus` extra: pymilvus, and milvus-lite for a local file).

`retina-index build --store milvus --milvus-uri URI` embeds exactly as a FAISS build does, then writes
the two embeddings (image-only and record) into two collections, `<prefix>_image` and `<prefix>_record`,
with the same int64 ids. URI is a milvus-lite file (`./retina.db`) or a server (`http://HOST:19530`).
Each collection holds, besides `id` and `vector`, the archive's scalar fields (icdr, sdrg, exam_eye,
patient_age, patient_sex, camera, quality), each with an INVERTED scalar index, so filters run inside Milvus.

The metadata rows returned with hits (path, labels with the model's probabilities, narrative) stay in the
index folder's SQLite table, as for FAISS: one verified copy of the rows, the same hit path for both
stores, and no size limit of a Milvus VARCHAR on a narrative.

Missing values: milvus-lite does not support nullable fields, so a missing grade is stored as -1, a missing
age as -1.0 and a missing eye, sex, camera or quality as "" (no filter value matches those; `age_max` also asks
`patient_age >= 0`), so a row whose field is missing fails a condition on that field, as in SQLite.

Filters become a Milvus boolean expression built from field names of this module only; the values are
always bound: as `filter_params` (expression templates, Milvus >= 2.5 servers) or, for milvus-lite, which
rejects templates (both 2.5.1 and 3.2.2 answer a `{name}` placeholder with a parse error), rendered by
`render_literal` from the validated `Filters` values (ints, finite floats, strings of a closed alphabet),
never from raw text.
"""

from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index.metadata import Filters, MetadataRow, MetadataTable
from index.store import (
    AGAINST,
    INFO_FILE,
    Against,
    Hit,
    IndexFiles,
    IndexInfo,
    IndexStore,
    IndexStoreError,
    MilvusInfo,
    VectorIndexInfo,
    check_additions,
)
from index.vector_index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    IVF_KINDS,
    IndexKind,
    SearchParams,
    exact_search,
    filtered_nprobe,
    recall_at_k,
)

if TYPE_CHECKING:
    from pymilvus import MilvusClient

EXTRA_HINT = "pip install 'retina-align[milvus]'"
MISSING_INT = -1
MISSING_FLOAT = -1.0
MISSING_TEXT = ""
TEXT_LENGTH = 256
INSERT_BATCH = 1000
TIMEOUT_S = 60.0
EF_CANDIDATES: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
DEFAULT_NPROBE = 8
"""Milvus's nprobe when a search gives none."""
NPROBE_CANDIDATES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
SCALAR_FIELDS: tuple[str, ...] = ("icdr", "sdrg", "exam_eye", "patient_age", "patient_sex", "camera", "quality")
_SAFE_TEXT = re.compile(r"[A-Za-z0-9 _.-]*")


class MilvusStoreError(IndexStoreError):
    """A Milvus collection that cannot be created, opened, searched or changed; the message says why."""


def pymilvus_module() -> Any:
    """The pymilvus module, or a MilvusStoreError naming the extra to install."""
    try:
        import pymilvus
    except ImportError:
        raise MilvusStoreError(f"the Milvus store needs pymilvus (and milvus-lite for a local file): {EXTRA_HINT}") \
            from None
    return pymilvus


def is_local(uri: str) -> bool:
    """True when `uri` names a milvus-lite file rather than a server."""
    return "://" not in uri and not uri.startswith("unix:")


def normalise_uri(uri: str) -> str:
    """A local milvus-lite file as an absolute path ending in `.db` (pymilvus's rule); a server URI as given."""
    if not is_local(uri):
        return uri
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise MilvusStoreError(f"--milvus-uri {uri}: a local Milvus (milvus-lite) file must end in .db")
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


_clients: dict[str, MilvusClient] = {}
_clients_lock = threading.Lock()


def client_for(uri: str) -> MilvusClient:
    """One shared client per URI in this process (milvus-lite runs one engine per file)."""
    uri = normalise_uri(uri)
    with _clients_lock:
        if uri not in _clients:
            pymilvus = pymilvus_module()
            token = os.environ.get("MILVUS_TOKEN", "")
            try:
                _clients[uri] = pymilvus.MilvusClient(uri=uri, token=token)
            except Exception as error:
                raise MilvusStoreError(f"cannot connect to Milvus at {uri}: {error}") from None
        return _clients[uri]


def server_version(uri: str) -> str:
    """What answers at `uri`: "milvus-lite X.Y.Z" for a local file, else the server's version."""
    if is_local(uri):
        from importlib.metadata import version

        return f"milvus-lite {version('milvus-lite')}"
    return f"Milvus {client_for(uri).get_server_version()}"


def supported_kinds(uri: str) -> tuple[IndexKind, ...]:
    """The index kinds Milvus at `uri` can build: all on a server (and milvus-lite 3.x); milvus-lite 2.5's
    local mode builds only FLAT and IVF_FLAT ("local mode only support FLAT IVF_FLAT AUTOINDEX")."""
    if is_local(uri):
        from importlib.metadata import PackageNotFoundError, version

        try:
            major = int(version("milvus-lite").split(".")[0])
        except (PackageNotFoundError, ValueError):
            major = 0
        if major < 3:
            return ("flat", "ivf")
    return ("flat", "ivf", "hnsw", "ivfpq")


def check_kind(uri: str, kind: IndexKind) -> None:
    """Raise MilvusStoreError when Milvus at `uri` cannot build `kind` (see `supported_kinds`)."""
    kinds = supported_kinds(uri)
    if kind not in kinds:
        raise MilvusStoreError(
            f"--kind {kind}: {server_version(uri)} builds only {', '.join(kinds)}; use one of those, or a Milvus "
            "server (--milvus-uri http://HOST:19530)"
        )


# --- filters --------------------------------------------------------------------------------------


def filter_template(filters: Filters | None) -> tuple[str, dict[str, Any]] | None:
    """A Milvus boolean expression with `{placeholders}` for `filters`, and the values to bind. ("", {})
    when there is no condition; None when nothing can match (an empty grade list). The expression holds
    only this module's field names; every value is a parameter."""
    if filters is None or filters.is_empty():
        return "", {}
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for field in ("icdr", "sdrg"):
        values = getattr(filters, field)
        if values is not None:
            if not values:
                return None
            clauses.append(f"{field} in {{{field}}}")
            params[field] = [int(v) for v in values]
    if filters.exam_eye is not None:
        clauses.append("exam_eye == {exam_eye}")
        params["exam_eye"] = str(filters.exam_eye)
    if filters.age_min is not None:
        clauses.append("patient_age >= {age_min}")
        params["age_min"] = float(filters.age_min)
    if filters.age_max is not None:
        clauses.append("patient_age >= 0.0 and patient_age <= {age_max}")  # -1.0: age missing
        params["age_max"] = float(filters.age_max)
    return " and ".join(clauses), params


def render_literal(value: Any) -> str:
    """A Milvus expression literal for a validated filter value: an int, a finite float, a string of
    letters, digits, space, `_`, `.` and `-`, or a list of those. Anything else raises MilvusStoreError:
    no value can carry quotes, brackets or operators into an expression."""
    if isinstance(value, bool):
        raise MilvusStoreError(f"filter value {value!r}: booleans are not filter values")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise MilvusStoreError(f"filter value {value!r}: not a finite number")
        return repr(float(value))
    if isinstance(value, str):
        if len(value) > TEXT_LENGTH or not _SAFE_TEXT.fullmatch(value):
            raise MilvusStoreError(f"filter value {value!r}: refused (only letters, digits, space, _ . -)")
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_literal(item) for item in value) + "]"
    raise MilvusStoreError(f"filter value {value!r}: unsupported type {type(value).__name__}")


def inline_expression(template: str, params: dict[str, Any]) -> str:
    """`template` with each `{name}` replaced by `render_literal(params[name])` (for milvus-lite, which
    has no expression templates). The template comes from `filter_template`, never from a request."""
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in params:
            raise MilvusStoreError(f"filter template names {{{name}}} but no value is bound to it")
        return render_literal(params[name])

    return re.sub(r"\{(\w+)\}", replace, template)


# --- one collection --------------------------------------------------------------------------------


def _scalars(row: MetadataRow) -> dict[str, Any]:
    labels = row.labels
    return {
        "icdr": MISSING_INT if labels.icdr is None else int(labels.icdr),
        "sdrg": MISSING_INT if labels.sdrg is None else int(labels.sdrg),
        "exam_eye": labels.exam_eye or MISSING_TEXT,
        "patient_age": MISSING_FLOAT if labels.patient_age is None else float(labels.patient_age),
        "patient_sex": labels.patient_sex or MISSING_TEXT,
        "camera": (labels.camera or MISSING_TEXT)[:TEXT_LENGTH],
        "quality": labels.quality or MISSING_TEXT,
    }


def index_parameters(kind: IndexKind, n_hint: int) -> dict[str, Any]:
    """The Milvus vector index for a kind: FLAT (exact), HNSW (M, efConstruction as for FAISS), IVF_FLAT
    (nlist ~ 4*sqrt(n)) or IVF_PQ; all with the inner-product metric."""
    if kind == "flat":
        return {"index_type": "FLAT", "metric_type": "IP", "params": {}}
    if kind == "hnsw":
        return {"index_type": "HNSW", "metric_type": "IP",
                "params": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}}
    nlist = max(1, min(65536, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n_hint, 1)))))))
    if kind == "ivf":
        return {"index_type": "IVF_FLAT", "metric_type": "IP", "params": {"nlist": nlist}}
    return {"index_type": "IVF_PQ", "metric_type": "IP", "params": {"nlist": nlist, "m": 16, "nbits": 8}}


class MilvusVectors:
    """One Milvus collection of embeddings (id, vector, scalar fields): search with filters, add, remove."""

    def __init__(self, client: MilvusClient, uri: str, collection: str, kind: IndexKind) -> None:
        self.client = client
        self.uri = uri
        self.collection = collection
        self.kind = kind
        self.templates = not is_local(uri)
        """Bind filter values as `filter_params` (servers); milvus-lite gets `render_literal` literals."""
        self._count: int | None = None

    @classmethod
    def create(cls, uri: str, collection: str, kind: IndexKind, dim: int, n_hint: int) -> MilvusVectors:
        """A new, empty, loaded collection; raises MilvusStoreError when one of that name exists."""
        pymilvus = pymilvus_module()
        client = client_for(uri)
        check_kind(uri, kind)
        if client.has_collection(collection):
            raise MilvusStoreError(
                f"Milvus collection {collection!r} already exists at {uri}; choose another --milvus-collection "
                "or drop it first"
            )
        data_type = pymilvus.DataType
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", data_type.INT64, is_primary=True)
        schema.add_field("vector", data_type.FLOAT_VECTOR, dim=dim)
        for name in ("icdr", "sdrg"):
            schema.add_field(name, data_type.INT64)
        schema.add_field("patient_age", data_type.DOUBLE)
        for name in ("exam_eye", "patient_sex", "camera", "quality"):
            schema.add_field(name, data_type.VARCHAR, max_length=TEXT_LENGTH)
        index_params = client.prepare_index_params()
        index_params.add_index("vector", **index_parameters(kind, n_hint))
        for name in SCALAR_FIELDS:
            index_params.add_index(name, index_type="INVERTED")
        try:
            client.create_collection(collection, schema=schema, index_params=index_params,
                                     consistency_level="Strong", timeout=TIMEOUT_S)
            client.load_collection(collection, timeout=TIMEOUT_S)  # milvus-lite 3 does not load on create
        except Exception as error:
            raise MilvusStoreError(f"cannot create Milvus collection {collection!r} at {uri}: {error}") from None
        vectors = cls(client, normalise_uri(uri), collection, kind)
        vectors._count = 0
        return vectors

    @classmethod
    def open(cls, uri: str, collection: str, kind: IndexKind) -> MilvusVectors:
        """An existing collection, loaded for search; raises MilvusStoreError when it is absent."""
        client = client_for(uri)
        if not client.has_collection(collection):
            raise MilvusStoreError(f"Milvus collection {collection!r} not found at {uri}")
        try:
            client.load_collection(collection, timeout=TIMEOUT_S)
        except Exception as error:
            raise MilvusStoreError(f"cannot load Milvus collection {collection!r} at {uri}: {error}") from None
        return cls(client, normalise_uri(uri), collection, kind)

    @property
    def ntotal(self) -> int:
        """Number of vectors in the collection."""
        if self._count is None:
            result = self.client.query(self.collection, filter="", output_fields=["count(*)"], timeout=TIMEOUT_S)
            self._count = int(result[0]["count(*)"])
        return self._count

    def add(self, vectors: np.ndarray, rows: list[MetadataRow]) -> None:
        """Insert vectors (float32, L2-normalised) with their rows' ids and scalar fields."""
        matrix = np.asarray(vectors, dtype=np.float32)
        try:
            for start in range(0, len(rows), INSERT_BATCH):
                part = rows[start : start + INSERT_BATCH]
                data = [
                    {"id": int(row.id), "vector": matrix[start + i].tolist(), **_scalars(row)}
                    for i, row in enumerate(part)
                ]
                self.client.insert(self.collection, data, timeout=TIMEOUT_S)
        except Exception as error:
            self._count = None
            raise MilvusStoreError(f"cannot insert into Milvus collection {self.collection!r}: {error}") from None
        if self._count is not None:
            self._count += len(rows)

    def remove(self, ids: np.ndarray) -> None:
        """Delete vectors by id."""
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        try:
            for start in range(0, len(wanted), INSERT_BATCH):
                self.client.delete(self.collection, ids=wanted[start : start + INSERT_BATCH], timeout=TIMEOUT_S)
        except Exception as error:
            raise MilvusStoreError(f"cannot delete from Milvus collection {self.collection!r}: {error}") from None
        finally:
            self._count = None

    def search_params(self, params: SearchParams, k: int) -> dict[str, Any]:
        """Milvus search parameters for `params` (ef for HNSW, at least k; nprobe for IVF)."""
        extra: dict[str, Any] = {}
        if self.kind == "hnsw":
            extra["ef"] = max(k, params.ef_search or 64)
        elif self.kind in IVF_KINDS and params.nprobe is not None:
            extra["nprobe"] = params.nprobe
        return {"metric_type": "IP", "params": extra}

    def search(
        self, queries: np.ndarray, k: int, params: SearchParams, filters: Filters | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (N, k), best first; ids -1 (score -inf) where fewer than k match."""
        matrix = np.asarray(queries, dtype=np.float32).reshape(-1, np.asarray(queries).shape[-1])
        scores = np.full((len(matrix), k), -np.inf, dtype=np.float32)
        ids = np.full((len(matrix), k), -1, dtype=np.int64)
        template = filter_template(filters)
        if template is None or len(matrix) == 0:
            return scores, ids
        expression, values = template
        arguments: dict[str, Any] = {}
        if expression and self.templates:
            arguments = {"filter": expression, "filter_params": values}
        elif expression:
            arguments = {"filter": inline_expression(expression, values)}
        try:
            results = self.client.search(
                self.collection, data=matrix.tolist(), limit=k, anns_field="vector",
                search_params=self.search_params(params, k), output_fields=["id"], timeout=TIMEOUT_S, **arguments,
            )
        except Exception as error:
            raise MilvusStoreError(f"Milvus search in {self.collection!r} failed: {error}") from None
        for row, hits in enumerate(results):
            for column, hit in enumerate(list(hits)[:k]):
                ids[row, column] = int(hit["id"])
                scores[row, column] = float(hit["distance"])
        return scores, ids

    def describe(self) -> dict[str, int | str]:
        """The vector index's type and parameters, as recorded in index.json."""
        described = index_parameters(self.kind, max(self.ntotal, 1))
        return {"index_type": described["index_type"], "metric": "IP",
                **{key: value for key, value in described["params"].items()}}


def tune_milvus_search(
    vectors: MilvusVectors, matrix: np.ndarray, ids: np.ndarray, queries: np.ndarray, target_recall: float,
    k: int = 10,
) -> tuple[SearchParams, float]:
    """The cheapest ef (HNSW) or nprobe (IVF) reaching `target_recall` at k against exact search, with the
    recall measured; the most thorough tried when none reaches it. FLAT: (SearchParams(), 1.0)."""
    if vectors.kind == "flat":
        return SearchParams(), 1.0
    truth = exact_search(matrix, ids, queries, min(k, len(ids)))
    candidates = (
        [SearchParams(ef_search=ef) for ef in EF_CANDIDATES] if vectors.kind == "hnsw"
        else [SearchParams(nprobe=p) for p in NPROBE_CANDIDATES]
    )
    best = (candidates[-1], 0.0)
    for params in candidates:
        _, found = vectors.search(queries, min(k, len(ids)), params)
        recall = recall_at_k(found, truth)
        best = (params, recall)
        if recall >= target_recall:
            break
    return best


# --- the store ---------------------------------------------------------------------------------------


def collection_names(prefix: str) -> dict[Against, str]:
    """The collections of an index: `<prefix>_image` and `<prefix>_record`."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", prefix):
        raise MilvusStoreError(
            f"--milvus-collection {prefix!r}: a Milvus name starts with a letter or _, then letters, digits or _"
        )
    return {name: f"{prefix}_{name}" for name in AGAINST}


def existing_collections(uri: str, prefix: str) -> list[str]:
    """Which of an index's collections (`collection_names(prefix)`) already exist at `uri`. Raises
    MilvusStoreError when pymilvus is missing, the prefix is not a Milvus name or Milvus cannot be reached."""
    names = collection_names(prefix)
    client = client_for(uri)
    return [name for name in names.values() if client.has_collection(name)]


def open_milvus_index(
    folder: Path, info: IndexInfo, metadata: MetadataTable, uri: str | None = None
) -> MilvusIndexStore:
    """An index whose vectors are in Milvus (`index.json` `store: "milvus"`), with its verified metadata
    table; `uri` replaces the recorded URI. Raises MilvusStoreError when a collection is missing or the
    counts disagree."""
    if info.milvus is None:
        metadata.close()
        raise MilvusStoreError(f"{folder}: {INFO_FILE} says store milvus but names no Milvus collections")
    target = uri or info.milvus.uri
    try:
        collections = {
            name: MilvusVectors.open(target, info.milvus.collections[name], info.indexes[name].kind)
            for name in AGAINST
        }
    except MilvusStoreError:
        metadata.close()
        raise
    counts = {f"{name} collection": vectors.ntotal for name, vectors in collections.items()}
    counts["metadata"] = len(metadata)
    if len(set(counts.values()) | {info.counts.indexed}) != 1:
        metadata.close()
        raise MilvusStoreError(
            f"{folder}: Milvus and the folder disagree: {INFO_FILE} says {info.counts.indexed} indexed, found "
            + ", ".join(f"{name} {count}" for name, count in counts.items())
        )
    return MilvusIndexStore(folder, info, collections, metadata)


class MilvusIndexStore(IndexStore):
    """An open Milvus-backed index: the same search, add, remove and save as the FAISS `IndexStore`.

    Adds and removes reach Milvus at once; `save` writes the metadata table's next generation and
    `index.json` (the commit) as for FAISS. Milvus is not versioned with the folder: between a change and
    its `save` the collections are ahead of the committed metadata (hits whose row is absent are dropped).
    """

    def __init__(
        self, folder: Path, info: IndexInfo, collections: dict[Against, MilvusVectors], metadata: MetadataTable
    ) -> None:
        self.folder = Path(folder)
        self.info = info
        self.collections = collections
        self.metadata = metadata
        self._write_lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        """Number of indexed photographs."""
        return self.collections["image"].ntotal

    def milvus(self, against: Against) -> MilvusVectors:
        """The collection searched for `against`: "image" or "record"."""
        if against not in AGAINST:
            raise IndexStoreError(f"against must be one of {', '.join(AGAINST)}, not {against!r}")
        return self.collections[against]

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        against: Against = "image",
        filters: Filters | None = None,
        params: SearchParams | None = None,
    ) -> list[list[Hit]]:
        """The `k` nearest indexed photographs of each query vector, restricted by `filters` (a Milvus
        filter expression)."""
        vectors = self.milvus(against)
        params = params or self.info.indexes[against].search
        if vectors.kind in IVF_KINDS and filters is not None and not filters.is_empty():
            params = self._filtered_params(against, params, filters)
        scores, ids = vectors.search(queries, k, params, filters)
        return self._hits(scores, ids)

    def _filtered_params(self, against: Against, params: SearchParams, filters: Filters) -> SearchParams:
        """nprobe raised for a selective filter (`filtered_nprobe`), sized by the metadata table's count of
        allowed rows: Milvus's IVF, like FAISS's, otherwise meets few allowed vectors in its probed lists."""
        allowed = self.metadata.allowed_ids(filters)
        nlist = int(self.info.indexes[against].parameters.get("nlist", 1))  # as built
        nprobe = filtered_nprobe(params.nprobe or DEFAULT_NPROBE, nlist, 0 if allowed is None else len(allowed),
                                 self.milvus(against).ntotal)
        return SearchParams(nprobe=nprobe, ef_search=params.ef_search)

    def add(
        self, ids: np.ndarray, image_vectors: np.ndarray, record_vectors: np.ndarray, rows: list[MetadataRow]
    ) -> None:
        """Add photographs (see `IndexStore.add`); the vectors go to Milvus at once, `save` commits the rows."""
        identifiers = check_additions(ids, image_vectors, record_vectors, rows)
        with self._write_lock:
            try:
                self.metadata.insert(rows)
            except Exception as error:
                raise IndexStoreError(f"add: {error}") from None
            try:
                self.collections["image"].add(image_vectors, rows)
                self.collections["record"].add(record_vectors, rows)
            except MilvusStoreError as error:
                for vectors in self.collections.values():
                    vectors.remove(identifiers)
                self.metadata.delete(identifiers.tolist())
                raise IndexStoreError(f"add: {error}") from None
            self._update_counts()

    def remove(self, ids: np.ndarray) -> int:
        """Remove photographs by id (see `IndexStore.remove`)."""
        identifiers = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        with self._write_lock:
            self._check_present(identifiers)
            for vectors in self.collections.values():
                vectors.remove(identifiers)
            removed = self.metadata.delete(identifiers.tolist())
            self._update_counts()
        return removed

    def _update_counts(self) -> None:
        counts = self.info.counts.model_copy(update={"indexed": self.ntotal})
        indexes = {
            name: info.model_copy(update={"ntotal": self.collections[name].ntotal})
            for name, info in self.info.indexes.items()
        }
        self.info = self.info.model_copy(update={"counts": counts, "indexes": indexes})

    def _save_vectors(self, files: IndexFiles) -> None:
        """Nothing to write: Milvus already holds the changes (flushed here on a server)."""
        if not is_local(self.collections["image"].uri):
            for vectors in self.collections.values():
                vectors.client.flush(vectors.collection)


def write_collections(
    uri: str, prefix: str, kind: IndexKind, ids: np.ndarray, image_vectors: np.ndarray, record_vectors: np.ndarray,
    rows: list[MetadataRow], target_recall: float, seed: int = 0, recall_queries: int = 1000,
) -> tuple[MilvusInfo, VectorIndexInfo, VectorIndexInfo]:
    """Create the two collections of a build and insert the vectors the build embedded (the same ones a
    FAISS build would index); for approximate kinds, choose the search parameters reaching
    `target_recall` (recall@10 measured against exact search). Returns what `index.json` records."""
    names = collection_names(prefix)
    uri = normalise_uri(uri)
    infos: dict[Against, VectorIndexInfo] = {}
    created: list[MilvusVectors] = []
    try:
        for against, matrix in (("image", image_vectors), ("record", record_vectors)):
            vectors = MilvusVectors.create(uri, names[against], kind, matrix.shape[1], len(matrix))  # type: ignore[index]
            created.append(vectors)
            vectors.add(matrix, rows)
            vectors.client.flush(vectors.collection, timeout=TIMEOUT_S)  # seal the segments: the index is built
            rng = np.random.default_rng(seed)
            queries = matrix[rng.choice(len(matrix), min(recall_queries, len(matrix)), replace=False)]
            params, recall = tune_milvus_search(vectors, matrix, ids, queries, target_recall)
            note = ("exact search (Milvus FLAT): recall 1.0 by definition" if kind == "flat" else
                    f"10-recall@10 against exact search, {len(queries)} indexed vectors as queries, with the search "
                    f"parameters above (the cheapest reaching {target_recall}, or the most thorough tried)")
            infos[against] = VectorIndexInfo(  # type: ignore[index]
                kind=kind, ntotal=vectors.ntotal, parameters=vectors.describe(), search=params,
                recall_at_10=recall, recall_note=note, device=f"milvus {'lite' if is_local(uri) else 'server'}",
            )
    except Exception:
        for vectors in created:  # a failed build leaves no half-filled collection behind
            vectors.client.drop_collection(vectors.collection)
        raise
    info = MilvusInfo(uri=uri, collections=names, pymilvus_version=pymilvus_module().__version__,
                      server=server_version(uri))
    return info, infos["image"], infos["record"]
