"""The FastAPI application: search by text or photograph, grading, archive images, health, metrics and
the web page. Build it with `create_app(settings)`; `retina-serve` runs it under uvicorn."""

# No `from __future__ import annotations` here: the routes' parameter types carry this server's limits
# (e.g. k <= max_k), so they are evaluated where the routes are defined, inside `create_app`.

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.consensus import Consensus
from index.embedder import GradeInput, Grades, is_valid_unicode
from index.explain import ExplainError, Explanation, check_window
from index.gate import Gradability
from index.metadata import MAX_RECORD_ID, Filters
from index.preprocess import ImageDecodeError, decode_image
from index.records import REFERABLE_ICDR
from index.store import Hit
from service.engine import Engine, GradeRequest, NotReady, SearchAnswer, SearchRequest
from service.errors import CatchUnexpected
from service.guards import ApiKeyGuard, BodyLimits, sniff_image_format
from service.schemas import (
    NOT_BLANK,
    Against,
    ErrorResponse,
    ExplainResponse,
    ExplainTarget,
    GateMode,
    Gradable,
    GradePrediction,
    GradeProbability,
    GradeResponse,
    Health,
    Heatmap,
    HeatmapPeak,
    Neighbour,
    NeighbourConsensus,
    Predicted,
    Readiness,
    SearchResponse,
    StructuredFields,
    text_search_request,
)
from service.settings import ServiceSettings
from service.telemetry import AccessMiddleware, Metrics

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
T = TypeVar("T")
THUMBNAIL_MIN, THUMBNAIL_MAX = 32, 1024


class BadInput(Exception):
    """A request the service cannot answer as sent: a status code (413, 415, 422) and a message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


ERROR_MEANINGS: dict[int, str] = {
    400: "The body could not be parsed (e.g. a broken multipart form).",
    401: "An API key is required, or the one sent is wrong.",
    404: "No such archived photograph.",
    408: "The request body did not arrive in time.",
    413: "The request body is larger than the limit.",
    429: "Too many heatmaps are being computed (`/explain`); retry in a moment.",
    415: "The upload is not a JPEG, PNG or TIFF image.",
    422: "The request is invalid: `detail` says why, `errors` (when given) where. Also a photograph that the "
         "gradability gate judges not a fundus photograph (unless `gate` is report).",
    500: "An unexpected error; the service keeps running.",
    503: "The bundle and index are loading, or could not be loaded (`detail` says which).",
}


def _errors(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses` for these error codes: each with the ErrorResponse body the server sends."""
    return {code: {"model": ErrorResponse, "description": ERROR_MEANINGS[code]} for code in codes}


ERRORS = _errors(400, 401, 408, 413, 415, 422, 500, 503)
MAX_FORM_JSON_CHARS = 10_000
"""The longest `filters` / `structured` form field (JSON) accepted."""
MAX_PENDING_EXPLANATIONS = 4
"""Heatmaps computed or waiting at once; more get 429 (each holds the model thread for some 170 grader runs,
and searches and grades queue behind it)."""
WEAK_EVIDENCE = 0.01
"""Below this largest drop of the target probability, a note says that no single region decides the grade."""


def _plain_digits(value: object) -> object:
    """Ids and counts in paths and forms are written as plain decimal digits: no sign, no `_`, no spaces
    (Python's int() would take `+17`, `1_7` and ` 17`)."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be written as plain decimal digits")
    return value


PlainDigits = BeforeValidator(_plain_digits)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The service for `settings` (default: from RETINA_* environment variables). The bundle and index
    load in the background when the app starts; /readyz says when they are in."""
    settings = settings or ServiceSettings()
    metrics = Metrics()
    engine = Engine(settings, on_batch=metrics.observe_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(
        title="retina-align",
        version="0.1.0",
        summary="Cross-modal search and grading of diabetic retinopathy (fundus photographs and clinical text).",
        lifespan=lifespan,
        docs_url=None,  # served below from the package's own copy of Swagger UI, never from a CDN
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.settings = settings
    _add_error_handlers(app)
    _add_routes(app, engine, metrics, settings)
    # Outermost first: count and time everything, then the body limits, then the key, then the net for
    # unexpected errors (answered 500 without closing the client's keep-alive connection).
    app.add_middleware(CatchUnexpected)
    app.add_middleware(ApiKeyGuard, api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    app.add_middleware(BodyLimits, max_bytes=settings.max_upload_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(AccessMiddleware, metrics=metrics, router=app.router)
    return app


def create_app_from_environment() -> FastAPI:
    """uvicorn factory for `--workers N`: settings from RETINA_* environment variables."""
    return create_app(ServiceSettings())


# --- errors -------------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = [_problem(item) for item in error.errors()]
        detail = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse({"detail": f"invalid request: {detail}", "errors": problems}, status_code=422)

    @app.exception_handler(BadInput)
    async def bad_input(_: Request, error: BadInput) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    @app.exception_handler(NotReady)
    async def not_ready(_: Request, error: NotReady) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code, headers=error.headers)



def _problem(item: dict[str, object]) -> dict[str, str]:
    """One validation problem as {field, message}; never the submitted value (it may be patient text)."""
    location = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path")]
    message = str(item.get("msg", "invalid"))
    context = item.get("ctx") if isinstance(item.get("ctx"), dict) else {}
    kind = item.get("type")
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "string_too_long":
        message = f"longer than the limit of {context.get('max_length')} characters"
    elif kind == "string_pattern_mismatch" and context.get("pattern") == NOT_BLANK:
        message = "the text is empty; describe the case, e.g. 'moderate NPDR, left eye'"
    elif kind == "less_than_equal":
        message = f"must be at most {context.get('le')} (the limit)"
    return {"field": ".".join(location) or "body", "message": message}


# --- routes -------------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, engine: Engine, metrics: Metrics, settings: ServiceSettings) -> None:
    text_request = text_search_request(settings.max_k, settings.max_text_chars)
    k_form = Form(ge=1, le=settings.max_k, description="How many neighbours.")
    text_form = Form(max_length=settings.max_text_chars, description="A clinical description.")
    consensus_form = Form(
        ge=0, le=settings.max_k,
        description=f"How many archived photographs nearest the photograph form its `consensus` (0: none; default "
        f"{settings.consensus_k}, the service's setting).",
    )

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process is alive (no key needed)."""
        return Health()

    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["operations"])
    async def readyz() -> JSONResponse:
        """Whether the bundle and index are loaded: their fingerprints, the runtime and what runs each graph
        (execution providers, precision), index size, and any warning (index files changed on disk, a bundle
        without the OpenVINO IR the openvino runtime would run)."""
        readiness = _readiness(engine)
        return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests and latencies per route, per stage (decode, embed, search)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search/text", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    async def search_text(request: text_request) -> Response:  # type: ignore[valid-type]
        """The archived cases nearest a clinical description, and the grades predicted from it."""
        started = time.perf_counter()
        route = "/search/text"
        text = _checked_text(request.text)
        engine.parts()
        search = SearchRequest(text, request.k, request.against, request.filters)
        answer = await _model_call(engine.texts.submit(search))
        _observe_search(metrics, route, answer)
        notes = _notes(answer.hits, request.k, request.filters, answer.query.truncated, engine)
        return _json(_search_response(answer, request.against, engine, notes, started))

    @app.post("/search/image", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    async def search_image(
        file: Annotated[UploadFile, File(description="A fundus photograph: JPEG, PNG or TIFF.")],
        k: Annotated[int, k_form, PlainDigits] = 10,
        filters: Annotated[
            str | None,
            Form(max_length=MAX_FORM_JSON_CHARS, description='JSON, e.g. {"icdr": [2, 3], "exam_eye": "left"}'),
        ] = None,
        against: Annotated[Against, Form(description="image or record embeddings.")] = "image",
        gate: Annotated[GateMode | None, Form(description=GATE_FIELD)] = None,
        consensus_k: Annotated[int | None, consensus_form, PlainDigits] = None,
    ) -> Response:
        """The archived cases nearest a photograph, the grades predicted from it, and whether it is gradable."""
        started = time.perf_counter()
        route = "/search/image"
        parsed_filters = _parse_filters(filters)
        engine.parts()
        with metrics.timed(route, "decode"):
            image = await _decode_upload(file, engine, settings)
        answer = await _model_call(engine.images.submit(
            SearchRequest(image, k, against, parsed_filters, _consensus_k(consensus_k, settings))))
        gradability = answer.query.grades.gradability
        _refuse_non_fundus(gradability, gate or settings.gate)
        _observe_search(metrics, route, answer)
        notes = _notes(answer.hits, k, parsed_filters, False, engine) + _gate_notes(gradability)
        return _json(_search_response(answer, against, engine, notes, started))

    @app.post("/grade", response_model=GradeResponse, responses=ERRORS, tags=["grading"])
    async def grade(
        file: Annotated[UploadFile | None, File(description="A fundus photograph: JPEG, PNG or TIFF.")] = None,
        text: Annotated[str | None, text_form] = None,
        structured: Annotated[
            str | None,
            Form(max_length=MAX_FORM_JSON_CHARS,
                 description='JSON of structured data, e.g. {"patient_age": 61, "patient_sex": "female", '
                             '"diabetes_time_y": 12, "insulin": true}'),
        ] = None,
        gate: Annotated[GateMode | None, Form(description=GATE_FIELD)] = None,
        consensus_k: Annotated[int | None, consensus_form, PlainDigits] = None,
    ) -> GradeResponse:
        """ICDR and SDRG grades from a photograph, optionally with a text and structured data (any
        non-empty subset of the three)."""
        started = time.perf_counter()
        route = "/grade"
        # A blank text is no text here (a form sends its empty fields): grading uses the other inputs.
        given_text = _checked_text(text) if text is not None and text.strip() else None
        fields = _parse_structured(structured) if structured else None
        if file is None and given_text is None and fields is None:
            raise BadInput(422, "give at least one of: file (a photograph), text, structured")
        engine.parts()
        image = None
        if file is not None:
            with metrics.timed(route, "decode"):
                image = await _decode_upload(file, engine, settings)
        with metrics.timed(route, "embed"):
            answer = await _model_call(engine.grades.submit(GradeRequest(
                GradeInput(image=image, text=given_text, structured=fields), _consensus_k(consensus_k, settings))))
        grades = answer.grades
        _refuse_non_fundus(grades.gradability, gate or settings.gate)
        notes = [_truncation_note(engine)] if grades.text_truncated else []
        notes += _gate_notes(grades.gradability)
        predicted = _predicted(grades)
        return GradeResponse(
            icdr=predicted.icdr, sdrg=predicted.sdrg, referable=predicted.referable,
            referable_probability=predicted.referable_probability, gradable=_gradable(grades.gradability),
            modalities=grades.modalities,  # type: ignore[arg-type]
            consensus=_consensus_body(answer.consensus, grades.icdr_names),
            calibrated=grades.calibrated,
            text_truncated=grades.text_truncated, notes=notes, took_ms=_ms(started),
        )

    pending_explanations = [0]

    @app.post("/explain", response_model=ExplainResponse, responses={**ERRORS, **_errors(429)}, tags=["grading"])
    async def explain(
        file: Annotated[UploadFile, File(description="A fundus photograph: JPEG, PNG or TIFF.")],
        window: Annotated[
            int | None,
            Form(ge=1, le=4096, description="Occlusion window in model-input pixels (default 3/28 of the "
                                            "side; 1/28 to 1/2 of it)."),
            PlainDigits,
        ] = None,
        stride: Annotated[
            int | None,
            Form(ge=1, le=4096, description="Occlusion stride in model-input pixels (default half the window; "
                                            "1/4 to 1 window)."),
            PlainDigits,
        ] = None,
        gate: Annotated[GateMode | None, Form(description=GATE_FIELD)] = None,
    ) -> Response:
        """The photograph's grades and an occlusion heatmap of where the evidence for its ICDR grade lies:
        each region is hidden in turn (replaced by a blurred copy) and the fall of P(ICDR >= g), g = max(1,
        predicted grade), is mapped. Gradient-free, from the bundle's graphs; a few hundred times the cost
        of /grade."""
        started = time.perf_counter()
        route = "/explain"
        embedder, _ = engine.parts()
        try:
            check_window(embedder.image_spec.size, window, stride)
        except ExplainError as error:
            raise BadInput(422, str(error)) from None
        with metrics.timed(route, "decode"):
            image = await _decode_upload(file, engine, settings)
        if pending_explanations[0] >= MAX_PENDING_EXPLANATIONS:
            raise BadInput(429, f"{MAX_PENDING_EXPLANATIONS} heatmaps are being computed; retry in a moment")
        pending_explanations[0] += 1
        try:
            with metrics.timed(route, "explain"):
                explanation, gradability = await _model_call(asyncio.wrap_future(engine.explain(image, window,
                                                                                                stride)))
        finally:
            pending_explanations[0] -= 1
        _refuse_non_fundus(gradability, gate or settings.gate)
        return _json(_explain_response(explanation, gradability, embedder.manifest.icdr_names,
                                       embedder.manifest.sdrg_names, embedder.calibrated, started))

    image_content = {"image/jpeg": {}, "image/png": {}, "image/tiff": {}}

    @app.get(
        "/archive/{record_id}/image", tags=["archive"], response_class=Response,
        responses={200: {"content": image_content, "description": "The photograph, or a JPEG thumbnail."},
                   **_errors(401, 404, 422, 500, 503)},
    )
    async def archive_image(
        record_id: Annotated[int, PathParam(ge=0, le=MAX_RECORD_ID, description="The archived record's id."),
                             PlainDigits],
        size: Annotated[
            int | None, Query(ge=THUMBNAIL_MIN, le=THUMBNAIL_MAX, description="Thumbnail size."), PlainDigits
        ] = None,
    ) -> Response:
        """The archived photograph with this id (looked up in the index's metadata table), or a JPEG
        thumbnail of it at most `size` pixels wide and high."""
        _, store = engine.parts()
        rows = store.metadata.get([record_id])
        if record_id not in rows:
            raise BadInput(404, f"no archived photograph has id {record_id}")
        root = Path(store.info.archive_root).resolve()
        path = (root / rows[record_id].path).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise BadInput(404, f"the photograph of id {record_id} is not on this server's disk")
        headers = {"Cache-Control": "private, max-age=3600"}
        if size is None:
            return FileResponse(path, headers=headers)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(engine.decode_pool, _thumbnail, path, size)
        return Response(data, media_type="image/jpeg", headers=headers)

    app.add_api_route("/archive/{record_id}/image", archive_image, methods=["HEAD"], include_in_schema=False)

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        """Swagger UI for the OpenAPI document, from the package's own pinned copy (no CDN)."""
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="retina-align API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
        async def page() -> FileResponse:
            """The web page for clinicians."""
            return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


# --- helpers ------------------------------------------------------------------------------------------


async def _model_call(call: Awaitable[T]) -> T:
    """Await a batched model call; a ValueError from the model (e.g. a text with no readable word) is
    the request's fault: 422."""
    try:
        return await call
    except ValueError as error:
        raise BadInput(422, _strip_position(str(error))) from None


def _strip_position(message: str) -> str:
    # The embedder names inputs by batch position ("text 3: ..."), which means nothing to the client.
    head, sep, rest = message.partition(": ")
    return rest if sep and (head.startswith("text ") or head.startswith("input ")) else message


def _checked_text(text: str) -> str:
    """A text the tokenizer can read. Its length and that it is not blank are the request schema's checks
    (`text_search_request`, the form's `max_length`); a lone surrogate (which JSON's \\ud800 escapes can
    carry) is not a schema type, so it is refused here, before it reaches a batch."""
    if not is_valid_unicode(text):
        raise BadInput(422, "text: not valid Unicode (it holds a lone surrogate code point)")
    return text


def _parse_filters(raw: str | None) -> Filters | None:
    if raw is None or not raw.strip():
        return None
    try:
        return Filters.model_validate_json(raw)
    except ValidationError as error:
        raise BadInput(422, f"filters: {_validation_summary(error)}") from None


def _parse_structured(raw: str) -> dict[str, object]:
    try:
        fields = StructuredFields.model_validate_json(raw)
    except ValidationError as error:
        raise BadInput(422, f"structured: {_validation_summary(error)}") from None
    return fields.model_dump()


def _validation_summary(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        if item["type"] == "json_invalid":
            problems.append(f"not valid JSON ({item['msg']})")
            continue
        field = ".".join(str(part) for part in item["loc"]) or "value"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{field}: {message}")
    return "; ".join(problems)


async def _decode_upload(file: UploadFile, engine: Engine, settings: ServiceSettings) -> Image.Image:
    data = await file.read()
    if not data:
        raise BadInput(422, "file: the upload is empty")
    if sniff_image_format(data) is None:
        raise BadInput(415, "file: not a JPEG, PNG or TIFF image (the service reads the bytes, not the file name)")
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(engine.decode_pool, decode_image, data, settings.max_image_pixels,
                                          settings.max_aspect_ratio)
    except ImageDecodeError as error:
        raise BadInput(422, f"file: {error}") from None


def _thumbnail(path: Path, size: int) -> bytes:
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        thumbnail = image.convert("RGB")
        thumbnail.thumbnail((size, size))
    buffer = io.BytesIO()
    thumbnail.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _prediction(probabilities: np.ndarray, names: tuple[str, ...]) -> GradePrediction:
    grade = int(np.argmax(probabilities))
    return GradePrediction(
        grade=grade,
        name=names[grade],
        probabilities=[GradeProbability(grade=i, name=names[i], probability=round(float(p), 6))
                       for i, p in enumerate(probabilities)],
    )


def _predicted(grades: Grades) -> Predicted:
    return Predicted(
        icdr=_prediction(grades.icdr_probabilities, grades.icdr_names),
        sdrg=_prediction(grades.sdrg_probabilities, grades.sdrg_names),
        referable=grades.referable,
        referable_probability=round(grades.referable_probability, 6),
        calibrated=grades.calibrated,
    )


GATE_FIELD = ("refuse: a photograph the gradability gate judges not a fundus photograph gets 422; report: it "
              "is answered, flagged in `gradable`. Default: the service's setting (RETINA_GATE).")


def _gradable(answer: Gradability | None) -> Gradable | None:
    if answer is None:
        return None
    return Gradable(ok=answer.ok, probability=answer.probability, fundus=answer.fundus, reasons=answer.reasons,
                    probabilities=answer.probabilities, recognised=answer.recognised)


def _refuse_non_fundus(answer: Gradability | None, mode: str) -> None:
    """422 for a photograph the gate judges not a fundus photograph, unless the mode is report."""
    if answer is not None and not answer.fundus and mode == "refuse":
        raise BadInput(
            422,
            f"file: not a fundus photograph (the gradability gate gives it a probability of "
            f"{answer.probabilities.get('fundus', 0.0):.2f} of being one), so it is not graded; send gate=report "
            "to get an answer anyway",
        )


def _gate_notes(answer: Gradability | None) -> list[str]:
    if answer is None or answer.ok:
        return []
    if not answer.fundus:
        return ["the gradability gate judges this not a fundus photograph: the grades and neighbours mean nothing"]
    note = f"the photograph may not be gradable ({'; '.join(answer.reasons)}): treat the grades with caution"
    if not answer.recognised:
        note += ("; the gradability gate does not recognise this kind of photograph (it was trained on rendered "
                 "ones), so its quality judgement may not apply: look at the photograph yourself")
    return [note]


def _truncation_note(engine: Engine) -> str:
    embedder, _ = engine.parts()
    return f"the text was cut to the model's {embedder.max_length} tokens; the rest was not read"


def _notes(hits: list[Hit], k: int, filters: Filters | None, truncated: bool, engine: Engine) -> list[str]:
    notes = [_truncation_note(engine)] if truncated else []
    if len(hits) < k:
        matching = "match the filters" if filters is not None and not filters.is_empty() else "are indexed"
        notes.append(f"only {len(hits)} archived cases {matching}")
    return notes


def _search_response(
    answer: SearchAnswer, against: Against, engine: Engine, notes: list[str], started: float
) -> SearchResponse:
    _, store = engine.parts()
    return SearchResponse(
        neighbours=[
            Neighbour(id=hit.id, image_id=hit.row.image_id, score=round(hit.score, 6), labels=hit.row.labels,
                      narrative=hit.row.narrative, image_url=f"/archive/{hit.id}/image")
            for hit in answer.hits
        ],
        predicted=_predicted(answer.query.grades),
        gradable=_gradable(answer.query.grades.gradability),
        consensus=_consensus_body(answer.consensus, answer.query.grades.icdr_names),
        against=against,
        index_size=store.ntotal,
        text_truncated=answer.query.truncated,
        notes=notes,
        took_ms=_ms(started),
    )


def _consensus_k(asked: int | None, settings: ServiceSettings) -> int:
    """The consensus's k of a request: its own `consensus_k`, else the service's setting."""
    return settings.consensus_k if asked is None else asked


def _consensus_body(consensus: Consensus | None, names: tuple[str, ...]) -> NeighbourConsensus | None:
    """The response's `consensus` (None when none was asked for or there was no photograph)."""
    if consensus is None:
        return None
    return NeighbourConsensus(
        k=consensus.k, known=consensus.known, counts=list(consensus.counts), grade=consensus.grade,
        name=None if consensus.grade is None else names[consensus.grade],
        share=_rounded(consensus.share), referable_share=_rounded(consensus.referable_share),
        referable=consensus.referable, agrees=consensus.agrees, referable_agrees=consensus.referable_agrees,
        duplicates=consensus.duplicates, mean_similarity=_rounded(consensus.mean_similarity),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _explain_response(
    explanation: Explanation, gradability: Gradability | None, icdr_names: Sequence[str],
    sdrg_names: Sequence[str], calibrated: bool, started: float,
) -> ExplainResponse:
    e = explanation
    xs, ys = e.cell_centres()
    left, top, right, bottom = e.square_box
    row, col = e.peak
    referable = float(e.icdr_probabilities[REFERABLE_ICDR:].sum())
    notes = _gate_notes(gradability)
    if e.icdr_grade == 0:
        notes.append("graded no DR: the map shows what pushes the photograph towards DR (P(ICDR >= 1)), not "
                     "evidence for the grade")
    if e.max_drop < WEAK_EVIDENCE:
        notes.append(f"hiding any one region lowers P(ICDR >= {e.target_grade}) by less than {WEAK_EVIDENCE}: the "
                     "evidence is spread over the photograph (or absent), so the peak is weak")
    return ExplainResponse(
        icdr=_prediction(e.icdr_probabilities, tuple(icdr_names)),
        sdrg=_prediction(e.sdrg_probabilities, tuple(sdrg_names)),
        referable=e.icdr_grade >= REFERABLE_ICDR,
        referable_probability=round(referable, 6),
        gradable=_gradable(gradability),
        calibrated=calibrated,
        target=ExplainTarget(grade=e.target_grade, name=f"P(ICDR >= {e.target_grade})",
                             probability=round(e.target_probability, 6), max_drop=round(e.max_drop, 6)),
        heatmap=Heatmap(
            rows=int(e.heatmap.shape[0]), cols=int(e.heatmap.shape[1]),
            values=np.round(e.heatmap.astype(np.float64), 4).tolist(),
            x=[round(float(v), 2) for v in xs], y=[round(float(v), 2) for v in ys],
            cell_size=round(e.stride * (right - left) / e.input_size, 3),
            square_box=[left, top, right, bottom], field_of_view_box=list(e.field_of_view_box),
            peak=HeatmapPeak(row=row, col=col, x=round(e.peak_xy[0], 2), y=round(e.peak_xy[1], 2)),
            window=e.window, stride=e.stride, input_size=e.input_size,
        ),
        occlusions=e.occlusions,
        explain_ms=round(e.seconds * 1000, 2),
        notes=notes,
        took_ms=_ms(started),
    )


def _observe_search(metrics: Metrics, route: str, answer: SearchAnswer) -> None:
    """The request's stages: its batch's time in the model and in FAISS."""
    metrics.stage.labels(route, "embed").observe(answer.embed_seconds)
    metrics.stage.labels(route, "search").observe(answer.search_seconds)


def _json(body: BaseModel) -> Response:
    """A response model as JSON, serialised once by pydantic: FastAPI would validate it again against the
    route's `response_model` (which still documents it) before serialising it."""
    return Response(body.model_dump_json(), media_type="application/json")


def _readiness(engine: Engine) -> Readiness:
    if not engine.ready:
        detail = engine.public_message(engine.error) if engine.error else "loading the bundle and index"
        return Readiness(ready=False, detail=detail)
    embedder, store = engine.parts()
    warnings = [engine.public_message(engine.index_warning)] if engine.index_warning else []
    warnings += embedder.notes
    if not store.verified:
        warnings.append("the index has no integrity record (built by an older version): its files were loaded "
                        "unverified; rebuild it with `retina-index build`")
    return Readiness(
        ready=True,
        warnings=warnings,
        bundle=embedder.bundle.name,
        bundle_fingerprint=embedder.fingerprint,
        index=store.folder.name,
        index_generation=store.info.generation,
        index_verified=store.verified,
        index_fingerprint=store.info.bundle_fingerprint,
        index_size=store.ntotal,
        index_kinds={name: info.kind for name, info in store.info.indexes.items()},
        providers=embedder.providers,
        runtime=embedder.runtime,
        runtimes=embedder.runtimes,
        calibration=dict(zip(("icdr", "sdrg"), embedder.temperatures, strict=True)) if embedder.calibrated else None,
        decision_offsets=({head: [float(v) for v in offsets] for head, offsets in embedder.offsets.items()}
                          if embedder.offsets is not None else None),
        vector_store=store.info.store,
        faiss_device=store.image.device if store.info.store == "faiss" else None,
        embedding_dim=embedder.dim,
        max_text_tokens=embedder.max_length,
        icdr_names=list(embedder.manifest.icdr_names),
        sdrg_names=list(embedder.manifest.sdrg_names),
        gradability_gate=embedder.has_gate,
    )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
