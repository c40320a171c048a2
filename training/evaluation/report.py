"""The run report: PNG plots (loss curves, confusion matrices, retrieval examples) and `report.md`.

Figures are drawn on `matplotlib.figure.Figure` objects (rendered by the Agg backend), never through
pyplot, so no global plotting state or display is involved.
"""

from __future__ import annotations

import math
import numbers
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from training.evaluation.metrics import direction_labels, format_number, summarise

NON_SERIES_KEYS = frozenset({"step", "epoch"})
THUMBNAIL_PIXELS = 256
HIT_COLOUR = "#1a9641"
MISS_COLOUR = "#d7191c"


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _wrap(text: str, width: int, max_lines: int) -> str:
    lines = textwrap.wrap(" ".join(text.split()), width=width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1].rstrip() + "…"
    return "\n".join(lines)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Centred moving average over about a twentieth of the series (no lag, shorter windows at the ends)."""
    window = max(1, len(values) // 20) | 1
    kernel = np.ones(window)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones(len(values)), kernel, mode="same")


def plot_loss_curves(steps_log: list[dict[str, Any]], out: Path) -> Path:
    """One PNG with a subplot per logged loss ("total" first): the raw series faint, a smoothed one on top.

    `steps_log` holds one dict per step with "step", optionally "epoch", and numeric loss values; a loss
    missing (or not finite) at some steps is drawn over the steps that have it. Epoch changes are marked.
    """
    if not steps_log:
        raise ValueError("the step log is empty")
    names: list[str] = []
    for entry in steps_log:
        for key, value in entry.items():
            if (
                key not in NON_SERIES_KEYS
                and key not in names
                and isinstance(value, numbers.Real)
                and not isinstance(value, bool)
            ):
                names.append(key)
    if not names:
        raise ValueError("the step log has no numeric series besides step/epoch")
    names.sort(key=lambda name: name != "total")  # stable: the others keep their first-seen order
    steps = np.array([entry.get("step", i) for i, entry in enumerate(steps_log)], dtype=float)
    epochs = [entry.get("epoch") for entry in steps_log]
    epoch_starts = [steps[i] for i in range(1, len(epochs)) if epochs[i] != epochs[i - 1]]

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.8 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for index, name in enumerate(names):
        ax = axes[index // cols][index % cols]
        raw = np.array([entry.get(name, np.nan) for entry in steps_log], dtype=float)
        present = np.isfinite(raw)
        x, y = steps[present], raw[present]
        if len(y):
            ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label="raw")
            ax.plot(x, _smooth(y), color="tab:blue", linewidth=1.8, label="smoothed")
        if len(epoch_starts) <= 50:
            for start in epoch_starts:
                ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for index in range(len(names), rows * cols):
        axes[index // cols][index % cols].set_axis_off()
    axes[0][0].legend(loc="upper right", fontsize=8)
    return _save(fig, out)


def _class_label(index: int, name: str) -> str:
    return f"{index}: " + _wrap(name, width=20, max_lines=3)


def plot_confusion(
    matrix: Sequence[Sequence[int]] | np.ndarray, names: Sequence[str], title: str, out: Path
) -> Path:
    """An annotated confusion matrix PNG: counts (and row share) in each cell, shaded by the row share."""
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.shape != (len(names), len(names)):
        raise ValueError(f"matrix shape {counts.shape} does not match {len(names)} class names")
    row_sums = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    n = len(names)
    fig = Figure(figsize=(1.4 * n + 3.0, 1.2 * n + 2.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n{shares[i, j]:.0%}",
                ha="center",
                va="center",
                color=colour,
                fontsize=9,
            )
    labels = [_class_label(i, name) for i, name in enumerate(names)]
    ax.set_xticks(range(n), labels, fontsize=7, rotation=45, ha="right")
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the true class (row)")
    return _save(fig, out)


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            return np.asarray(image)
    except (OSError, ValueError):
        return None


def plot_retrieval_grid(queries: list[str], results: list[list[tuple[Path, str, bool]]], out: Path) -> Path:
    """A grid of retrieval examples: a row per text query, its text on the left, then the photographs found.

    `results[i]` lists (image path, caption such as grade and score, hit) for query i, best first; a hit
    is framed green, a miss red. A photograph that cannot be read is drawn as a grey "unreadable" tile.
    """
    if len(queries) != len(results):
        raise ValueError(f"{len(queries)} queries but {len(results)} result lists")
    if not queries:
        raise ValueError("no queries to draw")
    k = max(1, max(len(row) for row in results))
    fig = Figure(figsize=(3.6 + 1.9 * k, 2.2 * len(queries)), layout="constrained")
    axes = fig.subplots(len(queries), k + 1, squeeze=False, gridspec_kw={"width_ratios": [1.9] + [1.0] * k})
    for row, (query, retrieved) in enumerate(zip(queries, results, strict=True)):
        text_ax = axes[row][0]
        text_ax.set_axis_off()
        text_ax.text(
            0.0, 0.5, _wrap(query, width=46, max_lines=3), va="center", ha="left", fontsize=9, wrap=False
        )
        for col in range(k):
            ax = axes[row][col + 1]
            if col >= len(retrieved):
                ax.set_axis_off()
                continue
            path, caption, hit = retrieved[col]
            pixels = _thumbnail(Path(path))
            if pixels is None:
                ax.imshow(np.full((8, 8, 3), 200, dtype=np.uint8))
                ax.text(3.5, 3.5, "unreadable", ha="center", va="center", fontsize=7)
            else:
                ax.imshow(pixels)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(HIT_COLOUR if hit else MISS_COLOUR)
                spine.set_linewidth(4)
            ax.set_xlabel(caption, fontsize=7)
    return _save(fig, out)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines + [""]


def _ks(result: dict[str, Any], prefix: str) -> list[int]:
    return sorted(int(key.split("@")[1]) for key in result if key.startswith(f"{prefix}@"))


def _instance_section(instance: dict[str, Any]) -> list[str]:
    lines = ["## Instance retrieval", ""]
    lines.append(
        "R@k: the paired item within the top k. fit_R@k: some item whose descriptors match the query's within"
        " the top k. ceiling@k: the expected R@k of a perfect model, since records that the text cannot tell"
        " apart tie. unique fit: the share of queries that exactly one gallery item matches."
    )
    lines.append("")
    for setting, entry in instance.items():
        directions = direction_labels(entry)
        first = directions[0][1]
        ks = _ks(first, "R")
        has_keys = "ceiling@1" in first
        header = ["direction", "queries", "gallery"] + [f"R@{k}" for k in ks]
        if has_keys:
            header += [f"fit_R@{k}" for k in ks] + [f"ceiling@{k}" for k in ks] + ["unique fit"]
        header += ["median rank"]
        rows = []
        for direction, result in directions:
            row = [direction or setting, str(result["queries"]), str(result["gallery_size"])]
            row += [format_number(result[f"R@{k}"]) for k in ks]
            if has_keys:
                row += [format_number(result.get(f"fit_R@{k}")) for k in ks]
                row += [format_number(result.get(f"ceiling@{k}")) for k in ks]
                row += [format_number(result.get("unique_fit"))]
            row += [format_number(result["median_rank"], 1)]
            rows.append(row)
        lines += [f"### {setting}", ""] + _table(header, rows)
        unfit = sum(result.get("paired_unfit", 0) for _, result in directions)
        if unfit:
            lines += [f"Warning: {unfit} queries do not match their own paired item's descriptors.", ""]
    return lines


def _category_section(category: dict[str, Any]) -> list[str]:
    lines = ["## Category retrieval (a hit shares the query's grade)", ""]
    for setting, result in category.items():
        ks = _ks(result, "P")
        per_class_key = next(key for key in result if key.startswith("per_class_P@"))
        class_k = per_class_key.split("@")[1]
        header = (
            ["queries", "gallery", "excluded"]
            + [f"P@{k}" for k in ks]
            + ["mAP", f"macro P@{class_k}", "macro mAP"]
        )
        row = [str(result["queries"]), str(result["gallery_size"]), str(result["excluded_queries"])]
        row += [format_number(result[f"P@{k}"]) for k in ks]
        row += [format_number(result["mAP"]), format_number(result[f"macro_P@{class_k}"])]
        row += [format_number(result["macro_mAP"])]
        lines += [f"### {setting}", ""] + _table(header, [row])
        class_rows = [
            [
                name,
                str(result["per_class_queries"][name]),
                format_number(value),
                format_number(result["per_class_mAP"][name]),
            ]
            for name, value in result[per_class_key].items()
        ]
        lines += _table(["class", "queries", f"P@{class_k}", "mAP"], class_rows)
        if result["excluded_queries"] or result["missing_label_queries"]:
            lines += [
                f"Excluded: {result['excluded_queries']} queries whose grade no gallery item has, "
                f"{result['missing_label_queries']} with no grade.",
                "",
            ]
    return lines


def _consensus_section(result: dict[str, Any]) -> list[str]:
    """The neighbours' consensus: the k nearest photographs' grade against the truth and the model's grade."""
    k = result["k"]
    lines = [f"## The neighbours' consensus (the {k} nearest photographs' grade vs the model's)", ""]
    lines.append(
        f"Each photograph's {k} nearest other photographs of the split (image->image, itself excluded) vote "
        "with their true ICDR grade; the majority grade (ties: the larger summed similarity, then the more "
        "severe grade) and the referable vote (at least half the voters referable) are compared with the truth "
        "and with the model's grade. Disagreement is the flag: recall is the share of the model's wrong grades "
        "it flags, precision the share of flags that are model errors."
    )
    lines.append("")
    header = ["level", "queries", "kNN accuracy", "kNN quadratic kappa", "model accuracy", "agreement",
              "model error when agreeing", "model error when disagreeing", "errors flagged (recall)",
              "flags that are errors (precision)", "kNN right when disagreeing"]
    rows = []
    settings = [("", result)]
    if "other_groups" in result:
        settings.append((", other patients only", result["other_groups"]))
    for suffix, figures in settings:
        for level, name in (("icdr", "ICDR grade"), ("referable", "referable (ICDR >= 2)")):
            entry = figures[level]
            rows.append([name + suffix, str(entry["n"])] + [format_number(entry[key]) for key in (
                "knn_accuracy", "knn_quadratic_kappa", "model_accuracy", "agreement", "model_error_when_agree",
                "model_error_when_disagree", "flag_recall", "flag_precision", "knn_right_when_disagree")])
    lines += _table(header, rows)
    icdr = result["icdr"]
    lines.append(
        f"ICDR: {icdr['disagreements']} disagreements, {icdr['model_errors']} model errors, "
        f"{icdr['flagged_errors']} errors flagged; voters per query {format_number(result['mean_known'], 2)} "
        f"on average (majority share {format_number(result['mean_share'], 3)}); gallery {result['gallery_size']}; "
        f"{result['no_vote_queries']} queries without a vote, {result['missing_label_queries']} without a grade."
    )
    if "same_group_share" in result:
        lines.append("")
        lines.append(
            f"Of the {k} nearest, {format_number(result['same_group_share'])} on average are photographs of the "
            "query's own patient (the other eye, another visit); 'other patients only' leaves the query's patient "
            "out of its gallery, as for a new patient's photograph."
        )
    return lines + [""]


def _grading_section(task: str, result: dict[str, Any]) -> list[str]:
    lines = [f"## {task.upper()} grading", ""]
    lines += _table(
        ["n", "ignored (no grade)", "accuracy", "macro-F1", "quadratic kappa"],
        [
            [
                str(result["n"]),
                str(result["ignored"]),
                format_number(result["accuracy"]),
                format_number(result["macro_f1"]),
                format_number(result["quadratic_kappa"]),
            ]
        ],
    )
    predicted = result.get("predicted", {})
    rows = [
        [
            f"{i}: {name}",
            str(result["support"][name]),
            str(predicted.get(name, 0)),
            format_number(result["per_class_recall"][name]),
            format_number(result["per_class_f1"][name]),
        ]
        for i, name in enumerate(result["names"])
    ]
    lines += _table(["class", "support", "predicted", "recall", "F1"], rows)
    matrix = result.get("confusion_matrix")
    if matrix is not None:
        header = ["true \\ predicted"] + [str(j) for j in range(len(matrix))]
        lines += _table(header, [[str(i)] + [str(v) for v in row] for i, row in enumerate(matrix)])
    return lines


def _referable_section(result: dict[str, Any]) -> list[str]:
    lines = ["## Referable diabetic retinopathy (ICDR >= 2)", ""]
    lines += _table(
        [
            "n",
            "positives",
            "negatives",
            "AUROC",
            "average precision",
            "decision",
            "sensitivity",
            "specificity",
        ],
        [
            [
                str(result["n"]),
                str(result["positives"]),
                str(result["negatives"]),
                format_number(result["auroc"]),
                format_number(result["average_precision"]),
                result["decision_rule"],
                format_number(result["sensitivity"]),
                format_number(result["specificity"]),
            ]
        ],
    )
    point = result["operating_point"]
    lines.append(
        f"Operating point chosen on these data for sensitivity >= {point['target_sensitivity']:g}: "
        f"threshold {format_number(point['threshold'])}, sensitivity {format_number(point['sensitivity'])}, "
        f"specificity {format_number(point['specificity'])} (optimistic: picked on the evaluation set)."
    )
    return lines + [""]


def _calibration_section(result: dict[str, Any]) -> list[str]:
    """Per grade head: photographs, temperature, ECE and NLL before and after calibration."""
    temperatures = result.get("temperatures") or {}
    rows = []
    for head in ("icdr", "sdrg"):
        entry = result.get(head)
        if not entry:
            continue
        rows.append([head.upper(), str(entry["items"]), format_number(temperatures.get(head)),
                     format_number(entry["ece_before"]), format_number(entry.get("ece_after")),
                     format_number(entry["nll_before"]), format_number(entry.get("nll_after"))])
    lines = ["## Calibration (grades from the photograph)", ""]
    if not temperatures:
        lines += ["No calibration for this run (`retina-train calibrate` writes one): before only.", ""]
    else:
        lines += [f"Temperatures from `{result.get('source')}`, fitted on {result.get('fitted_on')}.", ""]
    bins = result.get("bins")
    lines += [f"ECE: expected calibration error of the top grade's probability in {bins} equal-width bins "
              "(0 is perfectly calibrated); NLL: mean negative log-likelihood of the true grade.", ""]
    return lines + _table(["head", "photographs", "temperature", "ECE before", "ECE after", "NLL before",
                           "NLL after"], rows)


def write_report(
    metrics: dict[str, Any], out_dir: Path, title: str, figures: dict[str, Path], notes: list[str]
) -> Path:
    """Write `out_dir/report.md`: headline numbers, the metric tables of each section, figures and notes.

    `metrics` is the combined dict described in `training.evaluation.metrics`; figures are linked by
    their path relative to `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "Shares are fractions (1.0000 = 100%); n/a marks an undefined number.", ""]
    headline = summarise(metrics)
    if headline:
        lines += ["## Headline", ""] + _table(
            ["metric", "value"], [[name, format_number(v)] for name, v in headline]
        )
    if metrics.get("instance"):
        lines += _instance_section(metrics["instance"])
    if metrics.get("category"):
        lines += _category_section(metrics["category"])
    if metrics.get("consensus"):
        lines += _consensus_section(metrics["consensus"])
    for task in ("icdr", "sdrg"):
        if task in metrics:
            lines += _grading_section(task, metrics[task])
    if metrics.get("calibration"):
        lines += _calibration_section(metrics["calibration"])
    if "referable" in metrics:
        lines += _referable_section(metrics["referable"])
    if figures:
        lines += ["## Figures", ""]
        for name, path in figures.items():
            link = Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix()
            lines += [f"### {name}", "", f"![{name}]({link})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
