"""The net for unexpected errors: answered 500 with a JSON body, logged in one line, and the connection
kept open.

Starlette answers an exception that escapes the app in its outermost middleware and then re-raises it,
so uvicorn logs a full traceback and closes the keep-alive connection without saying `Connection: close`:
the client's next request on that connection fails too. Catching it here, inside the app, lets the
response end normally.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.guards import BodyRefused

log = logging.getLogger(__name__)
INTERNAL_ERROR = "internal error; the service keeps running (see the server log)"


class CatchUnexpected:
    """Answers any exception a route raises (and nothing answered before) with 500 and one log line
    naming the route template and the exception type, never the request's content."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except BodyRefused:
            raise  # the body guard outside answers it (413 / 408)
        except Exception as error:
            route = getattr(scope.get("route"), "path", "other")
            log.error("internal error on %s %s: %s", scope.get("method"), route, type(error).__name__)
            log.debug("traceback of the internal error", exc_info=True)
            if started:
                raise  # half a response is out: only closing the connection can end it
            body = json.dumps({"detail": INTERNAL_ERROR}).encode()
            await send({
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            })
            await send({"type": "http.response.body", "body": body})
