"""`docker compose up` for real: build both images, run the one-shot `prepare` job (a small demo) into a fresh
volume, wait for the API's /readyz, call the three POST routes; then the same project with replicas
(compose.scale.yaml: two `api` replicas behind HAProxy) and a replica restarted under load; tear everything
down (volumes too).

Opt-in: RETINA_DOCKER_TEST=1 (`.ci/run` sets it when ../shared/tools/docker-local.sh is there). Needs a
Docker engine and `docker-compose` (v1.29+) or the `docker compose` plugin. Containers are reached only
through a port published on 127.0.0.1. Timeouts (seconds) from the environment: RETINA_DOCKER_BUILD_TIMEOUT
(default 3600: the first build of the training image downloads CUDA torch), RETINA_DOCKER_UP_TIMEOUT
(default 1200: the `prepare` job), RETINA_DOCKER_READY_TIMEOUT (default 300).
"""

from __future__ import annotations

import http.client
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
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a plain `docker compose up` reads (compose.override.yaml publishes the API's port), and the replicas.
BASE_FILES = ("compose.yaml", "compose.override.yaml")
SCALE_FILES = ("compose.yaml", "compose.scale.yaml")
REPLICA_HEADER = "X-Retina-Replica"  # set by the load balancer (docker/haproxy.cfg): server slot and address

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
    files: tuple[str, ...] = field(default=BASE_FILES)

    def _command(self, *args: str) -> list[str]:
        files = [part for name in self.files for part in ("-f", str(ROOT / name))]
        return [*self.compose, "-p", self.project, *files, *args]

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = self._command(*args)
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
        command = self._command("logs", "--no-color", "--tail", str(lines))
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


# --- replicas behind the load balancer (compose.scale.yaml) -------------------------------------------------

REPLICAS = 2
LOAD_CLIENTS = 8
LOAD_SECONDS = 15.0
RESTART_AFTER_S = 3.0
QUERIES = (
    "moderate non-proliferative diabetic retinopathy with hard exudates near the macula",
    "proliferative diabetic retinopathy with new vessels at the disc, left eye",
    "no diabetic retinopathy, normal fundus of a 45-year-old woman",
)


def _port(stack: Stack) -> int:
    return int(stack.base_url.rsplit(":", 1)[1])


def _replica_of(stack: Stack, path: str = "/readyz") -> tuple[int, str | None]:
    """GET `path` through the load balancer on a new connection: the status and the replica that answered."""
    connection = http.client.HTTPConnection("127.0.0.1", _port(stack), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader(REPLICA_HEADER)
    finally:
        connection.close()


def _wait_replicas_ready(stack: Stack, timeout: float) -> set[str]:
    """Wait until /readyz, asked through the load balancer, has been answered 200 by REPLICAS distinct replicas."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            status, replica = _replica_of(stack)
            last = f"HTTP {status} from {replica}"
            if status == 200 and replica:
                seen.add(replica)
                if len(seen) >= REPLICAS:
                    return seen
        except (OSError, http.client.HTTPException) as error:
            last = f"{type(error).__name__}: {error}"
        time.sleep(0.25)
    pytest.fail(f"/readyz through the load balancer was answered by {sorted(seen)} only within {timeout:.0f} s "
                f"(want {REPLICAS} replicas; last: {last})\n{stack.logs()}")


def _search_client(port: int, until: float, offset: int) -> tuple[int, Counter[str], Counter[str]]:
    """POST /search/text on one keep-alive connection until `until`: (answers, errors by kind, answers per replica)."""
    ok, errors, replicas = 0, Counter[str](), Counter[str]()
    connection: http.client.HTTPConnection | None = None
    i = offset
    while time.monotonic() < until:
        body = json.dumps({"text": QUERIES[i % len(QUERIES)], "k": 5}).encode()
        i += 1
        try:
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("POST", "/search/text", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            if response.status == 200 and json.loads(answer)["neighbours"]:
                ok += 1
                replicas[response.getheader(REPLICA_HEADER) or "?"] += 1
            else:
                errors[f"HTTP {response.status}"] += 1
        except (OSError, http.client.HTTPException, ValueError) as error:
            errors[type(error).__name__] += 1
            if connection is not None:
                connection.close()
            connection = None
    if connection is not None:
        connection.close()
    return ok, errors, replicas


@pytest.fixture(scope="module")
def replicas(ready: Stack) -> Stack:
    """The same project (images, volume, demo) brought up with compose.scale.yaml and `--scale api=2`: the
    replicas replace the single `api` container and HAProxy takes over the published port."""
    ready.files = SCALE_FILES
    ready.run("build", "lb", timeout=_timeout("RETINA_DOCKER_BUILD_TIMEOUT", 3600))
    # The README's `up --scale api=2` would also start `prepare` again, which only finds every stage built
    # (tested above): --no-deps with the two services saves that half minute.
    ready.run("up", "-d", "--no-deps", "--scale", f"api={REPLICAS}", "api", "lb",
              timeout=_timeout("RETINA_DOCKER_UP_TIMEOUT", 1200))
    _wait_replicas_ready(ready, _timeout("RETINA_DOCKER_READY_TIMEOUT", 300))
    return ready


def test_replicas_behind_the_load_balancer_survive_a_restart(replicas: Stack) -> None:
    """Two replicas both get traffic through HAProxy; one restarted under load costs the clients nothing
    (the service drains on SIGTERM, HAProxy's health checks take it out and back in, and requests that
    failed on it are sent again to the other replica)."""
    api = replicas.run("ps", "-q", "api").stdout.split()
    assert len(api) == REPLICAS, f"want {REPLICAS} api containers, got {api}\n{replicas.logs()}"
    assert replicas.run("ps", "-q", "lb").stdout.strip(), f"no load balancer container\n{replicas.logs()}"

    until = time.monotonic() + LOAD_SECONDS
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        clients = [pool.submit(_search_client, _port(replicas), until, n) for n in range(LOAD_CLIENTS)]
        time.sleep(RESTART_AFTER_S)
        restart = subprocess.run(["docker", "restart", "-t", "10", api[0]], capture_output=True, text=True,
                                 timeout=120)
        results = [client.result() for client in clients]
    assert restart.returncode == 0, f"docker restart failed: {restart.stderr}"
    ok = sum(result[0] for result in results)
    errors = sum((result[1] for result in results), Counter[str]())
    served = sum((result[2] for result in results), Counter[str]())
    summary = f"{ok} answers, errors {dict(errors)}, per replica {dict(served)}"
    print(f"\nreplica restart under load ({LOAD_CLIENTS} clients, {LOAD_SECONDS:g} s): {summary}")
    assert not errors, f"{summary}\n{replicas.logs()}"
    assert ok >= 100, summary
    assert len(served) >= REPLICAS, f"not every replica got traffic: {summary}"
    # The restarted replica is back in rotation.
    _wait_replicas_ready(replicas, 120)
