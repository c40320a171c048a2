"""`retina-train crossval`: patient-level folds, three ways to grade, scores per fold and their spread.

The fold loop runs here on the session's small synthetic archive at one epoch; the opt-in test in
test_real_photos_e2e.py runs it on the 130 real EyePACS photographs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_factory import tiny_bundle

from index.archive.brset import read_archive
from training.crossval import (
    CrossValOptions,
    FoldScore,
    cross_validate,
    format_summary,
    patient_folds,
    summarise_scores,
)


def test_folds_are_patient_level_and_cover_every_image_once() -> None:
    ids = [f"img{i}" for i in range(40)]
    patients = [f"p{i // 2}" for i in range(40)]  # two photographs per patient
    grades = [i % 5 for i in range(40)]
    folds = patient_folds(ids, grades, patients, folds=4, seed=0)
    assert sorted(i for fold in folds for i in fold) == sorted(ids)
    patient_of = dict(zip(ids, patients, strict=True))
    owners = [{patient_of[i] for i in fold} for fold in folds]
    assert all(a.isdisjoint(b) for n, a in enumerate(owners) for b in owners[n + 1 :])


def test_summary_is_mean_and_spread_across_folds() -> None:
    scores = [FoldScore("probe", 0, 10, 0.2, 0.5, 0.6), FoldScore("probe", 1, 10, 0.4, 0.7, None)]
    summary = summarise_scores(scores)["probe"]
    assert summary["kappa_mean"] == pytest.approx(0.3) and summary["kappa_std"] == pytest.approx(0.1)
    assert summary["referable_auroc_mean"] == pytest.approx(0.6)  # the fold without an AUROC does not count
    assert "| probe | 2 | 0.300 +- 0.100 |" in format_summary(summarise_scores(scores))


def test_the_fold_loop_trains_scores_and_writes_a_report(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tiny = tiny_bundle(tmp_path_factory)
    result = cross_validate(CrossValOptions(archive=tiny.archive, init=tiny.run, out=tmp_path / "cv", folds=2,
                                            epochs=1, batch_size=8))
    assert [(s["method"], s["fold"]) for s in result["scores"]] == [
        (m, f) for f in (0, 1) for m in ("finetune", "scratch", "probe")]
    tested = sum(s["test_images"] for s in result["scores"] if s["method"] == "probe")
    assert tested == len([r for r in read_archive(tiny.archive).records if r.dr_icdr is not None])
    assert set(result["summary"]) == {"finetune", "scratch", "probe"}
    finetune = json.loads((tmp_path / "cv" / "fold-0" / "finetune" / "run.json").read_text())
    scratch = json.loads((tmp_path / "cv" / "fold-0" / "scratch" / "run.json").read_text())
    assert finetune["options"]["init"] == str(tiny.run) and scratch["options"]["init"] is None
    assert "| finetune | 2 |" in (tmp_path / "cv" / "crossval.md").read_text()
    with pytest.raises(ValueError, match="unknown methods"):
        cross_validate(CrossValOptions(archive=tiny.archive, init=tiny.run, out=tmp_path / "x", methods=("knn",)))
