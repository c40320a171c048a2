"""`retina-serve`: the server command in a subprocess, its errors, and the load-test client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_server import Served, free_port, serve, tiny_index
from typer.testing import CliRunner

from index.bench.load import run_load
from service.cli import app
from service.settings import ServiceSettings


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tiny, index = tiny_index(tmp_path_factory)
    return tiny.bundle, index


@pytest.fixture(scope="module")
def served(paths: tuple[Path, Path]) -> Iterator[Served]:
    with serve(ServiceSettings(bundle=paths[0], index=paths[1], device="cpu")) as server:
        yield server


def test_retina_serve_runs_a_server(paths: tuple[Path, Path]) -> None:
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "--bundle", str(paths[0]), "--index", str(paths[1]),
               "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            time.sleep(0.2)
        else:
            pytest.fail("retina-serve did not become ready in 90 s")
        response = httpx.post(f"http://127.0.0.1:{port}/search/text", json={"text": "no retinopathy", "k": 3},
                              timeout=60)
        assert response.status_code == 200 and len(response.json()["neighbours"]) == 3
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert f"http://localhost:{port}/" in output
    assert "no retinopathy" not in output  # no request text in the server's output


def test_retina_serve_explains_missing_or_wrong_arguments(tmp_path: Path, paths: tuple[Path, Path]) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, [], env={"RETINA_BUNDLE": "", "RETINA_INDEX": ""})
    assert missing.exit_code == 2 and "--bundle" in missing.output
    wrong = runner.invoke(app, ["--bundle", str(tmp_path / "nope"), "--index", str(paths[1])])
    assert wrong.exit_code == 2 and "no such folder" in wrong.output


def test_load_client_measures_every_route(served: Served) -> None:
    result = asyncio.run(run_load(served.url, ["text", "image", "grade"], concurrency=4, duration_s=3))
    assert result.errors == 0
    assert set(result.routes) == {"text", "image", "grade"}
    for stats in result.routes.values():
        assert stats["ok"] > 0 and 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]  # type: ignore[operator]
    assert result.total_requests_per_s > 0 and result.rss_mb and min(result.rss_mb) > 10


def test_bench_command_prints_and_saves_the_numbers(served: Served, paths: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--url", served.url, "--concurrency", "2", "--duration", "2",
                                      "--bundle", str(paths[0]), "--index", str(paths[1]), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "requests/s" in result.output and "overhead" in result.output and "bare model" in result.output
    report = json.loads(out.read_text())
    assert report["load"]["errors"] == 0 and report["bare"]["batched_queries_per_s"] > 0
    assert isinstance(report["overhead_p50_ms"], float) and report["throughput_ratio"] > 0


def test_bench_against_nothing_fails_clearly() -> None:
    result = CliRunner().invoke(app, ["bench", "--url", f"http://127.0.0.1:{free_port()}", "--duration", "1"])
    assert result.exit_code == 2 and "cannot connect" in result.output and "is retina-serve running" in result.output
