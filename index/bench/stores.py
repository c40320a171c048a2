"""`retina-index bench-stores`: FAISS and Milvus side by side on the same vectors and the same filters.

For each size, clustered vectors drawn like real embeddings (`synthetic_mixture`) get metadata rows whose
ICDR grades follow BRSET's proportions (`ICDR_SHARES`: ICDR >= 2 is about 5% of the records, the
selective filter), drawn independently of the vectors (the harder case for an approximate index: the
allowed records are spread over every list). Both stores index the same vectors with the same kind
(`choose_kind`; milvus-lite 2.5 builds only FLAT and IVF_FLAT) and tune their search parameters to
recall@10 >= 0.95 on indexed vectors. Held-out queries then measure (FAISS with one OpenMP thread, as
`retina-serve` searches), one query at a time, through the
same calls the service makes (`IndexStore.search`: the metadata table's allowed ids + FAISS, or a Milvus
filter expression): p50/p99 and recall@10 against exact search, unfiltered and filtered (exact filtered
search: brute force over the allowed records).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from index.bench.search import synthetic_mixture
from index.metadata import Filters, Labels, MetadataRow, MetadataTable
from index.vector_index import (
    IVF_KINDS,
    IndexKind,
    SearchParams,
    VectorIndex,
    choose_kind,
    exact_search,
    filtered_nprobe,
    recall_at_k,
    tune_search_params,
)

K = 10
ICDR_SHARES: tuple[float, ...] = (0.935, 0.015, 0.03, 0.01, 0.01)
"""ICDR 0-4 shares of the synthetic rows (BRSET: 93.5% ICDR 0)."""
SELECTIVE = Filters(icdr=[2, 3, 4])
TUNE_QUERIES = 200

Progress = Callable[[str], None]


@dataclass
class StoreRow:
    """One store at one size."""

    store: str
    n: int
    kind: str
    build_seconds: float
    search: dict[str, int | None]
    p50_ms: float
    p99_ms: float
    recall_at_10: float
    filtered_share: float
    filtered_p50_ms: float
    filtered_p99_ms: float
    filtered_recall_at_10: float

    def as_dict(self) -> dict[str, object]:
        """The row as JSON-ready data."""
        return asdict(self)


def synthetic_rows(n: int, seed: int) -> list[MetadataRow]:
    """Rows with BRSET-like ICDR grades, independent of the vectors."""
    grades = np.random.default_rng([seed, 7]).choice(len(ICDR_SHARES), size=n, p=ICDR_SHARES)
    eyes = ("right", "left")
    return [
        MetadataRow(id=i, image_id=f"img{i:08d}", path=f"photos/img{i:08d}.jpg",
                    labels=Labels(icdr=int(grade), sdrg=int(grade), exam_eye=eyes[i % 2], patient_age=40 + i % 40))
        for i, grade in enumerate(grades.tolist())
    ]


def _timed(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    found, latencies = [], []
    for row in range(len(queries)):
        start = time.perf_counter()
        found.append(search(queries[row : row + 1])[0])
        latencies.append((time.perf_counter() - start) * 1000)
    return np.stack(found), latencies


def _row(store: str, n: int, kind: str, build: float, params: SearchParams, plain: tuple[np.ndarray, list[float]],
         filtered: tuple[np.ndarray, list[float]], truth: np.ndarray, filtered_truth: np.ndarray,
         share: float) -> StoreRow:
    return StoreRow(
        store=store, n=n, kind=kind, build_seconds=round(build, 3),
        search={"nprobe": params.nprobe, "ef_search": params.ef_search},
        p50_ms=round(float(np.percentile(plain[1], 50)), 3), p99_ms=round(float(np.percentile(plain[1], 99)), 3),
        recall_at_10=round(recall_at_k(plain[0], truth), 4), filtered_share=round(share, 4),
        filtered_p50_ms=round(float(np.percentile(filtered[1], 50)), 3),
        filtered_p99_ms=round(float(np.percentile(filtered[1], 99)), 3),
        filtered_recall_at_10=round(recall_at_k(filtered[0], filtered_truth), 4),
    )


def bench_faiss(vectors: np.ndarray, rows: list[MetadataRow], kind: IndexKind, queries: np.ndarray,
                truth: np.ndarray, filtered_truth: np.ndarray, seed: int) -> StoreRow:
    """The FAISS store: `VectorIndex` + the metadata table's allowed ids, as `IndexStore.search` does."""
    ids = np.arange(len(vectors), dtype=np.int64)
    metadata = MetadataTable.in_memory()
    metadata.insert(rows)
    started = time.perf_counter()
    index = VectorIndex.create(kind, vectors.shape[1], vectors, n_hint=len(vectors), seed=seed, device="cpu")
    index.add(vectors, ids)
    tune = vectors[np.random.default_rng(seed).choice(len(vectors), TUNE_QUERIES, replace=False)]
    params, _ = tune_search_params(index, vectors, ids, tune)
    build = time.perf_counter() - started

    def filtered_search(query: np.ndarray) -> np.ndarray:
        return index.search(query, K, params, metadata.allowed_ids(SELECTIVE))[1]

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # as the service searches (RETINA_FAISS_THREADS=1)
    try:
        plain = _timed(lambda query: index.search(query, K, params)[1], queries)
        filtered = _timed(filtered_search, queries)
    finally:
        faiss.omp_set_num_threads(before)
    allowed = metadata.allowed_ids(SELECTIVE)
    share = 0.0 if allowed is None else len(allowed) / len(rows)
    metadata.close()
    return _row("faiss", len(vectors), kind, build, params, plain, filtered, truth, filtered_truth, share)


def bench_milvus(vectors: np.ndarray, rows: list[MetadataRow], kind: IndexKind, queries: np.ndarray,
                 truth: np.ndarray, filtered_truth: np.ndarray, uri: str, seed: int) -> StoreRow:
    """The Milvus store: one collection with the scalar fields, filters as Milvus expressions."""
    from index.milvus_store import DEFAULT_NPROBE, TIMEOUT_S, MilvusVectors, tune_milvus_search

    ids = np.arange(len(vectors), dtype=np.int64)
    name = f"bench_{len(vectors)}_{kind}"
    started = time.perf_counter()
    collection = MilvusVectors.create(uri, name, kind, vectors.shape[1], len(vectors))
    try:
        collection.add(vectors, rows)
        collection.client.flush(name, timeout=TIMEOUT_S)
        tune = vectors[np.random.default_rng(seed).choice(len(vectors), TUNE_QUERIES, replace=False)]
        params, _ = tune_milvus_search(collection, vectors, ids, tune, 0.95)
        build = time.perf_counter() - started
        plain = _timed(lambda query: collection.search(query, K, params)[1], queries)
        # As `MilvusIndexStore.search` does: IVF's nprobe raised for the filter's share of the records.
        allowed = int(np.isin([row.labels.icdr for row in rows], SELECTIVE.icdr or []).sum())
        nlist = int(collection.describe().get("nlist", 1))
        wider = SearchParams(nprobe=filtered_nprobe(params.nprobe or DEFAULT_NPROBE, nlist, allowed, len(rows)))
        filtered_params = wider if kind in IVF_KINDS else params
        filtered = _timed(lambda query: collection.search(query, K, filtered_params, SELECTIVE)[1], queries)
    finally:
        collection.client.drop_collection(name)
    share = float(np.isin([row.labels.icdr for row in rows], SELECTIVE.icdr or []).mean())
    return _row("milvus", len(vectors), kind, build, params, plain, filtered, truth, filtered_truth, share)


def run_store_bench(sizes: list[int], queries: int = 300, dim: int = 256, milvus_uri: str | None = None,
                    seed: int = 0, progress: Progress = lambda message: None) -> list[StoreRow]:
    """Both stores at each size (Milvus at `milvus_uri`, default a milvus-lite file in a temporary folder)."""
    mixture = synthetic_mixture(dim, seed=seed)
    out: list[StoreRow] = []
    with tempfile.TemporaryDirectory(prefix="retina-bench-stores-") as scratch:
        uri = milvus_uri or str(Path(scratch) / "bench.db")
        for n in sizes:
            rng = np.random.default_rng([seed, n])
            vectors = mixture.sample(n, rng)
            held_out = mixture.sample(queries, rng)
            rows = synthetic_rows(n, seed)
            ids = np.arange(n, dtype=np.int64)
            allowed = np.isin([row.labels.icdr for row in rows], SELECTIVE.icdr or [])
            truth = exact_search(vectors, ids, held_out, K)
            filtered_truth = exact_search(vectors[allowed], ids[allowed], held_out, K)
            kind = choose_kind(n, dim)
            progress(f"n={n:,}: FAISS {kind}")
            out.append(bench_faiss(vectors, rows, kind, held_out, truth, filtered_truth, seed))
            progress(f"n={n:,}: Milvus {kind}")
            out.append(bench_milvus(vectors, rows, kind, held_out, truth, filtered_truth, uri, seed))
    return out
