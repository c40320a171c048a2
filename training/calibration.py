"""Calibrated grade probabilities: temperature scaling of the ICDR and SDRG heads (issue 15).

`retina-train calibrate` runs a run's photographs of one split (normally `val`) through the model alone, as
`/grade` sees an upload (image only), and fits one temperature per head by minimising the negative
log-likelihood of softmax(logits / T) (scipy's bounded scalar minimiser over log T). Temperature scaling
divides every logit of a row by the same number, so the predicted grade never changes; only how sure the
probabilities say the model is.

Calibration error is the expected calibration error (ECE) of the top label (Guo et al., 2017): the
photographs are put in `bins` equal-width bins of their top probability (the confidence), bin m holding
confidences in ((m-1)/M, m/M], and ECE = sum over bins of (n_m / N) * |accuracy_m - confidence_m|.

Decision offsets (`--offsets-split`, issue 11): per-grade offsets b added to the scaled logits,
softmax(logits / T + b), chosen by coordinate ascent over a grid to maximise the macro-F1 of the argmax grade
(`fit_offsets`). They move the boundary between grades (the rare grades' precision against their recall),
which temperature scaling never does. They are fitted on a large split (normally `train`, sampled at most
`per_grade` photographs per ICDR grade and weighted back to the split's shares): a validation split of 1,500
photographs holds a few dozen of each rare grade, and offsets fitted there do not carry over.

The result is an `index.bundle.Calibration` (the same model `retina-train export` puts in the bundle's
manifest), saved as `RUN/calibration.json` or where `--out` says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as scipy_softmax
from sklearn.metrics import f1_score

from index.bundle import Calibration, DecisionOffsets, now_iso

if TYPE_CHECKING:  # torch is imported only where logits are computed
    from training.data import SplitData
    from training.run import LoadedRun

CALIBRATION_FILE = "calibration.json"
"""A run's calibration, beside its checkpoint (`retina-train calibrate --out` may put it elsewhere)."""
HEADS = ("icdr", "sdrg")
DEFAULT_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The temperatures the fit may choose (searched over log T)."""
OFFSET_GRID = np.round(np.linspace(-3.0, 3.0, 61), 2)
"""The offsets the decision fit tries for each grade (steps of 0.1)."""
OFFSET_ROUNDS = 3
"""Coordinate-ascent passes over the grades (it settles in one or two)."""
DEFAULT_PER_GRADE = 2000
"""The most photographs of one ICDR grade the offset fit grades (the rest of a large grade is weighted in)."""


@dataclass(frozen=True)
class Reliability:
    """Reliability-diagram data: per equal-width confidence bin, how many photographs, their mean top
    probability (confidence) and the share whose top grade was right (accuracy); NaN in empty bins."""

    edges: np.ndarray  # (bins + 1,) from 0 to 1
    counts: np.ndarray  # (bins,) int
    confidence: np.ndarray  # (bins,)
    accuracy: np.ndarray  # (bins,)
    ece: float


@dataclass(frozen=True)
class HeadFit:
    """One head's fitted temperature and its figures before (T = 1) and after."""

    temperature: float
    items: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(logits, dtype=np.float64)
    truth = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"logits must be (N, classes) with at least 2 classes, got shape {scores.shape}")
    if truth.shape != (scores.shape[0],):
        raise ValueError(f"labels must be ({scores.shape[0]},), got shape {truth.shape}")
    if len(truth) == 0:
        raise ValueError("no labelled items")
    if not np.issubdtype(truth.dtype, np.integer) or truth.min() < 0 or truth.max() >= scores.shape[1]:
        raise ValueError(f"labels must be integers in [0, {scores.shape[1] - 1}]")
    if not np.isfinite(scores).all():
        raise ValueError("logits hold NaN or infinity")
    return scores, truth.astype(np.int64)


def scaled_logits(logits: np.ndarray, temperature: float = 1.0, offsets: Sequence[float] | None = None) -> np.ndarray:
    """logits / temperature (+ offsets, one per grade), row-wise, float64: what the softmax of a calibrated
    head reads."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    scores = np.asarray(logits, dtype=np.float64) / temperature
    if offsets is None:
        return scores
    shift = np.asarray(offsets, dtype=np.float64)
    if shift.shape != scores.shape[-1:]:
        raise ValueError(f"one offset per grade: {scores.shape[-1]} grades, {shift.size} offsets")
    return scores + shift


def scaled_probabilities(logits: np.ndarray, temperature: float = 1.0,
                         offsets: Sequence[float] | None = None) -> np.ndarray:
    """softmax(logits / temperature + offsets), row-wise, float64 (no offsets: softmax(logits / temperature))."""
    return scipy_softmax(scaled_logits(logits, temperature, offsets), axis=-1)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                            offsets: Sequence[float] | None = None) -> float:
    """Mean -log softmax(logits / T + offsets)[label] (natural log)."""
    scores, truth = _check(logits, labels)
    log_probabilities = log_softmax(scaled_logits(scores, temperature, offsets), axis=-1)
    return float(-log_probabilities[np.arange(len(truth)), truth].mean())


def macro_f1(logits: np.ndarray, labels: np.ndarray, offsets: Sequence[float] | None = None,
             weights: np.ndarray | None = None) -> float:
    """Macro-F1 of the argmax grade of logits + offsets over the grades present in `labels`, each row
    weighted by `weights` (None: equally)."""
    scores, truth = _check(logits, labels)
    predicted = scaled_logits(scores, 1.0, offsets).argmax(axis=1)
    return float(f1_score(truth, predicted, labels=np.unique(truth), average="macro", sample_weight=weights,
                          zero_division=0))


def fit_offsets(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
                grid: Sequence[float] = tuple(OFFSET_GRID), rounds: int = OFFSET_ROUNDS) -> np.ndarray:
    """Per-grade offsets b (grade 0's stays 0) that maximise `macro_f1(logits, labels, b, weights)`: coordinate
    ascent, each grade in turn trying every value of `grid` with the others held, `rounds` passes. Among equal
    scores the offset nearest 0 wins, so a grade the fit cannot improve keeps 0."""
    scores, truth = _check(logits, labels)
    offsets = np.zeros(scores.shape[1])
    candidates = sorted(float(value) for value in grid)
    for _ in range(rounds):
        changed = False
        for grade in range(1, scores.shape[1]):
            def score(value: float, grade: int = grade) -> tuple[float, float]:
                trial = offsets.copy()
                trial[grade] = value
                return macro_f1(scores, truth, trial, weights), -abs(value)

            best = max(candidates, key=score)
            if score(best) > score(offsets[grade]):
                offsets[grade], changed = best, True
        if not changed:
            break
    return offsets


def stratified_sample(labels: np.ndarray, per_grade: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most `per_grade` row indices of each label (sorted), and each chosen row's weight: how many rows of
    its label it stands for (1 where a label has no more than `per_grade`)."""
    if per_grade < 1:
        raise ValueError(f"per_grade must be at least 1, not {per_grade}")
    truth = np.asarray(labels)
    if truth.size == 0:
        raise ValueError("no labels to sample from")
    rng = np.random.default_rng(seed)
    chosen, weights = [], []
    for label in np.unique(truth):
        rows = np.flatnonzero(truth == label)
        pick = np.sort(rng.choice(rows, per_grade, replace=False)) if len(rows) > per_grade else rows
        chosen.append(pick)
        weights.append(np.full(len(pick), len(rows) / len(pick)))
    rows, row_weights = np.concatenate(chosen), np.concatenate(weights)
    order = np.argsort(rows)
    return rows[order], row_weights[order]


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The temperature T in `bounds` that minimises the NLL of softmax(logits / T) on (logits, labels):
    scipy's bounded Brent minimiser over log T (the NLL is smooth and unimodal in log T)."""
    scores, truth = _check(logits, labels)
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(scores, truth, math.exp(log_t)),
        bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-6},
    )
    if not result.success:
        raise ValueError(f"the temperature fit did not converge: {result.message}")
    return float(math.exp(result.x))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> Reliability:
    """Reliability-diagram data and ECE of top-label confidence in `bins` equal-width bins: bin m holds
    confidences in ((m-1)/M, m/M] (a confidence of exactly 0 goes to the first)."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    probs = np.asarray(probabilities, dtype=np.float64)
    _, truth = _check(probs, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == truth).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
    filled = counts > 0
    ece = float((counts[filled] / len(truth) * np.abs(accuracy[filled] - mean_confidence[filled])).sum())
    return Reliability(np.linspace(0.0, 1.0, bins + 1), counts, mean_confidence, accuracy, ece)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """ECE of top-label confidence in `bins` equal-width bins (see `reliability`)."""
    return reliability(probabilities, labels, bins).ece


def fit_head(logits: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> HeadFit:
    """Fit one head's temperature on its labelled rows (labels < 0 mean missing and are left out) and
    measure ECE and NLL before and after."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    keep = labels >= 0
    scores, truth = _check(logits[keep], labels[keep])
    temperature = fit_temperature(scores, truth)
    return HeadFit(
        temperature=temperature,
        items=len(truth),
        ece_before=expected_calibration_error(scaled_probabilities(scores), truth, bins),
        ece_after=expected_calibration_error(scaled_probabilities(scores, temperature), truth, bins),
        nll_before=negative_log_likelihood(scores, truth),
        nll_after=negative_log_likelihood(scores, truth, temperature),
    )


@dataclass(frozen=True)
class OffsetSample:
    """The photographs the decision offsets are fitted on: per head their logits (N, 5) and labels (N,), -1
    where missing; each row's weight (`stratified_sample`); the split and the sample's cap per ICDR grade."""

    logits: Mapping[str, np.ndarray]
    labels: Mapping[str, np.ndarray]
    weights: np.ndarray
    split: str
    per_grade: int


def _fit_offsets(sample: OffsetSample, temperatures: Mapping[str, float]) -> DecisionOffsets:
    fitted, items, before, after = {}, {}, {}, {}
    for head in HEADS:
        truth = np.asarray(sample.labels[head])
        keep = truth >= 0
        if not keep.any():
            raise ValueError(f"no labelled {head.upper()} grades in split {sample.split!r} to fit offsets on")
        scores = scaled_logits(np.asarray(sample.logits[head])[keep], temperatures[head])
        weights = np.asarray(sample.weights, dtype=np.float64)[keep]
        fitted[head] = fit_offsets(scores, truth[keep], weights)
        items[head] = int(keep.sum())
        before[head] = macro_f1(scores, truth[keep], None, weights)
        after[head] = macro_f1(scores, truth[keep], fitted[head], weights)
    return DecisionOffsets(icdr=[float(v) for v in fitted["icdr"]], sdrg=[float(v) for v in fitted["sdrg"]],
                           split=sample.split, items=items, per_grade=sample.per_grade,
                           macro_f1_before=before, macro_f1_after=after)


def fit_calibration(
    logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], *, archive: str, split: str,
    weights_sha256: str | None, bins: int = DEFAULT_BINS, offsets: OffsetSample | None = None,
) -> Calibration:
    """Fit both heads ("icdr", "sdrg": logits (N, 5) and labels (N,), -1 where missing) and return the
    `Calibration` the bundle carries. With `offsets`, decision offsets are fitted on that sample after the
    temperatures, and the ECE and NLL "after" on (logits, labels) include them."""
    fits = {head: fit_head(logits[head], labels[head], bins) for head in HEADS}
    temperatures = {head: fit.temperature for head, fit in fits.items()}
    decision = _fit_offsets(offsets, temperatures) if offsets is not None else None
    ece_after = {head: fit.ece_after for head, fit in fits.items()}
    nll_after = {head: fit.nll_after for head, fit in fits.items()}
    if decision is not None:
        for head in HEADS:
            truth = np.asarray(labels[head])
            keep = truth >= 0
            scores, shift = np.asarray(logits[head], dtype=np.float64)[keep], getattr(decision, head)
            ece_after[head] = expected_calibration_error(
                scaled_probabilities(scores, temperatures[head], shift), truth[keep], bins)
            nll_after[head] = negative_log_likelihood(scores, truth[keep], temperatures[head], shift)
    return Calibration(
        icdr_temperature=fits["icdr"].temperature,
        sdrg_temperature=fits["sdrg"].temperature,
        inputs=["image"],
        archive=archive,
        split=split,
        items={head: fit.items for head, fit in fits.items()},
        weights_sha256=weights_sha256,
        bins=bins,
        ece_before={head: fit.ece_before for head, fit in fits.items()},
        ece_after=ece_after,
        nll_before={head: fit.nll_before for head, fit in fits.items()},
        nll_after=nll_after,
        created=now_iso(),
        offsets=decision,
    )


def save_calibration(calibration: Calibration, path: Path) -> Path:
    """Write a calibration as JSON (through a temporary file, never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(calibration.model_dump_json(indent=1) + "\n")
    tmp.replace(path)
    return path


def load_calibration(path: Path) -> Calibration:
    """Read a calibration file; ValueError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration file not found: {path}")
    try:
        return Calibration.model_validate_json(path.read_text())
    except ValidationError as error:
        raise ValueError(f"{path}: not a calibration written by `retina-train calibrate`: {error}") from None


def run_calibration(run_dir: Path, explicit: Path | None = None) -> Calibration | None:
    """The calibration to use with a run: `explicit` when given, else `RUN/calibration.json` when present,
    else None."""
    if explicit is not None:
        return load_calibration(explicit)
    own = Path(run_dir) / CALIBRATION_FILE
    return load_calibration(own) if own.is_file() else None


def check_weights(calibration: Calibration, weights_sha256: str, source: str = "the calibration") -> None:
    """ValueError when the calibration was fitted on other weights than `weights_sha256`."""
    if calibration.weights_sha256 is not None and calibration.weights_sha256 != weights_sha256:
        raise ValueError(
            f"{source} was fitted on other weights (checkpoint sha256 {calibration.weights_sha256[:12]}...) than "
            f"this run's ({weights_sha256[:12]}...): calibrate again with `retina-train calibrate`"
        )


def image_logits(run: LoadedRun, data: SplitData, batch_size: int = 64) -> dict[str, np.ndarray]:
    """ICDR and SDRG logits (N, 5) of a split's photographs through the model alone (image only, as
    `/grade` sees an upload and `retina-train evaluate` grades), fp32, eval mode."""
    import torch

    from training.data import normalise

    model = run.model.float().eval()
    if model.config.grading == "zero_shot":
        raise ValueError(f"{model.config.name} has no grading heads (it grades zero-shot): nothing to calibrate")
    device = next(model.parameters()).device
    image = model.config.vision.image
    icdr, sdrg = [], []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            images = torch.from_numpy(data.images[start : start + batch_size])
            pixels = normalise(images, image.mean, image.std).to(device)
            fused = model.fuse(pixels=pixels)
            icdr.append(fused.icdr_logits.float().cpu().numpy())
            sdrg.append(fused.sdrg_logits.float().cpu().numpy())
    if not icdr:
        raise ValueError("the split is empty")
    return {"icdr": np.concatenate(icdr), "sdrg": np.concatenate(sdrg)}


def calibration_metrics(
    logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], calibration: Calibration | None,
    bins: int = DEFAULT_BINS, source: str | None = None,
) -> tuple[dict, dict[str, dict[str, Reliability]]]:
    """The `calibration` section of `retina-train evaluate`'s metrics: per head ECE and NLL before
    (T = 1) and, with a calibration, after (its temperatures and decision offsets); and the reliability data of each
    ("before", "after") for the diagram."""
    section: dict = {
        "bins": bins,
        "temperatures": None if calibration is None else {h: calibration.temperature(h) for h in HEADS},
        "offsets": None if calibration is None or calibration.offsets is None
        else {h: list(calibration.offsets_of(h)) for h in HEADS},
        "source": source,
        "fitted_on": None if calibration is None else f"{calibration.archive} split {calibration.split}",
        "note": "ECE of top-label confidence, equal-width bins; grades from the photograph alone"
        + ("" if calibration is not None else
           "; no calibration (no RUN/calibration.json, no --calibration): before only"),
    }
    diagrams: dict[str, dict[str, Reliability]] = {}
    for head in HEADS:
        scores = np.asarray(logits[head], dtype=np.float64)
        truth = np.asarray(labels[head])
        keep = truth >= 0
        if not keep.any():
            section[head] = None
            continue
        scores, truth = scores[keep], truth[keep].astype(np.int64)
        before = reliability(scaled_probabilities(scores), truth, bins)
        entry: dict = {"items": int(len(truth)), "ece_before": before.ece,
                       "nll_before": negative_log_likelihood(scores, truth), "ece_after": None, "nll_after": None}
        diagrams[head] = {"before": before}
        if calibration is not None:
            temperature, shift = calibration.temperature(head), calibration.offsets_of(head)
            after = reliability(scaled_probabilities(scores, temperature, shift), truth, bins)
            entry.update(ece_after=after.ece, nll_after=negative_log_likelihood(scores, truth, temperature, shift))
            diagrams[head]["after"] = after
        section[head] = entry
    return section, diagrams


def plot_reliability(diagrams: Mapping[str, Mapping[str, Reliability]], out: Path, title: str = "") -> Path:
    """A reliability-diagram PNG: per head, accuracy against confidence in each bin before and after
    calibration (the diagonal is perfect calibration) above the number of photographs per bin."""
    from matplotlib.figure import Figure  # here: export and calibrate never draw

    heads = [head for head in HEADS if head in diagrams]
    if not heads:
        raise ValueError("no reliability data to plot")
    fig = Figure(figsize=(5.2 * len(heads), 6.8), layout="constrained")
    axes = fig.subplots(2, len(heads), squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    styles = {"before": ("tab:red", "o", "before (T = 1)"), "after": ("tab:blue", "s", "after")}
    for column, head in enumerate(heads):
        top, bottom = axes[0][column], axes[1][column]
        top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
        for name, data in diagrams[head].items():
            colour, marker, label = styles.get(name, ("black", "x", name))
            filled = data.counts > 0
            top.plot(data.confidence[filled], data.accuracy[filled], color=colour, marker=marker, markersize=4,
                     linewidth=1.4, label=f"{label}: ECE {data.ece:.4f}")
            centres = (data.edges[:-1] + data.edges[1:]) / 2
            width = (data.edges[1] - data.edges[0]) * 0.42
            offset = -width / 2 if name == "before" else width / 2
            bottom.bar(centres + offset, data.counts, width=width, color=colour, alpha=0.7, label=label)
        top.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy",
                title=f"{head.upper()} reliability")
        top.grid(alpha=0.3)
        top.legend(loc="upper left", fontsize=8)
        bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="photographs")
        bottom.set_yscale("symlog", linthresh=1)
        bottom.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
