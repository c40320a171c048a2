"""The bare model, in process and without HTTP: what the service's overhead and throughput are measured
against (`retina-serve bench --bundle B --index I`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from index.bench.load import QUERIES
from index.embedder import Embedder
from index.store import open_index


@dataclass(frozen=True)
class BareResult:
    """Text search (embed + grade + search) on the bare model."""

    single_p50_ms: float  # one query at a time
    batched_queries_per_s: float  # batches of `batch_size` queries
    batch_size: int


def measure_bare_text_search(
    bundle: Path, index: Path, seconds: float = 10.0, batch_size: int = 16, k: int = 10, device: str = "auto",
    faiss_threads: int = 1, ort_spinning: bool = False, runtime: str = "onnxruntime",
) -> BareResult:
    """Time what one `/search/text` does, with no server: one query at a time (p50 latency) and in
    batches of `batch_size` (queries/s), `seconds` each. FAISS runs with `faiss_threads` OpenMP threads
    and ONNX Runtime spins or not (`ort_spinning`), as the service does by default; `runtime` is the
    service's RETINA_RUNTIME."""
    faiss.omp_set_num_threads(faiss_threads)
    embedder = Embedder(bundle, device=device, spin=ort_spinning, runtime=runtime)  # type: ignore[arg-type]
    store = open_index(index, embedder)

    def run(texts: list[str]) -> None:
        queries = embedder.query_texts(texts)  # what the service runs: one text-tower pass, then the grader
        store.search(np.stack([query.vector for query in queries]), k)

    run([QUERIES[0]])  # warm-up
    single: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        run([QUERIES[i % len(QUERIES)]])
        single.append(time.perf_counter() - started)
        i += 1
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        run([QUERIES[(done + j) % len(QUERIES)] for j in range(batch_size)])
        done += batch_size
    return BareResult(
        single_p50_ms=float(np.percentile(np.array(single) * 1000, 50)),
        batched_queries_per_s=done / (time.perf_counter() - started),
        batch_size=batch_size,
    )
