"""The index builder, opening an index, add/remove by id and the query CLI, on a real (tiny) bundle
and its generated archive of 64 photographs."""

from __future__ import annotations

import gc
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import tiny_bundle
from typer.testing import CliRunner

from index import store as store_module
from index.archive.brset import read_archive
from index.build import BuildError, BuildOptions, build_index
from index.cli import app
from index.embedder import Embedder
from index.engines import local as local_engine
from index.metadata import Filters, MetadataRow
from index.preprocess import decode_image
from index.shards import ChunkResult
from index.store import IndexIntegrityError, IndexStoreError, open_index, read_info

CHUNK = 16  # 64 records -> 4 chunks
runner = CliRunner()


@dataclass
class Setup:
    root: Path
    archive: Path
    bundle: Path
    index: Path
    embedder: Embedder
    n: int  # records in the archive


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The session's tiny bundle and its generated archive (`bundle_factory`), and an index built from them."""
    tiny = tiny_bundle(tmp_path_factory)
    root = tmp_path_factory.mktemp("index_build")
    embedder = Embedder(tiny.bundle, device="cpu")
    options = BuildOptions(bundle=tiny.bundle, archive=tiny.archive, out=root / "index", chunk_size=CHUNK,
                           batch_size=8, progress=False)
    build_index(options, embedder)
    return Setup(root, tiny.archive, tiny.bundle, root / "index", embedder, len(read_archive(tiny.archive).records))


def options_for(setup: Setup, out: Path, **changes: object) -> BuildOptions:
    base = dict(bundle=setup.bundle, archive=setup.archive, out=out, chunk_size=CHUNK, batch_size=8, progress=False)
    return BuildOptions(**(base | changes))  # type: ignore[arg-type]


def all_vectors(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    store = open_index(folder, None)
    ids = np.sort(store.image.ids())
    return ids, store.image.reconstruct(ids), store.record.reconstruct(ids)


def test_build_writes_a_complete_index(setup: Setup) -> None:
    info = read_info(setup.index)
    assert info.counts.archive_records == info.counts.indexed == setup.n and info.counts.skipped == 0
    assert info.bundle_fingerprint == setup.embedder.fingerprint
    assert Path(info.bundle_path) == setup.bundle.resolve() and Path(info.archive_root) == setup.archive.resolve()
    assert info.dim == setup.embedder.dim and info.generation == 1
    for name in ("image", "record"):
        vectors = info.indexes[name]  # type: ignore[index]
        assert vectors.kind == "flat" and vectors.ntotal == setup.n  # auto: a small archive is searched exactly
        assert vectors.recall_at_10 == 1.0 and "by definition" in vectors.recall_note
    assert set(info.providers.values()) == {"CPUExecutionProvider"}
    assert info.images_per_second > 0 and info.build_seconds > 0
    names = sorted(p.name for p in setup.index.iterdir())
    assert names == ["image.faiss", "index.json", "metadata.sqlite", "record.faiss"]  # .partial removed

    store = open_index(setup.index, setup.embedder)
    archive = read_archive(setup.archive)
    assert store.ntotal == setup.n and np.array_equal(np.sort(store.record.ids()), np.arange(setup.n))
    row = store.metadata.get([7])[7]
    record = archive.records[7]  # ids are row numbers of the label file
    assert row.image_id == record.image_id and row.path == f"fundus_photos/{record.image_id}.jpg"
    assert row.labels.icdr == record.dr_icdr and row.narrative == record.narrative
    assert row.labels.predicted_icdr is not None and abs(sum(row.labels.predicted_icdr) - 1) < 1e-3
    assert store.metadata.by_image_id(record.image_id) == row


def test_a_photo_finds_itself_first(setup: Setup) -> None:
    store = open_index(setup.index, setup.embedder)
    archive = read_archive(setup.archive)
    for identifier in (0, 17, setup.n - 1):
        photo = decode_image(archive.photo_path(archive.records[identifier].image_id))  # type: ignore[arg-type]
        vector = setup.embedder.embed_images([photo])
        hit = store.search(vector, k=3)[0][0]
        assert hit.id == identifier and hit.score == pytest.approx(1.0, abs=1e-4)
        own = store.record.reconstruct(np.array([identifier]))
        assert store.search(own, k=1, against="record")[0][0].id == identifier


def test_filters(setup: Setup) -> None:
    store = open_index(setup.index, setup.embedder)
    query = setup.embedder.embed_texts(["proliferative diabetic retinopathy, right eye"]).vectors
    right = store.search(query, k=setup.n, filters=Filters(exam_eye="right"))[0]
    assert right and all(hit.row.labels.exam_eye == "right" for hit in right)
    assert len(right) == len(store.metadata.allowed_ids(Filters(exam_eye="right")))  # type: ignore[arg-type]
    worst = store.search(query, k=setup.n, filters=Filters(icdr=[4]))[0]
    assert [hit.row.labels.icdr for hit in worst] == [4] * len(store.metadata.allowed_ids(Filters(icdr=[4])))  # type: ignore[arg-type]
    aged = store.search(query, k=setup.n, filters=Filters(icdr=[0, 1], age_min=40, age_max=60))[0]
    assert aged and all(40 <= (hit.row.labels.patient_age or -1) <= 60 for hit in aged)
    assert all(hit.row.labels.icdr in (0, 1) for hit in aged)
    assert store.search(query, k=5, filters=Filters(icdr=[], exam_eye="left")) == [[]]


def test_query_cli_by_text_and_image(setup: Setup) -> None:
    result = runner.invoke(app, ["query", "--index", str(setup.index), "--text", "no diabetic retinopathy", "-k", "4"])
    assert result.exit_code == 0, result.output
    for column in ("rank", "score", "image_id", "ICDR", "SDRG", "eye", "age", "narrative"):
        assert column in result.stdout
    assert result.stdout.count("synth") == 4

    archive = read_archive(setup.archive)
    record = next(r for r in archive.records if r.exam_eye is not None)
    image_id = record.image_id
    photo = str(archive.photo_path(image_id))
    eye = "right" if record.exam_eye == 1 else "left"
    result = runner.invoke(app, ["query", "--index", str(setup.index), "--image", photo, "-k", "3",
                                 "--filter", f"exam_eye={eye}"])
    assert result.exit_code == 0, result.output
    first = next(line for line in result.stdout.splitlines() if "│    1 │" in line)
    assert image_id in first and "1.0000" in first

    result = runner.invoke(app, ["query", "--index", str(setup.index), "--text", "x", "--against", "record",
                                 "--filter", "exam_eye=left", "-k", str(setup.n)])
    assert result.exit_code == 0 and " right " not in result.stdout and " left " in result.stdout


def test_query_cli_errors(setup: Setup) -> None:
    result = runner.invoke(app, ["query", "--index", str(setup.index), "--text", "x", "--filter", "grade=2"])
    assert result.exit_code == 2
    assert "unknown field 'grade'" in result.output and "icdr, sdrg, exam_eye, age_min, age_max" in result.output
    result = runner.invoke(app, ["query", "--index", str(setup.index)])
    assert result.exit_code == 2 and "exactly one of --text or --image" in result.output
    result = runner.invoke(app, ["query", "--index", str(setup.root), "--text", "x"])
    assert result.exit_code == 2 and "not an index" in result.output


def test_another_bundle_is_refused(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(IndexStoreError) as error:
        open_index(setup.index, "0123456789abcdef")
    assert "0123456789abcdef" in str(error.value) and setup.embedder.fingerprint in str(error.value)
    # the same through the CLI: an index that says it was built by another bundle
    copy = tmp_path / "index"
    shutil.copytree(setup.index, copy)
    info = json.loads((copy / "index.json").read_text())
    info["bundle_fingerprint"] = "fedcba9876543210"
    (copy / "index.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["query", "--index", str(copy), "--text", "x", "--bundle", str(setup.bundle)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "fedcba9876543210" in output and setup.embedder.fingerprint in output


def test_resume_after_a_crash_gives_identical_vectors(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "index"
    real = local_engine.embed_chunk
    calls: list[int] = []
    crash = True

    def crash_after_first_chunk(*args: object, **kwargs: object) -> ChunkResult:
        calls.append(1)
        if crash and len(calls) == 2:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(local_engine, "embed_chunk", crash_after_first_chunk)
    with pytest.raises(RuntimeError, match="power cut"):
        build_index(options_for(setup, out), setup.embedder)
    assert not (out / "index.json").exists()
    assert sorted(p.name for p in (out / ".partial").iterdir()) == ["chunk-00000.json", "chunk-00000.npz", "plan.json"]
    with pytest.raises(IndexStoreError, match="unfinished build.*--resume"):
        open_index(out, setup.embedder)
    with pytest.raises(BuildError, match="differs in chunk_size"):
        build_index(options_for(setup, out, resume=True, chunk_size=20), setup.embedder)

    calls.clear()
    crash = False
    info = build_index(options_for(setup, out, resume=True), setup.embedder)
    assert len(calls) == 3  # chunk 0 was not embedded again
    assert info.counts.indexed == setup.n
    for got, want in zip(all_vectors(out), all_vectors(setup.index), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(BuildError, match="already holds a finished index"):
        build_index(options_for(setup, out, resume=True), setup.embedder)


def test_unreadable_photos_are_skipped_and_reported(setup: Setup, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(setup.archive, archive)
    records = read_archive(archive).records
    (archive / "fundus_photos" / f"{records[5].image_id}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (archive / "fundus_photos" / f"{records[40].image_id}.jpg").unlink()
    out = tmp_path / "index"
    result = runner.invoke(app, ["build", "--bundle", str(setup.bundle), "--archive", str(archive), "--out", str(out),
                                 "--chunk-size", "16", "--kind", "hnsw"])
    assert result.exit_code == 0, result.output
    assert "skipped id 5" in result.output and "skipped id 40" in result.output
    info = read_info(out)
    assert info.counts.archive_records == setup.n and info.counts.indexed == setup.n - 2
    assert info.counts.skipped == 2
    reasons = {photo.id: photo.reason for photo in info.skipped}
    assert "not a readable image" in reasons[5] or "could not be decoded" in reasons[5]
    assert "no photo file" in reasons[40]
    store = open_index(out, setup.embedder)
    assert not np.isin([5, 40], store.image.ids()).any() and store.metadata.get([5, 40]) == {}
    # hnsw: approximate, so its recall was measured (and the per-call parameters chosen) at build time
    assert info.indexes["image"].kind == "hnsw" and info.indexes["image"].search.ef_search is not None
    assert info.indexes["image"].recall_at_10 >= 0.95 and "against exact" in info.indexes["image"].recall_note


def test_add_remove_and_save(setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    shutil.copytree(setup.index, folder)
    store = open_index(folder, setup.embedder)
    ids = np.array([3, 4])
    image_vectors = store.image.reconstruct(ids)
    record_vectors = store.record.reconstruct(ids)
    rows = store.metadata.get(ids.tolist())

    assert store.remove(ids) == 2
    assert store.ntotal == setup.n - 2 and store.metadata.get([3, 4]) == {}
    hits = store.search(image_vectors, k=10)
    assert not any(hit.id in (3, 4) for row in hits for hit in row)
    with pytest.raises(IndexStoreError, match=r"not in the index: \[3\]"):
        store.remove(np.array([3, 10]))
    assert store.ntotal == setup.n - 2 and store.metadata.get([10])  # nothing changed

    new_ids = np.array([1000, 1001])
    new_rows = [
        MetadataRow.model_validate(rows[old].model_dump() | {"id": new, "image_id": f"added-{new}"})
        for old, new in zip(ids.tolist(), new_ids.tolist(), strict=True)
    ]
    store.add(new_ids, image_vectors, record_vectors, new_rows)
    assert store.search(image_vectors[:1], k=1)[0][0].id == 1000
    with pytest.raises(IndexStoreError, match="must be new"):
        store.add(np.array([1000]), image_vectors[:1], record_vectors[:1], new_rows[:1])
    with pytest.raises(IndexStoreError, match="L2-normalised"):
        row = new_rows[0].model_copy(update={"id": 2000, "image_id": "x"})
        store.add(np.array([2000]), image_vectors[:1] * 2, record_vectors[:1], [row])
    assert store.ntotal == setup.n

    store.save()
    assert store.info.generation == 2
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["image.g2.faiss", "index.json", "metadata.g2.sqlite", "record.g2.faiss"]
    reopened = open_index(folder, setup.embedder)
    assert reopened.ntotal == reopened.info.counts.indexed == setup.n
    assert reopened.metadata.get([1000])[1000].image_id == "added-1000" and reopened.metadata.get([3]) == {}
    assert reopened.search(record_vectors[1:2], k=1, against="record")[0][0].id == 1001

    # a crash before the commit (index.json) leaves the saved generation intact
    reopened.remove(np.array([1000, 1001]))
    monkeypatch.setattr(store_module, "write_info", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        reopened.save()
    again = open_index(folder, setup.embedder)
    assert again.ntotal == setup.n and again.info.generation == 2 and again.metadata.get([1000])
    monkeypatch.undo()
    again.remove(np.array([1000]))
    again.save()  # leftovers of the crashed save are replaced
    assert open_index(folder, setup.embedder).ntotal == setup.n - 1
    assert sorted(p.name for p in folder.iterdir()) == [
        "image.g3.faiss", "index.json", "metadata.g3.sqlite", "record.g3.faiss"
    ]


def test_ondisk_build_is_memory_mapped_verified_and_read_only(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "ondisk"
    info = build_index(options_for(setup, out, ondisk=True), setup.embedder)
    assert info.files.image_data == "image.faiss.ivfdata" and info.files.record_data == "record.faiss.ivfdata"
    assert sorted(p.name for p in out.iterdir()) == ["image.faiss", "image.faiss.ivfdata", "index.json",
                                                      "metadata.sqlite", "record.faiss", "record.faiss.ivfdata"]
    assert set(info.sha256 or {}) == set(info.files.names())
    for name in ("image", "record"):
        vectors = info.indexes[name]  # type: ignore[index]
        assert vectors.kind == "ivf" and vectors.ntotal == setup.n and vectors.recall_at_10 >= 0.95
        assert "inverted lists on disk" in vectors.recall_note

    store = open_index(out, setup.embedder)
    assert store.image.ondisk and store.record.ondisk
    ids, image, record = all_vectors(setup.index)
    assert np.array_equal(np.sort(store.image.ids()), ids)
    assert np.allclose(store.image.reconstruct(ids), image, atol=1e-6)
    assert np.allclose(store.record.reconstruct(ids), record, atol=1e-6)
    reference = open_index(setup.index, setup.embedder)
    for query in image[:5]:
        assert [h.id for h in store.search(query, 5)[0]] == [h.id for h in reference.search(query, 5)[0]]
    assert {h.row.labels.icdr for h in store.search(image[0], 20, filters=Filters(icdr=[0]))[0]} <= {0}
    with pytest.raises(IndexStoreError, match="read-only"):
        store.remove(np.array([0]))

    # A mapped file must never be rewritten in place (pages past a truncation raise SIGBUS in whoever maps
    # it): release the maps, then swap in a tampered copy by rename, as a changed file would arrive.
    del store, reference
    gc.collect()
    data = out / "image.faiss.ivfdata"
    tampered = out / "tampered"
    tampered.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)
    os.replace(tampered, data)
    with pytest.raises(IndexIntegrityError, match="image.faiss.ivfdata"):
        open_index(out, setup.embedder)
    refused = runner.invoke(app, ["build", "--bundle", str(setup.bundle), "--archive", str(setup.archive),
                                       "--out", str(tmp_path / "x"), "--ondisk", "--kind", "flat"])
    assert refused.exit_code != 0 and "--ondisk builds FAISS IVF indexes" in refused.output
