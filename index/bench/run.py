"""`retina-index bench`: embedding throughput per engine and search latency/recall on one machine, in one run.

Sections (each a table; `--json` saves every number):

1. Machine: CPU, threads, measured matmul GFLOP/s in fp32 (numpy), bf16 (torch, in the PyTorch
   subprocess; n/a without torch) and int8 (ONNX Runtime's MatMulInteger).
2. Embedding (`index.bench.embed`): `tiny` and `paper` at random init, image and text (128 tokens) towers,
   per engine: items/s, min cosine to PyTorch fp32, GFLOP per item, roofline items/s, target.
3. Search (`index.bench.search`): 10^4, 10^5, 10^6 vectors of width 256 drawn like real embeddings,
   flat, the `auto` choice and the approximate kinds: single-query p50/p99 and recall@10 against exact.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from index.bench.embed import (
    MIN_COSINE,
    TARGETS,
    EmbedRow,
    bench_model,
    cpu_model,
    cpu_threads,
    embed_rows,
    int8_matmul_gflops,
    numpy_matmul_gflops,
    torch_available,
)
from index.bench.search import (
    DEFAULT_DIM,
    DEFAULT_SIZES,
    TARGET_N,
    TARGET_P99_MS,
    TARGET_RECALL,
    ClusteredMixture,
    SearchResult,
    bench_size,
    fit_mixture,
    synthetic_mixture,
)

DEFAULT_MODELS: tuple[str, ...] = ("tiny", "paper")
DEFAULT_KINDS: tuple[str, ...] = ("flat", "auto", "ivf", "hnsw")


@dataclass
class BenchOptions:
    """What `retina-index bench` measures."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    batch_size: int = 16
    seconds: float = 5.0
    queries: int = 300
    search_threads: list[int] = field(default_factory=list)
    """OpenMP thread counts for the search timings; empty: FAISS's default, then 1."""
    dim: int = DEFAULT_DIM
    index: Path | None = None
    skip_embed: bool = False
    skip_search: bool = False
    seed: int = 0


def parse_sizes(text: str) -> list[int]:
    """"1e4,1e5,1e6" or "10000,2000" -> [10000, 100000, 1000000]."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        value = float(part)
        if value < 1 or value != int(value):
            raise ValueError(f"a size must be a positive whole number, not {part!r}")
        sizes.append(int(value))
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def parse_threads(text: str) -> list[int]:
    """"2,1" -> [2, 1]; "" -> [] (the default thread counts)."""
    counts = [int(part) for part in parse_list(text)]
    if any(count < 1 for count in counts):
        raise ValueError(f"thread counts must be >= 1, not {text!r}")
    return counts


def parse_list(text: str) -> list[str]:
    """"a, b,c" -> ["a", "b", "c"]."""
    return [p.strip() for p in text.split(",") if p.strip()]


# --- machine -------------------------------------------------------------------------------------


def measure_machine(seconds: float = 1.0) -> dict[str, object]:
    """CPU, threads, and the matmul GFLOP/s that need no torch (fp32 numpy, int8 ONNX Runtime)."""
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "threads": cpu_threads(),
        "load_average_start": _load_average(),
        "matmul_gflops": {
            "fp32": numpy_matmul_gflops(seconds=seconds),
            "bf16": None,
            "int8": int8_matmul_gflops(seconds=seconds),
        },
    }


def _load_average() -> float | None:
    """The 1-minute load average: above the core count, other processes were competing for the CPU."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def machine_table(machine: dict) -> Table:
    """The machine section."""
    table = Table(title="Machine", show_header=False)
    peaks = machine["matmul_gflops"]
    table.add_row("CPU", str(machine["cpu"]))
    torch_threads = machine.get("torch_threads", "n/a")
    table.add_row("threads used", f"{machine['threads']} (ONNX Runtime, FAISS, BLAS; torch: {torch_threads})")
    loads = [machine.get("load_average_start"), machine.get("load_average_end")]
    if any(load is not None for load in loads):
        table.add_row("load average (1 min)", " -> ".join("n/a" if x is None else f"{x:.1f}" for x in loads)
                      + f" on {os.cpu_count()} CPUs (higher: other processes shared the CPU)")
    table.add_row("matmul fp32", _gflops(peaks["fp32"], "numpy, 2048^2"))
    if machine.get("torch_matmul_gflops_fp32"):
        table.add_row("matmul fp32 (torch)", _gflops(machine["torch_matmul_gflops_fp32"], "torch, 2048^2"))
    table.add_row("matmul bf16", _gflops(peaks["bf16"], "torch, 2048^2" if peaks["bf16"] else "needs torch"))
    table.add_row("matmul int8", _gflops(peaks["int8"], "ONNX Runtime MatMulInteger u8 x s8, 2048^2"))
    return table


def _gflops(value: float | None, how: str) -> str:
    return f"n/a ({how})" if value is None else f"{value:,.0f} GFLOP/s ({how})"


# --- embedding -----------------------------------------------------------------------------------


def run_embed(options: BenchOptions, machine: dict, console: Console) -> list[EmbedRow]:
    """Every model's embedding benchmark (needs torch for the models and their ONNX export)."""
    if not torch_available():
        console.print("[yellow]torch is not installed: the embedding rows (PyTorch eager, and the ONNX graphs "
                      "it exports for ONNX Runtime and OpenVINO) are skipped[/yellow]")
        return []
    benches = []
    with tempfile.TemporaryDirectory(prefix="retina-bench-") as folder, console.status("embedding") as status:
        for model in options.models:
            started = time.perf_counter()

            def progress(what: str, started: float = started) -> None:
                status.update(f"{what} ({time.perf_counter() - started:.0f} s)")

            bench = bench_model(model, Path(folder), options.batch_size, options.seconds, progress)
            benches.append(bench)
            console.print(f"{model}: measured in {time.perf_counter() - started:.0f} s")
            machine["matmul_gflops"]["bf16"] = bench.report["matmul_gflops"]["bf16"]
            machine["torch_matmul_gflops_fp32"] = bench.report["matmul_gflops"]["fp32"]
            machine["torch_threads"] = bench.report["torch_threads"]
            machine["torch"] = bench.report["torch"]
    gc.collect()  # release the inference sessions and their thread pools before anything else is timed
    rows: list[EmbedRow] = []
    for bench in benches:
        rows += embed_rows(bench, machine["matmul_gflops"])
    return rows


def embed_table(rows: list[EmbedRow], batch_size: int) -> Table:
    """The embedding section."""
    targets = "; ".join(f"{m} {t} >= {v:g}/s" for (m, t), v in TARGETS.items())
    table = Table(title=f"Embedding throughput (batch {batch_size}, random init; targets: {targets} "
                        f"at cosine >= {MIN_COSINE})")
    for column in ("model", "tower", "engine", "prec", "items/s", "min cos", "GFLOP/item", "roofline/s",
                   "target", "note"):
        table.add_column(column, justify="right" if column in ("items/s", "min cos", "GFLOP/item", "roofline/s")
                         else "left", overflow="fold")
    for row in rows:
        table.add_row(
            row.model, row.tower, row.engine, row.precision,
            "-" if row.items_per_second is None else f"{row.items_per_second:.1f}",
            "-" if row.min_cosine is None else f"{row.min_cosine:.5f}",
            f"{row.gflop_per_item:.2f}",
            "-" if row.roofline_items_per_second is None else f"{row.roofline_items_per_second:.1f}",
            _mark(row.target), row.note,
        )
    return table


def _mark(status: str) -> str:
    return {"met": "[green]met[/green]", "not met": "[red]not met[/red]"}.get(status, status)


# --- search --------------------------------------------------------------------------------------


def load_mixture(options: BenchOptions, console: Console) -> ClusteredMixture:
    """The synthetic mixture, or one fitted to `options.index`'s image vectors (lifted to `options.dim`
    when they are narrower)."""
    if options.index is None:
        return synthetic_mixture(options.dim, seed=options.seed)
    from index.store import read_info
    from index.vector_index import VectorIndex

    info = read_info(options.index)
    if info.files.image is None:
        raise ValueError(f"--index {options.index}: its vectors are in Milvus; give a FAISS-backed index")
    vectors_index = VectorIndex.load(options.index / info.files.image, device="cpu")
    vectors = vectors_index.reconstruct(vectors_index.ids())
    mixture = fit_mixture(vectors, seed=options.seed)
    console.print(f"search vectors: {mixture.source} of {options.index}")
    if mixture.dim < options.dim:
        mixture = mixture.lifted(options.dim, seed=options.seed)
    elif mixture.dim > options.dim:
        console.print(f"the index's vectors are {mixture.dim} wide: searching at that width, not {options.dim}")
    return mixture


def run_search(options: BenchOptions, console: Console) -> tuple[ClusteredMixture, list[SearchResult]]:
    """The search benchmark at every size, with a progress bar."""
    mixture = load_mixture(options, console)
    results: list[SearchResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("search", total=None)
        for n in options.sizes:
            def progress(what: str, done: int, total: int, n: int = n) -> None:
                bar.update(task, description=f"n={n:,}: {what}", completed=done, total=total)

            started = time.perf_counter()
            results += bench_size(n, mixture, options.kinds, options.queries, options.seconds, options.seed, progress,
                                  options.search_threads)
            console.print(f"search n={n:,}: measured in {time.perf_counter() - started:.0f} s")
    return mixture, results


def search_table(results: list[SearchResult], mixture: ClusteredMixture) -> Table:
    """The search section."""
    table = Table(title=f"Search, one query per call, k=10 ({mixture.source}; width {mixture.dim}; "
                        f"target at {TARGET_N:,}: p99 <= {TARGET_P99_MS:g} ms at recall@10 >= {TARGET_RECALL})")
    for column in ("n", "index", "threads", "params", "queries", "p50 ms", "p99 ms", "recall@10", "build s",
                   "target", "note"):
        table.add_column(column, justify="left" if column in ("index", "params", "target", "note") else "right",
                         overflow="fold")
    for result in results:
        target = ("met" if result.meets_target() else "not met") if result.n == TARGET_N else "-"
        params = ", ".join(f"{k} {v}" for k, v in result.params.items()) or "-"
        table.add_row(
            f"{result.n:,}", result.label, str(result.threads), params, str(result.queries), f"{result.p50_ms:.3f}",
            f"{result.p99_ms:.3f}", f"{result.recall_at_10:.3f}", f"{result.build_seconds:.1f}", _mark(target),
            "; ".join(result.notes),
        )
    return table


# --- everything ----------------------------------------------------------------------------------


def run_bench(options: BenchOptions, console: Console, out: Console | None = None) -> dict[str, object]:
    """Run the benchmark, print its tables on `out` (default: `console`) and return every number.

    The tables are printed at the end, together, each section's progress before them."""
    out = out or console
    started = time.perf_counter()
    machine = measure_machine(seconds=min(2.0, max(options.seconds, 0.1)))
    report: dict[str, object] = {"machine": machine, "options": _options_json(options)}
    tables: list[Table] = []
    if not options.skip_embed:
        rows = run_embed(options, machine, console)
        if rows:
            tables.append(embed_table(rows, options.batch_size))
            report["embedding"] = [row.to_json() for row in rows]
            report["embedding_targets"] = _embed_verdicts(rows)
    if not options.skip_search:
        mixture, results = run_search(options, console)
        tables.append(search_table(results, mixture))
        report["search"] = {"mixture": mixture.describe(), "results": [r.to_json() for r in results]}
        report["search_target"] = _search_verdict(results)
    machine["load_average_end"] = _load_average()
    for table in [machine_table(machine), *tables]:
        out.print(table)
    for line in _verdict_lines(report):
        out.print(line)
    report["seconds"] = time.perf_counter() - started
    return report


def _embed_verdicts(rows: list[EmbedRow]) -> dict[str, dict[str, object]]:
    """Per targeted (model, tower): whether any engine met it, and the best engine at cosine >= MIN_COSINE."""
    verdicts: dict[str, dict[str, object]] = {}
    for (model, tower), target in TARGETS.items():
        candidates = [r for r in rows if r.model == model and r.tower == tower and r.items_per_second is not None]
        if not candidates:
            continue
        accurate = [r for r in candidates if (r.min_cosine or 0) >= MIN_COSINE]
        best = max(accurate, key=lambda r: r.items_per_second or 0.0) if accurate else None
        verdicts[f"{model} {tower}"] = {
            "target_items_per_second": target,
            "met": any(r.target == "met" for r in candidates),
            "best_engine": best.engine if best else None,
            "best_items_per_second": best.items_per_second if best else None,
            "best_min_cosine": best.min_cosine if best else None,
        }
    return verdicts


def _search_verdict(results: list[SearchResult]) -> dict[str, object]:
    at_target = [r for r in results if r.n == TARGET_N]
    return {
        "n": TARGET_N,
        "measured": bool(at_target),
        "met_by": [f"{r.label} ({r.threads} thread{'s' if r.threads > 1 else ''})" for r in at_target
                   if r.meets_target()],
        "auto_meets": any(r.meets_target() for r in at_target if r.label.startswith("auto")),
    }


def _verdict_lines(report: dict) -> list[str]:
    lines = []
    for name, verdict in report.get("embedding_targets", {}).items():
        state = "[green]met[/green]" if verdict["met"] else "[red]not met[/red]"
        best = (f"best at cosine >= {MIN_COSINE}: {verdict['best_engine']} {verdict['best_items_per_second']:.1f}/s"
                if verdict["best_engine"] else f"no engine reached cosine {MIN_COSINE}")
        lines.append(f"target {name} >= {verdict['target_items_per_second']:g}/s: {state} ({best})")
    search = report.get("search_target")
    if search and search["measured"]:
        state = "[green]met[/green]" if search["met_by"] else "[red]not met[/red]"
        by = ", ".join(search["met_by"]) or "no index kind"
        auto = "meets it" if search["auto_meets"] else "does not"
        lines.append(f"target search {TARGET_N:,}: p99 <= {TARGET_P99_MS:g} ms at recall@10 >= {TARGET_RECALL}: "
                     f"{state} (by {by}; the auto choice {auto})")
    return lines


def _options_json(options: BenchOptions) -> dict[str, object]:
    return {
        "models": options.models, "sizes": options.sizes, "kinds": options.kinds, "batch_size": options.batch_size,
        "seconds": options.seconds, "queries": options.queries, "search_threads": options.search_threads,
        "dim": options.dim,
        "index": str(options.index) if options.index else None, "skip_embed": options.skip_embed,
        "skip_search": options.skip_search, "seed": options.seed,
    }


def write_json(report: dict[str, object], path: Path) -> None:
    """Save the report (numpy numbers as plain JSON numbers)."""
    Path(path).write_text(json.dumps(report, indent=1, default=_plain) + "\n")


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
