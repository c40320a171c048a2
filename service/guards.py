"""Request guards: the body size limit, the optional API key, and sniffing what an upload really is."""

from __future__ import annotations

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


class BodyTooLarge(Exception):
    """Raised inside the app when the body passes the limit; answered with 413."""


async def _send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        + (headers or []),
    })
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413 and a message saying the limit: at once when
    Content-Length says so, else as soon as the streamed body passes it (nothing more is read)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: int | None) -> str:
        limit_mb = self.max_bytes / (1024 * 1024)
        said = f"the request body is {size / (1024 * 1024):.1f} MB" if size else "the request body is too large"
        return f"{said}; the limit is {limit_mb:g} MB (RETINA_MAX_UPLOAD_MB)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, self._message(int(length)), [(b"connection", b"close")])
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, self._message(None), [(b"connection", b"close")])


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
