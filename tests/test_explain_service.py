"""`POST /explain` on a real uvicorn server: the grades and the occlusion heatmap of an upload, and its errors."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_server import Served, serve

from index.embedder import Embedder
from index.preprocess import decode_image
from service.settings import ServiceSettings


@pytest.fixture(scope="module")
def served(paths: tuple[Path, Path, Path]) -> Iterator[Served]:
    bundle, index, _ = paths
    settings = ServiceSettings(bundle=bundle, index=index, device="cpu", threads=1, max_upload_mb=2.0)
    with serve(settings) as server:
        yield server


def _post(url: str, data: bytes, **form: str) -> httpx.Response:
    return httpx.post(url + "/explain", files={"file": ("photo.jpg", data, "image/jpeg")}, data=form, timeout=120)


def test_explain_answers_grades_and_a_heatmap(served: Served, photo: tuple[int, bytes],
                                              paths: tuple[Path, Path, Path]) -> None:
    _, data = photo
    response = _post(served.url, data, window="28", stride="14")
    assert response.status_code == 200, response.text
    body = response.json()
    heatmap = body["heatmap"]
    assert (heatmap["rows"], heatmap["cols"]) == (8, 8)
    values = np.array(heatmap["values"])
    assert values.shape == (8, 8) and values.min() >= 0 and values.max() <= 1
    assert len(heatmap["x"]) == 8 and len(heatmap["y"]) == 8
    assert (heatmap["window"], heatmap["stride"], heatmap["input_size"]) == (28, 14, 112)
    left, top, right, bottom = heatmap["square_box"]
    assert right - left == pytest.approx(bottom - top)
    assert heatmap["peak"]["x"] == heatmap["x"][heatmap["peak"]["col"]]
    assert heatmap["peak"]["y"] == heatmap["y"][heatmap["peak"]["row"]]
    assert body["target"]["grade"] == max(1, body["icdr"]["grade"])
    assert body["gradable"] is None  # the tiny bundle has no gate
    assert body["occlusions"] > 0 and body["explain_ms"] > 0 and body["took_ms"] >= body["explain_ms"]
    # The same grades as /grade (and as the embedder) give for the photograph.
    graded = httpx.post(served.url + "/grade", files={"file": ("p.jpg", data, "image/jpeg")}, timeout=60).json()
    assert body["icdr"]["grade"] == graded["icdr"]["grade"] and body["calibrated"] == graded["calibrated"]
    expected = Embedder(paths[0], device="cpu", threads=1).grade(decode_image(data)).icdr_probabilities
    got = [p["probability"] for p in body["icdr"]["probabilities"]]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    default = _post(served.url, data).json()["heatmap"]
    assert (default["window"], default["stride"], default["rows"]) == (12, 6, 19)


def test_explain_refuses_what_it_cannot_explain(served: Served, photo: tuple[int, bytes]) -> None:
    _, data = photo
    not_image = _post(served.url, b"%PDF-1.4 not a photograph" * 10)
    assert not_image.status_code == 415 and "JPEG" in not_image.json()["detail"]
    truncated = _post(served.url, data[: len(data) // 3])
    assert truncated.status_code == 422
    assert _post(served.url, b"").status_code == 422
    for form in ({"window": "2"}, {"window": "100"}, {"window": "28", "stride": "2"}, {"window": "+28"}):
        response = _post(served.url, data, **form)
        assert response.status_code == 422, (form, response.text)
        assert "window" in response.text or "stride" in response.text
    missing = httpx.post(served.url + "/explain", data={"window": "28"}, timeout=30)
    assert missing.status_code == 422
    assert httpx.get(served.url + "/healthz").status_code == 200


def test_explain_is_in_the_openapi_document(served: Served) -> None:
    document = httpx.get(served.url + "/openapi.json").json()
    route = document["paths"]["/explain"]["post"]
    assert {"200", "415", "422", "429"} <= set(route["responses"])
    assert "ExplainResponse" in document["components"]["schemas"]


def test_a_png_with_a_black_border_maps_back(served: Served, photo: tuple[int, bytes]) -> None:
    """A non-square upload (the photograph on a wider black canvas): the square box lies on the canvas where
    the photograph is, and the heatmap is the same as for the photograph alone (up to the JPEG/PNG change)."""
    _, data = photo
    original = decode_image(data)
    canvas = Image.new("RGB", (original.width + 120, original.height + 40))
    canvas.paste(original, (90, 20))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    wide = httpx.post(served.url + "/explain", files={"file": ("w.png", buffer.getvalue(), "image/png")},
                      data={"window": "28", "stride": "14"}, timeout=120)
    assert wide.status_code == 200, wide.text
    alone = _post(served.url, data, window="28", stride="14").json()["heatmap"]
    box, alone_box = wide.json()["heatmap"]["square_box"], alone["square_box"]
    assert box[0] == pytest.approx(alone_box[0] + 90, abs=2) and box[1] == pytest.approx(alone_box[1] + 20, abs=2)
    np.testing.assert_allclose(wide.json()["heatmap"]["values"], alone["values"], atol=0.05)


def test_explain_follows_the_gate(tmp_path_factory: pytest.TempPathFactory) -> None:
    from bundle_factory import gated_bundle

    built = gated_bundle(tmp_path_factory)
    with serve(ServiceSettings(bundle=built.bundle, index=built.index, device="cpu", threads=1)) as server:
        form = {"window": "56", "stride": "56"}
        refused = _post(server.url, built.other, **form)
        assert refused.status_code == 422 and "not a fundus photograph" in refused.json()["detail"]
        reported = _post(server.url, built.other, gate="report", **form)
        assert reported.status_code == 200, reported.text
        assert reported.json()["gradable"]["fundus"] is False
        assert any("not a fundus photograph" in note for note in reported.json()["notes"])
        accepted = _post(server.url, built.fundus_like, **form)
        assert accepted.status_code == 200 and accepted.json()["gradable"]["fundus"] is True
        assert accepted.json()["heatmap"]["rows"] == 2
