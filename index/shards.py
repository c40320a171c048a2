"""The shards of a build: a chunk of archive records embedded, and its files in `INDEX/.partial/`.

Every build engine (`index.engines`) embeds chunks with `embed_chunk` and writes each with `save_chunk`:
`chunk-NNNNN.npz` (ids, image and record vectors, ICDR and SDRG probabilities) and then `chunk-NNNNN.json`
(the ids the chunk covers, the photos it skipped) as its completion marker, both atomically; `load_chunk`
reads a finished one back. A record whose photo is missing or cannot be decoded is skipped with the reason,
never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from index.archive.brset import PHOTOS_DIR, Archive
from index.atomic import atomic_target, write_text_atomic
from index.preprocess import ImageDecodeError, decode_image
from index.records import FundusRecord
from index.store import SkippedPhoto

if TYPE_CHECKING:
    from index.embedder import Embedder


class ChunkDone(BaseModel):
    """`.partial/chunk-NNNNN.json`: a finished chunk (written after its .npz)."""

    model_config = ConfigDict(extra="forbid")

    chunk: int
    ids: list[int]
    """The ids this chunk covers (embedded or skipped)."""
    skipped: list[SkippedPhoto]
    seconds: float


@dataclass(frozen=True)
class ArchiveItem:
    """One archive record to embed: its id (row number of the label file), its labels, its photo file."""

    id: int
    record: FundusRecord
    photo: Path | None
    """None: the archive has no photo file for this record."""


@dataclass
class ChunkResult:
    """What embedding one chunk produced."""

    ids: np.ndarray
    image: np.ndarray
    record: np.ndarray
    icdr: np.ndarray
    sdrg: np.ndarray
    skipped: list[SkippedPhoto]


def archive_items(archive: Archive, ids: np.ndarray) -> list[ArchiveItem]:
    """The records `ids` of `archive` with their photo files."""
    items = []
    for identifier in ids.tolist():
        record = archive.records[identifier]
        items.append(ArchiveItem(identifier, record, archive.photo_path(record.image_id)))
    return items


def load_photo(item: ArchiveItem) -> Image.Image | str:
    """The decoded photograph of a record, or the reason it cannot be used."""
    if item.photo is None:
        return f"no photo file in {PHOTOS_DIR}/"
    try:
        return decode_image(item.photo)
    except ImageDecodeError as error:
        return f"{item.photo.name}: {error}"
    except OSError as error:
        return f"{item.photo.name}: cannot read ({error.strerror or error})"


def embed_chunk(
    embedder: Embedder,
    items: Sequence[ArchiveItem],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> ChunkResult:
    """Embed the records `items`, batch by batch; only one batch of decoded photographs is in memory at a
    time. `on_batch(n)` reports each batch's size (embedded and skipped)."""
    kept: list[int] = []
    image_parts, record_parts, icdr_parts, sdrg_parts = [], [], [], []
    skipped: list[SkippedPhoto] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        images: list[Image.Image] = []
        records: list[FundusRecord] = []
        for item in batch:
            photo = load_photo(item)
            if isinstance(photo, str):
                skipped.append(SkippedPhoto(id=item.id, image_id=item.record.image_id, reason=photo))
                continue
            images.append(photo)
            records.append(item.record)
            kept.append(item.id)
        if images:
            embedded = embedder.embed_records(images, records, batch_size)
            image_parts.append(embedded.image_vectors)
            record_parts.append(embedded.record_vectors)
            icdr_parts.append(embedded.icdr)
            sdrg_parts.append(embedded.sdrg)
        if on_batch is not None:
            on_batch(len(batch))
    dim = embedder.dim
    classes = len(embedder.manifest.icdr_names)

    def stack(parts: list[np.ndarray], width: int) -> np.ndarray:
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, width), np.float32)

    return ChunkResult(
        ids=np.asarray(kept, dtype=np.int64),
        image=stack(image_parts, dim),
        record=stack(record_parts, dim),
        icdr=stack(icdr_parts, classes),
        sdrg=stack(sdrg_parts, classes),
        skipped=skipped,
    )


def chunk_paths(partial: Path, chunk: int) -> tuple[Path, Path]:
    """The shard's arrays (.npz) and its completion marker (.json)."""
    return partial / f"chunk-{chunk:05d}.npz", partial / f"chunk-{chunk:05d}.json"


def save_chunk(partial: Path, chunk: int, result: ChunkResult, seconds: float, covered: Sequence[int]) -> None:
    """Write a finished chunk: its arrays, then its completion marker, each atomically (a writer killed
    halfway leaves no marker, so the chunk counts as not done)."""
    arrays_path, done_path = chunk_paths(partial, chunk)
    with atomic_target(arrays_path) as temp:
        with temp.open("wb") as handle:
            np.savez(
                handle, ids=result.ids, image=result.image, record=result.record, icdr=result.icdr, sdrg=result.sdrg
            )
    done = ChunkDone(chunk=chunk, ids=list(covered), skipped=result.skipped, seconds=seconds)
    write_text_atomic(done_path, done.model_dump_json() + "\n")


def is_finished(partial: Path, chunk: int, covered: Sequence[int]) -> bool:
    """Whether the chunk's shard is written (its marker, for these ids, and its arrays), without reading it."""
    arrays_path, done_path = chunk_paths(partial, chunk)
    if not (done_path.is_file() and arrays_path.is_file()):
        return False
    return ChunkDone.model_validate_json(done_path.read_text()).ids == list(covered)


def load_chunk(partial: Path, chunk: int, covered: Sequence[int]) -> ChunkResult | None:
    """A finished chunk, or None when it is not finished (or its marker does not match)."""
    arrays_path, done_path = chunk_paths(partial, chunk)
    if not (done_path.is_file() and arrays_path.is_file()):
        return None
    done = ChunkDone.model_validate_json(done_path.read_text())
    if done.ids != list(covered):
        return None
    with np.load(arrays_path) as data:
        return ChunkResult(
            ids=data["ids"], image=data["image"], record=data["record"], icdr=data["icdr"], sdrg=data["sdrg"],
            skipped=done.skipped,
        )


@dataclass(frozen=True)
class ChunkVectors:
    """One embedding of a finished chunk, read from its .npz when asked: a shard for `index.ivf_build`,
    which builds an index chunk by chunk without holding every vector."""

    partial: Path
    chunk: int
    embedding: Literal["image", "record"]

    def _read(self, name: str) -> np.ndarray:
        with np.load(chunk_paths(self.partial, self.chunk)[0]) as data:
            return data[name]

    def ids(self) -> np.ndarray:
        """The ids of the chunk's embedded photographs."""
        return self._read("ids")

    def vectors(self) -> np.ndarray:
        """Their `embedding` vectors."""
        return self._read(self.embedding)

    def __len__(self) -> int:
        return int(len(self.ids()))
