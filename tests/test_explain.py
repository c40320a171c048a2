"""The occlusion heatmap (`index.explain`) and its evaluation (`retina-train explain-eval`).

The heatmap's logic is checked against a stand-in model whose only evidence is known: it grades a photograph
by how much dark lesion-like detail it holds, so the peak must fall on the one dark spot the test paints,
and move when the spot moves, through a non-square photograph with a black border (the mapping back to the
photograph's pixels). The real path runs on the session's tiny bundle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from bundle_factory import tiny_bundle
from PIL import Image, ImageDraw, ImageFilter
from typer.testing import CliRunner

from index.explain import (
    ExplainError,
    check_window,
    explain_photograph,
    model_input_box,
    overlay,
    window_origins,
)
from index.preprocess import ImageSpec, model_pixels, to_model_input
from index.records import ICDR_NAMES, SDRG_NAMES


class DarkSpotModel:
    """A stand-in for `Embedder`: P(ICDR >= 1) rises with the number of dark-red, non-black pixels."""

    def __init__(self, size: int = 112) -> None:
        self.image_spec = ImageSpec(size=size)
        self.manifest = SimpleNamespace(icdr_names=ICDR_NAMES, sdrg_names=SDRG_NAMES)
        self.calls = 0

    def grade_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        rgb = pixels.transpose(0, 2, 3, 1) * 0.5 + 0.5  # undo mean/std 0.5
        red, green = rgb[..., 0], rgb[..., 1]
        # Dark red (90, 20, 20), not the black border nor the disc's blurred edge (orange fading to black).
        dark = (red > 0.1) & (red < 0.6) & (green < 0.35 * red)
        p = 1.0 - np.exp(-dark.sum(axis=(1, 2)) / 5.0)
        icdr = np.stack([1 - p, p, 0 * p, 0 * p, 0 * p], axis=1).astype(np.float32)
        return icdr, icdr.copy()


def fundus_with_spot(spot: tuple[float, float], size: tuple[int, int] = (360, 230),
                     centre: tuple[float, float] = (200, 115), radius: float = 120) -> Image.Image:
    """A smooth orange disc (cut at top and bottom by the frame) on black, with one dark-red spot."""
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    cx, cy = centre
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(200, 110, 60))
    x, y = spot
    draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=(90, 20, 20))
    return image.filter(ImageFilter.GaussianBlur(0.7))


def test_square_box_is_where_the_model_input_comes_from() -> None:
    image = fundus_with_spot((150, 90))
    spec = ImageSpec(size=112)
    square, fov = model_input_box(image, spec)
    assert fov[0] == pytest.approx(80, abs=2) and fov[2] == pytest.approx(320, abs=2)
    assert fov[1] == 0 and fov[3] == 230
    assert square[1] < 0 < square[3] - 230  # padded above and below the photograph
    assert square[2] - square[0] == square[3] - square[1] == fov[2] - fov[0]
    cropped = image.crop(tuple(int(v) for v in square)).resize((112, 112), Image.Resampling.BICUBIC,
                                                              reducing_gap=2.0)
    assert np.array_equal(np.asarray(cropped), model_pixels(image, spec))


@pytest.mark.parametrize("spot", [(150, 90), (260, 170), (205, 40)])
def test_peak_falls_on_the_only_evidence_and_moves_with_it(spot: tuple[float, float]) -> None:
    model = DarkSpotModel()
    image = fundus_with_spot(spot)
    explanation = explain_photograph(model, image)  # type: ignore[arg-type]
    window, stride = check_window(112, None, None)
    assert (explanation.window, explanation.stride) == (window, stride) == (12, 6)  # 3/28 of 112 px, half of it
    assert explanation.heatmap.shape == (19, 19)
    assert explanation.heatmap.dtype == np.float32
    assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() == pytest.approx(1.0)
    assert explanation.target_grade == 1 and explanation.target_probability > 0.9
    assert 0 < explanation.occlusions <= len(window_origins(112, 12, 6)) ** 2
    cell = stride * (explanation.square_box[2] - explanation.square_box[0]) / 112
    assert math.dist(explanation.peak_xy, spot) <= cell, (explanation.peak_xy, spot, cell)
    # Far from the spot the map is empty: hiding plain background lowers nothing.
    xs, ys = explanation.cell_centres()
    far = np.hypot(xs[None, :] - spot[0], ys[:, None] - spot[1]) > 3 * cell
    assert explanation.heatmap[far].max() < 0.05
    assert overlay(image, explanation).size == image.size


def test_no_evidence_gives_an_empty_map() -> None:
    model = DarkSpotModel()
    explanation = explain_photograph(model, fundus_with_spot((-50, -50)))  # type: ignore[arg-type]
    assert explanation.icdr_grade == 0 and explanation.target_grade == 1
    assert explanation.max_drop == pytest.approx(0.0, abs=1e-6)
    assert not explanation.heatmap.any()


def test_window_bounds() -> None:
    assert check_window(224, None, None) == (24, 12)
    assert check_window(224, 56, 14) == (56, 14)
    for window, stride in ((4, None), (200, None), (32, 4), (32, 40), (8, 2)):
        with pytest.raises(ExplainError):
            check_window(224, window, stride)
    assert window_origins(112, 16, 8)[-1] == 96
    assert window_origins(100, 30, 20) == [0, 20, 40, 60, 70]


# --- the real bundle ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from index.embedder import Embedder

    return Embedder(tiny_bundle(tmp_path_factory).bundle, device="cpu", threads=1)


def test_grade_pixels_agrees_with_grade(embedder) -> None:  # type: ignore[no-untyped-def]
    images = [fundus_with_spot((150, 90)), fundus_with_spot((260, 170), size=(300, 300), centre=(150, 150))]
    icdr, sdrg = embedder.grade_pixels(np.stack([to_model_input(i, embedder.image_spec) for i in images]),
                                       batch_size=1)
    for row, image in enumerate(images):
        grades = embedder.grade(image)
        np.testing.assert_allclose(icdr[row], grades.icdr_probabilities, atol=1e-5)
        np.testing.assert_allclose(sdrg[row], grades.sdrg_probabilities, atol=1e-5)
    empty = embedder.grade_pixels(np.zeros((0, 3, 112, 112), np.float32))
    assert empty[0].shape == (0, 5)


def test_real_bundle_heatmap(embedder) -> None:  # type: ignore[no-untyped-def]
    image = fundus_with_spot((150, 90))
    explanation = explain_photograph(embedder, image, window=28, stride=14)
    assert explanation.heatmap.shape == (8, 8)
    assert 0.0 <= explanation.heatmap.min() and explanation.heatmap.max() <= 1.0
    np.testing.assert_allclose(explanation.icdr_probabilities, embedder.grade(image).icdr_probabilities, atol=1e-5)
    grade = int(np.argmax(explanation.icdr_probabilities))
    assert explanation.target_grade == max(1, grade)
    assert explanation.target_probability == pytest.approx(
        float(explanation.icdr_probabilities[explanation.target_grade:].sum()), abs=1e-6)
    assert explanation.seconds > 0


def test_explain_eval_command(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from index.records import FundusRecord
    from training.cli import app
    from training.synth.archive import write_archive

    grades = [(0, 0), (1, 1), (2, 2), (4, 4)]
    records = [FundusRecord(image_id=f"e{i}", patient_id=f"p{i}", dr_icdr=a, dr_sdrg=b)
               for i, (a, b) in enumerate(grades)]
    write_archive(records, tmp_path / "archive", size=128, seed=2)
    bundle = tiny_bundle(tmp_path_factory).bundle
    result = CliRunner().invoke(app, ["explain-eval", "--bundle", str(bundle), "--archive", str(tmp_path / "archive"),
                                      "--window", "28", "--stride", "28", "--threads", "1",
                                      "--json", str(tmp_path / "report.json"), "--overlays", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    assert "pointing game" in result.output and "latency per photograph" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["summary"]
    assert summary["photographs"] == 3  # the ICDR 0 photograph is not played
    assert 0.0 <= summary["pointing_game"] <= 1.0 and 0.0 <= summary["random_point"] <= 1.0
    assert summary["tolerance_px"] == pytest.approx(15 * 128 / 512)
    assert summary["latency_ms_median"] > 0 and summary["cpu"]
    assert {p["image_id"] for p in report["photographs"]} == {"e1", "e2", "e3"}
    for p in report["photographs"]:
        assert p["hit"] == (p["distance"] <= summary["tolerance_px"])
    assert len(list((tmp_path / "png").glob("*.png"))) == 3

    (tmp_path / "archive" / "synth_inventory.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "lesions"}) + "\n"
                for line in (tmp_path / "archive" / "synth_inventory.jsonl").read_text().splitlines()))
    result = CliRunner().invoke(app, ["explain-eval", "--bundle", str(bundle), "--archive", str(tmp_path / "archive")])
    assert result.exit_code == 2 and "no lesion positions" in " ".join(result.output.split())
