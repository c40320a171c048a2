"""Build engines: embed the chunks of an index build still to do, each into its shard in `INDEX/.partial/`.

`index.build` plans the chunks, prepares the output folder, hands the unfinished chunks to an engine and,
once every shard is on disk, assembles the index from them. Two engines write the same shards
(`index.shards`), so they give the same index:

- `local` (`index.engines.local`): this process, chunk after chunk, with one `Embedder`.
- `ray` (`index.engines.ray_engine`, the `cluster` extra): Ray Data over a Ray cluster, an actor pool with
  one `Embedder` per actor, each actor writing the shards it embeds. Only that module imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from index.shards import ArchiveItem


class EngineError(Exception):
    """An engine that cannot run (no cluster at that address, a pool the cluster cannot hold); the message
    says why and what to do."""


@dataclass(frozen=True)
class ChunkTodo:
    """A chunk still to embed: its number (its shard's name) and its records."""

    number: int
    items: list[ArchiveItem]


@dataclass(frozen=True)
class ChunkSummary:
    """A chunk whose shard is written: how many records it covered, embedded and skipped, the seconds its
    worker spent on it, and where it ran."""

    chunk: int
    covered: int
    embedded: int
    skipped: int
    seconds: float
    worker: str = "local"


@dataclass
class EngineReport:
    """What an engine did in this run: photographs processed (embedded or skipped) in `seconds` of wall
    clock, and what ran each graph (empty when nothing was embedded)."""

    photos: int = 0
    seconds: float = 0.0
    providers: dict[str, str] = field(default_factory=dict)
    runtimes: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Photographs per second of this run's embedding."""
        return self.photos / self.seconds if self.seconds > 0 else 0.0


class Reporter(Protocol):
    """Where an engine reports progress (the build's progress bar)."""

    def start(self) -> None:
        """The engine starts embedding now (connected to its workers, if any): its rate counts from here."""
        ...

    def photos(self, count: int) -> None:
        """`count` more photographs were processed (embedded or skipped)."""
        ...

    def chunk(self, summary: ChunkSummary) -> None:
        """A chunk's shard was written."""
        ...
