"""Build a FAISS IVF index from vector shards, the way clip-retrieval and autofaiss build large ones.

A shard is one pair of `.npy` files written atomically, `shard-NNNNN.ids.npy` (int64) and
`shard-NNNNN.vectors.npy` (float32, L2-normalised), read back memory-mapped: no step below holds more than
one shard's vectors (plus the training sample) in memory.

1. **Train** IVF (and PQ) on a random sample drawn from every shard in proportion to its size
   (`training_sample`); nlist and the PQ code size follow `index.vector_index` for the total count.
2. **Add shard by shard.** In memory: each shard is added to the trained index. On disk (`ondisk=True`),
   for indexes that do not fit in memory: each shard is added to its own copy of the empty trained index
   and written out as a block; the blocks' inverted lists are then merged into one `.ivfdata` file
   (`faiss.contrib.ondisk.merge_ondisk`), and the index file only refers to it. `VectorIndex.load` maps
   that file into memory (read-only), so the operating system pages lists in as queries probe them.

Both paths give the same index for the same shards (same training sample, same assignment), which the
tests check.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from index.atomic import atomic_target
from index.vector_index import (
    ONDISK_KINDS,
    VectorIndex,
    VectorIndexError,
    faiss_messages_to_stderr,
    ivf_nlist,
    train_size,
)

ShardedKind = Literal["ivf", "ivfsq", "ivfpq", "ivfpqr"]
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.ids\.npy$")
IVFDATA_SUFFIX = ".ivfdata"

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total)."""
EXACT_BLOCK = 65_536
"""Shard rows per matrix product of `exact_top_k` (bounds its memory to queries x 65,536 scores)."""


class Shard(Protocol):
    """What the builder reads from a shard: its ids and vectors (`VectorShard`, or a build's chunk)."""

    def ids(self) -> np.ndarray: ...

    def vectors(self) -> np.ndarray: ...

    def __len__(self) -> int: ...


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class VectorShard:
    """One shard: its ids and vectors files."""

    ids_path: Path
    vectors_path: Path

    def ids(self) -> np.ndarray:
        """The shard's ids (int64, memory-mapped)."""
        return np.load(self.ids_path, mmap_mode="r")

    def vectors(self) -> np.ndarray:
        """The shard's vectors (float32 (n, dim), memory-mapped)."""
        return np.load(self.vectors_path, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.ids().shape[0])


def shard_paths(folder: Path, number: int) -> VectorShard:
    """The files of shard `number` in `folder` (they may not exist yet)."""
    stem = Path(folder) / f"shard-{number:05d}"
    return VectorShard(stem.with_name(stem.name + ".ids.npy"), stem.with_name(stem.name + ".vectors.npy"))


def write_shard(folder: Path, number: int, ids: np.ndarray, vectors: np.ndarray) -> VectorShard:
    """Write shard `number` atomically: the vectors first, the ids (which `list_shards` looks for) last."""
    identifiers = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or len(matrix) != len(identifiers):
        raise VectorIndexError(f"shard {number}: {len(identifiers)} ids for vectors of shape {matrix.shape}")
    shard = shard_paths(folder, number)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for path, array in ((shard.vectors_path, matrix), (shard.ids_path, identifiers)):
        with atomic_target(path) as temp:
            with temp.open("wb") as handle:
                np.save(handle, array)
    return shard


def list_shards(folder: Path) -> list[VectorShard]:
    """The finished shards in `folder`, by number."""
    names = (path.name for path in Path(folder).glob("shard-*.ids.npy"))
    numbers = sorted(int(match.group(1)) for name in names if (match := SHARD_PATTERN.match(name)))
    shards = [shard_paths(folder, number) for number in numbers]
    missing = [s.vectors_path.name for s in shards if not s.vectors_path.is_file()]
    if missing:
        raise VectorIndexError(f"{folder}: shard ids without vectors: {', '.join(missing[:5])}")
    return shards


def training_sample(shards: Sequence[Shard], size: int, seed: int = 0) -> np.ndarray:
    """`size` vectors drawn at random from all shards, each shard giving its share of the total."""
    counts = np.array([len(s) for s in shards], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise VectorIndexError("no vectors in the shards")
    size = min(size, total)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, size, replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for number, shard in enumerate(shards):
        local = rows[(rows >= offsets[number]) & (rows < offsets[number + 1])] - offsets[number]
        if len(local):
            parts.append(np.asarray(shard.vectors()[local], dtype=np.float32))
    return np.concatenate(parts)


@dataclass
class ShardedBuild:
    """What `build_from_shards` did and how long each stage took."""

    index_path: Path
    ivfdata_path: Path | None
    ntotal: int
    nlist: int
    kind: ShardedKind
    seconds: dict[str, float] = field(default_factory=dict)


def build_from_shards(
    shards: Sequence[Shard],
    kind: ShardedKind,
    out: Path,
    *,
    ondisk: bool = False,
    seed: int = 0,
    pq_m: int | None = None,
    nlist: int | None = None,
    progress: Progress = _no_progress,
) -> ShardedBuild:
    """Train on a sample of `shards`, add them shard by shard, and write the index to `out` (with
    `ondisk`, its inverted lists to `out` + `.ivfdata` beside it). `nlist` overrides `ivf_nlist`'s choice
    (the sample is then `train_size` for that many lists). Returns what was built."""
    if not shards:
        raise VectorIndexError("no shards to build an index from")
    if ondisk and kind not in ONDISK_KINDS:
        raise VectorIndexError(f"a {kind} index cannot be merged on disk; build it in memory")
    out = Path(out)
    total = sum(len(s) for s in shards)
    dim = int(shards[0].vectors().shape[1])
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    sample = training_sample(shards, train_size(total, nlist or ivf_nlist(total)), seed)
    progress("training", 0, 1)
    trained = VectorIndex.create(kind, dim, sample, n_hint=total, pq_m=pq_m, nlist=nlist, seed=seed, device="cpu")
    progress("training", 1, 1)
    seconds["train"] = time.perf_counter() - started

    started = time.perf_counter()
    if not ondisk:
        for number, shard in enumerate(shards):
            trained.add(np.asarray(shard.vectors()), np.asarray(shard.ids()))
            progress("adding", number + 1, len(shards))
        seconds["add"] = time.perf_counter() - started
        trained.save(out)
        return ShardedBuild(out, None, trained.ntotal, _nlist(trained), kind, seconds)

    empty = trained.faiss_index()
    faiss.extract_index_ivf(empty).set_direct_map_type(faiss.DirectMap.NoMap)  # blocks need no id map
    blocks = out.parent / f".{out.name}.blocks"
    shutil.rmtree(blocks, ignore_errors=True)
    blocks.mkdir(parents=True)
    try:
        block_files = []
        for number, shard in enumerate(shards):
            block = faiss.clone_index(empty)
            ids = np.ascontiguousarray(shard.ids(), dtype=np.int64)
            block.add_with_ids(np.ascontiguousarray(shard.vectors(), dtype=np.float32), ids)
            path = blocks / f"block-{number:05d}.index"
            faiss.write_index(block, str(path))
            block_files.append(str(path))
            del block
            progress("adding", number + 1, len(shards))
        seconds["add"] = time.perf_counter() - started

        started = time.perf_counter()
        ivfdata = out.with_name(out.name + IVFDATA_SUFFIX)
        merged = faiss.clone_index(empty)
        with atomic_target(ivfdata) as temp_data, faiss_messages_to_stderr():
            merge_ondisk(merged, block_files, str(temp_data))
        # The data file is in place; the index records its name, which `VectorIndex.load` resolves beside it.
        _rename_ivfdata(merged, ivfdata.name)
        with atomic_target(out) as temp_index:
            faiss.write_index(merged, str(temp_index))
        seconds["merge"] = time.perf_counter() - started
        progress("merging", 1, 1)
        return ShardedBuild(out, ivfdata, int(merged.ntotal), int(faiss.extract_index_ivf(merged).nlist), kind,
                            seconds)
    finally:
        shutil.rmtree(blocks, ignore_errors=True)


def exact_top_k(shards: Sequence[Shard], queries: np.ndarray, k: int = 10,
                progress: Progress = _no_progress) -> np.ndarray:
    """Exact top-`k` ids by inner product over every shard (a scan: one shard block in memory at a time)."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for number, shard in enumerate(shards):
        all_vectors, all_ids = shard.vectors(), shard.ids()
        for start in range(0, len(all_ids), EXACT_BLOCK):
            vectors = np.asarray(all_vectors[start : start + EXACT_BLOCK], dtype=np.float32)
            ids = np.asarray(all_ids[start : start + EXACT_BLOCK], dtype=np.int64)
            if len(ids) == 0:
                continue
            scores = queries @ vectors.T
            take = min(k, len(ids))
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
            candidates = np.concatenate([best_ids, ids[top]], axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(scores, order, axis=1)
            best_ids = np.take_along_axis(candidates, order, axis=1)
        progress("exact search", number + 1, len(shards))
    return best_ids


def _rename_ivfdata(index: faiss.Index, name: str) -> None:
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    invlists.filename = name


def _nlist(index: VectorIndex) -> int:
    return int(faiss.extract_index_ivf(index.faiss_index()).nlist)
