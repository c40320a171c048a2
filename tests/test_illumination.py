"""Illumination normalisation travels with the model: `fit --illumination` -> run config -> export ->
bundle manifest -> the service's numpy preprocessing, which must prepare photographs as training did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from index.archive.brset import read_archive
from index.bundle import read_manifest
from index.embedder import Embedder
from index.preprocess import decode_image
from training.cli import app
from training.data import load_photo, normalise
from training.export import export_bundle
from training.run import load_run
from training.splits import make_splits, save_splits
from training.synth.archive import write_archive
from training.synth.priors import sample_records

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("illumination")
    write_archive(sample_records(32, seed=5), root / "archive", size=224, seed=5)
    save_splits(make_splits(read_archive(root / "archive").records, seed=0), root / "splits.json")
    return root / "archive", root / "splits.json"


def test_local_contrast_run_exports_and_serves_with_the_same_preprocessing(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    archive_dir, splits = data
    result = runner.invoke(app, [
        "fit", "--archive", str(archive_dir), "--splits", str(splits), "--out", str(tmp_path / "run"),
        "--epochs", "1", "--batch-size", "8", "--max-steps", "1", "--precision", "fp32",
        "--illumination", "local-contrast",
    ])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["vision"]["image"]["illumination"] == "local-contrast"

    export_bundle(tmp_path / "run", archive_dir, splits, tmp_path / "bundle")
    assert read_manifest(tmp_path / "bundle").image.illumination == "local-contrast"
    embedder = Embedder(tmp_path / "bundle", device="cpu")
    assert embedder.image_spec.illumination == "local-contrast"

    archive = read_archive(archive_dir)
    paths = [archive.photo_path(r.image_id) for r in archive.records[:4]]
    run = load_run(tmp_path / "run")
    vision = run.model.config.vision
    trained = np.stack([load_photo(p, vision.image) for p in paths])
    assert abs(float(trained[:, 100:124, 100:124].mean()) - 128) < 30  # normalised, not raw fundus colours
    with torch.no_grad():
        pixels = normalise(torch.from_numpy(trained), vision.image.mean, vision.image.std)
        reference = run.model.encode_image(pixels).numpy()
    served = embedder.embed_images([decode_image(p) for p in paths])
    np.testing.assert_allclose(served, reference, atol=1e-4)


def test_an_unknown_illumination_is_refused(data: tuple[Path, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(tmp_path / "run"),
        "--illumination", "clahe",
    ])
    assert result.exit_code == 2 and "none or local-contrast" in result.output
    assert not (tmp_path / "run").exists()
