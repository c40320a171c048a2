"""`retina-index bench-scale`: an index of 10^7 vectors on one machine, built from shards the way the Ray
engine builds one (`index.ivf_build`), then searched.

1. **Shards.** Clustered vectors drawn like real embeddings (`index.bench.search.synthetic_mixture`)
   are written as `--shard-size` shards into `WORK/shards/` (a shard already there is kept: an
   interrupted run resumes).
2. **Build.** `build_from_shards`: IVF trained on a sample, shards added one by one, with `--ondisk` the
   inverted lists merged into one memory-mapped `.ivfdata` file.
3. **Truth.** Held-out queries (drawn from the same mixture, never indexed) are searched exactly by a scan
   over every shard (one matrix product per shard, a running top-k).
4. **Tune and time.** The cheapest nprobe reaching `--target-recall` on `--tune-queries` queries; then
   single-query latency (p50/p99) and recall@10 on the other queries, with that nprobe.

Reports build time per stage, the files' sizes and the process's resident memory (peak, and after the
index is opened and searched).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index.bench.search import synthetic_mixture
from index.ivf_build import ShardedKind, build_from_shards, exact_top_k, list_shards, shard_paths, write_shard
from index.vector_index import VectorIndex, recall_at_k, tune_against_truth

K = 10
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


@dataclass
class ScaleReport:
    """Everything `bench-scale` measured."""

    n: int
    dim: int
    shards: int
    kind: str
    ondisk: bool
    nlist: int
    parameters: dict[str, int | str]
    seconds: dict[str, float]
    bytes_on_disk: dict[str, int]
    rss_mb: dict[str, float]
    nprobe: int
    tune_recall_at_10: float
    recall_at_10: float
    queries: int
    faiss_threads: int
    p50_ms: float
    p99_ms: float
    cpu: str = ""
    notes: list[str] = field(default_factory=list)
    k_factor: int | None = None
    """ivfpqr: the tuned re-ranking depth (candidates re-ranked exactly per result)."""

    def as_dict(self) -> dict[str, object]:
        """The report as JSON-ready data."""
        return asdict(self)


def _rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_synthetic_shards(
    folder: Path, n: int, dim: int, shard_size: int, seed: int, progress: Progress = _no_progress
) -> int:
    """Write `n` clustered vectors (ids 0..n-1) as shards of `shard_size`; existing shards are kept.
    Returns the number of shards."""
    mixture = synthetic_mixture(dim, seed=seed)
    count = (n + shard_size - 1) // shard_size
    for number in range(count):
        start = number * shard_size
        size = min(shard_size, n - start)
        shard = shard_paths(folder, number)
        if shard.ids_path.is_file() and len(shard) == size:
            progress("shards", number + 1, count)
            continue
        rng = np.random.default_rng([seed, number])  # each shard its own stream: a resumed run draws the same
        write_shard(folder, number, np.arange(start, start + size, dtype=np.int64), mixture.sample(size, rng))
        progress("shards", number + 1, count)
    return count


def held_out_queries(dim: int, count: int, seed: int) -> np.ndarray:
    """Queries from the shards' mixture, from a stream no shard uses."""
    return synthetic_mixture(dim, seed=seed).sample(count, np.random.default_rng([seed, 1 << 30]))


def run_scale_bench(
    work: Path,
    n: int,
    dim: int = 256,
    shard_size: int = 1_000_000,
    kind: ShardedKind = "ivf",
    ondisk: bool = True,
    queries: int = 1000,
    tune_queries: int = 200,
    target_recall: float = 0.95,
    threads: int = 1,
    seed: int = 0,
    progress: Progress = _no_progress,
    pq_m: int | None = None,
    nlist: int | None = None,
) -> ScaleReport:
    """Shards, build, truth, tune and time (see the module docstring)."""
    work = Path(work)
    shards_dir = work / "shards"
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    count = write_synthetic_shards(shards_dir, n, dim, shard_size, seed, progress)
    seconds["shards"] = time.perf_counter() - started

    index_path = work / f"{kind}{pq_m or ''}{'-ondisk' if ondisk else ''}.faiss"
    built = build_from_shards(list_shards(shards_dir)[:count], kind, index_path, ondisk=ondisk, seed=seed,
                              pq_m=pq_m, nlist=nlist, progress=progress)
    seconds.update({f"build_{stage}": value for stage, value in built.seconds.items()})
    peak_build = _peak_rss_mb()

    everything = held_out_queries(dim, tune_queries + queries, seed)
    started = time.perf_counter()
    truth = exact_top_k(list_shards(shards_dir), everything, K, progress)
    seconds["exact_truth"] = time.perf_counter() - started

    rss_before = _rss_mb()
    started = time.perf_counter()
    index = VectorIndex.load(index_path, device="cpu")
    seconds["open"] = time.perf_counter() - started
    rss_open = _rss_mb()
    faiss.omp_set_num_threads(threads)
    params, tune_recall = tune_against_truth(index, everything[:tune_queries], truth[:tune_queries], target_recall, K)
    nprobe = int(params.nprobe or 0)
    timed = everything[tune_queries:]
    latencies = []
    found = []
    for row in range(len(timed)):
        start = time.perf_counter()
        found.append(index.search(timed[row : row + 1], K, params)[1][0])
        latencies.append((time.perf_counter() - start) * 1000)
        if row % 100 == 99:
            progress("timed queries", row + 1, len(timed))
    recall = recall_at_k(np.stack(found), truth[tune_queries:])
    sizes = {index_path.name: index_path.stat().st_size}
    if built.ivfdata_path is not None:
        sizes[built.ivfdata_path.name] = built.ivfdata_path.stat().st_size
    sizes["shards"] = sum(p.stat().st_size for p in shards_dir.glob("shard-*.npy"))
    return ScaleReport(
        n=n,
        dim=dim,
        shards=count,
        kind=kind,
        ondisk=ondisk,
        nlist=built.nlist,
        parameters=index.describe(),
        seconds={name: round(value, 1) for name, value in seconds.items()},
        bytes_on_disk=sizes,
        rss_mb={
            "peak_during_build": round(peak_build, 1),
            "before_open": round(rss_before, 1),
            "after_open": round(rss_open, 1),
            "after_queries": round(_rss_mb(), 1),
            "index_after_queries": round(_rss_mb() - rss_before, 1),
        },
        nprobe=nprobe,
        k_factor=params.k_factor,
        tune_recall_at_10=round(tune_recall, 4),
        recall_at_10=round(recall, 4),
        queries=len(timed),
        faiss_threads=threads,
        p50_ms=round(float(np.percentile(latencies, 50)), 3),
        p99_ms=round(float(np.percentile(latencies, 99)), 3),
    )
