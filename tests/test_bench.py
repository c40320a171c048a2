"""`retina-index bench`: the clustered vectors, the search benchmark, the roofline arithmetic, and the
embedding benchmark on `tiny` (PyTorch half in a subprocess, ONNX Runtime on its exported towers)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.bench.embed import (
    EngineResult,
    ModelBench,
    embed_rows,
    has_module,
    min_cosine,
    roofline,
    target_status,
)
from index.bench.run import BenchOptions, parse_sizes, parse_threads, run_bench, write_json
from index.bench.search import (
    K,
    default_threads,
    exact_truth,
    faiss_threads,
    fit_mixture,
    measure_kind,
    recall_at_k,
    synthetic_mixture,
)

DIM = 64


def _silent_console():  # noqa: ANN202
    from rich.console import Console

    return Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115 - closed with the process


def test_clustered_vectors_have_meaningful_neighbours() -> None:
    mixture = synthetic_mixture(DIM, n_clusters=64, n_super=8, seed=1)
    vectors = mixture.sample(3000, np.random.default_rng(0))
    assert vectors.shape == (3000, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    base, queries = vectors[:2900], vectors[2900:]
    similarity = queries @ base.T
    top10 = -np.sort(-similarity, axis=1)[:, :K]
    # Neighbours stand out from the crowd, as real embeddings' do (uniform vectors: all ~0).
    assert top10.mean() > 0.6
    assert abs(similarity.mean()) < 0.2


def test_flat_is_exact_and_ivf_searches_the_clustered_vectors() -> None:
    mixture = synthetic_mixture(DIM, n_clusters=64, n_super=8, seed=1)
    drawn = mixture.sample(2000 + 150 + 100, np.random.default_rng(2))
    vectors, queries, tune = drawn[:2000], drawn[2000:2150], drawn[2150:]
    truth = exact_truth(vectors, queries)
    flat, flat_one_thread = measure_kind("flat", "flat", vectors, queries, tune, truth, seconds=0.2, threads=(2, 1))
    assert (flat.threads, flat_one_thread.threads) == (2, 1)
    assert flat_one_thread.recall_at_10 == 1.0
    assert flat.recall_at_10 == 1.0
    assert flat.queries >= 100 and 0 < flat.p50_ms <= flat.p99_ms
    (ivf,) = measure_kind("ivf", "ivf", vectors, queries, tune, truth, seconds=0.2, threads=(1,))
    assert ivf.params["nprobe"] >= 1
    assert ivf.recall_at_10 >= 0.9  # tuned to 0.95 on other queries


def test_recall_at_k_counts_shared_ids() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    found = np.array([[4, 3, 9, 8], [6, 5, 7, 0]])
    assert recall_at_k(found, truth) == pytest.approx((2 + 2) / (4 + 2))


def test_fitted_mixture_reproduces_the_spread_and_lifts_isometrically() -> None:
    source = synthetic_mixture(DIM, n_clusters=32, n_super=4, spread=0.4, seed=3)
    real = source.sample(4000, np.random.default_rng(4))
    fitted = fit_mixture(real, max_clusters=200, seed=0)
    assert fitted.dim == DIM and fitted.n_clusters == 200
    drawn = fitted.sample(4000, np.random.default_rng(5))
    # Nearest-neighbour similarity of the fitted model's samples is close to the source's.
    real_nn = np.sort(real[:200] @ real[200:].T, axis=1)[:, -1].mean()
    drawn_nn = np.sort(drawn[:200] @ drawn[200:].T, axis=1)[:, -1].mean()
    assert abs(real_nn - drawn_nn) < 0.1
    lifted = fitted.lifted(256, seed=1)
    assert lifted.dim == 256
    np.testing.assert_allclose(lifted.centres @ lifted.centres.T, fitted.centres @ fitted.centres.T, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(lifted.sample(10, np.random.default_rng(0)), axis=1), 1.0, atol=1e-5)


def test_roofline_and_targets() -> None:
    # ViT-B/16: 35.1 GFLOP per image; 1,700 GFLOP/s bf16 -> 48.4 images/s at most.
    assert roofline(1700.0, 35.1) == pytest.approx(48.43, abs=0.01)
    assert roofline(None, 35.1) is None
    assert target_status("paper", "image", 41.0, 0.9995) == "met"
    assert target_status("paper", "image", 41.0, 0.998) == "not met"  # fast but not faithful
    assert target_status("paper", "image", 39.0, 0.9999) == "not met"
    assert target_status("paper", "text", 61.0, 0.9999) == "met"
    assert target_status("tiny", "image", 1000.0, 1.0) == "-"
    assert target_status("paper", "text", None, None) == "-"
    bench = ModelBench(
        "paper",
        {},
        {"image": [EngineResult("e", "bf16", 30.0, 0.9999), EngineResult("x", "int8", None, None, "skipped")]},
        {"image": 35.1},
    )
    rows = embed_rows(bench, {"fp32": 300.0, "bf16": 1700.0, "int8": None})
    assert rows[0].roofline_items_per_second == pytest.approx(1700.0 / 35.1)
    assert rows[0].target == "not met"
    assert rows[1].roofline_items_per_second is None and rows[1].target == "-"


def test_min_cosine_is_the_worst_row() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, 1.0]])
    assert min_cosine(a, b) == pytest.approx(np.sqrt(0.5))


def test_faiss_threads_is_restored() -> None:
    before = faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
    assert default_threads()[-1] == 1 and default_threads()[0] == before


def test_parse_sizes() -> None:
    assert parse_sizes("1e4,1e5, 1e6") == [10_000, 100_000, 1_000_000]
    assert parse_sizes("2000") == [2000]
    with pytest.raises(ValueError):
        parse_sizes("1.5")
    with pytest.raises(ValueError):
        parse_sizes(",")
    assert parse_threads("2, 1") == [2, 1] and parse_threads("") == []
    with pytest.raises(ValueError):
        parse_threads("0")


def test_search_bench_report_and_json(tmp_path: Path) -> None:
    options = BenchOptions(sizes=[2000], kinds=["flat", "auto", "ivf"], queries=120, seconds=0.2, skip_embed=True,
                           search_threads=[1])
    report = run_bench(options, _silent_console())
    path = tmp_path / "bench.json"
    write_json(report, path)
    saved = json.loads(path.read_text())
    assert set(saved) >= {"machine", "options", "search", "search_target", "seconds"}
    assert "embedding" not in saved
    assert saved["machine"]["matmul_gflops"]["fp32"] > 0
    results = saved["search"]["results"]
    assert [r["label"] for r in results] == ["flat", "auto (flat)", "ivf"]
    for result in results:
        assert result["n"] == 2000 and result["dim"] == 256 and result["queries"] >= 100 and result["threads"] == 1
        assert 0 < result["p50_ms"] <= result["p99_ms"]
        assert 0.0 <= result["recall_at_10"] <= 1.0
    assert results[0]["recall_at_10"] == 1.0
    assert results[2]["recall_at_10"] >= 0.9
    assert saved["search_target"]["measured"] is False  # 10^6 was not among the sizes
    assert saved["search"]["mixture"]["dim"] == 256


@pytest.mark.skipif(not has_module("torch"), reason="the embedding benchmark needs torch for the models")
def test_embed_bench_tiny(tmp_path: Path) -> None:
    from index.bench.run import run_embed

    options = BenchOptions(models=["tiny"], batch_size=4, seconds=0.0)
    machine = {"matmul_gflops": {"fp32": 100.0, "bf16": None, "int8": None}}
    rows = run_embed(options, machine, _silent_console())
    assert machine["matmul_gflops"]["bf16"] > 0  # measured by torch in the subprocess
    by_engine = {(r.tower, r.engine): r for r in rows}
    for tower in ("image", "text"):
        eager = by_engine[(tower, "torch eager")]
        assert eager.items_per_second > 0 and eager.min_cosine == 1.0 and eager.gflop_per_item > 0
        assert eager.roofline_items_per_second == pytest.approx(100.0 / eager.gflop_per_item)
        ort = by_engine[(tower, "ORT fp32")]
        assert ort.items_per_second > 0 and ort.min_cosine > 0.99999  # same graph, same inputs
        int8 = by_engine[(tower, "ORT int8 dynamic")]
        assert 0.99 < int8.min_cosine < 1.0
        assert by_engine[(tower, "torch eager bf16 autocast")].min_cosine > 0.999
    assert by_engine[("image", "torch eager")].gflop_per_item > by_engine[("text", "torch eager")].gflop_per_item
    assert all(r.target == "-" for r in rows)  # targets are for `paper`
    if has_module("openvino") and has_module("nncf"):
        for tower in ("image", "text"):
            # The service's own OpenVinoGraph on the IR the bench made: timed, and as faithful as the
            # bench's own compile of the same IR (same graph, same inputs).
            reference = by_engine[(tower, "OpenVINO INT8 (NNCF)")]
            for performance in ("latency", "throughput"):
                row = by_engine[(tower, f"Embedder OpenVINO INT8 ({performance})")]
                assert row.items_per_second > 0 and row.precision == "int8", row
                assert row.min_cosine == pytest.approx(reference.min_cosine, abs=1e-3)
                assert row.roofline_items_per_second is None  # the int8 peak was not measured here
