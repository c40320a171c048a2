"""The run report: PNGs that open and show something, and a report.md that carries the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from index.records import ICDR_NAMES, SDRG_NAMES
from training.evaluation.metrics import (
    bidirectional_instance_recall,
    category_retrieval,
    format_number,
    grading_metrics,
    referable_metrics,
)
from training.evaluation.report import plot_confusion, plot_loss_curves, plot_retrieval_grid, write_report


def _check_png(path: Path, min_width: int, min_height: int) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 5.0  # not a blank canvas


def test_loss_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    log = []
    for step in range(120):
        entry = {"step": step, "epoch": step // 40, "total": 3.0 * np.exp(-step / 50) + 0.1 * rng.random()}
        entry["contrastive"] = 2.0 * np.exp(-step / 40) + 0.1 * rng.random()
        if step % 3 == 0:  # a loss logged only on some steps
            entry["mlm"] = float(np.float32(1.0 + rng.random()))
        log.append(entry)
    out = plot_loss_curves(log, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    _check_png(out, 600, 250)


def test_confusion_plot(tmp_path: Path) -> None:
    matrix = [[50, 3, 1, 0, 0], [4, 10, 2, 0, 0], [1, 2, 8, 1, 0], [0, 0, 1, 3, 1], [0, 0, 0, 0, 0]]
    out = plot_confusion(matrix, SDRG_NAMES, "SDRG (test)", tmp_path / "confusion_sdrg.png")
    _check_png(out, 400, 400)


def _photo(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (300, 300), colour).save(path)
    return path


def test_retrieval_grid(tmp_path: Path) -> None:
    red, green = _photo(tmp_path / "a.jpg", (200, 60, 40)), _photo(tmp_path / "b.png", (40, 160, 60))
    queries = [
        "Moderate non-proliferative diabetic retinopathy: dot and blot haemorrhages with hard exudates in "
        "both hemi-fields, no neovascularisation; the optic disc is healthy and the macula is flat.",
        "No diabetic retinopathy.",
    ]
    results = [
        [
            (red, "grade 2, 0.91", True),
            (green, "grade 0, 0.80", False),
            (tmp_path / "gone.jpg", "grade 1", False),
        ],
        [(green, "grade 0, 0.95", True)],
    ]
    out = plot_retrieval_grid(queries, results, tmp_path / "grid.png")
    _check_png(out, 500, 300)


def test_write_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    text = rng.normal(size=(40, 8))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image = text + 0.2 * rng.normal(size=text.shape)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    keys = [i % 25 for i in range(40)]
    grades = [i % 5 for i in range(40)]
    probs = 0.5 * np.eye(5)[grades] + 0.5 * rng.dirichlet(np.ones(5), size=40)
    metrics = {
        "instance": {
            "text-image": bidirectional_instance_recall(text, image, keys, keys, names=("text", "image"))
        },
        "category": {"text-image": category_retrieval(text, image, grades, grades, names=ICDR_NAMES)},
        "icdr": grading_metrics(grades, probs, ICDR_NAMES),
        "sdrg": grading_metrics(grades + [-1], np.vstack([probs, probs[:1]]), SDRG_NAMES),
        "referable": referable_metrics(grades, probs),
    }
    loss = plot_loss_curves([{"step": s, "total": 1.0 / (s + 1)} for s in range(10)], tmp_path / "loss.png")
    confusion = plot_confusion(metrics["icdr"]["confusion_matrix"], ICDR_NAMES, "ICDR", tmp_path / "cm.png")
    path = write_report(
        metrics,
        tmp_path,
        "Run demo",
        {"loss curves": loss, "ICDR confusion": confusion},
        ["Synthetic archive: numbers are not BRSET's."],
    )
    assert path == tmp_path / "report.md"
    text_md = path.read_text()
    assert text_md.startswith("# Run demo")
    t2i = metrics["instance"]["text-image"]["a_to_b"]
    for value in (t2i["R@1"], t2i["ceiling@1"], t2i["unique_fit"]):
        assert format_number(value) in text_md
    assert "text->image" in text_md and "image->text" in text_md
    assert "| text->image | 40 | 40 |" in text_md
    assert format_number(metrics["category"]["text-image"]["mAP"]) in text_md
    assert format_number(metrics["icdr"]["quadratic_kappa"]) in text_md
    assert format_number(metrics["icdr"]["per_class_recall"][ICDR_NAMES[4]]) in text_md
    assert format_number(metrics["referable"]["auroc"]) in text_md
    assert "| 41 |" not in text_md and "| 40 | 1 |" in text_md  # SDRG: 40 graded, 1 ignored
    assert "![loss curves](loss.png)" in text_md and "![ICDR confusion](cm.png)" in text_md
    assert "- Synthetic archive: numbers are not BRSET's." in text_md
