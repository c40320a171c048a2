"""`docker compose up` for real: build both images, run the one-shot `prepare` job (a small demo) into a fresh
volume, wait for the API's /readyz, call the three POST routes, tear everything down (volumes too).

Opt-in: RETINA_DOCKER_TEST=1 (`.ci/run` sets it when ../shared/tools/docker-local.sh is there). Needs a
Docker engine and `docker-compose` (v1.29+) or the `docker compose` plugin. Containers are reached only
through a port published on 127.0.0.1. Timeouts (seconds) from the environment: RETINA_DOCKER_BUILD_TIMEOUT
(default 3600: the first build of the training image downloads CUDA torch), RETINA_DOCKER_UP_TIMEOUT
(default 1200: the `prepare` job), RETINA_DOCKER_READY_TIMEOUT (default 300).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("RETINA_DOCKER_TEST") != "1",
    reason="docker compose test is opt-in: set RETINA_DOCKER_TEST=1 (needs a Docker engine and docker-compose)",
)

# A small demo archive, so that `prepare` (export of the shipped model, index) takes about a minute.
DEMO_ENV = {
    "RETINA_DEMO_N": "200",
    "RETINA_DEMO_SEED": "1",
}


def _timeout(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    pytest.fail("RETINA_DOCKER_TEST=1 but neither `docker-compose` nor `docker compose` is available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    compose: list[str]
    project: str
    env: dict[str, str]
    base_url: str

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*self.compose, "-p", self.project, "-f", str(ROOT / "compose.yaml"), *args]
        try:
            result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"`{' '.join(command)}` did not finish in {timeout:.0f} s\n{self.logs()}"
                        f"\n--- its output ---\n{_tail(error.stdout)}\n{_tail(error.stderr)}")
        if check and result.returncode != 0:
            pytest.fail(f"`{' '.join(command)}` exited {result.returncode}\n--- stdout ---\n{_tail(result.stdout)}"
                        f"\n--- stderr ---\n{_tail(result.stderr)}\n{self.logs()}")
        return result

    def logs(self, lines: int = 60) -> str:
        command = [*self.compose, "-p", self.project, "-f", str(ROOT / "compose.yaml"), "logs", "--no-color",
                   "--tail", str(lines)]
        try:
            result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return "--- docker-compose logs timed out ---"
        return f"--- docker-compose logs (last {lines} lines per service) ---\n{result.stdout}{result.stderr}"

    def container(self, service: str) -> str:
        ids = self.run("ps", "-a", "-q", service).stdout.split()
        if not ids:
            pytest.fail(f"no container for service {service!r}\n{self.logs()}")
        return ids[0]

    def inspect(self, service: str, template: str) -> str:
        result = subprocess.run(["docker", "inspect", "-f", template, self.container(service)],
                                capture_output=True, text=True, timeout=60)
        return result.stdout.strip()


def _tail(text: str | bytes | None, chars: int = 4000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-chars:]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    compose = _compose_command()
    env = {key: value for key, value in os.environ.items() if key != "RETINA_API_KEY"}
    env.update(DEMO_ENV)
    port = _free_port()
    env["RETINA_HOST_PORT"] = str(port)
    stack = Stack(compose=compose, project=f"retinatest{uuid.uuid4().hex[:10]}", env=env,
                  base_url=f"http://127.0.0.1:{port}")
    try:
        stack.run("build", timeout=_timeout("RETINA_DOCKER_BUILD_TIMEOUT", 3600))
        # `up` waits for `prepare` to complete successfully before it starts `api` (depends_on condition).
        stack.run("up", "-d", timeout=_timeout("RETINA_DOCKER_UP_TIMEOUT", 1200))
        yield stack
    finally:
        stack.run("down", "-v", "--remove-orphans", timeout=300, check=False)


def _request(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _multipart(field: str, filename: str, content: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = f"----retina{uuid.uuid4().hex}"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _retina_jpeg() -> bytes:
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage_data.retina()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _wait_ready(stack: Stack, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            status, body = _request(f"{stack.base_url}/readyz", timeout=5)
            if status == 200:
                return json.loads(body or b"{}")
            last = f"HTTP {status}: {body[:300]!r}"
        except (OSError, urllib.error.URLError) as error:
            last = f"{type(error).__name__}: {error}"
        if stack.inspect("api", "{{.State.Status}}") in ("exited", "dead"):
            pytest.fail(f"the api container stopped before /readyz answered 200 (last: {last})\n{stack.logs()}")
        time.sleep(2)
    pytest.fail(f"{stack.base_url}/readyz did not answer 200 within {timeout:.0f} s (last: {last})\n{stack.logs()}")


@pytest.fixture(scope="module")
def ready(stack: Stack) -> Stack:
    exit_code = stack.inspect("prepare", "{{.State.ExitCode}}")
    if stack.inspect("prepare", "{{.State.Status}}") != "exited" or exit_code != "0":
        pytest.fail(f"the prepare job did not complete successfully (exit code {exit_code})\n{stack.logs()}")
    _wait_ready(stack, _timeout("RETINA_DOCKER_READY_TIMEOUT", 300))
    return stack


def test_prepare_built_the_demo_and_skips_it_the_second_time(ready: Stack) -> None:
    logs = ready.run("logs", "--no-color", "prepare").stdout
    assert "demo ready" in logs, logs[-3000:]
    again = ready.run("run", "--rm", "--no-deps", "prepare", timeout=300)
    output = again.stdout + again.stderr
    for stage in ("archive", "splits", "bundle", "index"):  # the shipped model: nothing is trained
        assert re.search(rf"reuse {stage}: ", output), f"{stage} was not reused:\n{output[-3000:]}"


def test_api_is_healthy_and_has_no_torch(ready: Stack) -> None:
    deadline = time.monotonic() + 120
    health = ""
    while time.monotonic() < deadline:
        health = ready.inspect("api", "{{if .State.Health}}{{.State.Health.Status}}{{end}}")
        if health == "healthy":
            break
        time.sleep(2)
    assert health == "healthy", f"api health status {health!r}\n{ready.logs()}"
    probe = subprocess.run(
        ["docker", "exec", ready.container("api"), "python", "-c", "import torch"],
        capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe.stderr


def test_search_text(ready: Stack) -> None:
    payload = json.dumps({"text": "proliferative diabetic retinopathy with new vessels, left eye", "k": 5}).encode()
    status, body = _request(f"{ready.base_url}/search/text", data=payload,
                            headers={"Content-Type": "application/json"})
    assert status == 200, f"HTTP {status}: {body[:1000]!r}\n{ready.logs()}"
    answer = json.loads(body)
    assert isinstance(answer["neighbours"], list) and 1 <= len(answer["neighbours"]) <= 5, body[:1000]
    assert answer["predicted"]["icdr"]["grade"] in range(5), body[:1000]


def test_search_image(ready: Stack) -> None:
    data, content_type = _multipart("file", "retina.jpg", _retina_jpeg(), "image/jpeg")
    status, body = _request(f"{ready.base_url}/search/image", data=data, headers={"Content-Type": content_type})
    assert status == 200, f"HTTP {status}: {body[:1000]!r}\n{ready.logs()}"
    answer = json.loads(body)
    assert isinstance(answer["neighbours"], list) and len(answer["neighbours"]) >= 1, body[:1000]
    assert answer["predicted"]["icdr"]["grade"] in range(5), body[:1000]


def test_grade(ready: Stack) -> None:
    data, content_type = _multipart("file", "retina.jpg", _retina_jpeg(), "image/jpeg")
    status, body = _request(f"{ready.base_url}/grade", data=data, headers={"Content-Type": content_type})
    assert status == 200, f"HTTP {status}: {body[:1000]!r}\n{ready.logs()}"
    answer = json.loads(body)
    assert answer["icdr"]["grade"] in range(5) and answer["modalities"] == ["image"], body[:1000]
