"""A FAISS vector index over L2-normalised embeddings: inner product (= cosine), native int64 ids.

Kinds (all `METRIC_INNER_PRODUCT`):

- `flat`: exact search; `IndexIDMap2(IndexFlatIP)`.
- `ivf`: IVF-Flat; `IndexIVFFlat` with its own ids and a hash-table direct map (so vectors can be
  reconstructed and removed by id). Approximate: `nprobe` of the `nlist` lists are scanned.
- `hnsw`: `IndexIDMap2(IndexHNSWFlat)`, M=32. Approximate: `efSearch` bounds the graph walk. FAISS cannot
  delete from an HNSW graph, so `remove` rebuilds the graph from the remaining vectors (a full build).
- `ivfsq`: IVF with 8-bit scalar-quantised vectors (`SQ8`, 1 byte per dimension: a quarter of IVF-Flat's
  memory and disk, approximate scores). Not faster to scan than IVF-Flat on the CPUs measured here:
  decoding the codes costs about what reading the floats does (README "Scaling").
- `ivfpqr`: IVF-PQ with 4-bit fast-scan codes (`PQ{dim/2}x4fs`: SIMD distance tables, several times
  faster to scan than IVF-Flat) whose top `k * REFINE_K_FACTOR` candidates are re-ranked exactly against
  the raw vectors (`IndexRefineFlat`, held in memory), wrapped in `IndexIDMap2` for the ids. The fastest
  kind for large archives that fit in memory: exact scores, recall set by nprobe and the re-ranking depth.
  Removal rebuilds it from the kept vectors (no retraining); it is not mergeable on disk.
- `ivfpq`: IVF with product-quantised codes (`m` bytes per vector); for archives whose raw vectors do
  not fit in memory. Scores are approximate as well as the neighbour set.

`choose_kind` ("auto") follows the FAISS wiki's "Guidelines to choose an index" and autofaiss's rules of
thumb:

1. Exact `flat` while the archive is at most `FLAT_MAX_VECTORS` (20,000) vectors and its raw vectors
   fit the memory budget: exact needs no training, no tuning and cannot miss, but one query costs time in
   proportion to n. Measured here (`retina-index bench`, 2 cores, width 256): flat p99 0.5 ms at 10^4,
   16.5 ms at 10^5, 109 ms at 10^6, against IVF 0.5 ms at 10^5 and 1.1 ms at 10^6 (recall@10 0.97-0.98).
   Up to 20,000 vectors a query stays within about 2 ms, well inside an interactive service's budget.
2. Beyond that, `ivf` (IVF-Flat) while the raw vectors fit the memory budget. It is preferred to `hnsw`
   because it removes by id in place and trains in minutes; choose `hnsw` explicitly for the lowest
   latency when memory allows (it costs ~2*M*4 bytes per vector more and a rebuild per removal).
3. `ivfpq` when the raw vectors do not fit: `m` is the largest code size (bytes per vector) that fits.

IVF sizing (`ivf_nlist`): nlist ~ 4*sqrt(n) rounded to a power of two below 4*10^6 vectors (FAISS wiki:
between 4*sqrt(n) and 16*sqrt(n); autofaiss jumps to 16,384 at 10^6, whose k-means is about 16 times
the work of 4,096 lists, which took 44 s at 10^6 here while already reaching recall@10 0.97), 16,384
lists up to 10^7, 65,536 up to 3*10^8, 262,144 beyond; never fewer than `MIN_POINTS_PER_CENTROID` (39,
below which FAISS's k-means warns) training vectors per list.
From 16,384 lists on, the coarse quantizer is itself an HNSW graph (`IVF65536_HNSW32`), as the wiki
advises. k-means trains on `train_size(n, nlist)` = min(n, 64*nlist) vectors: at least the 39 per list
that k-means needs and well under the 256 per list above which FAISS subsamples anyway.

Search parameters (`nprobe`, `efSearch`) and filters travel with each call (`SearchParams`,
`allowed_ids`) and are turned into a fresh `faiss.SearchParameters*` object per call: the shared index's
own `nprobe`/`efSearch` are never changed after construction, so concurrent searches cannot disturb each
other (clip-retrieval's crash). Searches may run concurrently from many threads; `add`, `remove` and
`save` must not run concurrently with searches (the caller serialises mutations).

GPU: when this FAISS build has GPU support and sees a GPU, flat and IVF indexes are cloned to GPU for
unfiltered searches, which are serialised with a lock (FAISS GPU indexes are not thread-safe). The CPU
copy stays the source of truth: mutations apply to it (the GPU copy is re-cloned on the next search),
`save` writes it, and filtered searches run on it (FAISS GPU indexes do not take an `IDSelector`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import faiss
import numpy as np

from index.atomic import atomic_target

IndexKind = Literal["flat", "ivf", "hnsw", "ivfsq", "ivfpq", "ivfpqr"]
KINDS: tuple[str, ...] = get_args(IndexKind)
IVF_KINDS: tuple[str, ...] = ("ivf", "ivfsq", "ivfpq", "ivfpqr")
"""The kinds with an IVF index inside (trained on a sample, searched with `nprobe`)."""
ONDISK_KINDS: tuple[str, ...] = ("ivf", "ivfsq", "ivfpq")
"""The IVF kinds whose inverted lists can be merged into one memory-mapped file (`index.ivf_build`)."""
ID_MAP_KINDS: tuple[str, ...] = ("flat", "hnsw", "ivfpqr")
"""The kinds wrapped in `IndexIDMap2` (their ids live in its id map, not in inverted lists)."""
REFINE_K_FACTOR = 32
"""`ivfpqr`: candidates re-ranked exactly per result wanted (k=10 re-ranks the 320 best by PQ score), unless
a search says otherwise (`SearchParams.k_factor`, which tuning sets)."""
REFINE_K_FACTORS: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
"""`ivfpqr`: the re-ranking depths tuning tries (the denser the archive, the deeper the shortlist must go)."""

FLAT_MAX_VECTORS = 20_000
"""Up to this many vectors (and if they fit in memory) search is exact (about 2 ms a query here)."""

SQRT_RULE_MAX_VECTORS = 4_000_000
"""Below this many vectors, IVF has ~4*sqrt(n) lists (4,096 at 10^6)."""

MIN_POINTS_PER_CENTROID = 39
"""FAISS k-means warns below 39 training points per centroid."""

TRAIN_POINTS_PER_CENTROID = 64
"""Training sample per IVF list (FAISS subsamples above 256 per centroid)."""

HNSW_M = 32
"""Neighbours per HNSW node (FAISS wiki: 4..64; 32 is the usual choice)."""

HNSW_EF_CONSTRUCTION = 80
"""Candidate list size while building the HNSW graph (FAISS's default is 40; higher = better graph)."""

HNSW_QUANTIZER_FROM_NLIST = 16_384
"""From this many IVF lists on, the coarse quantizer is an HNSW graph (`IVFn_HNSW32`)."""

PQ_CODE_SIZES: tuple[int, ...] = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
"""Candidate PQ code sizes (bytes per vector, = sub-quantizers of 8 bits), largest first."""

EXACT_FILTER_MAX = 4096
"""A filter allowing at most this many ids is searched exactly among them on approximate kinds: an
approximate walk restricted to a few ids misses most of them (they sit in lists or graph regions the walk
never reaches)."""

FILTER_CANDIDATES = 128
"""A filtered IVF search probes enough lists to meet about this many allowed vectors: with a selective
filter (5% of the records) the default nprobe meets only a handful of them (recall@10 0.66 at 10^5 here),
so `filtered_nprobe` raises nprobe in proportion (recall@10 0.99 at 10^5 with a 5% filter)."""

ID_BYTES = 8
MAP_BYTES_PER_VECTOR = 48
"""Rough cost of FAISS's id maps per vector (id array + hash table), for the memory estimates."""


@contextlib.contextmanager
def faiss_messages_to_stderr() -> Iterator[None]:
    """Send what FAISS's C++ code prints to stdout (on-disk lists: "resizing ...", "IO_FLAG_ONDISK_SAME_DIR:
    updating ...") to stderr instead, so that a command's stdout stays its own output (JSON)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _tune_faiss() -> None:
    # Flat search of a small query batch is ~10x faster with BLAS from 20 queries on (measured with
    # faiss-cpu 1.15.1 on 2 cores; its default threshold is far higher).
    faiss.cvar.distance_compute_blas_threshold = 20


_tune_faiss()


class VectorIndexError(Exception):
    """A vector index that cannot be built, changed, saved or loaded as asked; the message says why."""


@dataclass(frozen=True)
class SearchParams:
    """Per-call search parameters. `nprobe` is for the IVF kinds, `ef_search` for `hnsw`, `k_factor` for
    `ivfpqr` (candidates re-ranked exactly per result wanted); None = the index's construction default.
    They never change the index itself."""

    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int | None = None


# --- choosing and sizing -------------------------------------------------------------------------


def available_memory_bytes() -> int:
    """Default memory budget for an index: half the machine's physical memory (the other half is for
    the second index of an IndexStore, the embedder and the process)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def raw_bytes(n: int, dim: int) -> int:
    """Memory of `n` float32 vectors of width `dim` with their ids (flat or IVF-Flat storage)."""
    return int(n) * (4 * int(dim) + ID_BYTES + MAP_BYTES_PER_VECTOR)


def pq_bytes(n: int, code_size: int) -> int:
    """Memory of `n` PQ codes of `code_size` bytes with their ids (IVF-PQ storage)."""
    return int(n) * (int(code_size) + ID_BYTES + MAP_BYTES_PER_VECTOR)


def choose_kind(n: int, dim: int, memory_budget_bytes: int | None = None) -> IndexKind:
    """The index kind for `n` vectors of width `dim` ("auto"); see the module docstring for the rules.

    `memory_budget_bytes` defaults to half the machine's physical memory.
    """
    budget = available_memory_bytes() if memory_budget_bytes is None else int(memory_budget_bytes)
    fits = raw_bytes(n, dim) <= budget
    if n <= FLAT_MAX_VECTORS and fits:
        return "flat"
    if fits:
        return "ivf"
    return "ivfpq"


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for `n` vectors (autofaiss's `get_optimal_nb_clusters`, with the square-root
    rule kept up to 4*10^6 vectors; see the module docstring)."""
    if n < SQRT_RULE_MAX_VECTORS:
        nlist = 2 ** round(math.log2(max(1.0, 4.0 * math.sqrt(max(n, 1)))))
    elif n < 10_000_000:
        nlist = 16_384
    elif n < 300_000_000:
        nlist = 65_536
    else:
        nlist = 262_144
    return int(max(1, min(nlist, n // MIN_POINTS_PER_CENTROID)))


def train_size(n: int, nlist: int) -> int:
    """How many vectors to train IVF k-means (and PQ) on."""
    return int(min(n, TRAIN_POINTS_PER_CENTROID * nlist))


def pq_code_size(n: int, dim: int, memory_budget_bytes: int | None = None) -> int:
    """Bytes per vector for IVF-PQ: the largest candidate dividing `dim` whose codes fit the budget
    (the smallest candidate when none fits)."""
    budget = available_memory_bytes() if memory_budget_bytes is None else int(memory_budget_bytes)
    candidates = [m for m in PQ_CODE_SIZES if m <= dim and dim % m == 0] or [1]
    for m in candidates:
        if pq_bytes(n, m) <= budget:
            return m
    return candidates[-1]


def _factory_string(kind: IndexKind, dim: int, n_hint: int, pq_m: int | None, nlist: int | None = None) -> str:
    nlist = nlist or ivf_nlist(n_hint)
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_FROM_NLIST else f"IVF{nlist}"
    if kind == "ivf":
        return f"{quantizer},Flat"
    if kind == "ivfsq":
        return f"{quantizer},SQ8"
    if kind == "ivfpqr":
        m = pq_m or (dim // 2 if dim % 2 == 0 else dim)
        return f"{quantizer},PQ{m}x4fs,RFlat"
    m = pq_m or pq_code_size(n_hint, dim)
    # 8-bit codes need 256 * 39 training points; fewer bits for tiny archives.
    nbits = int(max(1, min(8, math.floor(math.log2(max(2, n_hint // MIN_POINTS_PER_CENTROID))))))
    return f"{quantizer},PQ{m}x{nbits}"


# --- the index -----------------------------------------------------------------------------------


def filtered_nprobe(nprobe: int, nlist: int, allowed: int, ntotal: int) -> int:
    """The nprobe of an IVF search restricted to `allowed` of `ntotal` vectors: at least `nprobe`, and
    enough lists to meet `FILTER_CANDIDATES` allowed vectors if they are spread evenly over the lists
    (`nlist` at most, which is exact for IVF-Flat)."""
    if allowed >= ntotal or allowed <= 0:
        return min(nprobe, nlist)
    wanted = math.ceil(FILTER_CANDIDATES * nlist / allowed)
    return int(min(nlist, max(nprobe, wanted)))


def _as_matrix(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise VectorIndexError(f"{what}: expected shape (n, {dim}), got {tuple(np.shape(vectors))}")
    if not np.isfinite(array).all():
        raise VectorIndexError(f"{what}: contains NaN or infinite values")
    return array


def _as_ids(ids: np.ndarray, what: str) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    if (array < 0).any():
        raise VectorIndexError(f"{what}: ids must be >= 0 (FAISS uses -1 for 'no result')")
    return array


def _gpu_count() -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        return 0  # faiss-cpu: no GPU support compiled in
    return int(faiss.get_num_gpus())


class VectorIndex:
    """One FAISS index with native int64 ids, searched by inner product. Build with `create`, open
    with `load`."""

    def __init__(self, index: faiss.Index, kind: IndexKind, device: Literal["auto", "cpu"] = "auto") -> None:
        self._cpu = index
        self.kind: IndexKind = kind
        self.dim = int(index.d)
        self._want_gpu = device == "auto" and kind not in ("hnsw", "ivfpqr") and _gpu_count() > 0
        self._gpu: faiss.Index | None = None
        self._gpu_resources = None
        self._gpu_lock = threading.Lock()
        self._map_lock = threading.Lock()
        self._positions: tuple[np.ndarray, np.ndarray] | None = None  # ivfpqr: (sorted ids, their positions)

    # construction

    @classmethod
    def create(
        cls,
        kind: IndexKind,
        dim: int,
        train_vectors: np.ndarray | None = None,
        *,
        n_hint: int | None = None,
        pq_m: int | None = None,
        nlist: int | None = None,
        seed: int = 0,
        device: Literal["auto", "cpu"] = "auto",
    ) -> VectorIndex:
        """A new, empty index. The IVF kinds are trained here on `train_vectors` (required; a random
        sample of `train_size` of them is used); `n_hint` (default: the number of training vectors) is the
        expected archive size that sets `nlist` (unless given) and the PQ code size."""
        if kind not in KINDS:
            raise VectorIndexError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "flat":
            index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index = faiss.IndexIDMap2(inner)
        else:
            if train_vectors is None or len(train_vectors) == 0:
                raise VectorIndexError(f"a {kind} index needs training vectors")
            train = _as_matrix(train_vectors, dim, "training vectors")
            n = int(n_hint or len(train))
            if nlist is not None and not 1 <= nlist <= len(train):
                raise VectorIndexError(f"nlist must be between 1 and the {len(train)} training vectors, not {nlist}")
            index = faiss.index_factory(dim, _factory_string(kind, dim, n, pq_m, nlist), faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed
            if kind == "ivfpqr":
                faiss.downcast_index(index).k_factor = REFINE_K_FACTOR
            if kind == "ivfpq":
                # Polysemous training (index_factory's default for PQ) takes minutes and is only used
                # for Hamming-distance pre-filtering, which this index does not do.
                faiss.downcast_index(ivf).do_polysemous_training = False
            sample = train_size(len(train), ivf.nlist)
            if sample < len(train):
                train = train[np.random.default_rng(seed).choice(len(train), sample, replace=False)]
            index.train(train)
            if kind == "ivfpqr":
                index = faiss.IndexIDMap2(index)
            else:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return cls(index, kind, device)

    # properties

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._cpu.ntotal)

    @property
    def ondisk(self) -> bool:
        """True for an IVF index whose inverted lists live in a memory-mapped `.ivfdata` file
        (`index.ivf_build`); such an index is read-only."""
        if self.kind not in ONDISK_KINDS:
            return False
        invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(self._cpu).invlists)
        return isinstance(invlists, faiss.OnDiskInvertedLists)

    def faiss_index(self) -> faiss.Index:
        """The underlying (CPU) FAISS index, for code that builds indexes from it (`index.ivf_build`)."""
        return self._cpu

    def _check_writable(self, what: str) -> None:
        if self.ondisk:
            raise VectorIndexError(
                f"{what}: this index's inverted lists are a memory-mapped on-disk file (read-only); rebuild the "
                "index to change it"
            )

    @property
    def device(self) -> str:
        """Where unfiltered searches run: "cpu" or "gpu" (this FAISS build sees a GPU and the kind
        supports it)."""
        return "gpu" if self._want_gpu else "cpu"

    def describe(self) -> dict[str, int | str]:
        """The construction parameters, for index.json."""
        out: dict[str, int | str] = {"kind": self.kind, "dim": self.dim, "ntotal": self.ntotal}
        if self.kind in IVF_KINDS:
            ivf = faiss.extract_index_ivf(self._cpu)
            out["nlist"] = int(ivf.nlist)
            if self.kind in ("ivfpq", "ivfpqr"):
                pq = faiss.downcast_index(ivf).pq
                out["pq_m"] = int(pq.M)
                out["pq_nbits"] = int(pq.nbits)
            if self.kind == "ivfpqr":
                out["refine_k_factor"] = int(self._refine().k_factor)
        elif self.kind == "hnsw":
            out["hnsw_m"] = HNSW_M
        return out

    def ids(self) -> np.ndarray:
        """All ids in the index (int64), in storage order."""
        if self.kind in ID_MAP_KINDS:
            return faiss.vector_to_array(faiss.downcast_index(self._cpu).id_map).astype(np.int64)
        invlists = faiss.extract_index_ivf(self._cpu).invlists
        parts = [
            faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
            for i in range(invlists.nlist)
            if invlists.list_size(i) > 0
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def _ensure_direct_map(self) -> None:
        """An on-disk index gets its id -> list map on first use, not at open: building it reads every
        list's ids (at 10^7 vectors, seconds and hundreds of MB) that a plain search never needs."""
        if not self.ondisk:
            return
        with self._map_lock:
            ivf = faiss.extract_index_ivf(self._cpu)
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of `ids` (approximate for ivfpq). Raises VectorIndexError for an unknown id."""
        wanted = _as_ids(ids, "reconstruct")
        self._ensure_direct_map()
        out = np.zeros((len(wanted), self.dim), dtype=np.float32)
        for row, identifier in enumerate(wanted):
            try:
                out[row] = self._cpu.reconstruct(int(identifier))
            except RuntimeError:
                raise VectorIndexError(f"id {int(identifier)} is not in the index") from None
        return out

    # mutation

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under the given ids. The ids must be new (the caller keeps them unique: the
        metadata table's primary key does)."""
        self._check_writable("add")
        matrix = _as_matrix(vectors, self.dim, "add")
        identifiers = _as_ids(ids, "add")
        if len(identifiers) != len(matrix):
            raise VectorIndexError(f"add: {len(matrix)} vectors but {len(identifiers)} ids")
        if len(np.unique(identifiers)) != len(identifiers):
            raise VectorIndexError("add: repeated ids in one call")
        if len(matrix):
            self._cpu.add_with_ids(matrix, identifiers)
            self._gpu = None
            self._positions = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id; returns how many were removed (unknown ids are ignored)."""
        identifiers = _as_ids(ids, "remove")
        if len(identifiers) == 0:
            return 0
        self._check_writable("remove")
        before = self.ntotal
        if self.kind == "hnsw":
            self._rebuild_hnsw_without(identifiers)
        elif self.kind == "ivfpqr":
            self._refill_without(identifiers)
        else:
            # IDSelectorArray: IVF's hash-table direct map only removes through an explicit id list.
            self._cpu.remove_ids(faiss.IDSelectorArray(identifiers))
        self._gpu = None
        self._positions = None
        return before - self.ntotal

    def _refine(self) -> faiss.IndexRefine:
        """ivfpqr: the re-ranking index inside the id map."""
        return faiss.downcast_index(faiss.downcast_index(self._cpu).index)

    def _refill_without(self, removed: np.ndarray) -> None:
        """ivfpqr (FAISS cannot remove from it): empty the trained index and add back the kept vectors,
        read exactly from its re-ranking store."""
        current = self.ids()
        keep = ~np.isin(current, removed)
        if keep.all():
            return
        vectors = self._refine().refine_index.reconstruct_n(0, len(current))[keep]
        id_map = faiss.downcast_index(self._cpu)
        id_map.reset()
        if len(vectors):
            id_map.add_with_ids(vectors, current[keep])
        id_map.construct_rev_map()  # `reset` leaves the removed ids in the reverse map

    def _internal_positions(self, allowed: np.ndarray) -> np.ndarray:
        """ivfpqr: the id map's positions of the `allowed` ids present (what the inner index's selector
        sees: FAISS translates a selector for the id map, not for the IVF index under the re-ranking)."""
        with self._map_lock:
            if self._positions is None:
                ids = self.ids()
                order = np.argsort(ids, kind="stable")
                self._positions = (ids[order], order.astype(np.int64))
            sorted_ids, positions = self._positions
        at = np.clip(np.searchsorted(sorted_ids, allowed), 0, max(len(sorted_ids) - 1, 0))
        found = sorted_ids[at] == allowed if len(sorted_ids) else np.zeros(len(allowed), dtype=bool)
        return positions[at[found]]

    def _rebuild_hnsw_without(self, removed: np.ndarray) -> None:
        current = self.ids()
        keep = ~np.isin(current, removed)
        if keep.all():
            return
        inner = faiss.downcast_index(faiss.downcast_index(self._cpu).index)
        vectors = inner.reconstruct_n(0, inner.ntotal)[keep]
        rebuilt = VectorIndex.create("hnsw", self.dim, device="cpu")
        rebuilt_inner = faiss.downcast_index(faiss.downcast_index(rebuilt._cpu).index)
        rebuilt_inner.hnsw.efConstruction = inner.hnsw.efConstruction
        rebuilt_inner.hnsw.efSearch = inner.hnsw.efSearch
        rebuilt.add(vectors, current[keep])
        self._cpu = rebuilt._cpu

    # search

    def _parameters(
        self, params: SearchParams | None, selector: faiss.IDSelector | None
    ) -> faiss.SearchParameters | None:
        """A fresh FAISS parameter object for one call (None when there is nothing to set: FAISS GPU
        indexes refuse parameter types they do not handle)."""
        params = params or SearchParams()
        out: faiss.SearchParameters | None = None
        if self.kind in IVF_KINDS:
            ivf = faiss.extract_index_ivf(self._cpu)
            nprobe = int(params.nprobe or ivf.nprobe)
            out = faiss.SearchParametersIVF(nprobe=min(nprobe, int(ivf.nlist)))
            if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSWFlat):
                out.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(2 * nprobe, 64))
            if self.kind == "ivfpqr":
                # The selector (already over id-map positions) goes to the IVF search, under the re-ranking.
                if selector is not None:
                    out.sel = selector
                k_factor = float(params.k_factor or self._refine().k_factor)
                return faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=out)
        elif self.kind == "hnsw" and params.ef_search is not None:
            out = faiss.SearchParametersHNSW(efSearch=int(params.ef_search))
        if selector is not None:
            out = out or faiss.SearchParameters()
            out.sel = selector
        return out

    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` by inner product: (scores float32 (nq, k), ids int64 (nq, k)), best first.

        `allowed_ids` restricts the results to those ids. On flat it is exact; on approximate kinds a
        filter of at most `EXACT_FILTER_MAX` ids is searched exactly among their stored vectors, a wider
        one through FAISS's `IDSelectorBatch`, on IVF kinds with nprobe raised by `filtered_nprobe` (so
        that a selective filter keeps the index's recall). Missing results (fewer than `k` candidates)
        have id -1 and score -inf.
        """
        matrix = _as_matrix(queries, self.dim, "search")
        if k < 1:
            raise VectorIndexError(f"search: k must be >= 1, got {k}")
        nq = len(matrix)
        empty = (np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64))
        if nq == 0 or self.ntotal == 0:
            return empty
        selector = None
        allowed = None
        if allowed_ids is not None:
            allowed = _as_ids(allowed_ids, "allowed_ids")
            if len(allowed) == 0:
                return empty
            if self.kind != "flat" and len(allowed) <= EXACT_FILTER_MAX:
                return self._search_among(matrix, k, allowed)
            if self.kind == "ivfpqr":
                inside = self._internal_positions(allowed)
                if len(inside) == 0:
                    return empty
                selector = faiss.IDSelectorBatch(inside)
            else:
                selector = faiss.IDSelectorBatch(allowed)
            if self.kind in IVF_KINDS:
                ivf = faiss.extract_index_ivf(self._cpu)
                nprobe = int((params or SearchParams()).nprobe or ivf.nprobe)
                wider = filtered_nprobe(nprobe, int(ivf.nlist), len(allowed), self.ntotal)
                params = dataclasses.replace(params or SearchParams(), nprobe=wider)
        search_params = self._parameters(params, selector)
        if selector is None and self._want_gpu:
            with self._gpu_lock:
                scores, ids = self._gpu_index().search(matrix, k, params=search_params)
        else:
            scores, ids = self._cpu.search(matrix, k, params=search_params)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def _search_among(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._ensure_direct_map()
        wanted = np.unique(allowed)
        try:
            present, matrix = wanted, self._cpu.reconstruct_batch(wanted)
        except RuntimeError:  # some id is not in the index: one by one, skipping those
            kept, rows = [], []
            for identifier in wanted.tolist():
                try:
                    rows.append(self._cpu.reconstruct(int(identifier)))
                except RuntimeError:
                    continue
                kept.append(int(identifier))
            present = np.asarray(kept, dtype=np.int64)
            matrix = np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if len(present) == 0:
            return scores, ids
        similarity = queries @ matrix.T
        top = min(k, len(present))
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :top]
        scores[:, :top] = np.take_along_axis(similarity, order, axis=1)
        ids[:, :top] = present[order]
        return scores, ids

    def _gpu_index(self) -> faiss.Index:
        # Called with the GPU lock held.
        if self._gpu is None:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._cpu)
        return self._gpu

    # files

    def save(self, path: Path) -> None:
        """Write the index atomically (`index.atomic`): a temporary file in the same folder, fsync, then
        `os.replace`. A crash leaves the previous file (if any) untouched."""
        with atomic_target(Path(path)) as temp:
            faiss.write_index(self._cpu, str(temp))

    @classmethod
    def load(cls, path: Path, device: Literal["auto", "cpu"] = "auto") -> VectorIndex:
        """Read an index written by `save` or `index.ivf_build`; the kind is read from the FAISS structure.
        An on-disk index's `.ivfdata` file is looked for beside `path` and memory-mapped read-only."""
        path = Path(path)
        if not path.is_file():
            raise VectorIndexError(f"index file not found: {path}")
        try:
            with faiss_messages_to_stderr():
                index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError as error:
            raise VectorIndexError(f"{path}: not a readable FAISS index ({str(error).splitlines()[0]})") from None
        loaded = cls(index, _kind_of(index, path), device)
        if loaded.ondisk:
            loaded._want_gpu = False  # the lists stay on disk: cloning them to a GPU would read them all
        return loaded

    @classmethod
    def from_bytes(cls, data: bytes, path: Path, device: Literal["auto", "cpu"] = "auto") -> VectorIndex:
        """An index from the bytes of a file written by `save` (`path` only names it in errors). Loading
        the very bytes whose checksum was verified leaves no window for the file to change in between."""
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as error:
            raise VectorIndexError(f"{path}: not a readable FAISS index ({str(error).splitlines()[0]})") from None
        return cls(index, _kind_of(index, path), device)


def _kind_of(index: faiss.Index, path: Path) -> IndexKind:
    concrete = faiss.downcast_index(index)
    if isinstance(concrete, faiss.IndexIDMap2):
        inner = faiss.downcast_index(concrete.index)
        if isinstance(inner, faiss.IndexFlat):
            return "flat"
        if isinstance(inner, faiss.IndexHNSWFlat):
            return "hnsw"
        if isinstance(inner, faiss.IndexRefine):
            return "ivfpqr"
    if isinstance(concrete, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(concrete, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(concrete, faiss.IndexIVFScalarQuantizer):
        return "ivfsq"
    raise VectorIndexError(f"{path}: unsupported FAISS index type {type(concrete).__name__}")


# --- recall --------------------------------------------------------------------------------------


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-`k` ids by inner product (brute force with a temporary flat index)."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = faiss.IndexFlatIP(matrix.shape[1])
    flat.add(matrix)
    _, rows = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    id_array = np.asarray(ids, dtype=np.int64)
    return np.where(rows < 0, -1, id_array[np.clip(rows, 0, None)])


def measure_recall(
    index: VectorIndex,
    exact: VectorIndex | np.ndarray,
    queries: np.ndarray,
    k: int = 10,
    params: SearchParams | None = None,
    exact_ids: np.ndarray | None = None,
) -> float:
    """Recall@k of `index` against exact search: the mean share of each query's exact top-`k` ids that
    the index also returns in its top-`k` ("k-recall@k", as autofaiss reports it).

    `exact` is a flat `VectorIndex` or the raw vectors (ids `exact_ids`, default 0..n-1).
    """
    if isinstance(exact, VectorIndex):
        truth = exact.search(queries, k)[1]
    else:
        ids = np.arange(len(exact), dtype=np.int64) if exact_ids is None else exact_ids
        truth = exact_search(exact, ids, queries, k)
    return recall_at_k(index.search(queries, k, params)[1], truth)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true top-k ids (>= 0) that `found` also holds ("k-recall@k")."""
    hits = total = 0
    for true_row, found_row in zip(truth, found, strict=True):
        wanted = set(true_row[true_row >= 0].tolist())
        total += len(wanted)
        hits += len(wanted.intersection(found_row.tolist()))
    return 1.0 if total == 0 else hits / total


def tune_search_params(
    index: VectorIndex,
    vectors: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    target_recall: float = 0.95,
    k: int = 10,
) -> tuple[SearchParams, float]:
    """The cheapest per-call parameters reaching `target_recall` at k (powers of two for nprobe,
    efSearch from 16), with the recall measured; the most thorough tried when none reaches it.
    A flat index needs none: (SearchParams(), 1.0)."""
    if index.kind == "flat":
        return SearchParams(), 1.0
    truth_index = VectorIndex(faiss.IndexIDMap2(faiss.IndexFlatIP(index.dim)), "flat", device="cpu")
    truth_index.add(vectors, ids)
    return tune_against_truth(index, queries, truth_index.search(queries, k)[1], target_recall, k)


def _tune_refined(
    index: VectorIndex, queries: np.ndarray, truth: np.ndarray, target_recall: float, k: int, probes: list[int]
) -> tuple[SearchParams, float]:
    """ivfpqr: the fewest lists whose deepest re-ranking reaches the target, then the shallowest re-ranking
    that still does at that nprobe (the list scan is the cost; re-ranking a few hundred more is not)."""
    best: tuple[SearchParams, float] = (SearchParams(nprobe=probes[-1], k_factor=REFINE_K_FACTORS[-1]), 0.0)
    for nprobe in probes:
        deepest = SearchParams(nprobe=nprobe, k_factor=REFINE_K_FACTORS[-1])
        best = (deepest, recall_at_k(index.search(queries, k, deepest)[1], truth))
        if best[1] < target_recall:
            continue
        for k_factor in REFINE_K_FACTORS[:-1]:
            candidate = SearchParams(nprobe=nprobe, k_factor=k_factor)
            recall = recall_at_k(index.search(queries, k, candidate)[1], truth)
            if recall >= target_recall:
                return candidate, recall
        return best
    return best


def tune_against_truth(
    index: VectorIndex, queries: np.ndarray, truth: np.ndarray, target_recall: float = 0.95, k: int = 10
) -> tuple[SearchParams, float]:
    """`tune_search_params` with the exact top-`k` ids of `queries` given (e.g. from a scan over shards)."""
    if index.kind == "flat":
        return SearchParams(), 1.0
    if index.kind == "hnsw":
        candidates = [SearchParams(ef_search=ef) for ef in (16, 32, 64, 128, 256, 512, 1024) if ef >= k]
    else:
        nlist = int(faiss.extract_index_ivf(index._cpu).nlist)
        probes = [p for p in (2**i for i in range(20)) if p < nlist] + [nlist]
        if index.kind == "ivfpqr":
            return _tune_refined(index, queries, truth, target_recall, k, probes)
        candidates = [SearchParams(nprobe=p) for p in probes]
    best: tuple[SearchParams, float] = (candidates[-1], 0.0)
    for candidate in candidates:
        recall = recall_at_k(index.search(queries, k, candidate)[1], truth)
        best = (candidate, recall)
        if recall >= target_recall:
            break
    return best
