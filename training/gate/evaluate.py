"""Measure a bundle's gradability gate the way the service runs it (`retina-train gate evaluate`).

Through `index.embedder` (ONNX Runtime, the exported graph), never the PyTorch network, on:

- a labelled archive (a held-out synthetic archive, or real photographs with BRSET-style quality
  labels): AUROC of ungradable (quality inadequate) vs gradable, scored by 1 - the answer's
  probability, the share flagged at the gate's threshold with its sensitivity and specificity, and each
  defect's AUROC;
- scikit-image's bundled sample images: every non-fundus one must come out flagged as not a fundus
  photograph (those the gate trained on and those it never saw, reported apart), and its one fundus
  photograph (`retina`) must not;
- optionally a folder of photographs without labels (e.g. real EyePACS photographs): the share flagged,
  each flagged one with its reasons, and a contact sheet of them to look at.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from index.archive.brset import read_archive
from index.embedder import Embedder
from index.gate import DEFECTS, Gradability
from index.preprocess import decode_image
from training.gate.negatives import SKIMAGE_HELD_OUT, SKIMAGE_TRAIN, skimage_fundus, skimage_samples
from training.gate.train import record_targets

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
BATCH = 32


def _gate(embedder: Embedder, images: Sequence[Image.Image]) -> list[Gradability]:
    answers: list[Gradability] = []
    for start in range(0, len(images), BATCH):
        answers += embedder.check_gradability(images[start : start + BATCH])
    return answers


def _photos(paths: Sequence[Path], embedder: Embedder, progress: Callable[[int], None]) -> list[Gradability]:
    answers: list[Gradability] = []
    for start in range(0, len(paths), BATCH):
        images = [decode_image(path) for path in paths[start : start + BATCH]]
        answers += embedder.check_gradability(images)
        progress(len(images))
    return answers


def archive_figures(embedder: Embedder, archive_dir: Path, progress: Callable[[int], None]) -> dict:
    """Ungradable-vs-gradable AUROC, flagged share, sensitivity and specificity, per-defect AUROC."""
    archive = read_archive(archive_dir)
    records = [r for r in archive.records if archive.photo_path(r.image_id) is not None]
    answers = _photos([archive.photo_path(r.image_id) for r in records], embedder, progress)  # type: ignore[misc]
    targets = np.stack([record_targets(r)[0] for r in records])
    known = np.stack([record_targets(r)[1] for r in records])
    flagged = np.array([not a.ok for a in answers])
    figures: dict = {"photographs": len(records), "flagged_share": round(float(flagged.mean()), 4) if records else 0.0}
    labelled = known[:, 1]
    ungradable = targets[labelled, 1] == 0
    figures["ungradable"] = int(ungradable.sum())
    if 0 < ungradable.sum() < labelled.sum():
        score = 1 - np.array([a.probability for a in answers])[labelled]
        figures["ungradable_auroc"] = round(float(roc_auc_score(ungradable, score)), 4)
        figures["sensitivity"] = round(float(flagged[labelled][ungradable].mean()), 4)
        figures["specificity"] = round(float(1 - flagged[labelled][~ungradable].mean()), 4)
    for i, name in enumerate(DEFECTS, start=2):
        rows = known[:, i]
        truth = targets[rows, i]
        if 0 < truth.sum() < len(truth):
            score = np.array([a.probabilities[name] for a in answers])[rows]
            figures[f"{name}_auroc"] = round(float(roc_auc_score(truth, score)), 4)
    figures["not_fundus_share"] = round(float(np.mean([not a.fundus for a in answers])), 4) if records else 0.0
    return figures


def sample_figures(embedder: Embedder) -> dict:
    """scikit-image's samples: each non-fundus one's answer (seen in training or not), and the fundus one's."""
    result: dict = {}
    for group, names in (("trained_on", SKIMAGE_TRAIN), ("never_seen", SKIMAGE_HELD_OUT)):
        images = skimage_samples(names)
        answers = _gate(embedder, list(images.values()))
        result[group] = {
            name: {"flagged_not_fundus": not a.fundus, "p_fundus": a.probabilities["fundus"]}
            for name, a in zip(images, answers, strict=True)
        }
        result[f"{group}_all_flagged"] = all(not a.fundus for a in answers)
    (retina,) = _gate(embedder, [skimage_fundus()])
    result["retina"] = {"ok": retina.ok, "fundus": retina.fundus, "probability": retina.probability,
                        "reasons": retina.reasons}
    return result


def folder_figures(embedder: Embedder, folder: Path, sheet: Path | None, progress: Callable[[int], None]) -> dict:
    """Unlabelled photographs: the share flagged and why, and (optionally) a contact sheet of the flagged."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    answers = _photos(paths, embedder, progress)
    flagged = [(p, a) for p, a in zip(paths, answers, strict=True) if not a.ok]
    if sheet is not None and flagged:
        write_sheet([p for p, _ in flagged], ["; ".join(a.reasons) for _, a in flagged], sheet)
    return {
        "photographs": len(paths),
        "flagged_share": round(len(flagged) / max(len(paths), 1), 4),
        "not_fundus_share": round(sum(not a.fundus for a in answers) / max(len(paths), 1), 4),
        "flagged": {p.name: {"probability": a.probability, "reasons": a.reasons} for p, a in flagged},
    }


def write_sheet(paths: Sequence[Path], captions: Sequence[str], out: Path, tile: int = 192, columns: int = 6) -> None:
    """A PNG grid of photographs with a caption under each."""
    rows = -(-len(paths) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 28)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (path, caption) in enumerate(zip(paths, captions, strict=True)):
        image = decode_image(path)
        image.thumbnail((tile, tile))
        x, y = (i % columns) * tile, (i // columns) * (tile + 28)
        sheet.paste(image, (x, y))
        draw.text((x + 2, y + tile + 2), f"{path.name[:28]}\n{caption[:34]}", fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def gate_latency_ms(embedder: Embedder, repeats: int = 30) -> float:
    """Median milliseconds of the gate on one photograph (preparation included)."""
    image = skimage_fundus()
    embedder.check_gradability([image])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.check_gradability([image])
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 2)


def evaluate_gate(
    bundle: Path, archive: Path | None = None, photos: Path | None = None, sheet: Path | None = None,
    progress: Callable[[int], None] = lambda n: None, threads: int | None = None,
) -> dict:
    """Every figure above for the gate in `bundle`. Raises ValueError when the bundle has no gate."""
    embedder = Embedder(bundle, device="cpu", threads=threads)
    if not embedder.has_gate:
        raise ValueError(f"{bundle}: this bundle has no gradability gate")
    report: dict = {"bundle": str(bundle), "gate": embedder.manifest.gate.model_dump(mode="json")}  # type: ignore[union-attr]
    if archive is not None:
        report["archive"] = {"path": str(archive), **archive_figures(embedder, archive, progress)}
    report["skimage"] = sample_figures(embedder)
    if photos is not None:
        report["photos"] = {"path": str(photos), **folder_figures(embedder, photos, sheet, progress)}
    report["latency_ms_one_photograph"] = gate_latency_ms(embedder)
    return report
