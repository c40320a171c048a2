"""The FastAPI application: search by text or photograph, grading, archive images, health, metrics and
the web page. Build it with `create_app(settings)`; `retina-serve` runs it under uvicorn."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.embedder import GradeInput, Grades
from index.metadata import Filters
from index.preprocess import ImageDecodeError, decode_image
from index.store import Hit
from service.engine import Engine, NotReady
from service.guards import ApiKeyGuard, BodySizeLimit, sniff_image_format
from service.schemas import (
    Against,
    ErrorResponse,
    GradePrediction,
    GradeProbability,
    GradeResponse,
    Health,
    Neighbour,
    Predicted,
    Readiness,
    SearchResponse,
    StructuredFields,
    TextSearchRequest,
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


ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 415, 422, 503)
}


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
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.settings = settings
    _add_error_handlers(app)
    _add_routes(app, engine, metrics, settings)
    # Outermost first: count and time everything, then the size limit, then the key.
    app.add_middleware(ApiKeyGuard, api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # The route template only: the request may carry patient text or ids.
        route = getattr(request.scope.get("route"), "path", "other")
        log.error("internal error on %s %s: %s", request.method, route, type(error).__name__)
        return JSONResponse({"detail": "internal error; the service keeps running (see the server log)"},
                            status_code=500)


def _problem(item: dict[str, object]) -> dict[str, str]:
    location = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path")]
    message = str(item.get("msg", "invalid"))
    if item.get("type") == "extra_forbidden":
        message = "unknown field"
    return {"field": ".".join(location) or "body", "message": message}


# --- routes -------------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, engine: Engine, metrics: Metrics, settings: ServiceSettings) -> None:
    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process is alive (no key needed)."""
        return Health()

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["operations"])
    async def readyz() -> JSONResponse:
        """Whether the bundle and index are loaded: their fingerprints, execution providers, index size."""
        readiness = _readiness(engine)
        return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests and latencies per route, per stage (decode, embed, search)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search/text", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    async def search_text(request: TextSearchRequest) -> SearchResponse:
        """The archived cases nearest a clinical description, and the grades predicted from it."""
        started = time.perf_counter()
        route = "/search/text"
        text = _checked_text(request.text, settings)
        _check_k(request.k, settings)
        engine.parts()
        with metrics.timed(route, "embed"):
            query = await _model_call(engine.texts.submit(text))
        with metrics.timed(route, "search"):
            hits = await engine.search(query.vector, request.k, request.against, request.filters)
        notes = _notes(hits, request.k, request.filters, query.truncated, engine)
        return _search_response(hits, query.grades, request.against, engine, query.truncated, notes, started)

    @app.post("/search/image", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    async def search_image(
        file: Annotated[UploadFile, File(description="A fundus photograph: JPEG, PNG or TIFF.")],
        k: Annotated[int, Form(ge=1, description="How many neighbours.")] = 10,
        filters: Annotated[str | None, Form(description='JSON, e.g. {"icdr": [2, 3], "exam_eye": "left"}')] = None,
        against: Annotated[Against, Form(description="image or record embeddings.")] = "image",
    ) -> SearchResponse:
        """The archived cases nearest a photograph, and the grades predicted from it."""
        started = time.perf_counter()
        route = "/search/image"
        _check_k(k, settings)
        parsed_filters = _parse_filters(filters)
        engine.parts()
        with metrics.timed(route, "decode"):
            image = await _decode_upload(file, engine, settings)
        with metrics.timed(route, "embed"):
            query = await _model_call(engine.images.submit(image))
        with metrics.timed(route, "search"):
            hits = await engine.search(query.vector, k, against, parsed_filters)
        notes = _notes(hits, k, parsed_filters, False, engine)
        return _search_response(hits, query.grades, against, engine, False, notes, started)

    @app.post("/grade", response_model=GradeResponse, responses=ERRORS, tags=["grading"])
    async def grade(
        file: Annotated[UploadFile | None, File(description="A fundus photograph: JPEG, PNG or TIFF.")] = None,
        text: Annotated[str | None, Form(description="A clinical description.")] = None,
        structured: Annotated[
            str | None,
            Form(description='JSON of structured data, e.g. {"patient_age": 61, "patient_sex": "female", '
                             '"diabetes_time_y": 12, "insulin": true}'),
        ] = None,
    ) -> GradeResponse:
        """ICDR and SDRG grades from a photograph, optionally with a text and structured data (any
        non-empty subset of the three)."""
        started = time.perf_counter()
        route = "/grade"
        given_text = _checked_text(text, settings) if text is not None and text != "" else None
        fields = _parse_structured(structured) if structured else None
        if file is None and given_text is None and fields is None:
            raise BadInput(422, "give at least one of: file (a photograph), text, structured")
        engine.parts()
        image = None
        if file is not None:
            with metrics.timed(route, "decode"):
                image = await _decode_upload(file, engine, settings)
        with metrics.timed(route, "embed"):
            grades = await _model_call(engine.grades.submit(GradeInput(image=image, text=given_text,
                                                                      structured=fields)))
        notes = [_truncation_note(engine)] if grades.text_truncated else []
        predicted = _predicted(grades)
        return GradeResponse(
            icdr=predicted.icdr, sdrg=predicted.sdrg, referable=predicted.referable,
            referable_probability=predicted.referable_probability, modalities=grades.modalities,  # type: ignore[arg-type]
            text_truncated=grades.text_truncated, notes=notes, took_ms=_ms(started),
        )

    @app.get("/archive/{record_id}/image", tags=["archive"], responses={404: {"model": ErrorResponse}})
    async def archive_image(
        record_id: int,
        size: Annotated[int | None, Query(ge=THUMBNAIL_MIN, le=THUMBNAIL_MAX, description="Thumbnail size.")] = None,
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

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
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


def _checked_text(text: str, settings: ServiceSettings) -> str:
    if not text.strip():
        raise BadInput(422, "text: the text is empty; describe the case, e.g. 'moderate NPDR, left eye'")
    if len(text) > settings.max_text_chars:
        raise BadInput(
            422, f"text: {len(text):,} characters, more than the limit of {settings.max_text_chars:,}"
        )
    return text


def _check_k(k: int, settings: ServiceSettings) -> None:
    if not 1 <= k <= settings.max_k:
        raise BadInput(422, f"k: must be between 1 and {settings.max_k}, not {k}")


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
        return await loop.run_in_executor(engine.decode_pool, decode_image, data, settings.max_image_pixels)
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
    )


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
    hits: list[Hit], grades: Grades, against: Against, engine: Engine, truncated: bool, notes: list[str],
    started: float,
) -> SearchResponse:
    _, store = engine.parts()
    return SearchResponse(
        neighbours=[
            Neighbour(id=hit.id, image_id=hit.row.image_id, score=round(hit.score, 6), labels=hit.row.labels,
                      narrative=hit.row.narrative, image_url=f"/archive/{hit.id}/image")
            for hit in hits
        ],
        predicted=_predicted(grades),
        against=against,
        index_size=store.ntotal,
        text_truncated=truncated,
        notes=notes,
        took_ms=_ms(started),
    )


def _readiness(engine: Engine) -> Readiness:
    if not engine.ready:
        detail = engine.error or "loading the bundle and index"
        return Readiness(ready=False, detail=detail)
    embedder, store = engine.parts()
    return Readiness(
        ready=True,
        bundle=str(embedder.bundle),
        bundle_fingerprint=embedder.fingerprint,
        index=str(store.folder),
        index_fingerprint=store.info.bundle_fingerprint,
        index_size=store.ntotal,
        index_kinds={name: info.kind for name, info in store.info.indexes.items()},
        providers=embedder.providers,
        faiss_device=store.image.device,
        embedding_dim=embedder.dim,
        max_text_tokens=embedder.max_length,
        icdr_names=list(embedder.manifest.icdr_names),
        sdrg_names=list(embedder.manifest.sdrg_names),
    )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
