"""Prometheus metrics and the access log.

Metrics (`GET /metrics`): requests by route and status, request latency by route, latency by stage
(decode, embed, search) and model batch sizes. Each app has its own registry, so several apps (tests)
live in one process. With `--workers N`, each worker process answers /metrics with its own numbers.

The access log names the route template (`/archive/{record_id}/image`), never the raw path or query,
and nothing from the body: patient text and ids never reach the logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("service.access")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's Prometheus collectors, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self.requests = Counter(
            "retina_requests", "HTTP requests by route and status code", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "retina_request_seconds", "HTTP request latency by route", ["route"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "retina_stage_seconds", "Latency of one stage of a request (decode, embed, search)",
            ["route", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "retina_model_batch_size", "Requests merged into one model run", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "retina_model_batch_seconds", "Duration of one model run", ["model"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        """Record one model run (the batchers call this)."""
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)

    @contextmanager
    def timed(self, route: str, stage: str) -> Iterator[None]:
        """Time a block as one stage of a route."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage.labels(route, stage).observe(time.perf_counter() - started)


def route_template(app: ASGIApp, scope: Scope) -> str:
    """The path template of the route `scope` matches (e.g. `/archive/{record_id}/image`), or "other"."""
    for route in getattr(app, "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "other"


class AccessMiddleware:
    """Counts and times every HTTP request by route template and logs one line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, router: ASGIApp) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(self.router, scope)
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            access_log.info("%s %s %d %.1f ms", scope["method"], route, status, seconds * 1000)
