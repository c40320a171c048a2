"""The Milvus store (`--store milvus`) against a real milvus-lite (a .db file in tmp_path): the same answers as
FAISS, add/remove by id, filters bound safely, and `retina-index query` on a Milvus-built folder. Skipped
when pymilvus or milvus-lite is not installed (the `milvus` extra)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import tiny_bundle
from typer.testing import CliRunner

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from index.archive.brset import read_archive  # noqa: E402
from index.build import BuildError, BuildOptions, build_index  # noqa: E402
from index.cli import app  # noqa: E402
from index.embedder import Embedder  # noqa: E402
from index.metadata import Filters  # noqa: E402
from index.milvus_store import (  # noqa: E402
    MilvusIndexStore,
    MilvusStoreError,
    MilvusVectors,
    check_kind,
    filter_template,
    inline_expression,
    render_literal,
    server_version,
    supported_kinds,
    tune_milvus_search,
)
from index.store import IndexStoreError, open_index, read_info  # noqa: E402
from index.vector_index import exact_search, recall_at_k  # noqa: E402

runner = CliRunner()


@dataclass
class Built:
    faiss: Path
    milvus: Path
    uri: Path
    embedder: Embedder
    n: int


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The tiny bundle's archive indexed twice, exactly (flat): into FAISS files and into milvus-lite."""
    tiny = tiny_bundle(tmp_path_factory)
    root = tmp_path_factory.mktemp("milvus")
    embedder = Embedder(tiny.bundle, device="cpu")
    base = dict(bundle=tiny.bundle, archive=tiny.archive, chunk_size=16, batch_size=8, progress=False, kind="flat")
    build_index(BuildOptions(out=root / "faiss", **base), embedder)  # type: ignore[arg-type]
    uri = root / "retina.db"
    build_index(BuildOptions(out=root / "milvus", store="milvus", milvus_uri=str(uri), **base), embedder)  # type: ignore[arg-type]
    return Built(root / "faiss", root / "milvus", uri, embedder, len(read_archive(tiny.archive).records))


def test_build_records_the_store(built: Built) -> None:
    info = read_info(built.milvus)
    assert info.store == "milvus" and info.milvus is not None
    assert info.milvus.uri == str(built.uri.resolve())
    assert info.milvus.collections == {"image": "retina_image", "record": "retina_record"}
    assert info.milvus.server.startswith("milvus-lite ")
    assert info.files.image is None and info.files.record is None
    assert sorted(p.name for p in built.milvus.iterdir()) == ["index.json", "metadata.sqlite"]
    assert set(info.sha256 or {}) == {"metadata.sqlite"}
    assert info.indexes["image"].kind == "flat" and info.indexes["image"].recall_at_10 == 1.0
    assert info.counts.indexed == built.n
    assert read_info(built.faiss).store == "faiss"  # and an index.json without the field still loads
    raw = json.loads((built.faiss / "index.json").read_text())
    raw.pop("store"), raw.pop("milvus")
    (built.faiss / "index.json").write_text(json.dumps(raw))
    assert read_info(built.faiss).store == "faiss"


FILTERS = [
    None,
    Filters(icdr=[0, 1]),
    Filters(icdr=[2, 3, 4], exam_eye="left"),
    Filters(exam_eye="right"),
    Filters(age_min=40, age_max=70),
    Filters(age_max=50),
    Filters(sdrg=[0], age_min=30),
]


@pytest.mark.parametrize("against", ["image", "record"])
def test_flat_milvus_answers_as_faiss(built: Built, against: str) -> None:
    faiss_store = open_index(built.faiss, built.embedder)
    milvus_store = open_index(built.milvus, built.embedder)
    assert isinstance(milvus_store, MilvusIndexStore) and milvus_store.ntotal == faiss_store.ntotal == built.n
    texts = ["proliferative diabetic retinopathy, right eye", "no diabetic retinopathy", "macular oedema, 60 years"]
    ids = np.sort(faiss_store.image.ids())
    queries = np.concatenate([
        built.embedder.embed_texts(texts).vectors,
        faiss_store.vectors(against).reconstruct(ids[[0, 9, built.n - 1]]),  # type: ignore[arg-type]
    ])
    for filters in FILTERS:
        expected = faiss_store.search(queries, 10, against, filters)  # type: ignore[arg-type]
        found = milvus_store.search(queries, 10, against, filters)  # type: ignore[arg-type]
        for want, got in zip(expected, found, strict=True):
            assert [hit.id for hit in got] == [hit.id for hit in want], filters
            assert np.allclose([hit.score for hit in got], [hit.score for hit in want], atol=1e-5)
            assert [hit.row for hit in got] == [hit.row for hit in want]
    assert milvus_store.search(queries, 5, "image", Filters(icdr=[], exam_eye="left")) == [[]] * len(queries)


def test_injection_cannot_widen_results(built: Built) -> None:
    with pytest.raises(ValueError):  # the request model refuses it first
        Filters.model_validate({"exam_eye": 'left" or 1==1'})
    forged = Filters.model_construct(exam_eye='left" or id >= 0 or exam_eye == "')  # past validation
    template, params = filter_template(forged)  # type: ignore[misc]
    assert template == "exam_eye == {exam_eye}" and params == {"exam_eye": forged.exam_eye}  # bound, not spliced
    with pytest.raises(MilvusStoreError, match="refused"):
        inline_expression(template, params)
    store = open_index(built.milvus, built.embedder)
    query = built.embedder.embed_texts(["x"]).vectors
    with pytest.raises(MilvusStoreError, match="refused"):
        store.search(query, built.n, "image", forged)
    for bad in (True, float("nan"), "a)", '"', "x' or '1", {"a": 1}):
        with pytest.raises(MilvusStoreError):
            render_literal(bad)
    assert render_literal([1, 2]) == "[1, 2]" and render_literal(40.0) == "40.0" and render_literal("left") == '"left"'
    left = store.search(query, built.n, "image", Filters(exam_eye="left"))[0]
    assert left and all(hit.row.labels.exam_eye == "left" for hit in left)


def test_add_remove_by_id(built: Built, tmp_path: Path) -> None:
    uri = tmp_path / "changes.db"
    info = read_info(built.faiss)
    faiss_store = open_index(built.faiss, built.embedder)
    folder = tmp_path / "milvus"
    tiny_archive = Path(info.archive_root)
    options = BuildOptions(bundle=Path(info.bundle_path), archive=tiny_archive, out=folder, chunk_size=16,
                           batch_size=8, progress=False, kind="flat", store="milvus", milvus_uri=str(uri),
                           milvus_collection="changes")
    build_index(options, built.embedder)
    store = open_index(folder, built.embedder)
    ids = np.array([3, 11])
    image, record = faiss_store.image.reconstruct(ids), faiss_store.record.reconstruct(ids)
    rows = list(faiss_store.metadata.get(ids.tolist()).values())
    assert store.remove(ids) == 2 and store.ntotal == built.n - 2
    assert all(hit.id not in (3, 11) for hit in store.search(image, built.n)[0])
    with pytest.raises(IndexStoreError, match="not in the index"):
        store.remove(np.array([3]))
    store.save()
    reopened = open_index(folder, built.embedder)
    assert reopened.ntotal == built.n - 2 and read_info(folder).generation == 2
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "metadata.g2.sqlite"]
    reopened.add(ids, image, record, rows)
    assert reopened.search(image, 1)[0][0].id == 3 and reopened.search(record, 1, "record")[1][0].id == 11
    with pytest.raises(IndexStoreError):
        reopened.add(ids, image, record, rows)  # ids must be new
    reopened.save()
    assert open_index(folder, built.embedder).ntotal == built.n
    with pytest.raises(BuildError, match="already has the collection"):  # a second build into the same collections
        build_index(options.model_copy(update={"out": tmp_path / "again"}), built.embedder)


def test_query_cli_on_a_milvus_index(built: Built) -> None:
    result = runner.invoke(app, ["query", "--index", str(built.milvus), "--text", "no diabetic retinopathy",
                                 "-k", "4", "--filter", "exam_eye=left"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("synth") == 4 and " right " not in result.stdout
    expected = runner.invoke(app, ["query", "--index", str(built.faiss), "--text", "no diabetic retinopathy",
                                   "-k", "4", "--filter", "exam_eye=left"])
    assert expected.stdout.replace(str(built.faiss), "").splitlines()[1:] == \
        result.stdout.replace(str(built.milvus), "").splitlines()[1:]


def test_missing_collection_is_named(built: Built, tmp_path: Path) -> None:
    with pytest.raises(MilvusStoreError, match="not found"):
        open_index(built.milvus, built.embedder, milvus_uri=str(tmp_path / "empty.db"))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_against_exact(tmp_path: Path, kind: str) -> None:
    uri = str(tmp_path / f"{kind}.db")
    if kind not in supported_kinds(uri):
        pytest.skip(f"{server_version(uri)} cannot build {kind} (a Milvus server can)")
    rng = np.random.default_rng(0)
    n, dim = 3000, 64
    centres = rng.normal(size=(30, dim))
    vectors = (centres[rng.integers(0, 30, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) * 7 + 5
    from index.metadata import Labels, MetadataRow

    rows = [MetadataRow(id=int(i), image_id=f"p{i}", path=f"{i}.jpg", labels=Labels(icdr=int(i) % 5)) for i in ids]
    index = MilvusVectors.create(uri, kind, kind, dim, n)  # type: ignore[arg-type]
    index.add(vectors, rows)
    queries = vectors[rng.choice(n, 200, replace=False)] + 0.05 * rng.normal(size=(200, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    params, recall = tune_milvus_search(index, vectors, ids, queries, 0.95)
    _, found = index.search(queries, 10, params)
    assert recall_at_k(found, exact_search(vectors, ids, queries, 10)) == recall >= 0.95
    allowed = ids[ids % 5 == 2]
    _, found = index.search(queries, 10, params, Filters(icdr=[2]))
    assert set(found[found >= 0].tolist()) <= set(allowed.tolist())
    truth = exact_search(vectors[ids % 5 == 2], allowed, queries, 10)
    assert recall_at_k(found, truth) >= 0.95


def test_unsupported_kind_is_refused_before_embedding(built: Built, tmp_path: Path) -> None:
    uri = str(tmp_path / "kinds.db")
    if "hnsw" in supported_kinds(uri):
        pytest.skip("this milvus-lite builds HNSW")
    with pytest.raises(MilvusStoreError, match="builds only flat, ivf"):
        check_kind(uri, "hnsw")
    info = read_info(built.faiss)
    options = BuildOptions(bundle=Path(info.bundle_path), archive=Path(info.archive_root), out=tmp_path / "out",
                           kind="hnsw", store="milvus", milvus_uri=uri, progress=False)
    with pytest.raises(IndexStoreError, match="builds only"):
        build_index(options, built.embedder)
    assert not (tmp_path / "out").exists()


def test_the_service_engine_serves_a_milvus_index(built: Built) -> None:
    from service.engine import Engine, SearchRequest
    from service.settings import ServiceSettings

    bundle = Path(read_info(built.milvus).bundle_path)
    engines = {
        name: Engine(ServiceSettings(bundle=bundle, index=folder, device="cpu", index_check_s=0, store=store))
        for name, folder, store in (("faiss", built.faiss, None), ("milvus", built.milvus, "milvus"))
    }
    try:
        for engine in engines.values():
            engine.load()
            assert engine.ready, engine.error
        requests = [
            SearchRequest("moderate NPDR in the right eye", 5),
            SearchRequest("no diabetic retinopathy", 4, "record", Filters(exam_eye="left", icdr=[0, 1])),
        ]
        answers = {name: engine._run_text_searches(requests) for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine._model_pool.shutdown()
    for served, expected in zip(answers["milvus"], answers["faiss"], strict=True):
        assert [h.id for h in served.hits] == [h.id for h in expected.hits] and served.hits
    wrong = Engine(ServiceSettings(bundle=bundle, index=built.faiss, device="cpu", index_check_s=0, store="milvus"))
    try:
        wrong.load()
    finally:
        wrong._model_pool.shutdown()
    assert not wrong.ready and "--store milvus" in (wrong.error or "")


def test_build_cli_with_the_milvus_store(built: Built, tmp_path: Path) -> None:
    info = read_info(built.faiss)
    common = ["build", "--bundle", info.bundle_path, "--archive", info.archive_root, "--chunk-size", "32"]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "a"), "--store", "milvus"])
    assert result.exit_code == 2 and "--milvus-uri" in result.output
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "b"), "--store", "milvus", "--milvus-uri",
                                 str(tmp_path / "cli.db"), "--milvus-collection", "bad-name"])
    assert result.exit_code == 2 and "bad-name" in result.output
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "c"), "--store", "milvus", "--milvus-uri",
                                 str(tmp_path / "cli.db"), "--milvus-collection", "cli", "--kind", "flat"])
    assert result.exit_code == 0, result.output
    assert "Milvus at" in result.output and "cli_image, cli_record" in result.output
    assert read_info(tmp_path / "c").milvus.collections["record"] == "cli_record"  # type: ignore[union-attr]


def test_without_pymilvus_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from index.milvus_store import pymilvus_module

    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(MilvusStoreError, match=r"retina-align\[milvus\]"):
        pymilvus_module()


def test_bench_stores_measures_both_stores_with_a_selective_filter(tmp_path: Path) -> None:
    out = tmp_path / "stores.json"
    result = runner.invoke(app, ["bench-stores", "--sizes", "3000", "--queries", "30", "--dim", "32",
                                 "--milvus-uri", str(tmp_path / "bench.db"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["store"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"faiss", "milvus"}
    for row in rows.values():
        assert row["n"] == 3000 and row["kind"] == "flat"  # exact at this size: recall 1.0 by definition
        assert row["recall_at_10"] == 1.0 and row["filtered_recall_at_10"] == 1.0
        assert 0.02 < row["filtered_share"] < 0.09  # ICDR >= 2 at BRSET's proportions, about 5%
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["build_seconds"] >= 0  # FAISS flat: a few ms
    assert rows["milvus"]["build_seconds"] > 0
