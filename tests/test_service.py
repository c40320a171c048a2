"""The HTTP service on a real uvicorn server: every endpoint, every bad input, the API key, metrics,
logs free of patient data, and 50 concurrent requests. The tests of a served index run once for each
vector store (FAISS files, and Milvus through milvus-lite) on indexes of the same archive."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_server import Served, serve

from index.embedder import Embedder
from index.preprocess import decode_image
from index.store import open_index, read_info
from service.settings import ServiceSettings

QUERY = "Left eye of a 61-year-old woman: moderate non-proliferative diabetic retinopathy with hard exudates."


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(bundle, index, store): the session's tiny archive indexed in each store."""
    from service_server import tiny_index

    store = request.param
    if store == "milvus":
        pytest.importorskip("pymilvus", reason="the Milvus store needs the milvus extra")
    tiny, index = tiny_index(tmp_path_factory, store)
    return tiny.bundle, index, store


@pytest.fixture(scope="module")
def served(stored: tuple[Path, Path, str]) -> Iterator[Served]:
    bundle, index, store = stored
    settings = ServiceSettings(bundle=bundle, index=index, device="cpu", max_upload_mb=1.0,
                               max_image_pixels=4_000_000, max_text_chars=2_000, max_k=50, store=store)
    with serve(settings) as server:
        yield server


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def _post_image(url: str, route: str, data: bytes, name: str = "photo.jpg", **form: str) -> httpx.Response:
    return httpx.post(url + route, files={"file": (name, data, "image/jpeg")}, data=form, timeout=60)


# --- the endpoints ------------------------------------------------------------------------------------


def test_health_and_readiness(served: Served, stored: tuple[Path, Path, str]) -> None:
    assert httpx.get(served.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(served.url + "/readyz").json()
    info = read_info(stored[1])
    assert info.store == stored[2]
    assert ready["ready"] is True
    assert ready["bundle_fingerprint"] == ready["index_fingerprint"] == info.bundle_fingerprint
    assert ready["index_size"] == info.counts.indexed > 0
    assert set(ready["providers"].values()) == {"CPUExecutionProvider"}
    assert ready["vector_store"] == stored[2] and len(ready["icdr_names"]) == 5
    assert ready["faiss_device"] == ("cpu" if stored[2] == "faiss" else None)


def test_text_search_returns_neighbours_and_grades(served: Served) -> None:
    response = httpx.post(served.url + "/search/text", json={"text": QUERY, "k": 7}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["neighbours"]) == 7 and body["against"] == "image" and body["took_ms"] > 0
    scores = [n["score"] for n in body["neighbours"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert len({n["id"] for n in body["neighbours"]}) == 7
    for neighbour in body["neighbours"]:
        assert neighbour["image_url"] == f"/archive/{neighbour['id']}/image"
        assert set(neighbour["labels"]) >= {"icdr", "sdrg", "exam_eye", "patient_age"}
    icdr = body["predicted"]["icdr"]
    probabilities = [p["probability"] for p in icdr["probabilities"]]
    assert [p["grade"] for p in icdr["probabilities"]] == [0, 1, 2, 3, 4]
    assert abs(sum(probabilities) - 1) < 1e-4 and icdr["grade"] == int(np.argmax(probabilities))
    assert body["predicted"]["referable"] == (icdr["grade"] >= 2)
    assert body["predicted"]["referable_probability"] == pytest.approx(sum(probabilities[2:]), abs=1e-4)
    assert body["text_truncated"] is False and body["notes"] == []


def test_text_search_filters_and_record_embeddings(served: Served) -> None:
    filters = {"icdr": [0], "exam_eye": "left"}
    response = httpx.post(served.url + "/search/text", json={"text": QUERY, "k": 50, "filters": filters,
                                                             "against": "record"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["against"] == "record" and body["neighbours"]
    assert all(n["labels"]["icdr"] == 0 and n["labels"]["exam_eye"] == "left" for n in body["neighbours"])
    if len(body["neighbours"]) < 50:
        assert any("match the filters" in note for note in body["notes"])


def test_text_search_against_records_uses_the_texts_record_vector(served: Served,
                                                                 stored: tuple[Path, Path, str]) -> None:
    embedder = Embedder(stored[0], device="cpu")
    query = embedder.query_texts([QUERY])[0]
    assert query.record_vector is not None  # the tiny bundle's model has a record head
    store = open_index(stored[1], embedder)
    scores = {}
    for against in ("record", "image"):
        response = httpx.post(served.url + "/search/text", json={"text": QUERY, "k": 5, "against": against},
                              timeout=60)
        assert response.status_code == 200, response.text
        expected = store.search(query.against(against)[None], 5, against)[0]  # type: ignore[arg-type]
        neighbours = response.json()["neighbours"]
        assert [n["id"] for n in neighbours] == [hit.id for hit in expected]
        assert [n["score"] for n in neighbours] == pytest.approx([hit.score for hit in expected], abs=1e-5)
        scores[against] = [hit.score for hit in expected]
    photographs_vector_on_records = [hit.score for hit in store.search(query.vector[None], 5, "record")[0]]
    assert photographs_vector_on_records != pytest.approx(scores["record"], abs=1e-5)


def test_image_search_matches_the_bare_model(served: Served, photo: tuple[int, bytes],
                                             stored: tuple[Path, Path, str]) -> None:
    photo_id, data = photo
    response = _post_image(served.url, "/search/image", data, k="5", filters='{"exam_eye": null}')
    assert response.status_code == 200, response.text
    embedder = Embedder(stored[0], device="cpu")
    expected = open_index(stored[1], embedder).search(embedder.embed_images([decode_image(data)]), 5)[0]
    neighbours = response.json()["neighbours"]
    assert [n["id"] for n in neighbours] == [hit.id for hit in expected]
    assert [n["score"] for n in neighbours] == pytest.approx([hit.score for hit in expected], abs=1e-5)
    assert photo_id in [n["id"] for n in neighbours] and neighbours[0]["score"] > 0.999
    grades = embedder.grade(image=decode_image(data))
    predicted = response.json()["predicted"]["icdr"]["probabilities"]
    assert [p["probability"] for p in predicted] == pytest.approx(grades.icdr_probabilities.tolist(), abs=1e-5)


def test_grade_from_each_modality_subset(served: Served, photo: tuple[int, bytes]) -> None:
    _, data = photo
    structured = json.dumps({"patient_age": 61, "patient_sex": "female", "insulin": True, "exam_eye": "left"})
    cases = [
        ({"files": {"file": ("a.jpg", data)}}, ["image"]),
        ({"files": {"file": ("a.jpg", data)}, "data": {"text": QUERY, "structured": structured}},
         ["image", "text", "structured"]),
        ({"data": {"text": QUERY}}, ["text"]),
        ({"data": {"structured": structured}, "files": {"unused": ("x", b"")}}, ["structured"]),
    ]
    for request, modalities in cases:
        response = httpx.post(served.url + "/grade", timeout=60, **request)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["modalities"] == modalities
        assert body["referable"] == (body["icdr"]["grade"] >= 2)
        assert abs(sum(p["probability"] for p in body["sdrg"]["probabilities"]) - 1) < 1e-4


def test_archive_images_by_id_only(served: Served, photo: tuple[int, bytes]) -> None:
    photo_id, data = photo
    full = httpx.get(f"{served.url}/archive/{photo_id}/image")
    assert full.status_code == 200 and full.content == data
    thumbnail = httpx.get(f"{served.url}/archive/{photo_id}/image", params={"size": 64})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 64
    assert httpx.get(f"{served.url}/archive/999999/image").status_code == 404
    assert httpx.get(f"{served.url}/archive/abc/image").status_code == 422
    assert httpx.get(f"{served.url}/archive/{photo_id}/image", params={"size": 5}).status_code == 422
    assert httpx.get(served.url + "/archive/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)


def test_openapi_and_page(served: Served) -> None:
    schema = httpx.get(served.url + "/openapi.json").json()
    assert {"/search/text", "/search/image", "/grade", "/readyz", "/archive/{record_id}/image"} <= set(schema["paths"])
    assert httpx.get(served.url + "/docs").status_code == 200
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_consensus_of_the_nearest_archived_photographs(served: Served, photo: tuple[int, bytes],
                                                       stored: tuple[Path, Path, str]) -> None:
    photo_id, data = photo
    # The consensus ignores the page's filters and `against`: the whole archive, image -> image.
    response = _post_image(served.url, "/search/image", data, k="2", against="record", filters='{"icdr": [4]}')
    assert response.status_code == 200, response.text
    body = response.json()
    consensus = body["consensus"]
    embedder = Embedder(stored[0], device="cpu")
    hits = open_index(stored[1], embedder).search(embedder.embed_images([decode_image(data)]), 11)[0]
    others = [hit for hit in hits if hit.id != photo_id][:10]  # the photograph itself is archived: left out
    counts = [0] * 5
    for hit in others:
        if hit.row.labels.icdr is not None:
            counts[hit.row.labels.icdr] += 1
    assert consensus["k"] == 10 and consensus["duplicates"] == 1
    assert consensus["counts"] == counts and sum(consensus["counts"]) == consensus["known"] > 0
    assert consensus["counts"][consensus["grade"]] == max(counts)
    assert consensus["share"] == pytest.approx(max(counts) / consensus["known"], abs=1e-6)
    assert consensus["referable_share"] == pytest.approx(sum(counts[2:]) / consensus["known"], abs=1e-6)
    model = body["predicted"]
    assert consensus["agrees"] == (consensus["grade"] == model["icdr"]["grade"])
    assert consensus["referable_agrees"] == (consensus["referable"] == model["referable"])
    assert consensus["mean_similarity"] == pytest.approx(np.mean([hit.score for hit in others]), abs=1e-4)
    # /grade with the photograph (and text): the same neighbours; the agreement is with /grade's own grade
    graded = httpx.post(served.url + "/grade", files={"file": ("a.jpg", data)}, data={"text": QUERY}, timeout=60)
    assert graded.status_code == 200, graded.text
    graded_consensus = graded.json()["consensus"]
    assert graded_consensus["counts"] == counts and graded_consensus["grade"] == consensus["grade"]
    assert graded_consensus["agrees"] == (graded_consensus["grade"] == graded.json()["icdr"]["grade"])
    # a request's own k; 0 switches it off; no photograph, no consensus
    three = _post_image(served.url, "/grade", data, consensus_k="3").json()["consensus"]
    assert three["k"] == 3 and sum(three["counts"]) == three["known"] <= 3
    assert _post_image(served.url, "/search/image", data, consensus_k="0").json()["consensus"] is None
    assert httpx.post(served.url + "/grade", data={"text": QUERY}, timeout=60).json()["consensus"] is None
    assert httpx.post(served.url + "/search/text", json={"text": QUERY}, timeout=60).json()["consensus"] is None
    for bad in ("-1", "51", "x"):
        assert _post_image(served.url, "/search/image", data, consensus_k=bad).status_code == 422, bad


def test_consensus_k_zero_switches_the_default_off(paths: tuple[Path, Path, Path], photo: tuple[int, bytes]) -> None:
    bundle, index, _ = paths
    with serve(ServiceSettings(bundle=bundle, index=index, device="cpu", consensus_k=0)) as server:
        assert _post_image(server.url, "/search/image", photo[1]).json()["consensus"] is None
        assert _post_image(server.url, "/grade", photo[1]).json()["consensus"] is None
        asked = _post_image(server.url, "/grade", photo[1], consensus_k="4").json()["consensus"]
        assert asked["k"] == 4 and asked["duplicates"] == 1


# --- bad input ----------------------------------------------------------------------------------------


def _bad_inputs(url: str, photo: bytes) -> list[tuple[str, httpx.Response, int, str]]:
    """(what, response, expected status, a word the message must contain)."""
    big = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    noisy_png = io.BytesIO()
    Image.fromarray(big).save(noisy_png, "PNG")
    flat = io.BytesIO()
    Image.new("RGB", (2500, 2500), (90, 40, 20)).save(flat, "PNG")  # small file, 6.25 MP > the 4 MP limit
    post = httpx.post
    text = url + "/search/text"
    return [
        ("upload over the size limit", _post_image(url, "/search/image", noisy_png.getvalue()), 413, "limit"),
        ("not an image", _post_image(url, "/search/image", b"%PDF-1.7 not a photo"), 415, "JPEG"),
        ("truncated JPEG", _post_image(url, "/search/image", photo[: len(photo) // 3]), 422, "decod"),
        ("decompression bomb", _post_image(url, "/grade", flat.getvalue(), "a.png"), 422, "pixels"),
        ("empty upload", _post_image(url, "/search/image", b""), 422, "empty"),
        ("missing file", post(url + "/search/image", data={"k": "3"}), 422, "file"),
        ("k out of range (image)", _post_image(url, "/search/image", photo, k="0"), 422, "k"),
        ("unknown filter (image)", _post_image(url, "/search/image", photo, filters='{"colour": 1}'), 422, "unknown"),
        ("filters not JSON", _post_image(url, "/search/image", photo, filters="icdr=2"), 422, "JSON"),
        ("empty text", post(text, json={"text": "   "}), 422, "empty"),
        ("overlong text", post(text, json={"text": "word " * 1000}), 422, "limit"),
        ("no readable words", post(text, json={"text": "\x00\x01"}), 422, "readable"),
        ("k too large", post(text, json={"text": QUERY, "k": 51}), 422, "k"),
        ("k zero", post(text, json={"text": QUERY, "k": 0}), 422, "k"),
        ("unknown filter", post(text, json={"text": QUERY, "filters": {"colour": "red"}}), 422, "unknown"),
        ("unknown field", post(text, json={"text": QUERY, "top": 3}), 422, "unknown"),
        ("bad grade filter", post(text, json={"text": QUERY, "filters": {"icdr": ["two"]}}), 422, "icdr"),
        ("age range reversed", post(text, json={"text": QUERY, "filters": {"age_min": 70, "age_max": 40}}), 422,
         "age_min"),
        ("not JSON", post(text, content=b"{text", headers={"content-type": "application/json"}), 422, "JSON"),
        ("grade without input", post(url + "/grade", data={"text": ""}), 422, "at least one"),
        ("bad structured", post(url + "/grade", data={"text": QUERY, "structured": '{"age": 3}'}), 422, "unknown"),
        ("bad structured value", post(url + "/grade", data={"structured": '{"patient_age": -4}'}), 422, "patient_age"),
    ]


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(served: Served, photo: tuple[int, bytes]) -> None:
    for what, response, status, word in _bad_inputs(served.url, photo[1]):
        assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
        detail = response.json()["detail"]
        assert word.lower() in detail.lower(), f"{what}: {detail!r} does not mention {word!r}"
    assert httpx.get(served.url + "/healthz").status_code == 200
    assert httpx.post(served.url + "/search/text", json={"text": QUERY}, timeout=60).status_code == 200


def test_text_longer_than_the_model_reads_is_truncated_and_said(served: Served) -> None:
    response = httpx.post(served.url + "/search/text", json={"text": QUERY + " exudates" * 150}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text_truncated"] is True and any("cut to" in note for note in body["notes"])


# --- operations ---------------------------------------------------------------------------------------


def test_metrics_count_routes_and_stages(served: Served, photo: tuple[int, bytes]) -> None:
    httpx.post(served.url + "/search/text", json={"text": QUERY}, timeout=60)
    _post_image(served.url, "/search/image", photo[1])
    metrics = httpx.get(served.url + "/metrics").text
    assert 'retina_requests_total{route="/search/text",status="200"}' in metrics
    assert 'retina_requests_total{route="/search/image",status="200"}' in metrics
    for stage in ("decode", "embed", "search"):
        assert f'retina_stage_seconds_count{{route="/search/image",stage="{stage}"}}' in metrics
    assert 'retina_model_batch_size_count{model="text"}' in metrics


def test_logs_never_contain_patient_text_or_ids(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Zyxwvu Patient-Name-8841 left eye severe haemorrhages"
    with caplog.at_level(logging.DEBUG):
        httpx.post(served.url + "/search/text", json={"text": secret}, timeout=60)
        httpx.post(served.url + "/search/text", json={"text": secret, "filters": {"bogus": secret}}, timeout=60)
        httpx.get(served.url + "/archive/424242/image")
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not the client's
    logged = "\n".join(record.getMessage() for record in server_side)
    assert "/search/text" in logged  # the access log did log the requests...
    assert "8841" not in logged and "Zyxwvu" not in logged and "424242" not in logged  # ...but nothing of theirs


def test_fifty_concurrent_requests_all_succeed_and_are_batched(served: Served, photo: tuple[int, bytes]) -> None:
    def batches() -> float:
        text = httpx.get(served.url + "/metrics").text
        line = next(x for x in text.splitlines() if x.startswith('retina_model_batch_size_count{model="text"}'))
        return float(line.split()[-1])

    before = batches()

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            calls = [client.post("/search/text", json={"text": f"{QUERY} case {i}", "k": 5}) for i in range(40)]
            calls += [client.post("/search/image", files={"file": ("p.jpg", photo[1])}) for _ in range(10)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 50
    assert all(len(r.json()["neighbours"]) == 5 for r in responses[:40])
    assert batches() - before < 40, "40 concurrent text searches ran as 40 single model runs: no batching"


def test_api_key_guards_every_route_but_healthz(paths: tuple[Path, Path, Path]) -> None:
    bundle, index, _ = paths
    settings = ServiceSettings(bundle=bundle, index=index, device="cpu", api_key="s3cret")
    with serve(settings) as server:
        assert httpx.get(server.url + "/healthz").status_code == 200
        for path in ("/readyz", "/metrics", "/openapi.json"):
            assert httpx.get(server.url + path).status_code == 401
        refused = httpx.post(server.url + "/search/text", json={"text": QUERY})
        assert refused.status_code == 401 and "X-API-Key" in refused.json()["detail"]
        assert httpx.post(server.url + "/search/text", json={"text": QUERY},
                          headers={"X-API-Key": "wrong"}).json()["detail"] == "wrong API key"
        allowed = httpx.post(server.url + "/search/text", json={"text": QUERY}, headers={"X-API-Key": "s3cret"},
                             timeout=60)
        assert allowed.status_code == 200
        form = httpx.get(server.url + "/", headers={"Accept": "text/html"})
        assert form.status_code == 401 and "API key" in form.text and "<form" in form.text
        page = httpx.get(server.url + "/", headers={"Accept": "text/html"}, cookies={"retina_api_key": "s3cret"})
        assert page.status_code == 200


def test_not_ready_until_loaded_and_failed_loads_are_reported(tmp_path: Path, paths: tuple[Path, Path, Path]) -> None:
    settings = ServiceSettings(bundle=paths[0], index=tmp_path / "missing", device="cpu")
    with serve(settings, wait_ready=False) as server:
        server.app.state.engine.wait_loaded(30)  # type: ignore[attr-defined]
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and "not an index" in ready.json()["detail"]
        search = httpx.post(server.url + "/search/text", json={"text": QUERY})
        assert search.status_code == 503 and "could not load" in search.json()["detail"]
        assert httpx.get(server.url + "/healthz").status_code == 200
