"""The Ray build engine on a real Ray cluster of two nodes on this machine (a head and a second node, each
its own raylet and worker processes; `ray.cluster_utils.Cluster`, not local mode): the same index as the
local engine, photos that fail to decode reported, a worker killed mid-build, a build whose driver died
finished with --resume. The tiny bundle and its archive come from `bundle_factory` (session-shared). The
cluster tests skip where Ray is not installed; the CLI's errors are tested either way."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import tiny_bundle
from rich.console import Console
from typer.testing import CliRunner

from index import build as build_module
from index.archive.brset import read_archive
from index.build import BuildError, BuildOptions, build_index
from index.cli import app
from index.shards import ChunkResult, chunk_paths, load_chunk
from index.store import PARTIAL_DIR, IndexInfo, open_index, read_info

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16  # 64 records -> 4 chunks
BROKEN, MISSING = 5, 40  # a photo that is not a JPEG, a record without a photo file
ACTOR_TITLE = "MapBatches(ChunkEmbedder)"  # in the process title of the pool's actors
runner = CliRunner()


@dataclass
class Setup:
    bundle: Path
    archive: Path
    reference: Path  # the local engine's index of `archive`
    address: str  # the two-node cluster
    n: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A copy of the tiny archive with one undecodable photo and one missing, its local build, and a Ray
    cluster of two nodes with one CPU each (so a pool of two actors needs both)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'retina-align[cluster]'")
    from ray.cluster_utils import Cluster

    tiny = tiny_bundle(tmp_path_factory)
    root = tmp_path_factory.mktemp("ray_engine")
    archive = root / "archive"
    shutil.copytree(tiny.archive, archive)
    records = read_archive(archive).records
    (archive / "fundus_photos" / f"{records[BROKEN].image_id}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (archive / "fundus_photos" / f"{records[MISSING].image_id}.jpg").unlink()
    reference = root / "reference"
    build_index(BuildOptions(bundle=tiny.bundle, archive=archive, out=reference, chunk_size=CHUNK, batch_size=8,
                             progress=False, device="cpu"))
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield Setup(tiny.bundle, archive, reference, cluster.address, len(records))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def ray_options(setup: Setup, out: Path, **changes: object) -> BuildOptions:
    base = dict(bundle=setup.bundle, archive=setup.archive, out=out, chunk_size=CHUNK, batch_size=8, progress=False,
                engine="ray", address=setup.address, workers=2)
    return BuildOptions(**(base | changes))  # type: ignore[arg-type]


def assert_same_index(got: Path, want: Path) -> IndexInfo:
    """Same ids, vectors within 1e-5, same metadata rows (predicted probabilities within 1e-5), same skips."""
    info, reference = read_info(got), read_info(want)
    assert info.counts == reference.counts and info.skipped == reference.skipped
    mine, theirs = open_index(got, None), open_index(want, None)
    ids = np.sort(theirs.image.ids())
    assert np.array_equal(np.sort(mine.image.ids()), ids) and np.array_equal(np.sort(mine.record.ids()), ids)
    for name in ("image", "record"):
        a, b = getattr(mine, name).reconstruct(ids), getattr(theirs, name).reconstruct(ids)
        assert np.abs(a - b).max() <= 1e-5, f"{name} vectors differ by {np.abs(a - b).max()}"
    rows, expected = mine.metadata.get(ids.tolist()), theirs.metadata.get(ids.tolist())
    for identifier in ids.tolist():
        row, other = rows[identifier], expected[identifier]
        predicted = ("predicted_icdr", "predicted_sdrg")
        assert row.labels.model_dump(exclude=set(predicted)) == other.labels.model_dump(exclude=set(predicted))
        assert row.model_dump(exclude={"labels"}) == other.model_dump(exclude={"labels"})
        for field in predicted:
            np.testing.assert_allclose(getattr(row.labels, field), getattr(other.labels, field), atol=1e-5)
    return info


def actor_pids() -> list[int]:
    """The processes of the pool's actors (Ray titles them after the map operator)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and ACTOR_TITLE in title:
            pids.append(int(entry.name))
    return pids


def finished_chunks(out: Path) -> list[Path]:
    return sorted((out / PARTIAL_DIR).glob("chunk-*.json")) if (out / PARTIAL_DIR).is_dir() else []


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def test_two_node_cluster_builds_the_local_index(setup: Setup, tmp_path: Path) -> None:
    """Two actors, one on each node, write the shards; the index equals the local engine's, and the photo
    that fails to decode and the one that is missing are in `skipped` with their image ids."""
    output = io.StringIO()
    info = build_index(ray_options(setup, tmp_path / "index"), console=Console(file=output, width=200))
    assert_same_index(tmp_path / "index", setup.reference)
    log = output.getvalue()
    assert "4 chunks over 2 worker(s) of 1 CPU(s)" in log and "by 2 worker process(es) on 2 node(s)" in log, log
    assert info.counts.indexed == setup.n - 2 and info.counts.skipped == 2
    records = read_archive(setup.archive).records
    skipped = {photo.id: photo for photo in info.skipped}
    assert skipped[BROKEN].image_id == records[BROKEN].image_id and "jpg" in skipped[BROKEN].reason
    assert skipped[MISSING].image_id == records[MISSING].image_id and "no photo file" in skipped[MISSING].reason
    assert set(info.providers.values()) == {"CPUExecutionProvider"} and info.images_per_second > 0
    assert not (tmp_path / "index" / PARTIAL_DIR).exists()


def test_a_pool_the_cluster_cannot_hold_is_refused(setup: Setup, tmp_path: Path) -> None:
    """Three one-CPU actors on a cluster of two CPUs would wait forever: refused, saying what fits."""
    with pytest.raises(BuildError, match="2 CPUs and 0 GPUs: 3 worker.*do not fit"):
        build_index(ray_options(setup, tmp_path / "index", workers=3))


@pytest.mark.slow
def test_a_worker_killed_mid_build_is_replaced(setup: Setup, tmp_path: Path) -> None:
    """SIGKILL one actor's process while chunks remain: Ray restarts it and sends the chunk it was
    embedding, if any, again (max_restarts, max_task_retries); the build finishes with the same index."""
    out = tmp_path / "index"
    killed: list[tuple[int, int]] = []  # (pid, chunks finished when it was killed)

    def kill_one_actor() -> None:
        wait_for(lambda: finished_chunks(out) and actor_pids(), 120, "the first shard")
        pid = actor_pids()[0]
        killed.append((pid, len(finished_chunks(out))))
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    output = io.StringIO()
    build_index(ray_options(setup, out, chunk_size=2, batch_size=2), console=Console(file=output, width=200))
    killer.join(timeout=5)
    assert killed and killed[0][1] < 32, killed  # it died mid-build
    assert not Path(f"/proc/{killed[0][0]}").exists()
    assert "ray: 32 chunks by" in output.getvalue(), output.getvalue()  # every chunk's summary came back
    assert_same_index(out, setup.reference)


@pytest.mark.slow
def test_resume_after_the_driver_died_keeps_the_written_shards(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill the build's driver (`retina-index build --engine ray` in a subprocess) once shards are written;
    its actors die with it. --resume embeds only the chunks without a shard: the shards written before are
    not rewritten (same mtimes), and the index equals the local engine's."""
    out = tmp_path / "index"
    command = [sys.executable, "-m", "index.cli", "build", "--bundle", str(setup.bundle), "--archive",
               str(setup.archive), "--out", str(out), "--chunk-size", "2", "--batch-size", "2", "--engine", "ray",
               "--address", setup.address, "--workers", "2"]
    environment = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(finished_chunks(out)) >= 2 or driver.poll() is not None, 120, "two shards")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    wait_for(lambda: not actor_pids(), 60, "the dead driver's actors to go")
    done = len(finished_chunks(out))
    assert 2 <= done < 32, f"{done} shards: the driver was killed too late; {driver.stderr.read().decode()[-2000:]}"
    before = {path.name: path.stat().st_mtime_ns for path in (out / PARTIAL_DIR).glob("chunk-*")
              if path.with_suffix(".json").is_file()}  # finished shards (an .npz without its marker is redone)

    after: dict[str, int] = {}  # the shards' mtimes when the build assembles them (.partial/ then goes)

    def load_and_stat(partial: Path, chunk: int, covered: list[int]) -> ChunkResult | None:
        for path in chunk_paths(partial, chunk):
            after[path.name] = path.stat().st_mtime_ns
        return load_chunk(partial, chunk, covered)

    monkeypatch.setattr(build_module, "load_chunk", load_and_stat)
    output = io.StringIO()
    build_index(ray_options(setup, out, chunk_size=2, batch_size=2, resume=True),
                console=Console(file=output, width=200))
    assert f"{32 - done} chunks over 2 worker(s)" in output.getvalue(), output.getvalue()
    assert len(after) == 64 and all(after[name] == mtime for name, mtime in before.items())
    assert_same_index(out, setup.reference)


def test_cli_engine_errors(tmp_path: Path) -> None:
    """Ray's options without --engine ray, and --engine ray where Ray is not installed, are refused with
    what to do (runs with or without Ray: the second part blocks it)."""
    base = ["build", "--bundle", str(tmp_path), "--archive", str(tmp_path), "--out", str(tmp_path / "index")]
    result = runner.invoke(app, [*base, "--address", "auto"])
    assert result.exit_code == 2 and "--address only apply to --engine ray" in " ".join(result.output.split())
    result = runner.invoke(app, [*base, "--engine", "ray", "--workers", "2", "--cpu", "--gpus-per-worker", "1"])
    assert result.exit_code == 2 and "contradict" in result.output
    result = runner.invoke(app, [*base, "--engine", "spark"])
    assert result.exit_code == 2 and "local or ray" in result.output

    blocked = (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Block())\n"
        "from index.cli import app\n"
        f"app({[*base, '--engine', 'ray']!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True)
    output = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "install the cluster extra: pip install 'retina-align[cluster]'" in output, output
