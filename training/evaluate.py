"""`retina-train evaluate`: the honest evaluation of a run on a patient-level split (DESIGN.md).

Embeds the split three ways (image only, record = image + structured data through the joint transformer,
and the stored narratives), then reports instance retrieval both ways with the gallery size and the
ceiling, category retrieval (a hit shares the ICDR grade), grading (ICDR, SDRG) and referable DR.
Grades come from the photograph alone (what `/grade` sees); the CLIP baseline, which has no grading
heads, grades zero-shot against text prompts of each grade.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from index.archive.brset import read_archive
from index.archive.deepeyenet import read_deepeyenet
from index.bundle import Calibration, sha256_of
from index.knowledge import ICDR_DESCRIPTIONS, SDRG_DESCRIPTIONS
from index.records import ICDR_NAMES, SDRG_NAMES, FundusRecord
from training.calibration import (
    CALIBRATION_FILE,
    calibration_metrics,
    check_weights,
    plot_reliability,
    run_calibration,
    scaled_probabilities,
)
from training.data import BatchBuilder, SplitData, load_photo, normalise
from training.evaluation.metrics import (
    bidirectional_instance_recall,
    category_retrieval,
    consensus_metrics,
    grading_metrics,
    referable_metrics,
    self_retrieval,
    top_k,
    within_grade_agreement,
)
from training.evaluation.report import plot_confusion, plot_loss_curves, plot_retrieval_grid, write_report
from training.hardware import autocast_context
from training.run import LoadedRun, load_run, split_for_evaluation
from training.splits import load_splits
from training.synth.archive import read_synth_manifest
from training.text.narratives import compose_narrative, fitting_counts
from training.tokenizer import batch_tokenizer, encode_texts

log = logging.getLogger(__name__)

KS = (1, 5, 10)
CONSENSUS_K = 10
"""The neighbours that vote in the consensus section (the service's default `consensus_k`)."""
GRID_QUERIES = 6
GRID_RESULTS = 5


@dataclass
class Embeddings:
    """Everything the metrics need for one split."""

    image: np.ndarray
    record: np.ndarray
    text: np.ndarray
    icdr_probabilities: np.ndarray
    sdrg_probabilities: np.ndarray
    icdr_logits: np.ndarray | None = None  # what the probabilities are the softmax of (for calibration)
    sdrg_logits: np.ndarray | None = None
    text_record: np.ndarray | None = None  # the texts against records (a record head); None: `text`

    def text_against(self, gallery: str) -> np.ndarray:
        """The text embeddings that search `gallery` ("image" or "record")."""
        return self.text_record if gallery == "record" and self.text_record is not None else self.text


def _batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(start, min(n, start + size)) for start in range(0, n, size)]


def grade_prompts(names: Sequence[str], descriptions: object) -> list[list[str]]:
    """Text prompts per grade for zero-shot grading: the grade's name and its expert descriptions."""
    prompts = []
    for grade, name in enumerate(names):
        texts = [name]
        if isinstance(descriptions, dict) and grade in descriptions:
            texts += list(descriptions[grade])
        prompts.append(texts)
    return prompts


@torch.no_grad()
def _class_embeddings(run: LoadedRun, builder: BatchBuilder, prompts: list[list[str]]) -> torch.Tensor:
    rows = []
    for texts in prompts:
        tokens = builder.tokenize(texts)
        mean = run.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().mean(0)
        rows.append(torch.nn.functional.normalize(mean, dim=0))
    return torch.stack(rows)


@torch.no_grad()
def embed_split(run: LoadedRun, data: SplitData, texts: Sequence[str], batch_size: int = 64,
                precision: str = "fp32") -> Embeddings:
    """Image, record and text embeddings and grade probabilities of a split (eval mode, no gradients)."""
    model, config = run.model, run.model.config
    device = next(model.parameters()).device
    builder = BatchBuilder(data, run.tokenizer, config.vision.image, config.text.max_length)
    zero_shot = config.grading == "zero_shot"
    if zero_shot:
        icdr_classes = _class_embeddings(run, builder, grade_prompts(ICDR_NAMES, ICDR_DESCRIPTIONS))
        sdrg_classes = _class_embeddings(run, builder, grade_prompts(SDRG_NAMES, SDRG_DESCRIPTIONS))
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "record", "text", "text_record", "icdr", "sdrg",
                                                          "icdr_logits", "sdrg_logits")}
    for rows in _batches(len(data), batch_size):
        batch = builder.batch(rows, [texts[i] for i in rows])
        pixels, tabular = batch["pixels"].to(device), batch["tabular"].to(device)
        with autocast_context(precision, device):
            image = model.encode_image(pixels)
            text, text_record, _ = model.encode_text_for_search(batch["input_ids"].to(device),
                                                                batch["attention_mask"].to(device))
            if zero_shot:
                record = image
                icdr = model.zero_shot_logits(image.float(), icdr_classes)
                sdrg = model.zero_shot_logits(image.float(), sdrg_classes)
            else:
                record = model.encode_record(pixels, tabular)
                fused = model.fuse(pixels=pixels)
                icdr, sdrg = fused.icdr_logits, fused.sdrg_logits
        out["image"].append(image.float().cpu().numpy())
        out["record"].append(record.float().cpu().numpy())
        out["text"].append(text.float().cpu().numpy())
        out["text_record"].append(text_record.float().cpu().numpy())
        out["icdr"].append(icdr.float().softmax(-1).cpu().numpy())
        out["sdrg"].append(sdrg.float().softmax(-1).cpu().numpy())
        out["icdr_logits"].append(icdr.float().cpu().numpy())
        out["sdrg_logits"].append(sdrg.float().cpu().numpy())
    return Embeddings(
        image=np.concatenate(out["image"]),
        record=np.concatenate(out["record"]),
        text=np.concatenate(out["text"]),
        icdr_probabilities=np.concatenate(out["icdr"]),
        sdrg_probabilities=np.concatenate(out["sdrg"]),
        icdr_logits=np.concatenate(out["icdr_logits"]),
        sdrg_logits=np.concatenate(out["sdrg_logits"]),
        text_record=np.concatenate(out["text_record"]) if model.config.record_text_head else None,
    )


def query_texts(records: Sequence[FundusRecord], seed: int = 0) -> tuple[list[str], list, int]:
    """The text query of each record and the facts it states (for the ceiling), plus how many equal the
    archive's stored narrative.

    Queries are written from the labels with the archive's narrative seed, which reproduces a synthetic
    archive's stored narratives exactly; the facts of an arbitrary stored text could not be known.
    """
    texts, facts, same = [], [], 0
    for record in records:
        text, stated = compose_narrative(record, seed)
        same += record.narrative == text
        texts.append(text)
        facts.append(stated)
    return texts, facts, same


def ceiling(records: Sequence[FundusRecord], facts: Sequence, ks: Sequence[int] = KS) -> dict[str, float]:
    """The best a perfect model can do on exact pairs: a query whose text fits n records of the gallery
    finds its own at rank 1 with probability 1/n (ties broken at random)."""
    counts = np.asarray(fitting_counts(records, facts, records), dtype=np.float64)
    result = {f"ceiling@{k}": float(np.minimum(1.0, k / counts).mean()) for k in ks}
    result["unique_fit"] = float((counts == 1).mean())
    result["mean_fitting"] = float(counts.mean())
    return result


def compute_metrics(records: Sequence[FundusRecord], embeddings: Embeddings, facts: Sequence,
                    consensus_k: int = CONSENSUS_K) -> dict:
    """The combined metrics dict (see `training.evaluation.metrics`); the consensus of each photograph's
    `consensus_k` nearest photographs is compared with the model's ICDR grade (argmax)."""
    icdr = np.array([-1 if r.dr_icdr is None else r.dr_icdr for r in records])
    sdrg = np.array([-1 if r.dr_sdrg is None else r.dr_sdrg for r in records])
    bound = ceiling(records, facts)
    metrics: dict = {"instance": {}, "category": {}}
    for gallery_name in ("image", "record"):
        gallery, text = getattr(embeddings, gallery_name), embeddings.text_against(gallery_name)
        result = bidirectional_instance_recall(text, gallery, ks=KS, names=("text", gallery_name))
        result["a_to_b"].update(bound)
        metrics["instance"][f"text-{gallery_name}"] = result
        metrics["category"][f"text-{gallery_name}"] = category_retrieval(
            text, gallery, icdr, icdr, ks=KS, names=[f"ICDR {g}" for g in range(5)]
        )
    metrics["image_image"] = self_retrieval(embeddings.image, icdr, ks=KS, names=[f"ICDR {g}" for g in range(5)])
    metrics["lookalike"] = within_grade_agreement(
        embeddings.image, icdr, {"eye": [r.exam_eye for r in records], "camera": [r.camera for r in records]}, k=10
    )
    metrics["consensus"] = consensus_metrics(embeddings.image, icdr, embeddings.icdr_probabilities.argmax(axis=1),
                                             k=consensus_k, groups=[r.patient_id for r in records])
    metrics["icdr"] = grading_metrics(icdr, embeddings.icdr_probabilities, list(ICDR_NAMES))
    metrics["sdrg"] = grading_metrics(sdrg, embeddings.sdrg_probabilities, list(SDRG_NAMES))
    metrics["referable"] = referable_metrics(icdr, embeddings.icdr_probabilities)
    return metrics


def evaluate(run_dir: Path, archive_dir: Path, splits_path: Path, split: str = "test",
             out: Path | None = None, batch_size: int = 64, consensus_k: int = CONSENSUS_K,
             calibration: Path | None = None) -> dict:
    """Evaluate a run on a split and write metrics.json, report.md and the figures to `out`
    (default RUN/eval-SPLIT); `consensus_k`: the neighbours of the consensus section. Returns the metrics.

    The `calibration` section reports each grade head's ECE before temperature scaling and, with the
    temperatures of `calibration` (a `retina-train calibrate` file; default RUN/calibration.json when
    present), after; a reliability diagram (before/after) goes beside the report."""
    run = load_run(run_dir)
    archive = read_archive(archive_dir)
    splits = load_splits(splits_path)
    if split not in splits:
        raise ValueError(f"{splits_path} has no split {split!r} (it has {sorted(splits)})")
    data = split_for_evaluation(archive, splits[split], run)
    narrative_seed = read_synth_manifest(archive_dir).get("seed", 0)
    texts, facts, same = query_texts(data.records, narrative_seed)
    embeddings = embed_split(run, data, texts, batch_size)
    chosen, source = _chosen_calibration(run_dir, run, calibration)
    if chosen is not None:
        embeddings = calibrated(embeddings, chosen)
    metrics = compute_metrics(data.records, embeddings, facts, consensus_k)
    metrics["calibration"], reliability_data = calibration_metrics(
        {"icdr": embeddings.icdr_logits, "sdrg": embeddings.sdrg_logits}, {"icdr": data.icdr, "sdrg": data.sdrg},
        chosen, source=source)
    metrics["run"] = {"run": str(run_dir), "config": run.model.config.name, "split": split,
                      "gallery_size": len(data), **{k: run.info.get(k) for k in (
                          "steps", "training_seconds", "samples_per_second", "precision", "fingerprint")}}

    out = Path(out) if out else Path(run_dir) / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(run, archive, data, embeddings, texts, metrics, out)
    if reliability_data:
        figures["reliability diagram (before / after calibration)"] = plot_reliability(
            reliability_data, out / "reliability.png", f"{run.model.config.name} on {split}")
    notes = [
        f"Split `{split}` of {archive_dir}: {len(data)} photographs from "
        f"{len({r.patient_id for r in data.records})} patients; every gallery is this whole split.",
        f"Queries are narratives written from the labels (seed {narrative_seed}); {same} of {len(texts)} are "
        "the archive's stored narratives word for word. The ceiling is what a perfect model reaches on exact "
        "pairs: a narrative that fits n records of the gallery finds its own first with probability 1/n.",
        "Image->image: each photograph queries all the others of the split (itself excluded); a hit shares its "
        "ICDR grade; the referable share counts referable neighbours of referable queries.",
        f"Consensus: each photograph's {consensus_k} nearest other photographs of the split (as image->image; "
        "another photograph of the same patient may be among them, and 'other patients only' repeats it without "
        "them) vote with their true ICDR grade (`index.consensus`, the service's rules); the model's grade is its "
        "argmax from the photograph alone.",
        "Grades are predicted from the photograph alone"
        + (" (zero-shot against grade prompts: the baseline has no grading heads)."
           if run.model.config.grading == "zero_shot" else
           ", with the calibration below (softmax(logits / T + b), as the service grades)." if chosen is not None
           else "."),
    ]
    notes.append(_calibration_note(metrics["calibration"]))
    write_report(metrics, out, f"Evaluation of {run.model.config.name} on {split}", figures, notes)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def _chosen_calibration(run_dir: Path, run: LoadedRun, explicit: Path | None) -> tuple[Calibration | None, str | None]:
    """The run's calibration (or `explicit`) and where it came from; ValueError when it was fitted on other
    weights."""
    chosen = run_calibration(run_dir, explicit)
    source = str(explicit) if explicit is not None else str(Path(run_dir) / CALIBRATION_FILE) if chosen else None
    if chosen is not None:
        check_weights(chosen, sha256_of(run.files.weights), source or "the calibration")
    return chosen, source


def calibrated(embeddings: Embeddings, calibration: Calibration) -> Embeddings:
    """The embeddings with grade probabilities as the service gives them under `calibration`:
    softmax(logits / T + b) (b: the decision offsets, zeros without)."""
    if embeddings.icdr_logits is None or embeddings.sdrg_logits is None:
        raise ValueError("calibration needs the grade logits")
    return replace(
        embeddings,
        icdr_probabilities=scaled_probabilities(embeddings.icdr_logits, calibration.temperature("icdr"),
                                                calibration.offsets_of("icdr")),
        sdrg_probabilities=scaled_probabilities(embeddings.sdrg_logits, calibration.temperature("sdrg"),
                                                calibration.offsets_of("sdrg")),
    )


def _calibration_note(section: dict) -> str:
    if section.get("temperatures") is None:
        return ("Calibration: no temperatures (no RUN/calibration.json and no --calibration; fit them with "
                "`retina-train calibrate`), so ECE is reported before calibration only.")
    temperatures = section["temperatures"]
    return (f"Calibration: temperatures ICDR {temperatures['icdr']:.4f}, SDRG {temperatures['sdrg']:.4f} from "
            f"{section['source']} (fitted on {section['fitted_on']}); ECE of top-label confidence in "
            f"{section['bins']} equal-width bins, from the photograph alone."
            + ("" if not section.get("offsets") else
               " Decision offsets (added to logits / T; every grade figure above uses them, as the service does): "
               + "; ".join(f"{head.upper()} [{', '.join(f'{v:+.1f}' for v in values)}]"
                           for head, values in section["offsets"].items()) + "."))


def _figures(run: LoadedRun, archive, data: SplitData, embeddings: Embeddings, texts: list[str],
             metrics: dict, out: Path) -> dict[str, Path]:
    figures: dict[str, Path] = {}
    log_path = run.files.metrics
    if log_path.exists():
        steps = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        if steps:
            figures["loss curves"] = plot_loss_curves(steps, out / "loss_curves.png")
    figures["ICDR confusion"] = plot_confusion(
        metrics["icdr"]["confusion_matrix"], list(ICDR_NAMES), "ICDR (from the photograph)", out / "confusion_icdr.png"
    )
    figures["SDRG confusion"] = plot_confusion(
        metrics["sdrg"]["confusion_matrix"], list(SDRG_NAMES), "SDRG (from the photograph)", out / "confusion_sdrg.png"
    )
    # One query per grade where possible, so the grid shows the whole scale.
    chosen: list[int] = []
    for grade in (4, 3, 2, 1, 0, 0):
        candidates = [i for i, r in enumerate(data.records) if r.dr_icdr == grade and i not in chosen]
        if candidates:
            chosen.append(candidates[0])
    chosen = chosen[:GRID_QUERIES]
    indices, scores = top_k(embeddings.text[chosen], embeddings.image, GRID_RESULTS)
    results = []
    for query, row, row_scores in zip(chosen, indices, scores, strict=True):
        hits = []
        for j, score in zip(row, row_scores, strict=True):
            record = data.records[j]
            path = archive.photo_path(record.image_id)
            same = record.dr_icdr == data.records[query].dr_icdr
            hits.append((path, f"ICDR {record.dr_icdr} {score:.2f}" + (" (own)" if j == query else ""), same))
        results.append(hits)
    figures["text->image retrieval"] = plot_retrieval_grid(
        [texts[i] for i in chosen], results, out / "retrieval_examples.png"
    )
    return figures


@torch.no_grad()
def evaluate_deepeyenet(run_dir: Path, root: Path, split: str = "test", batch_size: int = 64) -> dict:
    """Zero-shot text <-> image instance retrieval on DeepEyeNet (clinical descriptions vs photographs)."""
    run = load_run(run_dir)
    cases = [c for c in read_deepeyenet(root, split) if c.image_path.is_file()]
    if not cases:
        raise ValueError(f"{root}: no DeepEyeNet {split} case has its photograph")
    config = run.model.config
    images = np.stack([load_photo(c.image_path, config.vision.image) for c in cases])
    texts = [f"{c.description} Keywords: {', '.join(c.keywords)}." for c in cases]
    image_rows, text_rows = [], []
    text_tokenizer = batch_tokenizer(run.tokenizer, config.text.max_length)
    for rows in _batches(len(cases), batch_size):
        pixels = normalise(torch.from_numpy(images[rows]), config.vision.image.mean, config.vision.image.std)
        image_rows.append(run.model.encode_image(pixels).float().numpy())
        tokens = encode_texts(text_tokenizer, [texts[i] for i in rows])
        text_rows.append(run.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().numpy())
    return {
        "deepeyenet": bidirectional_instance_recall(
            np.concatenate(text_rows), np.concatenate(image_rows), ks=KS, names=("text", "image")
        ),
        "cases": len(cases),
    }
