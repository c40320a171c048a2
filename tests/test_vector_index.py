"""The FAISS wrapper: exactness, approximate recall on clustered data, per-call parameters, filters,
removal by id, atomic saves and the "auto" rules."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import vector_index
from index.vector_index import (
    SearchParams,
    VectorIndex,
    VectorIndexError,
    choose_kind,
    ivf_nlist,
    measure_recall,
    tune_search_params,
)

DIM = 64


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int = DIM, clusters: int = 100, seed: int = 0) -> np.ndarray:
    """A gaussian mixture on the sphere: uniform random vectors make every approximate index look
    broken (their nearest neighbours are barely nearer than anything else)."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((clusters, dim)))
    labels = rng.integers(0, clusters, n)
    return normalise(centres[labels] + 0.5 * rng.standard_normal((n, dim)) / np.sqrt(dim))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = clustered(20_200, seed=1)
    vectors, queries = points[:20_000], points[20_000:]  # held-out queries from the same mixture
    ids = np.arange(20_000, dtype=np.int64) * 7 + 3  # not row numbers: ids must be native
    return vectors, ids, queries


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_flat_is_exact(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, ids, queries = data
    index = VectorIndex.create("flat", DIM)
    index.add(vectors, ids)
    scores, found = index.search(queries, 10)
    want_scores, want_ids = brute_force(vectors, ids, queries, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert (found == want_ids).mean() > 0.999  # ties at the 6th decimal may swap
    assert index.ntotal == len(vectors) and index.kind == "flat" and index.device == "cpu"
    assert measure_recall(index, vectors, queries, 10, exact_ids=ids) > 0.999


@pytest.mark.parametrize(
    ("kind", "params"),
    [("ivf", SearchParams(nprobe=16)), ("ivfsq", SearchParams(nprobe=16)),
     ("ivfpqr", SearchParams(nprobe=16)), ("hnsw", SearchParams(ef_search=64))],
)
def test_approximate_recall_on_clustered_data(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], kind: str, params: SearchParams
) -> None:
    vectors, ids, queries = data
    index = VectorIndex.create(kind, DIM, train_vectors=vectors)  # type: ignore[arg-type]
    index.add(vectors, ids)
    assert measure_recall(index, vectors, queries, 10, params, exact_ids=ids) >= 0.95
    tuned, recall = tune_search_params(index, vectors, ids, queries)
    assert recall >= 0.95 and tuned != SearchParams()


def test_ivfpq_builds_and_finds_neighbours(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, ids, queries = data
    index = VectorIndex.create("ivfpq", DIM, train_vectors=vectors, pq_m=16)
    index.add(vectors, ids)
    assert index.describe()["pq_m"] == 16
    assert measure_recall(index, vectors, queries, 10, SearchParams(nprobe=32), exact_ids=ids) > 0.5


def test_search_params_per_call_leave_the_index_unchanged(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, ids, queries = data
    index = VectorIndex.create("ivf", DIM, train_vectors=vectors)
    index.add(vectors, ids)
    ivf = faiss.extract_index_ivf(index._cpu)
    before = ivf.nprobe
    low = measure_recall(index, vectors, queries, 10, SearchParams(nprobe=1), exact_ids=ids)
    high = measure_recall(index, vectors, queries, 10, SearchParams(nprobe=64), exact_ids=ids)
    assert high > low
    assert ivf.nprobe == before == 1

    hnsw = VectorIndex.create("hnsw", DIM)
    hnsw.add(vectors[:2000], ids[:2000])
    inner = faiss.downcast_index(faiss.downcast_index(hnsw._cpu).index)
    ef = inner.hnsw.efSearch
    hnsw.search(queries, 10, SearchParams(ef_search=300))
    assert inner.hnsw.efSearch == ef


def test_concurrent_searches_with_different_params(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Per-call parameters make concurrent searches independent (no shared nprobe to race on)."""
    vectors, ids, queries = data
    index = VectorIndex.create("ivf", DIM, train_vectors=vectors)
    index.add(vectors, ids)
    settings = [SearchParams(nprobe=1), SearchParams(nprobe=64)] * 8
    serial = [index.search(queries, 10, p)[1] for p in settings]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda p: index.search(queries, 10, p)[1], settings))
    for got, want in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(serial[0], serial[1])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfsq", "ivfpqr"])
def test_filters_return_only_allowed_ids(data: tuple[np.ndarray, np.ndarray, np.ndarray], kind: str) -> None:
    vectors, ids, queries = data
    index = VectorIndex.create(kind, DIM, train_vectors=vectors)  # type: ignore[arg-type]
    index.add(vectors, ids)
    params = SearchParams(nprobe=16, ef_search=64)
    # wide: through FAISS's IDSelectorBatch; narrow: exact among the allowed ids' stored vectors
    wide, narrow = ids[::2], ids[::97]
    assert len(wide) > vector_index.EXACT_FILTER_MAX >= len(narrow)
    for allowed in (wide, narrow):
        scores, found = index.search(queries[:50], 10, params, allowed_ids=allowed)
        assert (found >= 0).all() and np.isin(found, allowed).all()
        rows = np.flatnonzero(np.isin(ids, allowed))
        want_scores, want = brute_force(vectors[rows], ids[rows], queries[:50], 10)
        exact = kind == "flat" or (allowed is narrow and kind != "ivfsq")  # SQ8 stores approximate vectors
        if exact:
            assert (found == want).mean() > 0.999
        else:
            assert np.mean([len(set(f) & set(w)) / 10 for f, w in zip(found, want, strict=True)]) > 0.9
        if exact:
            np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # nothing allowed: nothing returned; fewer allowed than k: the rest is -1; unknown allowed ids ignored
    assert (index.search(queries[:2], 5, allowed_ids=np.array([], dtype=np.int64))[1] == -1).all()
    scores, few = index.search(queries[:2], 5, params, allowed_ids=np.array([ids[0], ids[1], 10**12]))
    assert set(few[:, :2].ravel()) == set(ids[:2]) and (few[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfsq", "ivfpq", "ivfpqr"])
def test_removed_ids_are_never_returned(data: tuple[np.ndarray, np.ndarray, np.ndarray], kind: str) -> None:
    vectors, ids, _ = data
    index = VectorIndex.create(kind, DIM, train_vectors=vectors, pq_m=16)  # type: ignore[arg-type]
    index.add(vectors[:3000], ids[:3000])
    removed = ids[:3000:3]
    assert index.remove(np.concatenate([removed, [10**12]])) == len(removed)  # unknown ids ignored
    assert index.ntotal == 3000 - len(removed)
    # the removed vectors themselves as queries: their best match used to be themselves
    found = index.search(vectors[:3000:3][:200], 10, SearchParams(nprobe=64, ef_search=128))[1]
    assert not np.isin(found, removed).any()
    assert set(index.ids().tolist()) == set(ids[:3000].tolist()) - set(removed.tolist())
    with pytest.raises(VectorIndexError, match="not in the index"):
        index.reconstruct(removed[:1])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfsq", "ivfpq", "ivfpqr"])
def test_save_load_round_trip(tmp_path: Path, data: tuple[np.ndarray, np.ndarray, np.ndarray], kind: str) -> None:
    vectors, ids, queries = data
    index = VectorIndex.create(kind, DIM, train_vectors=vectors, pq_m=16)  # type: ignore[arg-type]
    index.add(vectors[:3000], ids[:3000])
    path = tmp_path / "sub" / f"{kind}.faiss"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert loaded.kind == kind and loaded.ntotal == 3000 and loaded.dim == DIM
    params = SearchParams(nprobe=8, ef_search=64)
    for got, want in zip(loaded.search(queries, 5, params), index.search(queries, 5, params), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(loaded.reconstruct(ids[5:6]), index.reconstruct(ids[5:6]))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_save_is_atomic_when_the_write_crashes(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, ids, queries = data
    path = tmp_path / "image.faiss"
    good = VectorIndex.create("flat", DIM)
    good.add(vectors[:100], ids[:100])
    good.save(path)
    before = path.read_bytes()

    real_write = faiss.write_index

    def crash(index: faiss.Index, name: str) -> None:
        real_write(index, name)  # the temporary file exists, fully written ...
        with open(name, "r+b") as handle:  # ... or half written
            handle.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    bigger = VectorIndex.create("flat", DIM)
    bigger.add(vectors[:500], ids[:500])
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["image.faiss"]
    assert VectorIndex.load(path).ntotal == 100


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VectorIndexError, match="not found"):
        VectorIndex.load(tmp_path / "missing.faiss")
    junk = tmp_path / "junk.faiss"
    junk.write_bytes(b"not faiss")
    with pytest.raises(VectorIndexError, match="junk.faiss"):
        VectorIndex.load(junk)


def test_bad_input_is_refused(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, ids, _ = data
    index = VectorIndex.create("flat", DIM)
    with pytest.raises(VectorIndexError, match=r"\(n, 64\)"):
        index.add(vectors[:, :10], ids)
    with pytest.raises(VectorIndexError, match="repeated ids"):
        index.add(vectors[:2], np.array([1, 1]))
    with pytest.raises(VectorIndexError, match=">= 0"):
        index.add(vectors[:1], np.array([-5]))
    with pytest.raises(VectorIndexError, match="training vectors"):
        VectorIndex.create("ivf", DIM)
    with pytest.raises(VectorIndexError, match="unknown index kind"):
        VectorIndex.create("lsh", DIM)  # type: ignore[arg-type]


def test_choose_kind_rules() -> None:
    gib = 1 << 30
    assert choose_kind(10_000, 512, memory_budget_bytes=16 * gib) == "flat"
    assert choose_kind(20_000, 512, memory_budget_bytes=16 * gib) == "flat"
    assert choose_kind(20_001, 512, memory_budget_bytes=16 * gib) == "ivf"  # flat would be too slow a query
    assert choose_kind(1_000_000, 512, memory_budget_bytes=16 * gib) == "ivf"  # 2 GB of raw vectors
    assert choose_kind(100_000_000, 512, memory_budget_bytes=64 * gib) == "ivfpq"  # 205 GB raw
    assert choose_kind(100_000_000, 512, memory_budget_bytes=1024 * gib) == "ivf"  # fits, too many for flat
    assert choose_kind(5_000_000, 256, memory_budget_bytes=64 * gib) == "ivf"
    assert choose_kind(1_000_000, 512, memory_budget_bytes=1 * gib) == "ivfpq"  # does not fit
    assert choose_kind(10_000, 512) == "flat"  # default budget: half the machine's memory
    # nlist: ~4 sqrt(n) as a power of two, >= 39 training points per list, fixed sizes for big n
    assert ivf_nlist(10_000) == 256
    assert ivf_nlist(100_000) == 1024
    assert ivf_nlist(1_000_000) == 4096
    assert ivf_nlist(5_000_000) == 16_384
    assert ivf_nlist(100_000_000) == 65_536
    assert ivf_nlist(60) == 1 and ivf_nlist(1000) == 25
    assert vector_index.pq_code_size(100_000_000, 512, 64 * gib) == 128  # 18 GB of codes fit
    assert vector_index.pq_code_size(100_000_000, 512, 10 * gib) == 32


def test_ivfpqr_tunes_its_reranking_depth_and_deeper_finds_more(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    vectors, ids, queries = data
    index = VectorIndex.create("ivfpqr", DIM, train_vectors=vectors)
    index.add(vectors, ids)
    shallow = measure_recall(index, vectors, queries, 10, SearchParams(nprobe=16, k_factor=1), exact_ids=ids)
    deep = measure_recall(index, vectors, queries, 10, SearchParams(nprobe=16, k_factor=64), exact_ids=ids)
    assert deep > shallow + 0.05
    tuned, recall = tune_search_params(index, vectors, ids, queries)
    assert recall >= 0.95 and tuned.nprobe is not None and tuned.k_factor in vector_index.REFINE_K_FACTORS
    # the shallowest depth reaching the target at that nprobe: one step shallower misses it
    shallower = [f for f in vector_index.REFINE_K_FACTORS if f < tuned.k_factor]
    if shallower:
        params = SearchParams(nprobe=tuned.nprobe, k_factor=shallower[-1])
        assert measure_recall(index, vectors, queries, 10, params, exact_ids=ids) < 0.95
