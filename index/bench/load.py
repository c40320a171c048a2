"""Load test of a running service: concurrent clients for a fixed time, latency percentiles per route,
error counts, and the server's resident memory over the run (read from its /metrics)."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

ROUTES = ("text", "image", "grade")
QUERIES = (
    "Right eye of a 58-year-old man with diabetes: no diabetic retinopathy.",
    "Left eye, 64-year-old woman on insulin: mild non-proliferative diabetic retinopathy, microaneurysms only.",
    "Moderate NPDR with dot haemorrhages and hard exudates near the macula.",
    "Severe non-proliferative diabetic retinopathy with venous beading and intraretinal microvascular abnormalities.",
    "Proliferative diabetic retinopathy with new vessels at the disc and pre-retinal haemorrhage.",
    "Pan-retinal laser scars after treatment of proliferative retinopathy, left eye.",
    "Diabetic patient, 12 years since diagnosis, macular oedema suspected.",
    "Normal fundus of a 45-year-old woman, optic disc and vessels within normal limits.",
)
RSS_METRIC = re.compile(r"^process_resident_memory_bytes\s+([0-9.e+]+)$", re.MULTILINE)


@dataclass
class RouteStats:
    """Latencies (s) and outcomes of one route."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def record(self, seconds: float, outcome: str | None) -> None:
        """Count a request; `outcome` is None for success, else the status code or error name."""
        if outcome is None:
            self.latencies.append(seconds)
        else:
            self.errors[outcome] = self.errors.get(outcome, 0) + 1

    def summary(self, duration_s: float) -> dict[str, float | int | dict[str, int]]:
        """requests, errors, req/s and p50/p95/p99 in ms."""
        ok = np.array(self.latencies) * 1000
        percentile = (lambda q: float(np.percentile(ok, q))) if len(ok) else (lambda q: float("nan"))
        return {
            "requests": len(ok) + sum(self.errors.values()),
            "ok": len(ok),
            "errors": dict(self.errors),
            "requests_per_s": len(ok) / duration_s,
            "p50_ms": percentile(50),
            "p95_ms": percentile(95),
            "p99_ms": percentile(99),
        }


@dataclass(frozen=True)
class LoadResult:
    """What a load test measured."""

    duration_s: float
    concurrency: int
    routes: dict[str, dict[str, float | int | dict[str, int]]]
    total_requests_per_s: float
    errors: int
    rss_mb: list[float]  # the server's resident memory, sampled over the run (empty if not exposed)


async def _fetch_photo(session: aiohttp.ClientSession) -> bytes:
    """A photograph to send: the top neighbour of a text search, fetched from the server itself."""
    async with session.post("/search/text", json={"text": QUERIES[0], "k": 1}) as response:
        response.raise_for_status()
        url = (await response.json())["neighbours"][0]["image_url"]
    async with session.get(url) as image:
        image.raise_for_status()
        return await image.read()


def _form(photo: bytes, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", photo, filename="photo.jpg", content_type="image/jpeg")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


Send = Callable[[aiohttp.ClientSession, int], Awaitable[int]]


def _requests(photo: bytes | None) -> dict[str, Send]:
    """One request of each route, sent and read whole; each returns the status code."""

    async def send(session: aiohttp.ClientSession, path: str, **kwargs: object) -> int:
        async with session.post(path, **kwargs) as response:  # type: ignore[arg-type]
            await response.read()
            return response.status

    async def text(session: aiohttp.ClientSession, i: int) -> int:
        return await send(session, "/search/text", json={"text": QUERIES[i % len(QUERIES)], "k": 10})

    async def image(session: aiohttp.ClientSession, i: int) -> int:
        return await send(session, "/search/image", data=_form(photo or b"", k="10"))

    async def grade(session: aiohttp.ClientSession, i: int) -> int:
        return await send(session, "/grade", data=_form(photo or b"", text=QUERIES[i % len(QUERIES)]))

    return {"text": text, "image": image, "grade": grade}


async def _metrics_text(session: aiohttp.ClientSession) -> str:
    async with session.get("/metrics") as response:
        return await response.text()


async def _sample_rss(session: aiohttp.ClientSession, until: float, every_s: float, into: list[float]) -> None:
    while time.perf_counter() < until:
        try:
            match = RSS_METRIC.search(await _metrics_text(session))
        except aiohttp.ClientError:
            match = None
        if match:
            into.append(float(match.group(1)) / 1e6)
        await asyncio.sleep(min(every_s, max(0.0, until - time.perf_counter())))


async def run_load(
    url: str,
    routes: Sequence[str] = ("text",),
    concurrency: int = 16,
    duration_s: float = 30.0,
    api_key: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> LoadResult:
    """`concurrency` clients send requests (routes in turn) to `url` for `duration_s` seconds, each on its
    own keep-alive connection. The client is aiohttp (its HTTP parser is compiled): with httpx the load
    generator itself cost 2-4 ms of Python per request and, on a small machine, measured its own limits."""
    unknown = set(routes) - set(ROUTES)
    if unknown:
        raise ValueError(f"unknown routes {sorted(unknown)}; known: {', '.join(ROUTES)}")
    headers = {"X-API-Key": api_key} if api_key else {}
    connector = aiohttp.TCPConnector(limit=concurrency + 2)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector, timeout=timeout) as session:
        photo = await _fetch_photo(session) if {"image", "grade"} & set(routes) else None
        make = _requests(photo)
        for route in routes:  # warm-up, not counted
            await make[route](session, 0)
        stats = {route: RouteStats() for route in routes}
        counter = itertools.count()
        started = time.perf_counter()
        deadline = started + duration_s
        rss: list[float] = []

        async def worker() -> None:
            while (now := time.perf_counter()) < deadline:
                i = next(counter)
                route = routes[i % len(routes)]
                try:
                    status = await make[route](session, i)
                    outcome = None if status < 400 else str(status)
                except (aiohttp.ClientError, TimeoutError) as error:
                    outcome = type(error).__name__
                stats[route].record(time.perf_counter() - now, outcome)

        async def ticker() -> None:
            while (now := time.perf_counter()) < deadline:
                if progress is not None:
                    progress(now - started)
                await asyncio.sleep(0.5)

        await asyncio.gather(
            *(worker() for _ in range(concurrency)), ticker(), _sample_rss(session, deadline, 5.0, rss)
        )
        elapsed = time.perf_counter() - started
        match = RSS_METRIC.search(await _metrics_text(session))
        if match:
            rss.append(float(match.group(1)) / 1e6)
    summaries = {route: stat.summary(elapsed) for route, stat in stats.items()}
    return LoadResult(
        duration_s=elapsed,
        concurrency=concurrency,
        routes=summaries,
        total_requests_per_s=sum(float(s["requests_per_s"]) for s in summaries.values()),  # type: ignore[arg-type]
        errors=sum(sum(stat.errors.values()) for stat in stats.values()),
        rss_mb=rss,
    )
