"""The gradability gate: its answer rules, its training data, a real (tiny) training run exported into a
bundle, ONNX parity, the CLI's evaluation, and the service refusing or reporting non-fundus photographs."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from index.gate import DEFECTS, GATE_OUTPUTS, INADEQUATE, NOT_FUNDUS, REASONS, GateSpec, assess
from index.preprocess import ImageSpec, model_pixels
from index.records import Assessment
from training.gate.negatives import (
    SKIMAGE_FUNDUS,
    SKIMAGE_HELD_OUT,
    SKIMAGE_TRAIN,
    negatives,
    skimage_fundus,
    skimage_samples,
)
from training.synth.priors import QUALITY_DEFECT_FIELDS, sample_records

SPEC = GateSpec(image=ImageSpec(size=32))


def _row(fundus: float, adequate: float, **defects: float) -> list[float]:
    return [fundus, adequate, *(defects.get(d, 0.0) for d in DEFECTS)]


def test_assess_names_what_is_wrong() -> None:
    answers = assess(np.array([
        _row(0.9, 0.9),
        _row(0.2, 0.9),
        _row(0.9, 0.1, focus=0.8, artifacts=0.7),
        _row(0.9, 0.1),
    ]), SPEC)
    assert [a.ok for a in answers] == [True, False, False, False]
    assert answers[0].reasons == [] and answers[0].probability == pytest.approx(0.81)
    assert answers[1].reasons == [NOT_FUNDUS] and not answers[1].fundus
    assert answers[2].reasons == [REASONS["focus"], REASONS["artifacts"]] and answers[2].fundus
    assert answers[3].reasons == [INADEQUATE]
    assert set(answers[0].probabilities) == set(GATE_OUTPUTS)
    with pytest.raises(ValueError, match="shape"):
        assess(np.zeros((2, 3)), SPEC)


def test_the_layout_rule_keeps_fundus_photographs_and_refuses_the_samples() -> None:
    from PIL import ImageDraw

    from index.gate import fundus_layout

    assert fundus_layout(skimage_fundus())
    assert not any(fundus_layout(image) for image in skimage_samples(SKIMAGE_TRAIN + SKIMAGE_HELD_OUT).values())
    disc = Image.new("RGB", (300, 200))
    ImageDraw.Draw(disc).ellipse((60, 10, 240, 190), fill=(180, 90, 40))
    assert fundus_layout(disc)  # an orange-red field with dark corners: what the rule calls a fundus camera's
    grey = Image.new("RGB", (300, 200))
    ImageDraw.Draw(grey).ellipse((60, 10, 240, 190), fill=(120, 120, 120))
    assert not fundus_layout(grey)
    answers = assess(np.array([_row(0.1, 0.9), _row(0.1, 0.9)]), SPEC, layouts=[True, False])
    assert answers[0].fundus and answers[0].ok and answers[0].probability == pytest.approx(0.9)
    assert answers[0].probabilities["fundus_layout"] == 1.0 and not answers[0].recognised
    assert not answers[1].fundus and answers[1].reasons == [NOT_FUNDUS]
    off = assess(np.array([_row(0.1, 0.9)]), SPEC.model_copy(update={"layout_rule": False}), layouts=[True])
    assert not off[0].fundus


def test_gate_file_must_be_a_plain_name() -> None:
    with pytest.raises(ValueError):
        GateSpec(image=ImageSpec(size=32), file="../outside.onnx")


def test_quality_defects_add_defects_and_keep_the_rest() -> None:
    plain = sample_records(400, seed=4)
    boosted = sample_records(400, seed=4, quality_defects=0.5)
    assert [r.dr_icdr for r in plain] == [r.dr_icdr for r in boosted]
    changed = [b for p, b in zip(plain, boosted, strict=True) if p != b]
    assert 0.3 * 400 < len(changed) < 0.6 * 400
    for record in changed:
        assert record.quality_adequate is False
        assert any(getattr(record, f) == Assessment.ABNORMAL for f in QUALITY_DEFECT_FIELDS)
    with pytest.raises(ValueError):
        sample_records(10, seed=4, quality_defects=1.5)


def test_negatives_are_seeded_varied_and_never_the_held_out_samples() -> None:
    assert not set(SKIMAGE_TRAIN) & set(SKIMAGE_HELD_OUT)
    assert SKIMAGE_FUNDUS not in SKIMAGE_TRAIN + SKIMAGE_HELD_OUT
    sources = skimage_samples(SKIMAGE_TRAIN[:2])
    first, again = negatives(12, 3, 64, sources), negatives(12, 3, 64, sources)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    assert all(image.mode == "RGB" for image in first)
    assert len({np.asarray(image).tobytes() for image in first}) == 12
    held_out = skimage_samples(SKIMAGE_HELD_OUT)
    assert set(held_out) == set(SKIMAGE_HELD_OUT)
    assert all(image.mode == "RGB" and min(image.size) >= 64 for image in held_out.values())
    assert skimage_fundus().mode == "RGB"


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's gated bundle (bundle_factory.gated_bundle) and the plain tiny bundle."""
    from bundle_factory import gated_bundle, tiny_bundle

    built = gated_bundle(tmp_path_factory)
    tiny = tiny_bundle(tmp_path_factory)
    return {"archive": built.archive, "gate": built.gate, "bundle": built.bundle, "index": built.index,
            "tiny_archive": tiny.archive, "plain_bundle": tiny.bundle}


def test_fit_writes_a_gate_with_its_validation_figures(gated: dict[str, Path]) -> None:
    from training.gate.train import GATE_SPEC, load_gate

    model, spec = load_gate(gated["gate"])
    info = json.loads((gated["gate"] / GATE_SPEC).read_text())
    assert len(info["history"]) == 1 and info["history"][0]["loss"] > 0
    assert "val_fundus_auroc" in spec.metrics and 0.0 <= spec.metrics["val_fundus_auroc"] <= 1.0
    assert 0 < spec.adequate_threshold < 1
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, len(GATE_OUTPUTS))


def test_exported_gate_matches_pytorch_and_rides_along_with_queries(gated: dict[str, Path]) -> None:
    from index.embedder import Embedder, GradeInput
    from training.data import normalise
    from training.gate.train import load_gate

    embedder = Embedder(gated["bundle"], device="cpu")
    assert embedder.has_gate and embedder.manifest.gate is not None
    images = [skimage_fundus(), *skimage_samples(("cat", "page")).values()]
    answers = embedder.check_gradability(images)
    model, spec = load_gate(gated["gate"])
    pixels = torch.from_numpy(np.stack([model_pixels(image, spec.image) for image in images]))
    with torch.inference_mode():
        expected = torch.sigmoid(model(normalise(pixels, spec.image.mean, spec.image.std))).numpy()
    found = np.array([[a.probabilities[name] for name in GATE_OUTPUTS] for a in answers])
    assert np.abs(found - expected).max() < 1e-3  # the answers are rounded to 4 decimals
    query = embedder.query_images(images[:1])[0]
    assert query.grades.gradability == answers[0]
    graded = embedder.grade_many([GradeInput(image=images[1]), GradeInput(text="no retinopathy")])
    assert graded[0].gradability == answers[1] and graded[1].gradability is None
    plain = Embedder(gated["plain_bundle"], device="cpu")
    assert not plain.has_gate and plain.query_images(images[:1])[0].grades.gradability is None
    with pytest.raises(ValueError, match="no gradability gate"):
        plain.check_gradability(images[:1])


def test_gate_evaluate_reports_the_figures(gated: dict[str, Path], tmp_path: Path) -> None:
    from training.cli import app

    out = tmp_path / "gate.json"
    result = CliRunner().invoke(app, ["gate", "evaluate", "--bundle", str(gated["bundle"]), "--archive",
                                      str(gated["archive"]), "--photos", str(gated["archive"] / "fundus_photos"),
                                      "--json", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["archive"]["photographs"] == 40 and 0 <= report["archive"]["ungradable_auroc"] <= 1
    assert set(report["skimage"]["never_seen"]) == set(SKIMAGE_HELD_OUT)
    assert report["photos"]["photographs"] == 40
    assert report["latency_ms_one_photograph"] > 0
    missing = CliRunner().invoke(app, ["gate", "evaluate", "--bundle", str(gated["plain_bundle"])])
    assert missing.exit_code == 2 and "no gradability gate" in " ".join(missing.output.split())


def test_service_refuses_or_reports_what_the_gate_calls_not_fundus(tmp_path_factory: pytest.TempPathFactory) -> None:
    from bundle_factory import gated_bundle
    from service_server import serve

    from service.settings import ServiceSettings

    built = gated_bundle(tmp_path_factory)
    with serve(ServiceSettings(bundle=built.bundle, index=built.index, device="cpu")) as served:
        assert httpx.get(served.url + "/readyz").json()["gradability_gate"] is True
        for route in ("/grade", "/search/image"):
            refused = httpx.post(served.url + route, files={"file": ("x.jpg", built.other)}, timeout=60)
            assert refused.status_code == 422 and "not a fundus photograph" in refused.json()["detail"]
            reported = httpx.post(served.url + route, files={"file": ("x.jpg", built.other)},
                                  data={"gate": "report"}, timeout=60)
            assert reported.status_code == 200, reported.text
            body = reported.json()
            assert body["gradable"]["fundus"] is False and body["gradable"]["reasons"] == [NOT_FUNDUS]
            assert any("not a fundus photograph" in note for note in body["notes"])
            accepted = httpx.post(served.url + route, files={"file": ("x.jpg", built.fundus_like)}, timeout=60)
            assert accepted.status_code == 200 and accepted.json()["gradable"]["fundus"] is True
        text_only = httpx.post(served.url + "/grade", data={"text": "moderate NPDR"}, timeout=60)
        assert text_only.status_code == 200 and text_only.json()["gradable"] is None


def _shipped_gate_answers(images: list[Image.Image]) -> list:
    """The shipped model's gate (zoo:tiny-synth/gate) on photographs, through PyTorch and the layout rule."""
    from index.gate import fundus_layout
    from training.data import normalise
    from training.gate.train import load_gate
    from training.zoo import resolve_run

    model, spec = load_gate(resolve_run("zoo:tiny-synth") / "gate")
    pixels = torch.from_numpy(np.stack([model_pixels(image, spec.image) for image in images]))
    with torch.inference_mode():
        probabilities = torch.sigmoid(model(normalise(pixels, spec.image.mean, spec.image.std))).numpy()
    return assess(probabilities, spec, [fundus_layout(image) for image in images])


def test_the_shipped_gate_refuses_every_bundled_sample_and_keeps_the_fundus_photograph() -> None:
    samples = skimage_samples(SKIMAGE_TRAIN + SKIMAGE_HELD_OUT)
    answers = _shipped_gate_answers([*samples.values(), skimage_fundus()])
    refused = {name for name, answer in zip(samples, answers, strict=False) if not answer.fundus}
    assert refused == set(samples)
    assert answers[-1].fundus


@pytest.mark.shared_data
def test_the_shipped_gate_refuses_few_real_photographs(shared_data_dir: Path) -> None:
    from index.preprocess import decode_image

    photos = sorted((shared_data_dir / "eyepacs-sample" / "images").glob("*.jpg"))
    assert len(photos) == 130
    answers = _shipped_gate_answers([decode_image(path) for path in photos])
    not_fundus = sum(not answer.fundus for answer in answers)
    assert not_fundus <= 0.05 * len(photos), f"{not_fundus} real photographs refused as not fundus photographs"
