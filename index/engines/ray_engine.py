"""The Ray build engine: Ray Data over a Ray cluster (the `cluster` extra; the only module that imports ray).

The chunks still to do become a Ray Dataset with one row (and one block) per chunk: its number, its ids, and
its records' labels and photo paths (JSON). `map_batches` sends each chunk to an actor of a fixed pool
(`ChunkEmbedder`): each actor holds one `Embedder`, built once in its `__init__`, whose ONNX Runtime sessions
run as many threads as the CPUs the actor reserves (and on CUDA when it reserves a GPU and onnxruntime-gpu is
installed there). The actor embeds the chunk with `index.shards.embed_chunk`, writes its shard with
`save_chunk` (the local engine's format, atomically) and returns a small summary; the driver only streams
the summaries, so no vector crosses the cluster twice. `index.build` then assembles the index from the shards.

Every node must see the bundle, the archive's photographs and the output folder at the same paths (a shared
file system), and have this project installed with the same version (`pip install 'retina-align[cluster]'`).

Faults: an actor whose process dies is restarted (at most `MAX_RESTARTS` times) and the chunk it was
embedding retried (`MAX_TASK_RETRIES`); the retry rewrites the shard whole. If the build fails anyway,
`retina-index build --resume` embeds only the chunks without a finished shard.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import ray.data
from rich.console import Console

from index.engines import ChunkSummary, ChunkTodo, EngineError, EngineReport, Reporter
from index.records import FundusRecord
from index.shards import ArchiveItem, embed_chunk, save_chunk

MAX_RESTARTS = 3
"""How often Ray restarts an actor whose process died (each restart builds a new Embedder)."""
MAX_TASK_RETRIES = 3
"""How often a chunk whose actor died is sent again; a chunk that kills every worker fails the build."""
ACTORS_START_S = 600
"""How long the pool may take to start all its actors (an autoscaler adding nodes) before the build fails."""


@dataclass(frozen=True)
class RaySettings:
    """How to run the Ray engine."""

    bundle: Path
    fingerprint: str
    """The bundle's, as the build's plan has it: every actor checks that its copy is the same."""
    batch_size: int
    device: Literal["auto", "cpu"]
    runtime: str
    address: str | None
    """Anything `ray.init` accepts ("auto", "HOST:6379", "ray://HOST:10001"); None starts a local Ray."""
    workers: int | None
    """Actors in the pool; None: as many as the cluster's CPUs (GPUs with gpus_per_worker) allow."""
    cpus_per_worker: int
    gpus_per_worker: float


class ChunkEmbedder:
    """One actor of the pool: one Embedder, and the chunks sent to it embedded into their shards."""

    def __init__(self, bundle: str, fingerprint: str, partial: str, batch_size: int, device: str, runtime: str,
                 threads: int) -> None:
        """Open the bundle (`threads` intra-op threads per graph: the CPUs this actor reserves)."""
        from index.embedder import Embedder  # onnxruntime: in the actor's process

        self.embedder = Embedder(Path(bundle), device=device, threads=threads,  # type: ignore[arg-type]
                                 runtime=runtime, performance="throughput")  # type: ignore[arg-type]
        if self.embedder.fingerprint != fingerprint:
            raise RuntimeError(
                f"the bundle at {bundle} on this node is {self.embedder.fingerprint}, the build's is {fingerprint}: "
                "every node must see the same bundle at the same path"
            )
        self.partial = Path(partial)
        self.batch_size = batch_size
        self.worker = f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"
        self.graphs = json.dumps({"providers": self.embedder.providers, "runtimes": self.embedder.runtimes})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        """Embed each chunk of the batch and write its shard; one summary row per chunk."""
        rows: dict[str, list[Any]] = {name: [] for name in ("chunk", "covered", "embedded", "skipped", "seconds",
                                                            "worker", "graphs")}
        for number, ids, records in zip(batch["chunk"], batch["ids"], batch["records"], strict=True):
            covered = [int(identifier) for identifier in ids]
            items = [
                ArchiveItem(identifier, FundusRecord.model_validate(entry["record"]),
                            Path(entry["photo"]) if entry["photo"] is not None else None)
                for identifier, entry in zip(covered, json.loads(records), strict=True)
            ]
            started = time.perf_counter()
            result = embed_chunk(self.embedder, items, self.batch_size)
            seconds = time.perf_counter() - started
            save_chunk(self.partial, int(number), result, seconds, covered)
            for name, value in (("chunk", int(number)), ("covered", len(covered)), ("embedded", len(result.ids)),
                                ("skipped", len(result.skipped)), ("seconds", seconds), ("worker", self.worker),
                                ("graphs", self.graphs)):
                rows[name].append(value)
        return rows


def _row(chunk: ChunkTodo) -> dict[str, Any]:
    """A chunk as a dataset row: number, ids, and each record's labels and absolute photo path as JSON."""
    records = [{"record": item.record.model_dump(mode="json"),
                "photo": str(item.photo.absolute()) if item.photo is not None else None} for item in chunk.items]
    return {"chunk": chunk.number, "ids": [item.id for item in chunk.items], "records": json.dumps(records)}


def _connect(address: str | None) -> bool:
    """Connect to the Ray cluster at `address` (None: start a local one); True when this call did it (and the
    engine must shut it down), False when this process was already connected."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise EngineError(f"cannot connect to the Ray cluster at {address}: {error}") from None
    return True


def _pool_size(settings: RaySettings, chunks: int) -> int:
    """The actor pool's size: the one asked for, or as many as the cluster's resources allow; never more
    than there are chunks. Refuses a pool the cluster cannot hold (it would wait forever)."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if settings.gpus_per_worker > 0:
        fits = int(gpus // settings.gpus_per_worker + 1e-9)
        fits = min(fits, int(cpus // settings.cpus_per_worker + 1e-9))
    else:
        fits = int(cpus // settings.cpus_per_worker + 1e-9)
    if fits < 1 or (settings.workers is not None and settings.workers > fits):
        wanted = settings.workers or 1
        raise EngineError(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: {wanted} worker(s) of {settings.cpus_per_worker} "
            f"CPU(s) and {settings.gpus_per_worker:g} GPU(s) do not fit; lower --workers, --cpus-per-worker or "
            "--gpus-per-worker, or add nodes (ray start --address HEAD:6379)"
        )
    return max(1, min(settings.workers or fits, chunks))


def _merge(report: EngineReport, graphs: str) -> None:
    """Add one worker's providers and runtimes per graph (distinct ones joined: a mixed cluster shows all)."""
    described = json.loads(graphs)
    for name, target in (("providers", report.providers), ("runtimes", report.runtimes)):
        for graph, value in described[name].items():
            seen = target.get(graph, "")
            if value not in seen.split(" | "):
                target[graph] = f"{seen} | {value}" if seen else value


def embed_chunks(todo: Sequence[ChunkTodo], partial: Path, settings: RaySettings, reporter: Reporter,
                 console: Console) -> EngineReport:
    """Embed every chunk of `todo` on the Ray cluster into its shard in `partial` (which every node must
    see); report each chunk as its shard is written."""
    report = EngineReport()
    if not todo:
        return report
    owned = _connect(settings.address)
    try:
        workers = _pool_size(settings, len(todo))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the build's own progress bar reports chunks and images/s
        # Start every actor before the first chunk is sent: else the first one up takes the early chunks (a
        # pool that cannot start fails after ACTORS_START_S instead of waiting forever).
        context.wait_for_min_actors_s = ACTORS_START_S
        dataset = ray.data.from_items([_row(chunk) for chunk in todo], override_num_blocks=len(todo))
        constructor = dict(bundle=str(Path(settings.bundle).absolute()), fingerprint=settings.fingerprint,
                           partial=str(Path(partial).absolute()), batch_size=settings.batch_size,
                           device="cpu" if settings.device == "cpu" or settings.gpus_per_worker == 0 else "auto",
                           runtime=settings.runtime, threads=settings.cpus_per_worker)
        with warnings.catch_warnings():
            # Ray 2.60 deprecates the actor's remote args in map_batches; they are the only way to bound retries.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            summaries = dataset.map_batches(
                ChunkEmbedder,
                batch_size=1,  # one chunk per call
                # one chunk at a time per actor: a chunk is seconds of work, and a queue behind a busy actor
                # would leave another idle at the end
                compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
                fn_constructor_kwargs=constructor,
                num_cpus=settings.cpus_per_worker,
                num_gpus=settings.gpus_per_worker or None,
                max_restarts=MAX_RESTARTS,
                max_task_retries=MAX_TASK_RETRIES,
            )
        console.print(f"ray: {len(todo)} chunks over {workers} worker(s) of {settings.cpus_per_worker} CPU(s)"
                      + (f" and {settings.gpus_per_worker:g} GPU(s)" if settings.gpus_per_worker else "")
                      + f" on a cluster of {ray.cluster_resources().get('CPU', 0):g} CPUs", highlight=False,
                      soft_wrap=True)
        reporter.start()
        started = time.perf_counter()
        first: float | None = None
        nodes: Counter[str] = Counter()
        processes: set[str] = set()
        busy = 0.0  # the actors' own seconds on their chunks
        for row in summaries.iter_rows():
            summary = ChunkSummary(int(row["chunk"]), int(row["covered"]), int(row["embedded"]), int(row["skipped"]),
                                   float(row["seconds"]), str(row["worker"]))
            first = first if first is not None else time.perf_counter() - started
            nodes[summary.worker.split(":")[0]] += 1
            processes.add(summary.worker)
            busy += summary.seconds
            _merge(report, str(row["graphs"]))
            report.photos += summary.covered
            reporter.photos(summary.covered)
            reporter.chunk(summary)
        report.seconds = time.perf_counter() - started
        spread = ", ".join(f"node {node[:8]}: {count}" for node, count in sorted(nodes.items()))
        console.print(f"ray: {sum(nodes.values())} chunks by {len(processes)} worker process(es) on {len(nodes)} "
                      f"node(s) ({spread}) in {report.seconds:.1f} s, the first after {first or 0:.1f} s "
                      f"(the pool's start-up + one chunk); {report.photos / max(busy, 1e-9):.1f} images/s per worker "
                      "in its own time", highlight=False, soft_wrap=True)
    finally:
        if owned:
            ray.shutdown()
    return report
