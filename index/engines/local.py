"""The local build engine: this process embeds the chunks one after another with one `Embedder`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from index.engines import ChunkSummary, ChunkTodo, EngineReport, Reporter
from index.shards import embed_chunk, save_chunk

if TYPE_CHECKING:
    from index.embedder import Embedder


def embed_chunks(
    embedder: Embedder, todo: Sequence[ChunkTodo], partial: Path, batch_size: int, reporter: Reporter
) -> EngineReport:
    """Embed each chunk of `todo` and write its shard to `partial`, in order."""
    report = EngineReport(providers=dict(embedder.providers), runtimes=dict(embedder.runtimes))
    reporter.start()
    for chunk in todo:
        started = time.perf_counter()
        result = embed_chunk(embedder, chunk.items, batch_size, reporter.photos)
        seconds = time.perf_counter() - started
        save_chunk(partial, chunk.number, result, seconds, [item.id for item in chunk.items])
        report.photos += len(chunk.items)
        report.seconds += seconds
        reporter.chunk(ChunkSummary(chunk.number, len(chunk.items), len(result.ids), len(result.skipped), seconds))
    return report
