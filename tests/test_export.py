"""`retina-train export`: a 2-step tiny run -> a bundle; manifest, fp32 and int8 parity, the CLI, and
bundle verification (checksums, missing files, schema version)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import TinyBundle, tiny_bundle
from tokenizers import Tokenizer
from typer.testing import CliRunner

from index.bundle import (
    GRADER,
    MANIFEST_FILE,
    REQUIRED_FILES,
    SCHEMA_VERSION,
    TOKENIZER,
    BundleError,
    read_manifest,
    sha256_of,
)
from index.embedder import Embedder
from index.records import ICDR_NAMES, SDRG_NAMES
from index.tabular import FeatureSpec
from index.tokens import configured_as
from training.cli import app
from training.export import FP32_TOLERANCE, MIN_COSINE, SUBSET_SUFFIX
from training.model.config import ModelConfig

runner = CliRunner()
EMBEDDINGS = ("image_embedding", "text_embedding", "record_embedding", "record_embedding" + SUBSET_SUFFIX)


def _flat(output: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    return tiny_bundle(tmp_path_factory)


def test_export_writes_a_complete_bundle(tiny: TinyBundle) -> None:
    for name in (*REQUIRED_FILES, MANIFEST_FILE):
        assert (tiny.bundle / name).is_file(), name
    assert not list(tiny.bundle.parent.glob(".bundle-*")), "the staging folder was left behind"
    manifest = read_manifest(tiny.bundle)
    config = ModelConfig.model_validate_json((tiny.run / "config.json").read_text())
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.precision == "fp32"
    assert manifest.model_name == "tiny" and manifest.model_config_data["name"] == "tiny"
    assert manifest.embedding_dim == config.embed_dim + config.num_icdr  # the grade part (`grade_part_weight`)
    assert manifest.image == config.vision.image  # the one spec, crop_fov and illumination included
    assert manifest.text.max_length == config.text.max_length
    assert manifest.text.pad_token_id == config.text.pad_token_id
    assert manifest.feature_spec == FeatureSpec.model_validate_json((tiny.run / "feature_spec.json").read_text())
    assert manifest.icdr_names == list(ICDR_NAMES) and manifest.sdrg_names == list(SDRG_NAMES)
    assert manifest.data_fingerprint == json.loads((tiny.run / "run.json").read_text())["fingerprint"]
    assert set(manifest.files) == set(REQUIRED_FILES)
    for name, digest in manifest.files.items():
        assert digest == sha256_of(tiny.bundle / name), name
    # The run's tokenizer, written with the text encoder's truncation and padding set in the file itself.
    shipped = Tokenizer.from_file(str(tiny.bundle / TOKENIZER))
    trained = Tokenizer.from_file(str(tiny.run / "tokenizer" / TOKENIZER))
    assert shipped.get_vocab() == trained.get_vocab()
    assert configured_as(shipped) == (config.text.max_length, config.text.pad_token_id)
    assert configured_as(trained) is None
    assert len(manifest.fingerprint) == 16


def test_fp32_parity_report(tiny: TinyBundle) -> None:
    report = tiny.report
    assert report.precision == "fp32" and report.samples > 0
    # The grader is checked with every modality present and with each row showing another subset.
    for name in (*EMBEDDINGS, "icdr_logits", "sdrg_logits", "icdr_logits" + SUBSET_SUFFIX):
        assert report.max_abs_diff[name] <= FP32_TOLERANCE, (name, report.lines())
    assert report.recall_at_10_fp32 is not None and report.recall_at_10_exported is not None


def test_int8_export_through_the_cli(tiny: TinyBundle, tmp_path: Path) -> None:
    out = tmp_path / "bundle-int8"
    result = runner.invoke(app, ["export", "--run", str(tiny.run), "--archive", str(tiny.archive),
                                 "--splits", str(tiny.splits), "--out", str(out), "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert "(int8)" in result.output and "R@10" in result.output
    cosines = dict(re.findall(r"^\s+(\S+(?: \(subsets\))?)\s+max \|diff\| \S+\s+min cosine (\S+)$", result.output,
                              flags=re.MULTILINE))
    assert set(EMBEDDINGS) <= set(cosines), result.output
    for name in EMBEDDINGS:
        assert float(cosines[name]) >= MIN_COSINE, (name, result.output)
    recall = re.search(r"PyTorch fp32 ([\d.]+), exported ([\d.]+)", result.output)
    assert recall is not None and abs(float(recall[1]) - float(recall[2])) <= 0.01
    manifest = read_manifest(out)
    assert manifest.precision == "int8"
    assert manifest.fingerprint != read_manifest(tiny.bundle).fingerprint
    assert (out / "image_encoder.onnx").stat().st_size < (tiny.bundle / "image_encoder.onnx").stat().st_size / 2

    # The int8 bundle runs through the same embedder and stays close to fp32.
    fp32, int8 = Embedder(tiny.bundle, device="cpu"), Embedder(out, device="cpu")
    texts = ["moderate non-proliferative diabetic retinopathy with hard exudates", "no retinopathy"]
    cosine = (fp32.embed_texts(texts).vectors * int8.embed_texts(texts).vectors).sum(axis=1)
    assert cosine.min() >= MIN_COSINE
    side = fp32.image_spec.size
    pixels = np.random.default_rng(0).normal(size=(2, 3, side, side)).astype(np.float32)
    assert (fp32.embed_pixels(pixels) * int8.embed_pixels(pixels)).sum(axis=1).min() >= MIN_COSINE


def test_cli_export_fails_clearly_on_a_missing_run(tiny: TinyBundle, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    result = runner.invoke(app, ["export", "--run", str(missing), "--archive", str(tiny.archive),
                                 "--splits", str(tiny.splits), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "no such run folder" in _flat(result.output) and "no-such-run" in result.output
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    result = runner.invoke(app, ["export", "--run", str(incomplete), "--archive", str(tiny.archive),
                                 "--splits", str(tiny.splits), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not a complete run" in _flat(result.output)
    result = runner.invoke(app, ["export", "--run", str(tiny.run), "--archive", str(tiny.archive),
                                 "--splits", str(tiny.splits), "--out", str(tmp_path / "b"), "--precision", "fp16"])
    assert result.exit_code == 2 and "--precision must be fp32 or int8" in _flat(result.output)
    assert not (tmp_path / "b").exists()


def test_cli_export_defaults_to_the_data_the_run_recorded(tiny: TinyBundle, tmp_path: Path) -> None:
    moved = tmp_path / "run"
    shutil.copytree(tiny.run, moved)
    info = json.loads((moved / "run.json").read_text())
    info["options"]["archive"] = str(tmp_path / "gone-archive")
    (moved / "run.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["export", "--run", str(moved), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not there any more" in _flat(result.output) and "--archive" in result.output
    assert not (tmp_path / "b").exists()
    recorded = json.loads((tiny.run / "run.json").read_text())["options"]
    assert Path(recorded["archive"]).is_dir() and Path(recorded["splits"]).is_file()


@pytest.fixture
def copy(tiny: TinyBundle, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(tiny.bundle, target)
    return target


def test_a_corrupted_file_is_named(copy: Path) -> None:
    data = bytearray((copy / GRADER).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / GRADER).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"checksum mismatch for {re.escape(GRADER)}"):
        read_manifest(copy)
    with pytest.raises(BundleError, match="checksum"):
        Embedder(copy, device="cpu")


def test_a_missing_file_is_named(copy: Path) -> None:
    (copy / TOKENIZER).unlink()
    with pytest.raises(BundleError, match=rf"missing file {re.escape(TOKENIZER)}"):
        read_manifest(copy)


def test_a_newer_schema_version_is_refused(copy: Path) -> None:
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer"):
        read_manifest(copy)


def test_a_v1_bundle_is_refused_with_how_to_re_export(copy: Path) -> None:
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 1  # v1: the grader re-ran both towers on raw inputs
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="retina-train export"):
        read_manifest(copy)


def test_the_grader_reads_the_towers_tokens_not_raw_inputs(tiny: TinyBundle) -> None:
    import onnxruntime as ort

    names = {item.name for item in ort.InferenceSession(str(tiny.bundle / GRADER)).get_inputs()}
    assert {"image_tokens", "text_tokens"} <= names and not {"pixels", "input_ids"} & names


def test_a_bundle_from_before_illumination_settings_loads_without_them(copy: Path) -> None:
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    assert manifest["image"].pop("illumination") == "none"
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert read_manifest(copy).image.illumination == "none"


def test_not_a_bundle_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="not found"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / MANIFEST_FILE).write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(tmp_path)


def _replace_tokenizer(bundle: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(str(bundle / TOKENIZER))
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["files"][TOKENIZER] = sha256_of(bundle / TOKENIZER)
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_tokenizer_json_without_its_settings_gets_them_from_the_manifest(tiny: TinyBundle, copy: Path) -> None:
    _replace_tokenizer(copy, Tokenizer.from_file(str(tiny.run / "tokenizer" / TOKENIZER)))  # as exported before
    texts = ["right eye, moderate NPDR " * 40, "left eye, no DR"]
    old, new = Embedder(copy, device="cpu").tokenize(texts), Embedder(tiny.bundle, device="cpu").tokenize(texts)
    np.testing.assert_array_equal(old.input_ids, new.input_ids)
    assert old.truncated == new.truncated == [True, False]


def test_a_tokenizer_json_set_otherwise_than_the_manifest_is_refused(tiny: TinyBundle, copy: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny.bundle / TOKENIZER))
    tokenizer.enable_truncation(max_length=16)
    _replace_tokenizer(copy, tokenizer)
    with pytest.raises(BundleError, match="truncates at 16 tokens"):
        Embedder(copy, device="cpu")
