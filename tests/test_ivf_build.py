"""Indexes built from vector shards (`index.ivf_build`): in memory and merged on disk they answer alike, the
on-disk one is memory-mapped and read-only, and a selective filter keeps an IVF index's recall."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from index.bench.search import synthetic_mixture
from index.cli import app
from index.ivf_build import build_from_shards, list_shards, training_sample, write_shard
from index.vector_index import (
    EXACT_FILTER_MAX,
    SearchParams,
    VectorIndex,
    VectorIndexError,
    exact_search,
    filtered_nprobe,
    recall_at_k,
)

DIM = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """Four shards of 5,000 clustered vectors with sparse ids: (folder, ids, vectors)."""
    folder = tmp_path_factory.mktemp("shards")
    vectors = synthetic_mixture(DIM, n_clusters=64, n_super=8).sample(20_000, np.random.default_rng(0))
    ids = np.arange(20_000, dtype=np.int64) * 3 + 11
    for number in range(4):
        rows = slice(number * 5_000, (number + 1) * 5_000)
        write_shard(folder, number, ids[rows], vectors[rows])
    return folder, ids, vectors


def test_shards_are_listed_in_order_and_sampled_from_all(shards: tuple[Path, np.ndarray, np.ndarray]) -> None:
    folder, ids, vectors = shards
    listed = list_shards(folder)
    assert [s.ids_path.name for s in listed] == [f"shard-{n:05d}.ids.npy" for n in range(4)]
    assert np.array_equal(np.concatenate([s.ids() for s in listed]), ids)
    sample = training_sample(listed, 2_000, seed=1)
    assert sample.shape == (2_000, DIM)
    rows = {tuple(np.round(v, 6)) for v in vectors}
    assert all(tuple(np.round(v, 6)) in rows for v in sample[:50])
    (folder / "shard-00009.ids.npy").write_bytes((folder / "shard-00000.ids.npy").read_bytes())
    try:
        with pytest.raises(VectorIndexError, match="shard ids without vectors"):
            list_shards(folder)
    finally:
        (folder / "shard-00009.ids.npy").unlink()


@pytest.mark.parametrize("kind", ["ivf", "ivfsq", "ivfpq"])
def test_on_disk_merge_answers_as_the_in_memory_index(
    shards: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    folder, ids, vectors = shards
    listed = list_shards(folder)
    pq_m = 8 if kind == "ivfpq" else None  # a small code trains in seconds
    memory = build_from_shards(listed, kind, tmp_path / "memory.faiss", ondisk=False, pq_m=pq_m)  # type: ignore[arg-type]
    disk = build_from_shards(listed, kind, tmp_path / "disk.faiss", ondisk=True, pq_m=pq_m)  # type: ignore[arg-type]
    assert memory.ivfdata_path is None and disk.ivfdata_path == tmp_path / "disk.faiss.ivfdata"
    assert memory.ntotal == disk.ntotal == 20_000 and memory.nlist == disk.nlist
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.faiss", "disk.faiss.ivfdata", "memory.faiss"]

    in_memory, on_disk = VectorIndex.load(memory.index_path), VectorIndex.load(disk.index_path)
    assert not in_memory.ondisk and on_disk.ondisk and on_disk.kind == kind
    queries = synthetic_mixture(DIM, n_clusters=64, n_super=8).sample(40, np.random.default_rng(5))
    params = SearchParams(nprobe=8)
    scores_a, ids_a = in_memory.search(queries, 10, params)
    scores_b, ids_b = on_disk.search(queries, 10, params)
    assert np.array_equal(ids_a, ids_b) and np.allclose(scores_a, scores_b, atol=1e-6)
    assert np.allclose(on_disk.reconstruct(ids[:7]), in_memory.reconstruct(ids[:7]), atol=1e-6)
    narrow = ids[::500]
    assert set(on_disk.search(queries, 5, allowed_ids=narrow)[1].ravel()) <= set(narrow.tolist())
    with pytest.raises(VectorIndexError, match="read-only"):
        on_disk.remove(ids[:2])
    with pytest.raises(VectorIndexError, match="read-only"):
        on_disk.add(vectors[:1], np.array([1]))
    assert capfd.readouterr().out == ""  # FAISS's own messages about the data file go to stderr


def test_the_data_file_is_found_beside_a_moved_index(shards: tuple[Path, np.ndarray, np.ndarray],
                                                      tmp_path: Path) -> None:
    folder, _, _ = shards
    built = build_from_shards(list_shards(folder), "ivf", tmp_path / "a" / "image.faiss", ondisk=True)
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)
    assert VectorIndex.load(moved / "image.faiss").ntotal == built.ntotal
    (moved / "image.faiss.ivfdata").unlink()
    with pytest.raises(VectorIndexError, match="not a readable FAISS index"):
        VectorIndex.load(moved / "image.faiss")


def test_a_selective_filter_keeps_ivf_recall() -> None:
    n = 60_000
    mixture = synthetic_mixture(DIM, n_clusters=512, n_super=16)
    rng = np.random.default_rng(2)
    vectors, queries = mixture.sample(n, rng), mixture.sample(100, rng)
    ids = np.arange(n, dtype=np.int64)
    allowed = ids[rng.random(n) < 0.08]  # about 4,800 records, spread over every list
    assert len(allowed) > EXACT_FILTER_MAX  # the FAISS selector path, not the exact one
    index = VectorIndex.create("ivf", DIM, vectors, n_hint=n, device="cpu")
    index.add(vectors, ids)
    truth = exact_search(vectors[allowed], allowed, queries, 10)
    found = index.search(queries, 10, SearchParams(nprobe=4), allowed)[1]
    assert set(found[found >= 0].tolist()) <= set(allowed.tolist())
    assert recall_at_k(found, truth) >= 0.95
    assert filtered_nprobe(4, 1024, len(allowed), n) > 4 == filtered_nprobe(4, 1024, n, n)
    narrow = faiss.SearchParametersIVF(nprobe=4)
    narrow.sel = faiss.IDSelectorBatch(allowed)
    unwidened = index.faiss_index().search(queries, 10, params=narrow)[1]
    assert recall_at_k(unwidened, truth) < 0.9  # what FAISS alone gives with the build's nprobe
    assert filtered_nprobe(4, 1024, 10, n) == 1024  # a handful of records: every list (exact for IVF-Flat)


def test_bench_scale_prints_its_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench-scale", "--work", str(tmp_path), "--n", "2e4", "--dim", "16",
                                      "--shard-size", "5e3", "--queries", "50", "--tune-queries", "50"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["n"] == 20_000 and report["shards"] == 4 and report["ondisk"] is True
    assert report["recall_at_10"] >= 0.9 and 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["bytes_on_disk"]["ivf-ondisk.faiss.ivfdata"] > 20_000 * 16 * 4


def test_nlist_can_be_chosen_for_a_build(shards: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    folder, ids, vectors = shards
    built = build_from_shards(list_shards(folder), "ivf", tmp_path / "few.faiss", nlist=16)
    assert built.nlist == 16 and built.ntotal == len(ids)
    index = VectorIndex.load(tmp_path / "few.faiss", device="cpu")
    found = index.search(vectors[:5], 1, SearchParams(nprobe=16))[1][:, 0]
    assert np.array_equal(found, ids[:5])
    with pytest.raises(VectorIndexError, match="nlist must be between 1 and the 100 training vectors"):
        VectorIndex.create("ivf", DIM, vectors[:100], nlist=200, device="cpu")


def test_ivfpqr_builds_from_shards_in_memory_with_exact_scores(
    shards: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    folder, ids, vectors = shards
    with pytest.raises(VectorIndexError, match="cannot be merged on disk"):
        build_from_shards(list_shards(folder), "ivfpqr", tmp_path / "no.faiss", ondisk=True)
    built = build_from_shards(list_shards(folder), "ivfpqr", tmp_path / "pqr.faiss", nlist=64)
    index = VectorIndex.load(built.index_path, device="cpu")
    assert index.kind == "ivfpqr" and index.ntotal == len(ids) and built.nlist == 64
    assert index.describe()["pq_nbits"] == 4 and index.describe()["refine_k_factor"] == 32
    queries = synthetic_mixture(DIM, n_clusters=64, n_super=8).sample(40, np.random.default_rng(5))
    scores, found = index.search(queries, 10, SearchParams(nprobe=64))
    want_scores, want = exact_search_scores(vectors, ids, queries)
    # 4-bit codes of 2 dimensions each only shortlist at 32-d (at 256-d: 0.98, README "Scaling")
    assert recall_at_k(found, want) >= 0.9
    same = found[:, 0] == want[:, 0]
    assert same.mean() > 0.9
    np.testing.assert_allclose(scores[same, 0], want_scores[same, 0], atol=1e-5)  # re-ranked: exact scores
    result = CliRunner().invoke(app, ["bench-scale", "--work", str(tmp_path), "--n", "2e4", "--kind", "ivfpqr"])
    assert result.exit_code != 0 and "--in-memory" in result.output


def exact_search_scores(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-10 (scores, ids) by inner product."""
    similarity = queries @ vectors.T
    order = np.argsort(-similarity, axis=1)[:, :10]
    return np.take_along_axis(similarity, order, axis=1), ids[order]


def test_allowed_ids_are_cached_until_the_table_changes() -> None:
    from index.bench.stores import SELECTIVE, synthetic_rows
    from index.metadata import MetadataTable

    rows = synthetic_rows(2_000, seed=3)
    table = MetadataTable.in_memory()
    table.insert(rows[:1_500])
    first = table.allowed_ids(SELECTIVE)
    assert first is not None and not first.flags.writeable
    assert table.allowed_ids(SELECTIVE) is first  # the same answer, not read again
    table.insert(rows[1_500:])
    grown = table.allowed_ids(SELECTIVE)
    expected = [row.id for row in rows if (row.labels.icdr or 0) >= 2]
    assert grown is not None and grown.tolist() == expected and len(grown) > len(first)
    table.delete(expected[:3])
    assert table.allowed_ids(SELECTIVE).tolist() == expected[3:]  # type: ignore[union-attr]
