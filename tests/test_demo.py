"""`retina-train demo`: the shipped model is served without training; stages are reused by fingerprint and
rebuilt when stale; `--train` keeps the train-from-scratch path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from service_server import tiny_index

import training.zoo as zoo
from training import demo
from training.demo import DemoError, DemoOptions, prepare


@pytest.fixture()
def built(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo folder holding the session's tiny archive, splits, run, bundle and index (n=64, seed 1)."""
    tiny, index = tiny_index(tmp_path_factory)
    root = tmp_path / "demo"
    root.mkdir()
    shutil.copytree(tiny.archive, root / "archive")
    shutil.copy2(tiny.splits, root / "splits.json")
    shutil.copytree(tiny.run, root / "run")
    shutil.copytree(tiny.bundle, root / "bundle")
    shutil.copytree(index, root / "index")
    evaluation = root / "run" / "eval-test"
    evaluation.mkdir(exist_ok=True)
    (evaluation / "metrics.json").write_text("{}")
    (evaluation / "report.md").write_text("# report\n")
    return root


@pytest.fixture()
def shipped(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The demo folder's run released into a temporary zoo as `zoo:tiny-test`."""
    models = tmp_path / "zoo-models"
    zoo.release(built / "run", "tiny-test", "# card\n", zoo_dir=models)
    monkeypatch.setattr(zoo, "ZOO_DIR", models)
    return "zoo:tiny-test"


@pytest.fixture()
def stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stages the demo runs (recorded, not executed)."""
    ran: list[str] = []
    monkeypatch.setattr(demo, "run_stage", lambda console, title, command: ran.append(title))
    return ran


def test_the_shipped_model_is_served_without_training(built: Path, shipped: str, stages: list[str]) -> None:
    paths = prepare(DemoOptions(root=built, n=64, seed=1, model=shipped))
    assert stages == []  # the bundle was exported from exactly these weights, the index from that bundle
    assert paths.run == zoo.ZOO_DIR / "tiny-test" and paths.evaluation == paths.run / "eval-test"


def test_a_bundle_of_other_weights_is_exported_again(built: Path, shipped: str, stages: list[str]) -> None:
    manifest_path = built / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["weights_sha256"] = "0" * 64  # e.g. the bundle of an earlier release
    manifest_path.write_text(json.dumps(manifest))
    prepare(DemoOptions(root=built, n=64, seed=1, model=shipped))
    assert stages == ["4/5 ONNX export of zoo:tiny-test with parity check"]


def test_an_unknown_or_corrupt_shipped_model_is_a_clear_error(built: Path, shipped: str, stages: list[str]) -> None:
    with pytest.raises(DemoError, match="unknown shipped model 'zoo:nope'.*zoo:tiny-test"):
        prepare(DemoOptions(root=built, n=64, seed=1, model="zoo:nope"))
    weights = zoo.ZOO_DIR / "tiny-test" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(DemoError, match="checkpoint/model.safetensors is corrupt"):
        prepare(DemoOptions(root=built, n=64, seed=1, model=shipped))
    assert stages == []


def test_everything_built_for_the_same_inputs_is_reused(built: Path, stages: list[str]) -> None:
    paths = prepare(DemoOptions(root=built, n=64, seed=1, train=True))
    assert stages == []
    assert paths.index == built / "index" and paths.bundle == built / "bundle" and paths.run == built / "run"


def test_an_index_built_with_another_bundle_is_rebuilt(built: Path, stages: list[str]) -> None:
    info_path = built / "index" / "index.json"
    info = json.loads(info_path.read_text())
    info["bundle_fingerprint"] = "0000000000000000"
    info_path.write_text(json.dumps(info))
    prepare(DemoOptions(root=built, n=64, seed=1, train=True))
    assert stages == ["6/6 FAISS index of the archive"]
    assert not (built / "index").exists()  # the stale index was removed before the rebuild


def test_a_run_of_an_older_tiny_is_retrained(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    current = tmp_path / "current-run"
    shutil.copytree(built / "run", current)
    config_path = built / "run" / "config.json"
    config = json.loads(config_path.read_text())
    config["vision"]["image_size"] = 224  # e.g. a demo made before `tiny` moved to 112 px
    config_path.write_text(json.dumps(config))
    ran: list[str] = []

    def fake_run(console: object, title: str, command: list[str]) -> None:
        ran.append(title)
        if title.startswith("3/6"):  # "training": the stale run must be gone, then today's appears
            assert not (built / "run").exists()
            shutil.copytree(current, built / "run")

    monkeypatch.setattr(demo, "run_stage", fake_run)
    prepare(DemoOptions(root=built, n=64, seed=1, train=True))
    assert ran == ["3/6 training tiny"]


def test_an_archive_generated_differently_is_refused(built: Path, stages: list[str]) -> None:
    with pytest.raises(DemoError, match="make clean"):
        prepare(DemoOptions(root=built, n=3000, seed=1, train=True))
    assert stages == []
