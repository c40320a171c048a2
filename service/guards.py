"""Request guards: the body size limit, the optional API key, and sniffing what an upload really is."""

from __future__ import annotations

import asyncio
import hmac
import json
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_HEADER = "X-API-Key"
API_KEY_COOKIE = "retina_api_key"
OPEN_PATHS = frozenset({"/healthz"})

# Magic numbers of the formats the service reads. The content type a client sends is never trusted.
IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_image_format(data: bytes) -> str | None:
    """"JPEG", "PNG" or "TIFF" from the first bytes of `data`, or None for anything else."""
    for signature, name in IMAGE_SIGNATURES:
        if data.startswith(signature):
            return name
    return None


class BodyRefused(Exception):
    """Raised inside the app when the body passes the size limit (413) or its time limit (408)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        + (headers or []),
    })
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    """Bounds every request body by size and by time.

    Size: over `max_bytes` is refused with 413 and a message saying the limit: at once when Content-Length
    says so, else as soon as the streamed (e.g. chunked) body passes it; nothing more is read.
    Time: the whole body must arrive within `timeout_s` of the request's start, else 408, so that a client
    sending one byte a second cannot hold a connection and a worker's buffers for ever.
    Either way the app's own answer (e.g. a form parser's 400 for the cut body) is replaced by ours, and the
    connection is closed."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _message(self, size: int | None) -> str:
        limit_mb = self.max_bytes / (1024 * 1024)
        said = f"the request body is {size / (1024 * 1024):.1f} MB" if size else "the request body is too large"
        return f"{said}; the limit is {limit_mb:g} MB (RETINA_MAX_UPLOAD_MB)"

    def _refusal(self, status: int) -> str:
        if status == 413:
            return self._message(None)
        return f"the request body did not arrive within {self.timeout_s:g} s (RETINA_BODY_TIMEOUT_S)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, self._message(int(length)), [(b"connection", b"close")])
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received = 0
        body_done = False
        refused: int | None = None
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done, refused
            if body_done:  # after the body only http.disconnect comes: no deadline for that wait
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                refused = 408
                raise BodyRefused(408) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    refused = 413
                    raise BodyRefused(413)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None:
                return  # the app answers a body it could not read (a parser's 400): ours replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyRefused:
            pass
        if refused is not None and not started:
            await _send_json(send, refused, self._refusal(refused), [(b"connection", b"close")])


def key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of an API key."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class ApiKeyGuard:
    """When a key is configured, every path but /healthz needs it, in the X-API-Key header or the
    `retina_api_key` cookie (which the web page's key form sets)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.api_key is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get(API_KEY_HEADER.lower()) or _cookie(headers.get("cookie"), API_KEY_COOKIE)
        if key_matches(given, self.api_key):
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/" and "text/html" in headers.get("accept", ""):
            await _send_key_form(send)
            return
        detail = "an API key is required: send it in the X-API-Key header" if given is None else "wrong API key"
        await _send_json(send, 401, detail)


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return unquote(value)
    return None


KEY_FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>retina-align: API key</title>
<style>body{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto}input,button{font-size:1rem}</style>
</head><body><h1>retina-align</h1><p>This service needs an API key.</p>
<form id="key"><input id="value" type="password" autocomplete="off" placeholder="API key" required>
<button>Continue</button></form>
<script>document.getElementById("key").addEventListener("submit", (e) => { e.preventDefault();
document.cookie = "retina_api_key=" + encodeURIComponent(document.getElementById("value").value)
 + "; path=/; SameSite=Strict"; location.reload(); });</script></body></html>"""


async def _send_key_form(send: Send) -> None:
    body = KEY_FORM.encode()
    await send({
        "type": "http.response.start",
        "status": 401,
        "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
