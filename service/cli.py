"""`retina-serve`: run the API (`retina-serve --bundle B --index I`) or load-test one (`retina-serve bench`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

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
    runtime: Annotated[
        str | None,
        typer.Option(help="onnxruntime, or openvino (CPU, the `openvino` extra; env RETINA_RUNTIME; onnxruntime)."),
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="faiss or milvus: the store INDEX must use (env RETINA_STORE; its index.json).")
    ] = None,
    milvus_uri: Annotated[
        str | None,
        typer.Option(help="A Milvus-backed INDEX: reach Milvus here, not at the recorded URI (env RETINA_MILVUS_URI)."),
    ] = None,
) -> None:
    """Serve the search and grading API for BUNDLE and INDEX (flags win over RETINA_* variables).
    Other settings come from the environment: RETINA_API_KEY, RETINA_MAX_UPLOAD_MB, RETINA_DEVICE, ..."""
    if ctx.invoked_subcommand is not None:
        return
    given = {"bundle": bundle, "index": index, "host": host, "port": port, "workers": workers, "runtime": runtime,
             "store": store, "milvus_uri": milvus_uri}
    try:
        settings = ServiceSettings(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as error:
        raise _fail(f"invalid settings: {error}") from None
    if settings.bundle is None or settings.index is None:
        raise _fail("give --bundle BUNDLE and --index INDEX (or RETINA_BUNDLE and RETINA_INDEX)")
    for name, path in (("bundle", settings.bundle), ("index", settings.index)):
        if not Path(path).is_dir():
            raise _fail(f"--{name} {path}: no such folder")
    if settings.runtime == "openvino":
        from index.runtimes import RuntimeUnavailable, openvino_module

        try:
            openvino_module()
        except RuntimeUnavailable as error:
            raise _fail(escape(str(error))) from None  # the extra's [brackets] are not rich markup

    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shown = "localhost" if settings.host in ("0.0.0.0", "127.0.0.1") else settings.host
    console.print(f"retina-serve: open http://{shown}:{settings.port}/ (API docs at /docs)", highlight=False)
    if settings.workers == 1:
        from service.app import create_app
        from service.server import serve as run_server

        run_server(create_app(settings), settings.host, settings.port, settings.log_level)
        return
    # Several workers import the app by name in each process: settings travel as environment variables.
    os.environ.update({
        "RETINA_BUNDLE": str(Path(settings.bundle).resolve()),
        "RETINA_INDEX": str(Path(settings.index).resolve()),
        "RETINA_RUNTIME": settings.runtime,
        **({"RETINA_STORE": settings.store} if settings.store else {}),
        **({"RETINA_MILVUS_URI": settings.milvus_uri} if settings.milvus_uri else {}),
    })
    uvicorn.run("service.app:create_app_from_environment", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, access_log=False, log_level=settings.log_level)


@app.command()
def bench(
    url: Annotated[str, typer.Option(help="The running service, e.g. http://127.0.0.1:8000")],
    concurrency: Annotated[int, typer.Option(min=1, help="Clients sending requests at the same time.")] = 16,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of load.")] = 30.0,
    routes: Annotated[str, typer.Option(help="Comma-separated routes in turn: text, image, grade.")] = "text",
    bundle: Annotated[Path | None, typer.Option(help="With --index: also time the bare model in process.")] = None,
    index: Annotated[Path | None, typer.Option(help="The index the service runs (for the bare comparison).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="RETINA_API_KEY", help="The service's API key.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers to this JSON file.")] = None,
    ort_spinning: Annotated[
        bool, typer.Option(help="Let the bare model's ONNX Runtime spin (as the server's RETINA_ORT_SPINNING).")
    ] = False,
    runtime: Annotated[
        str, typer.Option(envvar="RETINA_RUNTIME", help="The bare model's runtime (as the server's RETINA_RUNTIME).")
    ] = "onnxruntime",
) -> None:
    """Load-test a running service: requests/s, p50/p95/p99 latency and errors per route, and the
    server's resident memory over the run. With --bundle and --index, also the service's overhead over
    the bare model (p50, one client) and its throughput against the bare model's batched throughput."""
    import asyncio
    import json
    from dataclasses import asdict

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from index.bench.load import run_load

    chosen = [route.strip() for route in routes.split(",") if route.strip()]
    if (bundle is None) != (index is None):
        raise _fail("give both --bundle and --index for the bare-model comparison, or neither")
    report: dict[str, object] = {"url": url}

    def load(clients: int, seconds: float, which: list[str], title: str):  # type: ignore[no-untyped-def]
        with Progress(TextColumn(title), BarColumn(), TimeRemainingColumn(), console=console) as progress:
            task = progress.add_task(title, total=seconds)
            try:
                return asyncio.run(run_load(url, which, clients, seconds, api_key,
                                            lambda done: progress.update(task, completed=done)))
            except OSError as error:  # aiohttp's ClientConnectorError: nothing listens there
                raise _fail(f"{url}: cannot connect ({error}); is retina-serve running there?") from None
            except Exception as error:  # 401, a server without an index...
                raise _fail(f"{url}: {type(error).__name__}: {error}") from None

    result = load(concurrency, duration, chosen, f"{concurrency} clients, {duration:g} s")
    report["load"] = asdict(result)
    table = Table(title=f"{url}: {concurrency} concurrent clients for {result.duration_s:.1f} s")
    for column in ("route", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "route" else "right")
    for route, stats in result.routes.items():
        errors = stats["errors"]
        table.add_row(f"/search/{route}" if route != "grade" else "/grade", str(stats["requests"]),
                      str(sum(errors.values())) + (f" {errors}" if errors else ""),  # type: ignore[union-attr]
                      f"{stats['requests_per_s']:.1f}", f"{stats['p50_ms']:.1f}", f"{stats['p95_ms']:.1f}",
                      f"{stats['p99_ms']:.1f}")
    print()
    Console().print(table)
    print(f"total {result.total_requests_per_s:.1f} requests/s, {result.errors} errors")
    if result.rss_mb:
        rss = result.rss_mb
        print(f"server resident memory: start {rss[0]:.0f} MB, end {rss[-1]:.0f} MB, max {max(rss):.0f} MB "
              f"({len(rss)} samples)")

    if bundle is not None and index is not None:
        from index.bench.bare import measure_bare_text_search

        single = load(1, min(duration, 10.0), ["text"], "1 client (overhead)")
        console.print("timing the bare model in process (no HTTP)...")
        bare = measure_bare_text_search(bundle, index, seconds=min(duration, 10.0), batch_size=concurrency,
                                        ort_spinning=ort_spinning, runtime=runtime)
        service_p50 = float(single.routes["text"]["p50_ms"])  # type: ignore[arg-type]
        service_rate = float(result.routes["text"]["requests_per_s"]) if "text" in result.routes else float("nan")  # type: ignore[arg-type]
        overhead = service_p50 - bare.single_p50_ms
        ratio = service_rate / bare.batched_queries_per_s
        report["bare"] = asdict(bare)
        report["overhead_p50_ms"] = overhead
        report["throughput_ratio"] = ratio
        print(f"/search/text, one client: service p50 {service_p50:.2f} ms, bare model p50 {bare.single_p50_ms:.2f} ms"
              f" -> overhead {overhead:.2f} ms (target <= 3 ms: {'met' if overhead <= 3 else 'NOT met'})")
        print(f"/search/text, {concurrency} clients: service {service_rate:.1f} req/s, bare model in batches of "
              f"{bare.batch_size} {bare.batched_queries_per_s:.1f} queries/s -> {ratio:.0%} "
              f"(target >= 90%: {'met' if ratio >= 0.9 else 'NOT met'})")
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
if __name__ == "__main__":
    app()
