"""`retina-train crossval`: k-fold, patient-level cross-validation of three ways to grade an archive.

For each fold (patients never straddle train and test; folds stratified by ICDR grade):

- `finetune`: the starting model (e.g. the shipped `zoo:tiny-synth`) trained further on the fold's
  training photographs, all its weights updated;
- `scratch`: the same architecture from random init, trained the same way;
- `probe`: a linear probe (multinomial logistic regression) on the starting model's frozen image
  embeddings, the protocol RETFound users ask for.

Each is scored on the fold's test photographs from the photograph alone: ICDR quadratic-weighted kappa,
accuracy and referable-DR (ICDR >= 2) AUROC; the summary gives the mean and standard deviation across
folds. Small real archives (e.g. the 130 EyePACS photographs) give wide spreads: report them as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from index.archive.brset import read_archive
from index.records import ICDR_NAMES, REFERABLE_ICDR
from training.data import normalise, stored_narrative
from training.evaluate import embed_split
from training.evaluation.metrics import grading_metrics, referable_metrics
from training.run import load_run, split_for_evaluation
from training.splits import save_splits
from training.train import FitOptions, fit

METHODS: tuple[str, ...] = ("finetune", "scratch", "probe")


@dataclass(frozen=True)
class CrossValOptions:
    """What to cross-validate and how long each training runs."""

    archive: Path
    init: Path
    out: Path
    folds: int = 5
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-4
    balance: float = 0.0
    seed: int = 0
    methods: tuple[str, ...] = METHODS


@dataclass
class FoldScore:
    """One method on one fold."""

    method: str
    fold: int
    test_images: int
    kappa: float | None
    accuracy: float | None
    referable_auroc: float | None
    extra: dict = field(default_factory=dict)


def patient_folds(
    image_ids: list[str], grades: list[int], patients: list[str], folds: int, seed: int
) -> list[list[str]]:
    """Test image ids of each fold: patient-level, stratified by ICDR grade (scikit-learn)."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    ids = np.array(image_ids)
    return [list(ids[test]) for _, test in splitter.split(ids, grades, groups=patients)]


def _scores(method: str, fold: int, truth: np.ndarray, probabilities: np.ndarray) -> FoldScore:
    grading = grading_metrics(truth, probabilities, list(ICDR_NAMES))
    referable = referable_metrics(truth, probabilities)
    return FoldScore(method, fold, len(truth), grading["quadratic_kappa"], grading["accuracy"], referable["auroc"])


def _grade_with_run(run_dir: Path, archive_dir: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """ICDR truth and the run's photograph-only ICDR probabilities for the given images."""
    run = load_run(run_dir)
    data = split_for_evaluation(read_archive(archive_dir), ids, run)
    embeddings = embed_split(run, data, [stored_narrative(r) for r in data.records])
    return data.icdr, embeddings.icdr_probabilities


@torch.no_grad()
def _image_embeddings(run_dir: Path, archive_dir: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    run = load_run(run_dir)
    data = split_for_evaluation(read_archive(archive_dir), ids, run)
    config = run.model.config
    rows = []
    for start in range(0, len(data), 32):
        image = config.vision.image
        pixels = normalise(torch.from_numpy(data.images[start : start + 32]), image.mean, image.std)
        rows.append(run.model.encode_image(pixels).float().numpy())
    return np.concatenate(rows), data.icdr


def _probe(
    init: Path, archive: Path, train_ids: list[str], test_ids: list[str], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on frozen image embeddings; probabilities for all five grades."""
    x_train, y_train = _image_embeddings(init, archive, train_ids)
    x_test, y_test = _image_embeddings(init, archive, test_ids)
    probabilities = np.zeros((len(x_test), len(ICDR_NAMES)))
    classes = np.unique(y_train)
    if len(classes) < 2:  # a fold whose training photographs share one grade: the probe can only say that
        probabilities[:, classes[0]] = 1.0
        return y_test, probabilities
    probe = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    probe.fit(x_train, y_train)
    probabilities[:, probe.classes_] = probe.predict_proba(x_test)
    return y_test, probabilities


def summarise_scores(scores: list[FoldScore]) -> dict[str, dict[str, float | None]]:
    """Mean and standard deviation across folds of each method's kappa, accuracy and AUROC."""
    summary: dict[str, dict[str, float | None]] = {}
    for method in dict.fromkeys(s.method for s in scores):
        rows = [s for s in scores if s.method == method]
        entry: dict[str, float | None] = {"folds": float(len(rows))}
        for name in ("kappa", "accuracy", "referable_auroc"):
            values = [getattr(s, name) for s in rows if getattr(s, name) is not None]
            entry[f"{name}_mean"] = float(np.mean(values)) if values else None
            entry[f"{name}_std"] = float(np.std(values)) if values else None
        summary[method] = entry
    return summary


def format_summary(summary: dict[str, dict[str, float | None]]) -> str:
    """The summary as a markdown table (mean +- standard deviation across folds)."""
    def cell(entry: dict[str, float | None], name: str) -> str:
        mean, std = entry.get(f"{name}_mean"), entry.get(f"{name}_std")
        return "n/a" if mean is None else f"{mean:.3f} +- {std:.3f}"

    lines = ["| method | folds | ICDR kappa | ICDR accuracy | referable AUROC |", "|---|---:|---|---|---|"]
    for method, entry in summary.items():
        lines.append(f"| {method} | {int(entry['folds'] or 0)} | {cell(entry, 'kappa')} | {cell(entry, 'accuracy')} | "
                     f"{cell(entry, 'referable_auroc')} |")
    return "\n".join(lines) + "\n"


def cross_validate(options: CrossValOptions, on_fold: Callable[[FoldScore], None] | None = None) -> dict:
    """Run every method on every fold; writes OUT/crossval.json and OUT/crossval.md, returns the results."""
    unknown = set(options.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    archive = read_archive(options.archive)
    graded = [r for r in archive.records if r.dr_icdr is not None]
    if len({r.patient_id for r in graded}) < options.folds:
        raise ValueError(f"{options.archive}: fewer patients with an ICDR grade than --folds {options.folds}")
    init = Path(options.init)
    config = init / "config.json"
    folds = patient_folds([r.image_id for r in graded], [int(r.dr_icdr) for r in graded],
                          [r.patient_id for r in graded], options.folds, options.seed)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    scores: list[FoldScore] = []
    for fold, test_ids in enumerate(folds):
        held = set(test_ids)
        train_ids = [r.image_id for r in graded if r.image_id not in held]
        folder = out / f"fold-{fold}"
        folder.mkdir(exist_ok=True)
        # `fit` trains on "train" only; "val" must exist and is the fold's test set (never trained on).
        splits_path = folder / "splits.json"
        save_splits({"train": train_ids, "val": test_ids, "test": test_ids}, splits_path)
        for method in options.methods:
            if method == "probe":
                truth, probabilities = _probe(init, options.archive, train_ids, test_ids, options.seed)
            else:
                run = folder / method
                if not (run / "run.json").is_file() or not json.loads((run / "run.json").read_text()).get("finished"):
                    fit(FitOptions(
                        config=str(config), archive=options.archive, splits=splits_path, out=run,
                        epochs=options.epochs, batch_size=min(options.batch_size, len(train_ids)), lr=options.lr,
                        balance=options.balance, seed=options.seed, init=init if method == "finetune" else None,
                    ))
                truth, probabilities = _grade_with_run(run, options.archive, test_ids)
            score = _scores(method, fold, truth, probabilities)
            score.extra = {"referable_in_test": int((truth >= REFERABLE_ICDR).sum())}
            scores.append(score)
            if on_fold:
                on_fold(score)
    summary = summarise_scores(scores)
    result = {
        "archive": str(options.archive), "init": str(options.init), "folds": options.folds,
        "epochs": options.epochs, "batch_size": options.batch_size, "lr": options.lr, "seed": options.seed,
        "scores": [vars(s) for s in scores], "summary": summary,
    }
    (out / "crossval.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "crossval.md").write_text(
        f"# {options.folds}-fold patient-level cross-validation of {options.archive}\n\n"
        f"Starting model {options.init}; {options.epochs} epochs, batch {options.batch_size}, lr {options.lr:g}, "
        f"seed {options.seed}. Grades from the photograph alone.\n\n" + format_summary(summary)
    )
    return result
