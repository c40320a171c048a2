"""`index.embedder.Embedder` on the tiny bundle against the PyTorch model it was exported from: image,
text (with transformers' tokenizer ids) and record embeddings, grades from every modality subset, text
validation and truncation, providers."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from bundle_factory import TinyBundle, tiny_bundle
from PIL import Image

from index.archive.brset import read_archive
from index.bundle import TEXT_ENCODER
from index.embedder import CPU, CUDA, Embedder, GradeInput, Grades
from index.preprocess import batch_model_inputs, decode_image
from index.records import FundusRecord
from index.runtimes import Graph
from training.data import load_photo, normalise, stored_narrative
from training.run import LoadedRun, load_run

ATOL = 1e-4
N = 10
OVERLONG = "moderate non-proliferative diabetic retinopathy with hard exudates near the fovea. " * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def embedder(tiny: TinyBundle) -> Embedder:
    return Embedder(tiny.bundle, device="cpu")


@pytest.fixture(scope="module")
def run(tiny: TinyBundle) -> LoadedRun:
    return load_run(tiny.run)


@pytest.fixture(scope="module")
def sample(tiny: TinyBundle) -> tuple[list[FundusRecord], list[Image.Image], list[str]]:
    archive = read_archive(tiny.archive)
    records = archive.records[:N]
    paths = [archive.photo_path(r.image_id) for r in records]
    images = [decode_image(p) for p in paths if p is not None]
    texts = [stored_narrative(r) for r in records]
    return records, images, texts


def _probs(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits, dim=-1).numpy()


def _unit(vectors: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5))


def test_onnx_runtime_spinning_is_chosen_per_embedder(tiny: TinyBundle, embedder: Embedder) -> None:
    quiet = Embedder(tiny.bundle, device="cpu", spin=False)
    for graph in quiet._graphs.values():
        options = graph.session.get_session_options()  # type: ignore[attr-defined]
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for graph in embedder._graphs.values():  # the default: ONNX Runtime's own (spinning), no entry set
        with pytest.raises(RuntimeError, match="does not have configuration"):
            graph.session.get_session_options().get_session_config_entry(  # type: ignore[attr-defined]
                "session.intra_op.allow_spinning")
    np.testing.assert_allclose(quiet.embed_texts(["no retinopathy"]).vectors,
                               embedder.embed_texts(["no retinopathy"]).vectors, atol=1e-6)


def test_providers_and_identity(tiny: TinyBundle, embedder: Embedder) -> None:
    assert embedder.providers == {name: CPU for name in ("image_encoder.onnx", "text_encoder.onnx", "grader.onnx")}
    assert embedder.runtime == "onnxruntime" and embedder.notes == []
    assert set(embedder.runtimes.values()) == {f"ONNX Runtime {CPU} fp32"}
    assert embedder.fingerprint == embedder.manifest.fingerprint and embedder.dim == embedder.manifest.embedding_dim
    if CUDA not in ort.get_available_providers():
        assert set(Embedder(tiny.bundle, device="auto", threads=1).providers.values()) == {CPU}
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            Embedder(tiny.bundle, device="cuda")
    with pytest.raises(ValueError, match="device"):
        Embedder(tiny.bundle, device="tpu")  # type: ignore[arg-type]


def test_image_embeddings_match_pytorch(embedder: Embedder, run: LoadedRun, sample, tiny: TinyBundle) -> None:
    records, images, _ = sample
    pixels = batch_model_inputs(images, embedder.image_spec)
    # The service's preprocessing (numpy, constants from the bundle) is the training preprocessing.
    archive = read_archive(tiny.archive)
    trained = np.stack([load_photo(archive.photo_path(r.image_id), embedder.image_spec) for r in records])
    spec = run.model.config.vision.image
    np.testing.assert_allclose(pixels, normalise(torch.from_numpy(trained), spec.mean, spec.std).numpy(), atol=1e-6)
    with torch.no_grad():
        reference = run.model.encode_image(torch.from_numpy(pixels)).numpy()
    got = embedder.embed_pixels(pixels)
    assert got.shape == (N, embedder.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, atol=ATOL)
    np.testing.assert_allclose(embedder.embed_images(images, batch_size=3), reference, atol=ATOL)
    np.testing.assert_allclose(embedder.embed_images(images[:1], batch_size=1), reference[:1], atol=ATOL)
    assert _unit(got)
    assert embedder.embed_images([]).shape == (0, embedder.dim)
    with pytest.raises(ValueError, match="shape"):
        embedder.embed_pixels(pixels[:, :, :100])


def test_text_embeddings_match_pytorch_with_transformers_ids(embedder: Embedder, run: LoadedRun, sample) -> None:
    texts = [*sample[2], OVERLONG, "PDR", "Café naïve\tNPDR,  ÉDEMA!"]
    max_length = run.model.config.text.max_length
    reference_ids = run.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tokens = embedder.tokenize(texts)
    np.testing.assert_array_equal(tokens.input_ids, reference_ids["input_ids"].numpy())
    np.testing.assert_array_equal(tokens.attention_mask, reference_ids["attention_mask"].numpy())
    with torch.no_grad():
        reference = run.model.encode_text(reference_ids["input_ids"], reference_ids["attention_mask"]).numpy()
    embedded = embedder.embed_texts(texts, batch_size=5)
    assert embedded.vectors.shape == (len(texts), embedder.dim)
    np.testing.assert_allclose(embedded.vectors, reference, atol=ATOL)
    assert _unit(embedded.vectors)
    assert embedded.truncated == [False] * N + [True, False, False]
    # One text alone (no padding) embeds as it does inside a padded batch.
    np.testing.assert_allclose(embedder.embed_texts(texts[-2:-1]).vectors[0], reference[-2], atol=ATOL)


def test_texts_search_records_with_the_record_heads_vector(embedder: Embedder, run: LoadedRun, sample) -> None:
    texts = sample[2]
    tokens = run.tokenizer(texts, padding=True, truncation=True, max_length=run.model.config.text.max_length,
                           return_tensors="pt")
    assert run.model.config.record_text_head
    with torch.no_grad():
        image_side = run.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()
        record_side = run.model.encode_text_for_records(tokens["input_ids"], tokens["attention_mask"]).numpy()
    embedded = embedder.embed_texts(texts)
    assert embedded.record_vectors is not None and _unit(embedded.record_vectors)
    np.testing.assert_allclose(embedded.against("image"), image_side, atol=ATOL)
    np.testing.assert_allclose(embedded.against("record"), record_side, atol=ATOL)
    assert np.abs(record_side - image_side).max() > 0.01  # the two heads differ
    for query, image_vector, record_vector in zip(embedder.query_texts(texts), image_side, record_side, strict=True):
        np.testing.assert_allclose(query.against("image"), image_vector, atol=ATOL)
        np.testing.assert_allclose(query.against("record"), record_vector, atol=ATOL)


def test_a_text_graph_without_a_record_output_searches_records_with_its_one_vector(
    tiny: TinyBundle, sample, tmp_path: Path
) -> None:
    """A bundle exported before the record head: its text graph has two outputs, and they serve both."""
    import onnx

    from index.bundle import MANIFEST_FILE, sha256_of

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny.bundle, bundle)
    graph = onnx.load(str(bundle / TEXT_ENCODER))
    (record_output,) = [o for o in graph.graph.output if o.name == "text_record_embedding"]
    graph.graph.output.remove(record_output)
    onnx.save(graph, str(bundle / TEXT_ENCODER))
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["files"][TEXT_ENCODER] = sha256_of(bundle / TEXT_ENCODER)
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    older = Embedder(bundle, device="cpu")
    embedded = older.embed_texts(sample[2])
    assert embedded.record_vectors is None
    np.testing.assert_array_equal(embedded.against("record"), embedded.vectors)
    query = older.query_texts(sample[2][:1])[0]
    assert query.record_vector is None and query.against("record") is query.vector


def test_empty_texts_are_refused(embedder: Embedder) -> None:
    for text in ("", "   \n\t", "\x00\x01"):
        with pytest.raises(ValueError, match="text 1"):
            embedder.embed_texts(["no retinopathy", text])
    with pytest.raises(ValueError, match="empty"):
        embedder.grade(text=" ")
    assert embedder.embed_texts([]).vectors.shape == (0, embedder.dim)


def test_record_embeddings_match_pytorch(embedder: Embedder, run: LoadedRun, sample) -> None:
    records, images, _ = sample
    pixels = torch.from_numpy(batch_model_inputs(images, embedder.image_spec))
    tabular = torch.from_numpy(run.spec.transform(records))
    with torch.no_grad():
        reference = run.model.encode_record(pixels, tabular).numpy()
        fused = run.model.fuse(pixels=pixels, tabular=tabular)
    vectors, icdr, sdrg = embedder.record_embeddings(images, records, batch_size=4)
    np.testing.assert_allclose(vectors, reference, atol=ATOL)
    np.testing.assert_allclose(icdr, _probs(fused.icdr_logits), atol=ATOL)
    np.testing.assert_allclose(sdrg, _probs(fused.sdrg_logits), atol=ATOL)
    assert _unit(vectors) and icdr.shape == sdrg.shape == (N, 5)
    # Structured data as plain mappings (e.g. a request's JSON) give the same records.
    as_dicts = [r.model_dump() for r in records]
    np.testing.assert_allclose(embedder.record_embeddings(images, as_dicts)[0], vectors, atol=1e-6)
    with pytest.raises(ValueError, match="structured"):
        embedder.record_embeddings(images, records[:-1])


@pytest.mark.parametrize(
    "given", [("image",), ("text",), ("structured",), ("image", "structured"), ("image", "text", "structured")]
)
def test_grade_from_any_subset_matches_pytorch(embedder: Embedder, run: LoadedRun, sample, given) -> None:
    records, images, texts = sample
    inputs = {"image": images[3], "text": texts[3], "structured": records[3].model_dump()}
    grades = embedder.grade(**{name: inputs[name] for name in given})
    assert isinstance(grades, Grades) and grades.modalities == list(given)

    torch_inputs: dict[str, torch.Tensor] = {}
    if "image" in given:
        torch_inputs["pixels"] = torch.from_numpy(batch_model_inputs([images[3]], embedder.image_spec))
    if "text" in given:
        ids = run.tokenizer([texts[3]], truncation=True, max_length=run.model.config.text.max_length,
                            return_tensors="pt")
        torch_inputs.update(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    if "structured" in given:
        torch_inputs["tabular"] = torch.from_numpy(run.spec.transform([records[3]]))
    with torch.no_grad():
        fused = run.model.fuse(**torch_inputs)
        record = torch.nn.functional.normalize(run.model.record_proj(fused.cls), dim=-1).numpy()[0]
    record = np.concatenate([record, np.zeros(run.model.config.num_icdr, record.dtype)])  # the grade part: zeros
    np.testing.assert_allclose(grades.icdr_probabilities, _probs(fused.icdr_logits)[0], atol=ATOL)
    np.testing.assert_allclose(grades.sdrg_probabilities, _probs(fused.sdrg_logits)[0], atol=ATOL)
    np.testing.assert_allclose(grades.record_embedding, record, atol=ATOL)
    for probabilities in (grades.icdr_probabilities, grades.sdrg_probabilities):
        assert probabilities.shape == (5,) and abs(float(probabilities.sum()) - 1.0) < 1e-5
    assert grades.icdr_grade == int(np.argmax(grades.icdr_probabilities))
    assert grades.icdr_name == embedder.manifest.icdr_names[grades.icdr_grade]
    assert grades.sdrg_name == embedder.manifest.sdrg_names[grades.sdrg_grade]
    assert grades.referable == (grades.icdr_grade >= 2)
    assert grades.referable_probability == pytest.approx(float(grades.icdr_probabilities[2:].sum()))
    assert _unit(grades.record_embedding)


def test_grade_needs_a_modality_and_flags_truncation(embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="at least one"):
        embedder.grade()
    assert embedder.grade(text=OVERLONG).text_truncated
    assert not embedder.grade(text="no retinopathy").text_truncated


def test_referable_rule() -> None:
    grades = Grades(np.array([0.4, 0.0, 0.2, 0.2, 0.2]), np.full(5, 0.2), np.zeros(4), ["text"])
    # The argmax grade is 0 although P(ICDR >= 2) = 0.6: the flag follows the argmax, as evaluated.
    assert grades.icdr_grade == 0 and not grades.referable
    assert grades.referable_probability == pytest.approx(0.6)


def test_one_embedder_serves_several_threads(embedder: Embedder, sample) -> None:
    _, images, texts = sample
    expected_texts = embedder.embed_texts(texts).vectors
    expected_images = embedder.embed_images(images[:2])
    with ThreadPoolExecutor(max_workers=4) as pool:
        text_jobs = [pool.submit(embedder.embed_texts, texts) for _ in range(4)]
        image_jobs = [pool.submit(embedder.embed_images, images[:2]) for _ in range(2)]
        for job in text_jobs:
            np.testing.assert_allclose(job.result().vectors, expected_texts, atol=1e-6)
        for job in image_jobs:
            np.testing.assert_allclose(job.result(), expected_images, atol=1e-6)


def test_grade_many_mixes_modality_subsets_in_one_batch(embedder: Embedder, sample) -> None:
    records, images, texts = sample
    inputs = [
        GradeInput(text=texts[0]),
        GradeInput(image=images[1]),
        GradeInput(image=images[2], text=OVERLONG, structured=records[2].model_dump()),
        GradeInput(structured=records[3]),
        GradeInput(text="no retinopathy"),
    ]
    batched = embedder.grade_many(inputs)
    assert [g.modalities for g in batched] == [i.modalities for i in inputs]
    assert [g.text_truncated for g in batched] == [False, False, True, False, False]
    for item, grades in zip(inputs, batched, strict=True):
        alone = embedder.grade(image=item.image, text=item.text, structured=item.structured)
        np.testing.assert_allclose(grades.icdr_probabilities, alone.icdr_probabilities, atol=ATOL)
        np.testing.assert_allclose(grades.sdrg_probabilities, alone.sdrg_probabilities, atol=ATOL)
        np.testing.assert_allclose(grades.record_embedding, alone.record_embedding, atol=ATOL)
    assert embedder.grade_many([]) == []
    with pytest.raises(ValueError, match="input 1"):
        embedder.grade_many([GradeInput(text="no retinopathy"), GradeInput()])


class _CountingGraph:
    """A graph (`index.runtimes`) that counts its runs."""

    def __init__(self, graph: Graph) -> None:
        self._graph = graph
        self.runs = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        return self._graph.run(feeds)


def _counted(tiny: TinyBundle) -> tuple[Embedder, dict[str, _CountingGraph]]:
    counted = Embedder(tiny.bundle, device="cpu")
    graphs = {name: _CountingGraph(graph) for name, graph in counted._graphs.items()}
    counted._graphs = graphs  # type: ignore[assignment]
    return counted, graphs


def test_each_tower_runs_once_per_query(tiny: TinyBundle, sample) -> None:
    _, images, texts = sample
    counted, sessions = _counted(tiny)
    counted.query_texts(texts[:3])
    assert {name: s.runs for name, s in sessions.items()} == {"image_encoder.onnx": 0, "text_encoder.onnx": 1,
                                                              "grader.onnx": 1}
    counted, sessions = _counted(tiny)
    counted.query_images(images[:3])
    assert {name: s.runs for name, s in sessions.items()} == {"image_encoder.onnx": 1, "text_encoder.onnx": 0,
                                                              "grader.onnx": 1}
    counted, sessions = _counted(tiny)
    counted.grade_many([GradeInput(text=texts[0]), GradeInput(structured={"patient_age": 50})])
    assert sessions["image_encoder.onnx"].runs == 0  # text-only grading never runs the image tower


def test_one_pass_queries_equal_the_separate_calls(embedder: Embedder, sample) -> None:
    records, images, texts = sample
    text_queries = embedder.query_texts(texts[:4])
    separate = embedder.embed_texts(texts[:4])
    np.testing.assert_allclose(np.stack([q.vector for q in text_queries]), separate.vectors, atol=1e-6)
    assert [q.truncated for q in text_queries] == separate.truncated
    for query, text in zip(text_queries, texts, strict=False):
        np.testing.assert_allclose(query.grades.icdr_probabilities,
                                   embedder.grade(text=text).icdr_probabilities, atol=1e-5)
    image_queries = embedder.query_images(images[:4])
    np.testing.assert_allclose(np.stack([q.vector for q in image_queries]), embedder.embed_images(images[:4]),
                               atol=1e-6)
    for query, image in zip(image_queries, images, strict=False):
        np.testing.assert_allclose(query.grades.sdrg_probabilities,
                                   embedder.grade(image=image).sdrg_probabilities, atol=1e-5)
        assert query.grades.modalities == ["image"]
    records_out = embedder.embed_records(images[:4], records[:4])
    np.testing.assert_allclose(records_out.image_vectors, embedder.embed_images(images[:4]), atol=1e-6)
    assert records_out.record_vectors.shape == records_out.image_vectors.shape
