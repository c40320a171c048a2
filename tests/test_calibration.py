"""Calibrated probabilities (issue 15): temperature scaling fitted by `retina-train calibrate`, ECE and the
reliability diagram, the temperatures in the bundle's manifest, the embedder's softmax(logits / T), the
service's `calibrated` flag, and `retina-train evaluate`'s calibration section."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import TinyBundle, tiny_bundle
from pydantic import ValidationError
from typer.testing import CliRunner

from index.bundle import MANIFEST_FILE, Calibration, read_manifest
from index.embedder import Embedder
from index.preprocess import decode_image
from training.calibration import (
    CALIBRATION_FILE,
    expected_calibration_error,
    fit_head,
    fit_temperature,
    load_calibration,
    negative_log_likelihood,
    reliability,
    scaled_probabilities,
)
from training.cli import app

runner = CliRunner()


def _said(result: object) -> str:
    """A CLI result's output with rich's line wrapping undone."""
    return " ".join(result.output.split())  # type: ignore[attr-defined]


def _sampled(n: int, scale: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits `scale * z` of a model whose true probabilities are softmax(z), and labels drawn from them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, 5))
    probabilities = scaled_probabilities(z)
    labels = (probabilities.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return scale * z, labels


# --- the maths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [3.0, 1.0, 0.5])
def test_fit_temperature_recovers_the_scale_of_over_or_under_confident_logits(scale: float) -> None:
    logits, labels = _sampled(20_000, scale)
    assert fit_temperature(logits, labels) == pytest.approx(scale, rel=0.05)


def test_temperature_scaling_lowers_nll_and_ece_and_keeps_the_grades() -> None:
    logits, labels = _sampled(20_000, 3.0, seed=1)
    fit = fit_head(logits, labels)
    assert fit.nll_after < fit.nll_before
    assert fit.ece_before > 0.1 and fit.ece_after < 0.03
    assert fit.nll_after == pytest.approx(negative_log_likelihood(logits, labels, fit.temperature))
    after = scaled_probabilities(logits, fit.temperature)
    assert (after.argmax(1) == logits.argmax(1)).all()
    assert np.allclose(after.sum(1), 1)


def test_ece_by_hand() -> None:
    # 0.9-confident: 1 of 2 right (|0.5 - 0.9| = 0.4); 0.6-confident: 2 of 2 right (|1 - 0.6| = 0.4).
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(probabilities, np.array([0, 1, 0, 0]), bins=10) == pytest.approx(0.4)
    # One bin: |accuracy - mean confidence| = |0.75 - 0.75|.
    assert expected_calibration_error(probabilities, np.array([0, 1, 0, 0]), bins=1) == pytest.approx(0.0)
    # Calibrated: 0.75-confident and right 3 times in 4.
    calibrated = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(calibrated, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    # Always right at 0.5 confidence: off by 0.5.
    assert expected_calibration_error(np.array([[0.5, 0.5, 0.0]] * 3), np.zeros(3, int)) == pytest.approx(0.5)


def test_reliability_bins_are_right_closed_and_empty_bins_are_nan() -> None:
    probabilities = np.array([[0.5, 0.5], [0.75, 0.25], [0.875, 0.125], [1.0, 0.0], [0.25, 0.75]])
    data = reliability(probabilities, np.array([0, 1, 0, 0, 1]), bins=4)
    assert data.edges.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert data.counts.tolist() == [0, 1, 2, 2]  # 0.5 in (0.25, 0.5]; both 0.75 in (0.5, 0.75]
    assert np.isnan(data.accuracy[0]) and np.isnan(data.confidence[0])
    assert data.accuracy[1:].tolist() == [1.0, 0.5, 1.0]
    assert data.confidence[1:].tolist() == pytest.approx([0.5, 0.75, 0.9375])
    assert data.ece == pytest.approx(0.5 / 5 + 2 / 5 * 0.25 + 2 / 5 * 0.0625)


def test_missing_labels_are_left_out_and_bad_input_is_refused() -> None:
    logits, labels = _sampled(2_000, 2.0, seed=2)
    with_missing = np.concatenate([labels, [-100, -100]])
    fit = fit_head(np.concatenate([logits, [[50.0, 0, 0, 0, 0]] * 2]), with_missing)
    assert fit.items == 2_000 and fit.temperature == pytest.approx(fit_temperature(logits, labels))
    with pytest.raises(ValueError, match="labels must be integers"):
        fit_temperature(logits, labels + 5)
    with pytest.raises(ValueError, match="no labelled items"):
        fit_head(logits[:3], np.array([-100, -100, -100]))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.full((2, 5), np.nan), np.array([0, 1]))


def _calibration(**changes: object) -> dict:
    values: dict = {"icdr_temperature": 1.5, "sdrg_temperature": 0.8, "archive": "a", "split": "val",
                    "items": {"icdr": 10, "sdrg": 10}, "ece_before": {"icdr": 0.1, "sdrg": 0.1},
                    "ece_after": {"icdr": 0.05, "sdrg": 0.05}, "nll_before": {"icdr": 1.0, "sdrg": 1.0},
                    "nll_after": {"icdr": 0.9, "sdrg": 0.9}}
    return values | changes


def test_the_calibration_schema_refuses_bad_temperatures_and_unknown_fields() -> None:
    assert Calibration.model_validate(_calibration()).temperature("sdrg") == 0.8
    for bad in ({"icdr_temperature": 0.0}, {"sdrg_temperature": -1.0}, {"icdr_temperature": float("inf")},
                {"surprise": 1}):
        with pytest.raises(ValidationError):
            Calibration.model_validate(_calibration(**bad))


# --- calibrate -> export -> embedder -> service ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def calibrated(tiny: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a copy of the tiny run with RUN/calibration.json from the CLI, its calibrated bundle from the CLI)."""
    root = tmp_path_factory.mktemp("calibrated")
    run = root / "run"
    shutil.copytree(tiny.run, run)
    result = runner.invoke(app, ["calibrate", "--run", str(run), "--archive", str(tiny.archive), "--splits",
                                 str(tiny.splits), "--split", "train"])
    assert result.exit_code == 0, result.output
    assert "ECE before" in result.output and "icdr" in result.output
    result = runner.invoke(app, ["export", "--run", str(run), "--archive", str(tiny.archive), "--splits",
                                 str(tiny.splits), "--out", str(root / "bundle")])
    assert result.exit_code == 0, result.output
    assert "calibrated: temperature ICDR" in result.output
    return run, root / "bundle"


def test_calibrate_writes_the_temperatures_and_errors(calibrated: tuple[Path, Path], tiny: TinyBundle) -> None:
    run, _ = calibrated
    written = json.loads((run / CALIBRATION_FILE).read_text())
    calibration = load_calibration(run / CALIBRATION_FILE)
    train = len(json.loads(tiny.splits.read_text())["train"])
    assert calibration.split == "train" and calibration.items == {"icdr": train, "sdrg": train}
    assert calibration.archive == str(tiny.archive) and calibration.inputs == ["image"]
    assert calibration.icdr_temperature > 0 and calibration.sdrg_temperature > 0
    for head in ("icdr", "sdrg"):
        assert 0 <= written["ece_before"][head] <= 1 and 0 <= written["ece_after"][head] <= 1
        assert written["nll_after"][head] <= written["nll_before"][head] + 1e-9  # the fit minimises the NLL


def test_the_exported_embedder_gives_softmax_of_logits_over_t(calibrated: tuple[Path, Path], tiny: TinyBundle) -> None:
    run, bundle = calibrated
    calibration = load_calibration(run / CALIBRATION_FILE)
    manifest = read_manifest(bundle)
    assert manifest.calibration == calibration
    plain, scaled = Embedder(tiny.bundle, device="cpu"), Embedder(bundle, device="cpu")
    assert not plain.calibrated and plain.manifest.calibration is None
    assert scaled.calibrated
    assert scaled.temperatures == (calibration.icdr_temperature, calibration.sdrg_temperature)
    images = [decode_image(p.read_bytes()) for p in sorted((tiny.archive / "fundus_photos").glob("*.jpg"))[:6]]
    for image in images:
        raw, calibrated_grades = plain.grade(image=image), scaled.grade(image=image)
        assert not raw.calibrated and calibrated_grades.calibrated
        for head, temperature in (("icdr", calibration.icdr_temperature), ("sdrg", calibration.sdrg_temperature)):
            # log softmax(z) = z - c: softmax(log p / T) = softmax(z / T) exactly.
            log_p = np.log(getattr(raw, f"{head}_probabilities").astype(np.float64))
            expected = scaled_probabilities(log_p[None], temperature)[0]
            assert getattr(calibrated_grades, f"{head}_probabilities") == pytest.approx(expected, abs=1e-4)
    # The search queries and archive records are calibrated the same way.
    query = scaled.query_images(images[:1])[0]
    assert query.grades.calibrated
    assert query.grades.icdr_probabilities == pytest.approx(scaled.grade(image=images[0]).icdr_probabilities, abs=1e-6)


def test_export_refuses_a_calibration_of_other_weights(calibrated: tuple[Path, Path], tiny: TinyBundle,
                                                       tmp_path: Path) -> None:
    run, _ = calibrated
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads((run / CALIBRATION_FILE).read_text()) | {"weights_sha256": "0" * 64}))
    common = ["export", "--run", str(run), "--archive", str(tiny.archive), "--splits", str(tiny.splits),
              "--out", str(tmp_path / "bundle")]
    result = runner.invoke(app, [*common, "--calibration", str(other)])
    assert result.exit_code == 2 and "other weights" in _said(result)
    assert not (tmp_path / "bundle").exists()
    result = runner.invoke(app, [*common, "--calibration", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "not found" in _said(result)
    result = runner.invoke(app, [*common, "--calibration", str(other), "--no-calibration"])
    assert result.exit_code == 2 and "contradict" in _said(result)


def test_calibrate_refuses_to_write_into_a_shipped_model_and_names_a_bad_split(tiny: TinyBundle) -> None:
    result = runner.invoke(app, ["calibrate", "--run", "zoo:tiny-synth", "--archive", str(tiny.archive),
                                 "--splits", str(tiny.splits)])
    assert result.exit_code == 2 and "--out" in _said(result)
    result = runner.invoke(app, ["calibrate", "--run", str(tiny.run), "--archive", str(tiny.archive),
                                 "--splits", str(tiny.splits), "--split", "nope", "--out", "/dev/null"])
    assert result.exit_code == 2 and "no split 'nope'" in _said(result)


def test_a_manifest_without_calibration_loads_and_grades_as_before(tiny: TinyBundle, tmp_path: Path) -> None:
    raw = json.loads((tiny.bundle / MANIFEST_FILE).read_text())
    assert raw.get("calibration") is None
    copy = tmp_path / "bundle"
    shutil.copytree(tiny.bundle, copy)
    raw.pop("calibration", None)  # a bundle written before the field existed
    (copy / MANIFEST_FILE).write_text(json.dumps(raw))
    embedder = Embedder(copy, device="cpu")
    assert read_manifest(copy).calibration is None and not embedder.calibrated
    assert embedder.temperatures == (1.0, 1.0)
    grades = embedder.grade(text="moderate non-proliferative diabetic retinopathy")
    assert not grades.calibrated
    assert grades.icdr_probabilities == pytest.approx(
        Embedder(tiny.bundle, device="cpu").grade(text="moderate non-proliferative diabetic retinopathy")
        .icdr_probabilities)


def test_evaluate_reports_ece_before_and_after_with_a_reliability_diagram(calibrated: tuple[Path, Path],
                                                                         tiny: TinyBundle, tmp_path: Path) -> None:
    run, _ = calibrated
    common = ["evaluate", "--run", str(run), "--archive", str(tiny.archive), "--splits", str(tiny.splits)]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "with")])
    assert result.exit_code == 0, result.output
    assert "ICDR ECE before / after calibration" in result.output
    metrics = json.loads((tmp_path / "with" / "metrics.json").read_text())
    section = metrics["calibration"]
    calibration = load_calibration(run / CALIBRATION_FILE)
    assert section["temperatures"] == {"icdr": calibration.icdr_temperature, "sdrg": calibration.sdrg_temperature}
    for head in ("icdr", "sdrg"):
        assert section[head]["items"] == metrics[head]["n"]
        assert 0 <= section[head]["ece_before"] <= 1 and 0 <= section[head]["ece_after"] <= 1
    report = (tmp_path / "with" / "report.md").read_text()
    assert "## Calibration" in report and "reliability.png" in report
    assert (tmp_path / "with" / "reliability.png").stat().st_size > 1000

    (run / CALIBRATION_FILE).rename(run / "aside.json")
    try:
        result = runner.invoke(app, [*common, "--out", str(tmp_path / "without")])
    finally:
        (run / "aside.json").rename(run / CALIBRATION_FILE)
    assert result.exit_code == 0, result.output
    section = json.loads((tmp_path / "without" / "metrics.json").read_text())["calibration"]
    assert section["temperatures"] is None and section["icdr"]["ece_after"] is None
    assert section["icdr"]["ece_before"] == pytest.approx(metrics["calibration"]["icdr"]["ece_before"])
    assert "before only" in (tmp_path / "without" / "report.md").read_text()


@pytest.fixture(scope="module")
def served_calibrated(calibrated: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service on the calibrated bundle, over the tiny index (built with the uncalibrated bundle: the
    same graphs, so the same fingerprint)."""
    from service_server import serve, tiny_index

    from service.settings import ServiceSettings

    _, index = tiny_index(tmp_path_factory)
    settings = ServiceSettings(bundle=calibrated[1], index=index, device="cpu", store="faiss")
    with serve(settings) as server:
        yield server.url


def test_the_service_says_its_probabilities_are_calibrated(served_calibrated: str, calibrated: tuple[Path, Path],
                                                           tiny: TinyBundle) -> None:
    url, (run, bundle) = served_calibrated, calibrated
    calibration = load_calibration(run / CALIBRATION_FILE)
    ready = httpx.get(url + "/readyz").json()
    assert ready["ready"] is True, ready
    assert ready["calibration"] == {"icdr": calibration.icdr_temperature, "sdrg": calibration.sdrg_temperature}
    photo = sorted((tiny.archive / "fundus_photos").glob("*.jpg"))[0].read_bytes()
    graded = httpx.post(url + "/grade", files={"file": ("p.jpg", photo, "image/jpeg")}, timeout=60).json()
    assert graded["calibrated"] is True
    expected = Embedder(bundle, device="cpu").grade(image=decode_image(photo))
    assert [p["probability"] for p in graded["icdr"]["probabilities"]] == pytest.approx(
        expected.icdr_probabilities.tolist(), abs=1e-5)
    searched = httpx.post(url + "/search/image", files={"file": ("p.jpg", photo, "image/jpeg")}, timeout=60).json()
    assert searched["predicted"]["calibrated"] is True
    texted = httpx.post(url + "/search/text", json={"text": "severe NPDR", "k": 3}, timeout=60).json()
    assert texted["predicted"]["calibrated"] is True
    schema = httpx.get(url + "/openapi.json").json()["components"]["schemas"]
    assert "calibrated" in schema["GradeResponse"]["properties"] and "calibrated" in schema["Predicted"]["properties"]


def test_an_uncalibrated_bundle_is_served_with_calibrated_false(tiny: TinyBundle,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    from service_server import serve, tiny_index

    from service.settings import ServiceSettings

    _, index = tiny_index(tmp_path_factory)
    with serve(ServiceSettings(bundle=tiny.bundle, index=index, device="cpu", store="faiss")) as server:
        assert httpx.get(server.url + "/readyz").json()["calibration"] is None
        graded = httpx.post(server.url + "/grade", data={"text": "mild NPDR"}, timeout=60).json()
        assert graded["calibrated"] is False
        texted = httpx.post(server.url + "/search/text", json={"text": "mild NPDR", "k": 3}, timeout=60).json()
        assert texted["predicted"]["calibrated"] is False
