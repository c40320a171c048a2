"""`retina-serve`: run the API (`retina-serve --bundle B --index I`) or load-test one (`retina-serve bench`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from service.settings import ServiceSettings

app = typer.Typer(add_completion=False, help=__doc__)
console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    bundle: Annotated[Path | None, typer.Option(help="The bundle folder (env RETINA_BUNDLE).")] = None,
    index: Annotated[Path | None, typer.Option(help="The index folder (env RETINA_INDEX).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (env RETINA_HOST; 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (env RETINA_PORT; 8000).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (env RETINA_WORKERS; 1).")] = None,
) -> None:
    """Serve the search and grading API for BUNDLE and INDEX (flags win over RETINA_* variables).
    Other settings come from the environment: RETINA_API_KEY, RETINA_MAX_UPLOAD_MB, RETINA_DEVICE, ..."""
    if ctx.invoked_subcommand is not None:
        return
    given = {"bundle": bundle, "index": index, "host": host, "port": port, "workers": workers}
    try:
        settings = ServiceSettings(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as error:
        raise _fail(f"invalid settings: {error}") from None
    if settings.bundle is None or settings.index is None:
        raise _fail("give --bundle BUNDLE and --index INDEX (or RETINA_BUNDLE and RETINA_INDEX)")
    for name, path in (("bundle", settings.bundle), ("index", settings.index)):
        if not Path(path).is_dir():
            raise _fail(f"--{name} {path}: no such folder")

    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shown = "localhost" if settings.host in ("0.0.0.0", "127.0.0.1") else settings.host
    console.print(f"retina-serve: open http://{shown}:{settings.port}/ (API docs at /docs)", highlight=False)
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=False,
                    log_level=settings.log_level)
        return
    # Several workers import the app by name in each process: settings travel as environment variables.
    os.environ.update({
        "RETINA_BUNDLE": str(Path(settings.bundle).resolve()),
        "RETINA_INDEX": str(Path(settings.index).resolve()),
    })
    uvicorn.run("service.app:create_app_from_environment", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, access_log=False, log_level=settings.log_level)
