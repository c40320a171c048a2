"""End to end on real photographs (opt-in, RETINA_SHARED_DATA): import eyepacs-sample with the EyePACS
mapping, fine-tune `tiny` a few steps from the session's run (`fit --init`), export, build an index,
start the service and send every photograph to /search/image and /grade."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from bundle_factory import tiny_bundle
from service_server import serve

from index.archive.brset import read_archive
from index.archive.importer import import_archive
from index.build import BuildOptions, build_index
from service.settings import ServiceSettings
from training.export import export_bundle
from training.splits import make_splits, save_splits
from training.train import FitOptions, fit

pytestmark = pytest.mark.shared_data


def test_every_real_photograph_is_answered_and_finds_itself(
    shared_data_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    source = shared_data_dir / "eyepacs-sample"
    archive = tmp_path / "archive"
    report = import_archive(source / "images", source / "labels.csv", archive, mapping="eyepacs")
    assert report.imported == 130
    records = read_archive(archive).records
    save_splits(make_splits(records, seed=0), tmp_path / "splits.json")

    tiny = tiny_bundle(tmp_path_factory)
    fit(FitOptions(config=str(tiny.run / "config.json"), archive=archive, splits=tmp_path / "splits.json",
                   out=tmp_path / "run", epochs=1, batch_size=8, max_steps=3, precision="fp32", seed=0, init=tiny.run))
    export_bundle(tmp_path / "run", archive, tmp_path / "splits.json", tmp_path / "bundle")
    info = build_index(BuildOptions(bundle=tmp_path / "bundle", archive=archive, out=tmp_path / "index",
                                    batch_size=16, device="cpu", progress=False))
    assert info.counts.indexed == 130 and info.counts.skipped == 0

    photos = sorted((archive / "fundus_photos").iterdir())
    settings = ServiceSettings(bundle=tmp_path / "bundle", index=tmp_path / "index", device="cpu")
    with serve(settings) as server:

        async def send_all() -> list[tuple[str, httpx.Response, httpx.Response]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                semaphore = asyncio.Semaphore(8)

                async def one(photo: Path) -> tuple[str, httpx.Response, httpx.Response]:
                    data = photo.read_bytes()
                    async with semaphore:
                        search = await client.post("/search/image", files={"file": (photo.name, data)},
                                                   data={"k": "5"})
                        grade = await client.post("/grade", files={"file": (photo.name, data)})
                    return photo.stem, search, grade

                return await asyncio.gather(*(one(photo) for photo in photos))

        answers = asyncio.run(send_all())

    assert len(answers) == 130
    failures = [(name, s.status_code, g.status_code) for name, s, g in answers if (s.status_code, g.status_code)
                != (200, 200)]
    assert failures == [], failures
    for name, search, grade in answers:
        neighbours = search.json()["neighbours"]
        ids = [n["image_id"] for n in neighbours]
        # Its own photograph is among the nearest, at cosine ~1 (ties with near-duplicates allowed).
        assert name in ids, (name, ids)
        assert neighbours[ids.index(name)]["score"] > 0.999
        assert grade.json()["modalities"] == ["image"]


def test_crossval_of_the_shipped_model_on_the_real_photographs(shared_data_dir: Path, tmp_path: Path) -> None:
    """The README's real-photo table at one epoch: five patient-level folds, three ways to grade."""
    from training.crossval import CrossValOptions, cross_validate
    from training.zoo import resolve_run

    source = shared_data_dir / "eyepacs-sample"
    archive = tmp_path / "archive"
    import_archive(source / "images", source / "labels.csv", archive, mapping="eyepacs")
    result = cross_validate(CrossValOptions(archive=archive, init=resolve_run("zoo:tiny-synth"),
                                            out=tmp_path / "cv", folds=5, epochs=1, batch_size=16))
    scores = result["scores"]
    assert len(scores) == 15
    assert sum(s["test_images"] for s in scores if s["method"] == "probe") == 130
    for method in ("finetune", "scratch", "probe"):
        summary = result["summary"][method]
        assert summary["folds"] == 5 and summary["kappa_mean"] is not None
        assert summary["referable_auroc_mean"] is not None and 0 <= summary["referable_auroc_mean"] <= 1
