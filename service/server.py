"""uvicorn's server with a drain: on shutdown it stops accepting, then gives connections it has already
accepted a moment to deliver their request before asking every connection to close.

uvicorn's own shutdown closes at once every connection whose request it has not started reading, so a
request that reached the server just before SIGTERM (accepted, its bytes not parsed yet) failed with a
reset connection although it was in flight (`tests/test_hardening.py`'s SIGTERM drill caught it in CI).
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvicorn

DRAIN_S = 0.25
"""How long accepted connections get to deliver their request once the server stops accepting."""


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose shutdown stops accepting, waits `DRAIN_S`, then shuts down as usual."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting, let accepted connections start their requests, then uvicorn's shutdown."""
        for server in self.servers:
            server.close()
        await asyncio.sleep(DRAIN_S)
        await super().shutdown(sockets)


def serve(app: object, host: str, port: int, log_level: str) -> None:
    """Run `app` in this process (one worker) until SIGINT/SIGTERM, as `uvicorn.run` does."""
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level=log_level)  # type: ignore[arg-type]
    server = DrainingServer(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
