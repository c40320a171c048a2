"""Write a synthetic BRSET-layout archive: labels with narratives, photographs, lesion inventory.

Layout written (the same the readers in `index.archive.brset` take):
    OUT/labels.csv               BRSET v1.0.0 columns + `narrative`
    OUT/fundus_photos/<id>.jpg   one rendered photograph per record
    OUT/synth_inventory.jsonl    per image: grades and lesion counts by type and hemi-field

The archive is built in a hidden sibling folder and renamed into place at the end, so an interrupted
run never leaves a half-written archive where a complete one (or nothing) was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.archive.brset import write_labels_csv
from index.records import FundusRecord
from training.synth.render import render_fundus
from training.text.narratives import write_narrative

PHOTO_FOLDER = "fundus_photos"
INVENTORY_FILE = "synth_inventory.jsonl"
MANIFEST_FILE = "synth_manifest.json"
JPEG_QUALITY = 92


@dataclass(frozen=True)
class SynthSummary:
    """What a generation run wrote and how fast."""

    out: Path
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Throughput of the whole run (render, encode, write)."""
        return self.images / max(self.seconds, 1e-9)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of one image: independent of worker count and of the other images."""
    return np.random.default_rng([seed, index])


def _render_and_save(task: tuple[int, FundusRecord, int, int, Path]) -> tuple[str, str]:
    index, record, size, seed, photo_dir = task
    image, inventory = render_fundus(record, size, image_rng(seed, index))
    image.save(photo_dir / f"{record.image_id}.jpg", quality=JPEG_QUALITY)
    line = {"image_id": record.image_id, "dr_icdr": record.dr_icdr, "dr_sdrg": record.dr_sdrg}
    line.update(inventory.model_dump())
    return json.dumps(line), write_narrative(record, seed)


def write_archive(
    records: Sequence[FundusRecord],
    out: Path,
    size: int,
    seed: int,
    workers: int = 1,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Render every record and write the archive at `out` (atomically; see the module docstring).

    Each record keeps its image id; a record without a narrative gets one written from its labels.
    `on_progress(n)` is called as images complete.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    if size < 64:
        raise ValueError(f"size must be at least 64 px, got {size}")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("records have duplicate image ids")

    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    photo_dir = partial / PHOTO_FOLDER
    photo_dir.mkdir(parents=True)
    started = time.perf_counter()
    tasks = [(i, record, size, seed, photo_dir) for i, record in enumerate(records)]
    results: list[tuple[str, str]] = []
    try:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(_render_and_save, tasks, chunksize=8):
                    results.append(result)
                    if on_progress:
                        on_progress(1)
        else:
            for task in tasks:
                results.append(_render_and_save(task))
                if on_progress:
                    on_progress(1)
        with_narratives = [
            record if record.narrative else record.model_copy(update={"narrative": narrative})
            for record, (_, narrative) in zip(records, results, strict=True)
        ]
        write_labels_csv(with_narratives, partial / "labels.csv")
        (partial / INVENTORY_FILE).write_text("".join(line + "\n" for line, _ in results))
        manifest = {"generator": "retina-align synth", "images": len(records), "size": size, "seed": seed}
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _replace_folder(partial, out)
    return SynthSummary(out=out, images=len(records), seconds=time.perf_counter() - started)


def _replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing what was there only once `new` is complete."""
    if target.exists():
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, target)


def read_synth_manifest(archive: Path) -> dict:
    """How a synthetic archive was generated (seed, size, images), or {} for any other archive."""
    path = Path(archive) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_inventory(archive: Path) -> list[dict]:
    """The lesion inventory of a synthetic archive, one dict per image."""
    path = Path(archive) / INVENTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
