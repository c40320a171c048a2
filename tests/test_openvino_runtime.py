"""The openvino runtime (`index.runtimes.OpenVinoGraph`, `Embedder(runtime="openvino")`) on the tiny bundle:
fp32 parity with ONNX Runtime, `retina-train export --openvino-int8` (IR, checksums, cosines), the INT8 IR
through the embedder, a tampered IR refused, a clear error without openvino, `retina-index build --runtime`
and the service's /readyz with RETINA_RUNTIME=openvino."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import TinyBundle, tiny_bundle
from PIL import Image
from service_server import serve, tiny_index
from test_no_torch_imports import BLOCKER, ROOT
from typer.testing import CliRunner

from index import embedder as embedder_module
from index.archive.brset import read_archive
from index.bundle import GRADER, IMAGE_ENCODER, OPENVINO_INT8_IR, TEXT_ENCODER, BundleError, read_manifest, sha256_of
from index.cli import app as index_app
from index.embedder import Embedder
from index.preprocess import decode_image
from index.runtimes import OPENVINO_INSTALL, RuntimeUnavailable, cpu_has_vnni
from index.store import read_info
from service.settings import ServiceSettings
from training.cli import app as train_app
from training.export import MIN_COSINE

runner = CliRunner()
GRAPHS = (IMAGE_ENCODER, TEXT_ENCODER, GRADER)
FP32_COSINE = 0.9999
TEXTS = [
    "moderate non-proliferative diabetic retinopathy with hard exudates near the fovea",
    "no diabetic retinopathy",
    "proliferative diabetic retinopathy with neovascularisation of the disc and vitreous haemorrhage",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def openvino_installed() -> None:
    pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def photos(tiny: TinyBundle) -> list[Image.Image]:
    archive = read_archive(tiny.archive)
    paths = [archive.photo_path(record.image_id) for record in archive.records[:8]]
    return [decode_image(path) for path in paths if path is not None]


@pytest.fixture(scope="module")
def records(tiny: TinyBundle) -> list[object]:
    return list(read_archive(tiny.archive).records[:8])


@pytest.fixture(scope="module")
def ir_bundle(tiny: TinyBundle, openvino_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported with --openvino-int8 (fp32 ONNX graphs + the encoders' INT8 IR)."""
    pytest.importorskip("nncf")
    out = tmp_path_factory.mktemp("openvino") / "bundle"
    result = runner.invoke(train_app, ["export", "--run", str(tiny.run), "--archive", str(tiny.archive),
                                       "--splits", str(tiny.splits), "--out", str(out), "--openvino-int8"])
    assert result.exit_code == 0, result.output
    assert "OpenVINO INT8 IR (runtime openvino)" in result.output
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


# --- fp32: OpenVINO against ONNX Runtime on the same graphs -------------------------------------------


def test_openvino_fp32_matches_onnx_runtime(tiny: TinyBundle, openvino_installed: None,
                                            photos: list[Image.Image], records: list[object]) -> None:
    reference = Embedder(tiny.bundle, device="cpu")
    openvino = Embedder(tiny.bundle, device="cpu", runtime="openvino")
    assert openvino.runtime == "openvino"
    assert openvino.runtimes == {name: "OpenVINO CPU fp32" for name in GRAPHS}
    assert set(openvino.providers.values()) == {"OpenVINO CPU"}
    assert len(openvino.notes) == 1 and "no OpenVINO INT8 IR" in openvino.notes[0]  # a bundle without the IR
    assert _cosines(reference.embed_texts(TEXTS).vectors, openvino.embed_texts(TEXTS).vectors).min() >= FP32_COSINE
    assert _cosines(reference.embed_images(photos), openvino.embed_images(photos)).min() >= FP32_COSINE
    expected, got = reference.embed_records(photos, records), openvino.embed_records(photos, records)
    assert _cosines(expected.record_vectors, got.record_vectors).min() >= FP32_COSINE
    np.testing.assert_allclose(got.icdr, expected.icdr, atol=1e-4)
    np.testing.assert_allclose(got.sdrg, expected.sdrg, atol=1e-4)
    for ours, theirs in zip(openvino.query_texts(TEXTS), reference.query_texts(TEXTS), strict=True):
        np.testing.assert_allclose(ours.grades.icdr_probabilities, theirs.grades.icdr_probabilities, atol=1e-4)
    mixed = openvino.grade(image=photos[0], text=TEXTS[0], structured={"patient_age": 61})
    np.testing.assert_allclose(
        mixed.icdr_probabilities,
        reference.grade(image=photos[0], text=TEXTS[0], structured={"patient_age": 61}).icdr_probabilities, atol=1e-4)


def test_openvino_graph_is_safe_from_several_threads(tiny: TinyBundle, openvino_installed: None,
                                                     photos: list[Image.Image]) -> None:
    for performance in ("latency", "throughput"):
        embedder = Embedder(tiny.bundle, device="cpu", runtime="openvino", performance=performance)  # type: ignore[arg-type]
        one_by_one = [embedder.embed_images(photos[i : i + 3]) for i in range(4)]
        starts = [0, 1, 2, 3] * 3
        with ThreadPoolExecutor(max_workers=4) as pool:
            together = list(pool.map(embedder.embed_images, [photos[i : i + 3] for i in starts]))
        for start, vectors in zip(starts, together, strict=True):
            np.testing.assert_allclose(vectors, one_by_one[start], atol=1e-6)


def test_openvino_runtime_arguments_are_checked(tiny: TinyBundle, openvino_installed: None) -> None:
    with pytest.raises(ValueError, match="runs on the CPU"):
        Embedder(tiny.bundle, device="cuda", runtime="openvino")
    with pytest.raises(ValueError, match="runtime must be"):
        Embedder(tiny.bundle, runtime="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latency or throughput"):
        Embedder(tiny.bundle, runtime="openvino", performance="fast")  # type: ignore[arg-type]


def test_the_openvino_runtime_imports_no_torch(tiny: TinyBundle, openvino_installed: None) -> None:
    code = BLOCKER + (
        "from index.embedder import Embedder\n"
        f"embedder = Embedder({str(tiny.bundle)!r}, device='cpu', runtime='openvino')\n"
        "assert embedder.embed_texts(['no retinopathy']).vectors.shape[0] == 1\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- without openvino ------------------------------------------------------------------------------


def test_missing_openvino_names_the_extra(tiny: TinyBundle, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(RuntimeUnavailable, match=OPENVINO_INSTALL.replace("[", r"\[").replace("]", r"\]")):
        Embedder(tiny.bundle, device="cpu", runtime="openvino")
    assert Embedder(tiny.bundle, device="cpu").runtime == "onnxruntime"  # the default needs no openvino

    from service.cli import app as serve_app

    result = runner.invoke(serve_app, ["--bundle", str(tiny.bundle), "--index", str(tmp_path), "--runtime",
                                       "openvino"])
    assert result.exit_code == 2 and "retina-align[openvino]" in " ".join(result.output.split())

    import training.openvino_int8

    monkeypatch.setattr(training.openvino_int8, "missing_packages", lambda: ["openvino", "nncf"])
    result = runner.invoke(train_app, ["export", "--run", str(tiny.run), "--archive", str(tiny.archive),
                                       "--splits", str(tiny.splits), "--out", str(tmp_path / "b"),
                                       "--openvino-int8"])
    assert result.exit_code == 2 and "retina-align[openvino]" in " ".join(result.output.split())
    assert not (tmp_path / "b").exists()


# --- export --openvino-int8 ---------------------------------------------------------------------------


def test_export_writes_the_checked_int8_ir(ir_bundle: Path) -> None:
    manifest = read_manifest(ir_bundle)
    assert manifest.precision == "fp32" and manifest.openvino_int8 is not None
    assert manifest.openvino_int8.graphs == OPENVINO_INT8_IR
    for xml in OPENVINO_INT8_IR.values():
        for name in (xml, xml.replace(".xml", ".bin")):
            assert (ir_bundle / name).is_file(), name
            assert manifest.files[name] == sha256_of(ir_bundle / name), name
    cosines = manifest.openvino_int8.min_cosine
    assert set(cosines) == {"image_embedding", "text_embedding", "text_record_embedding", "record_embedding"}
    assert all(MIN_COSINE <= cosine <= 1.0 + 1e-6 for cosine in cosines.values()), cosines
    assert manifest.openvino_int8.samples > 0 and manifest.openvino_int8.calibration_items > 0
    assert "NNCF" in manifest.openvino_int8.quantizer
    assert manifest.openvino_int8.needs_vnni == cpu_has_vnni()  # 8-bit weights only where VNNI runs them


def test_embedder_runs_the_int8_ir(ir_bundle: Path, tiny: TinyBundle, photos: list[Image.Image],
                                   records: list[object]) -> None:
    openvino = Embedder(ir_bundle, device="cpu", runtime="openvino")
    assert openvino.runtimes == {IMAGE_ENCODER: "OpenVINO CPU int8", TEXT_ENCODER: "OpenVINO CPU int8",
                                 GRADER: "OpenVINO CPU fp32"}
    assert openvino.notes == []
    reference = Embedder(tiny.bundle, device="cpu")  # the same run, fp32 on ONNX Runtime
    text_queries = openvino.query_texts(TEXTS)
    expected_texts = reference.embed_texts(TEXTS).vectors
    assert _cosines(np.stack([q.vector for q in text_queries]), expected_texts).min() >= MIN_COSINE
    image_queries = openvino.query_images(photos)
    assert _cosines(np.stack([q.vector for q in image_queries]), reference.embed_images(photos)).min() >= MIN_COSINE
    for query in (*text_queries, *image_queries):
        assert abs(float(query.grades.icdr_probabilities.sum()) - 1) < 1e-4
    got, expected = openvino.embed_records(photos, records), reference.embed_records(photos, records)
    assert _cosines(got.record_vectors, expected.record_vectors).min() >= MIN_COSINE
    assert got.icdr.shape == expected.icdr.shape and np.abs(got.icdr - expected.icdr).max() < 0.02
    # ONNX Runtime on the same bundle still runs its fp32 graphs (the IR is for the openvino runtime only).
    assert set(Embedder(ir_bundle, device="cpu").runtimes.values()) == {"ONNX Runtime CPUExecutionProvider fp32"}


def test_a_tampered_ir_is_refused(ir_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(ir_bundle, copy)
    weights = copy / OPENVINO_INT8_IR[IMAGE_ENCODER].replace(".xml", ".bin")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    for runtime in ("openvino", "onnxruntime"):
        with pytest.raises(BundleError, match=r"checksum mismatch for image_encoder\.ov-int8\.bin"):
            Embedder(copy, device="cpu", runtime=runtime)  # type: ignore[arg-type]


def test_an_ir_without_its_checksum_is_refused(ir_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(ir_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["text_encoder.ov-int8.xml"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"lists no checksum for text_encoder\.ov-int8\.xml"):
        read_manifest(copy)


def test_an_ir_with_8_bit_weights_is_not_run_without_vnni(ir_bundle: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(ir_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["openvino_int8"]["needs_vnni"] = True  # as exported on a CPU with VNNI
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(embedder_module, "cpu_has_vnni", lambda: False)
    embedder = Embedder(copy, device="cpu", runtime="openvino")
    assert set(embedder.runtimes.values()) == {"OpenVINO CPU fp32"}
    assert len(embedder.notes) == 1 and "without VNNI" in embedder.notes[0]
    monkeypatch.setattr(embedder_module, "cpu_has_vnni", lambda: True)
    assert Embedder(copy, device="cpu", runtime="openvino").runtimes[IMAGE_ENCODER] == "OpenVINO CPU int8"


def test_cpu_has_vnni_reads_the_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert not cpu_has_vnni(cpuinfo)
    assert not cpu_has_vnni(tmp_path / "missing")


def test_openvino_int8_export_is_for_fp32_bundles(tiny: TinyBundle, tmp_path: Path) -> None:
    result = runner.invoke(train_app, ["export", "--run", str(tiny.run), "--archive", str(tiny.archive),
                                       "--splits", str(tiny.splits), "--out", str(tmp_path / "b"),
                                       "--precision", "int8", "--openvino-int8"])
    assert result.exit_code == 2 and "--precision fp32" in " ".join(result.output.split())


# --- retina-index build --runtime and the service ----------------------------------------------------


@pytest.fixture(scope="module")
def ir_index(ir_bundle: Path, tiny: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("openvino-index") / "index"
    result = runner.invoke(index_app, ["build", "--bundle", str(ir_bundle), "--archive", str(tiny.archive),
                                       "--out", str(out), "--batch-size", "16", "--runtime", "openvino"])
    assert result.exit_code == 0, result.output
    return out


def test_index_build_with_the_openvino_runtime(ir_index: Path, ir_bundle: Path) -> None:
    info = read_info(ir_index)
    assert info.bundle_fingerprint == read_manifest(ir_bundle).fingerprint
    assert info.runtimes[IMAGE_ENCODER] == "OpenVINO CPU int8" and info.runtimes[GRADER] == "OpenVINO CPU fp32"
    assert set(info.providers.values()) == {"OpenVINO CPU"}
    assert info.counts.indexed > 0


def test_service_reports_the_openvino_runtime(ir_bundle: Path, ir_index: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETINA_RUNTIME", "openvino")
    settings = ServiceSettings(bundle=ir_bundle, index=ir_index, device="cpu")
    assert settings.runtime == "openvino"
    with serve(settings) as server:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["ready"] is True and ready["runtime"] == "openvino"
        assert ready["runtimes"] == {IMAGE_ENCODER: "OpenVINO CPU int8", TEXT_ENCODER: "OpenVINO CPU int8",
                                     GRADER: "OpenVINO CPU fp32"}
        assert ready["warnings"] == []
        response = httpx.post(server.url + "/search/text", json={"text": TEXTS[0], "k": 3}, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["neighbours"]) == 3


def test_service_without_the_ir_says_so(tmp_path_factory: pytest.TempPathFactory, openvino_installed: None) -> None:
    tiny, index = tiny_index(tmp_path_factory)
    with serve(ServiceSettings(bundle=tiny.bundle, index=index, device="cpu", runtime="openvino")) as server:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["ready"] is True and ready["runtime"] == "openvino"
        assert set(ready["runtimes"].values()) == {"OpenVINO CPU fp32"}
        assert any("no OpenVINO INT8 IR" in warning for warning in ready["warnings"])
        response = httpx.post(server.url + "/search/text", json={"text": TEXTS[1], "k": 2}, timeout=60)
        assert response.status_code == 200, response.text
