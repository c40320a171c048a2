"""`retina-train evaluate` and `compare` on a briefly trained run: every artefact, sane metrics, and the
DeepEyeNet zero-shot path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from index.archive.brset import read_archive
from training.cli import app
from training.evaluate import ceiling, evaluate_deepeyenet, query_texts
from training.splits import make_splits, save_splits
from training.synth.archive import write_archive
from training.synth.priors import sample_records
from training.synth.render import render_fundus
from training.text.narratives import compose_narrative
from training.train import FitOptions, fit

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    write_archive(sample_records(90, seed=4), root / "archive", size=224, seed=7)
    splits = make_splits(read_archive(root / "archive").records, seed=0)
    save_splits(splits, root / "splits.json")
    paths = {"archive": root / "archive", "splits": root / "splits.json"}
    for config in ("tiny", "clip-baseline"):
        fit(FitOptions(config=config, archive=root / "archive", splits=root / "splits.json", out=root / config,
                       epochs=1, batch_size=16, max_steps=2, precision="bf16"))
        paths[config] = root / config
    return paths


def test_evaluate_writes_metrics_report_and_figures(trained: dict[str, Path]) -> None:
    result = runner.invoke(app, ["evaluate", "--run", str(trained["tiny"]), "--archive", str(trained["archive"]),
                                 "--splits", str(trained["splits"])])
    assert result.exit_code == 0, result.output
    out = trained["tiny"] / "eval-test"
    for name in ("metrics.json", "report.md", "confusion_icdr.png", "confusion_sdrg.png", "loss_curves.png",
                 "retrieval_examples.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    test_size = len(json.loads(trained["splits"].read_text())["test"])
    for setting in ("text-image", "text-record"):
        forward = metrics["instance"][setting]["a_to_b"]
        assert forward["gallery_size"] == test_size
        assert 0 <= forward["R@1"] <= forward["R@5"] <= forward["R@10"] <= 1
        assert 0 < forward["ceiling@1"] <= 1
        assert 0 <= metrics["category"][setting]["mAP"] <= 1
    assert metrics["icdr"]["n"] == test_size
    assert len(metrics["icdr"]["confusion_matrix"]) == 5
    assert metrics["run"]["config"] == "tiny"
    for attribute in ("eye", "camera"):  # what the look-alikes of one grade share
        entry = metrics["lookalike"][attribute]
        assert 0 <= entry["agree"] <= 1 and 0 <= entry["chance"] <= 1 and 0 < entry["queries"] <= test_size
    report = (out / "report.md").read_text()
    assert "ceiling" in report and "confusion_icdr.png" in report
    assert "same-grade 10 nearest: same eye" in report


def test_the_baseline_grades_zero_shot_and_compare_prints_both(trained: dict[str, Path]) -> None:
    for config in ("tiny", "clip-baseline"):
        result = runner.invoke(app, ["evaluate", "--run", str(trained[config]), "--archive",
                                     str(trained["archive"]), "--splits", str(trained["splits"])])
        assert result.exit_code == 0, result.output
    baseline = json.loads((trained["clip-baseline"] / "eval-test" / "metrics.json").read_text())
    assert baseline["run"]["config"] == "clip-baseline"
    assert sum(baseline["icdr"]["support"].values()) == baseline["icdr"]["n"]
    result = runner.invoke(app, ["compare", str(trained["tiny"]), str(trained["clip-baseline"])])
    assert result.exit_code == 0, result.output
    assert "tiny" in result.output and "clip-baseline" in result.output and "R@1" in result.output


def test_compare_names_a_missing_evaluation(tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 2 and "evaluate" in result.output


def test_queries_reproduce_the_stored_narratives(trained: dict[str, Path]) -> None:
    records = read_archive(trained["archive"]).records
    texts, facts, same = query_texts(records, seed=7)
    assert same == len(records)
    assert texts[0] == compose_narrative(records[0], 7)[0]
    bound = ceiling(records, facts)
    assert 0 < bound["ceiling@1"] <= bound["ceiling@5"] <= bound["ceiling@10"] <= 1
    assert bound["unique_fit"] <= bound["ceiling@1"]


def test_deepeyenet_zero_shot(trained: dict[str, Path], tmp_path: Path) -> None:
    records = sample_records(4, seed=2)
    entries = []
    for i, record in enumerate(records):
        relative = f"eyenet0420/test_set/case_{i}.jpg"
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        image, _ = render_fundus(record, 224, np.random.default_rng(i))
        image.save(tmp_path / relative)
        entries.append({relative: {"keywords": "fundus, retina", "clinical-description": f"case {i}"}})
    (tmp_path / "DeepEyeNet_test.json").write_text(json.dumps(entries))
    result = evaluate_deepeyenet(trained["tiny"], tmp_path)
    assert result["cases"] == 4
    assert result["deepeyenet"]["a_to_b"]["gallery_size"] == 4


def test_evaluate_reports_the_neighbours_consensus(trained: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--run", str(trained["tiny"]), "--archive", str(trained["archive"]),
                                 "--splits", str(trained["splits"]), "--consensus-k", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    consensus = json.loads((tmp_path / "metrics.json").read_text())["consensus"]
    test_size = len(json.loads(trained["splits"].read_text())["test"])
    assert consensus["k"] == 3 and consensus["gallery_size"] == test_size - 1
    assert consensus["queries"] + consensus["no_vote_queries"] + consensus["missing_label_queries"] == test_size
    for figures in (consensus, consensus["other_groups"]):
        for level in ("icdr", "referable"):
            entry = figures[level]
            assert entry["disagreements"] == round((1 - entry["agreement"]) * entry["n"])
            assert entry["flagged_errors"] <= min(entry["disagreements"], entry["model_errors"])
    assert 0 <= consensus["same_group_share"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert "neighbours' consensus" in report and "other patients only" in report
    assert "consensus kNN@3 ICDR agreement with the model" in result.output
