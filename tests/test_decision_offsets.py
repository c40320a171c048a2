"""Decision offsets (issue 11, macro-F1): per-grade offsets b added to the temperature-scaled logits,
softmax(logits / T + b), fitted for macro-F1 by `retina-train calibrate --offsets-split`, carried by the
calibration into the bundle, applied by the embedder, reported by the service and used by `evaluate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import TinyBundle, tiny_bundle
from pydantic import ValidationError
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from index.bundle import Calibration, DecisionOffsets
from index.embedder import Embedder
from index.preprocess import decode_image
from training.calibration import (
    CALIBRATION_FILE,
    fit_offsets,
    load_calibration,
    macro_f1,
    scaled_logits,
    scaled_probabilities,
    stratified_sample,
)
from training.cli import app

runner = CliRunner()


def _said(result: object) -> str:
    return " ".join(result.output.split())  # type: ignore[attr-defined]


def _over_predicting(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 5-grade problem (grade 0 common, the rest rare) whose grade-1 logit is inflated by 2.5: the
    argmax calls many grade-0 items grade 1, as a model trained with grade-balanced sampling does."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(5, size=n, p=[0.84, 0.04, 0.04, 0.04, 0.04])
    logits = rng.normal(scale=1.0, size=(n, 5))
    logits[np.arange(n), labels] += 2.0
    logits[:, 1] += 2.5
    return logits, labels


# --- the maths --------------------------------------------------------------------------------------


def test_fit_offsets_undoes_an_inflated_grade_and_raises_macro_f1_on_new_items() -> None:
    logits, labels = _over_predicting(6000, seed=0)
    offsets = fit_offsets(logits, labels)
    assert offsets[0] == 0.0
    assert offsets[1] < -1.0  # the inflated grade is pulled back
    fresh_logits, fresh_labels = _over_predicting(6000, seed=1)  # the gain carries over to unseen items
    before = f1_score(fresh_labels, fresh_logits.argmax(1), average="macro")
    after = f1_score(fresh_labels, (fresh_logits + offsets).argmax(1), average="macro")
    assert after > before + 0.05
    assert macro_f1(fresh_logits, fresh_labels, offsets) == pytest.approx(after)


def test_fit_offsets_keeps_zeros_where_nothing_improves() -> None:
    labels = np.repeat(np.arange(5), 20)
    logits = np.eye(5)[labels] * 5.0  # already perfect: every offset near 0 ties, and 0 wins
    assert fit_offsets(logits, labels).tolist() == [0.0] * 5


def test_weights_stand_for_the_rows_a_sample_left_out() -> None:
    logits, labels = _over_predicting(4000, seed=2)
    rows, weights = stratified_sample(labels, per_grade=100, seed=0)
    counts = np.bincount(labels, minlength=5)
    assert np.bincount(labels[rows], minlength=5).tolist() == np.minimum(counts, 100).tolist()
    assert list(rows) == sorted(rows) and len(set(rows.tolist())) == len(rows)
    for grade in range(5):  # each grade's weights add up to its count in the whole set
        assert weights[labels[rows] == grade].sum() == pytest.approx(counts[grade])
    full = macro_f1(logits, labels)
    assert macro_f1(logits[rows], labels[rows], None, weights) == pytest.approx(full, abs=0.08)
    with pytest.raises(ValueError, match="at least 1"):
        stratified_sample(labels, per_grade=0)
    with pytest.raises(ValueError, match="no labels"):
        stratified_sample(np.array([], np.int64), per_grade=5)


def test_offsets_are_added_after_the_temperature() -> None:
    logits = np.array([[2.0, 0.0, 1.0, 0.0, -1.0]])
    offsets = [0.0, 0.5, -0.5, 0.0, 0.0]
    assert scaled_logits(logits, 2.0, offsets) == pytest.approx(np.array([[1.0, 0.5, 0.0, 0.0, -0.5]]))
    expected = np.exp([1.0, 0.5, 0.0, 0.0, -0.5]) / np.exp([1.0, 0.5, 0.0, 0.0, -0.5]).sum()
    assert scaled_probabilities(logits, 2.0, offsets)[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match="one offset per grade"):
        scaled_logits(logits, 1.0, [0.0, 1.0])


def _offsets(**changes: object) -> dict:
    values: dict = {"icdr": [0.0, -1.0, 0.5, 0.0, 0.0], "sdrg": [0.0] * 5, "split": "train",
                    "items": {"icdr": 10, "sdrg": 10}, "per_grade": 5, "macro_f1_before": {"icdr": 0.5, "sdrg": 0.5},
                    "macro_f1_after": {"icdr": 0.6, "sdrg": 0.5}}
    return values | changes


def test_the_schema_checks_offsets_and_old_calibrations_have_none() -> None:
    base = {"icdr_temperature": 1.5, "sdrg_temperature": 0.8, "archive": "a", "split": "val",
            "items": {"icdr": 10, "sdrg": 10}, "ece_before": {"icdr": 0.1, "sdrg": 0.1},
            "ece_after": {"icdr": 0.05, "sdrg": 0.05}, "nll_before": {"icdr": 1.0, "sdrg": 1.0},
            "nll_after": {"icdr": 0.9, "sdrg": 0.9}}
    old = Calibration.model_validate(base)  # a calibration.json written before offsets existed
    assert old.offsets is None and old.offsets_of("icdr") == (0.0,) * 5
    new = Calibration.model_validate(base | {"offsets": _offsets()})
    assert new.offsets_of("icdr") == (0.0, -1.0, 0.5, 0.0, 0.0) and new.offsets_of("sdrg") == (0.0,) * 5
    with pytest.raises(ValueError, match="no grade head"):
        new.offsets_of("dme")
    for bad in ({"icdr": [0.0, 1.0]}, {"sdrg": [0.0, 0.0, float("nan"), 0.0, 0.0]}, {"per_grade": 0},
                {"surprise": 1}):
        with pytest.raises(ValidationError):
            DecisionOffsets.model_validate(_offsets(**bad))


# --- calibrate -> export -> embedder -> evaluate -> service ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def with_offsets(tiny: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a copy of the tiny run whose calibration.json has offsets forcing ICDR 3, its bundle), both via the CLI."""
    root = tmp_path_factory.mktemp("offsets")
    run = root / "run"
    shutil.copytree(tiny.run, run)
    result = runner.invoke(app, ["calibrate", "--run", str(run), "--archive", str(tiny.archive), "--splits",
                                 str(tiny.splits), "--split", "val", "--offsets-split", "train",
                                 "--offsets-per-grade", "4"])
    assert result.exit_code == 0, result.output
    assert "decision offsets on split train" in _said(result) and "macro-F1" in result.output
    fitted = load_calibration(run / CALIBRATION_FILE)
    assert fitted.offsets is not None and fitted.offsets.split == "train" and fitted.offsets.per_grade == 4
    train = json.loads(tiny.splits.read_text())["train"]
    assert fitted.offsets.items["icdr"] <= min(len(train), 5 * 4)
    for head in ("icdr", "sdrg"):
        assert getattr(fitted.offsets, head)[0] == 0.0
        assert fitted.offsets.macro_f1_after[head] >= fitted.offsets.macro_f1_before[head]
    # Offsets that make ICDR 3 win everywhere, whatever temperature the 2-step model was fitted (a tiny
    # temperature multiplies its logit gaps): what evaluate and the service report must follow them.
    forced = fitted.model_copy(update={"offsets": fitted.offsets.model_copy(update={"icdr": [0, 0, 0, 1000.0, 0]})})
    (run / CALIBRATION_FILE).write_text(forced.model_dump_json(indent=1))
    result = runner.invoke(app, ["export", "--run", str(run), "--archive", str(tiny.archive), "--splits",
                                 str(tiny.splits), "--out", str(root / "bundle")])
    assert result.exit_code == 0, result.output
    return run, root / "bundle"


def test_calibrate_names_a_missing_offsets_split(tiny: TinyBundle, tmp_path: Path) -> None:
    result = runner.invoke(app, ["calibrate", "--run", str(tiny.run), "--archive", str(tiny.archive),
                                 "--splits", str(tiny.splits), "--offsets-split", "nope",
                                 "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2 and "--offsets-split 'nope'" in _said(result)
    assert not (tmp_path / "c.json").exists()


def test_the_embedder_adds_the_offsets_after_the_temperature(with_offsets: tuple[Path, Path],
                                                             tiny: TinyBundle) -> None:
    run, bundle = with_offsets
    calibration = load_calibration(run / CALIBRATION_FILE)
    plain, adjusted = Embedder(tiny.bundle, device="cpu"), Embedder(bundle, device="cpu")
    assert plain.offsets is None and adjusted.offsets is not None
    photo = decode_image(sorted((tiny.archive / "fundus_photos").glob("*.jpg"))[0].read_bytes())
    raw, graded = plain.grade(image=photo), adjusted.grade(image=photo)
    for head in ("icdr", "sdrg"):
        log_p = np.log(getattr(raw, f"{head}_probabilities").astype(np.float64))  # logits up to a constant
        expected = scaled_probabilities(log_p[None], calibration.temperature(head), calibration.offsets_of(head))[0]
        assert getattr(graded, f"{head}_probabilities") == pytest.approx(expected, abs=1e-4)
    assert graded.icdr_grade == 3


def test_evaluate_grades_with_the_offsets(with_offsets: tuple[Path, Path], tiny: TinyBundle, tmp_path: Path) -> None:
    run, _ = with_offsets
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--archive", str(tiny.archive), "--splits",
                                 str(tiny.splits), "--split", "val", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["calibration"]["offsets"]["icdr"] == [0, 0, 0, 1000.0, 0]
    confusion = np.array(metrics["icdr"]["confusion_matrix"])
    assert confusion[:, 3].sum() == confusion.sum()  # every photograph graded ICDR 3, as the service would
    assert "Decision offsets" in (tmp_path / "eval" / "report.md").read_text()


def test_the_service_reports_its_decision_offsets(with_offsets: tuple[Path, Path], tiny: TinyBundle,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    from service_server import serve, tiny_index

    from service.settings import ServiceSettings

    run, bundle = with_offsets
    _, index = tiny_index(tmp_path_factory)
    with serve(ServiceSettings(bundle=bundle, index=index, device="cpu", store="faiss")) as server:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["decision_offsets"]["icdr"] == [0, 0, 0, 1000.0, 0]
        assert ready["decision_offsets"]["sdrg"] == list(load_calibration(run / CALIBRATION_FILE).offsets_of("sdrg"))
        photo = sorted((tiny.archive / "fundus_photos").glob("*.jpg"))[0].read_bytes()
        graded = httpx.post(server.url + "/grade", files={"file": ("p.jpg", photo, "image/jpeg")}, timeout=60).json()
        assert graded["calibrated"] is True and graded["icdr"]["grade"] == 3
