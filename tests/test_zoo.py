"""The model zoo: shipped runs addressed as zoo:NAME, verified by checksum, usable wherever a run is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bundle_factory import tiny_bundle
from typer.testing import CliRunner

import training.zoo as zoo
from training.cli import app
from training.model.factory import load_config
from training.run import load_run


@pytest.fixture()
def evaluated_run(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny run with an (empty) evaluation, as a release needs."""
    run = tmp_path / "run"
    shutil.copytree(tiny_bundle(tmp_path_factory).run, run)
    (run / "eval-test").mkdir(exist_ok=True)
    (run / "eval-test" / "metrics.json").write_text("{}")
    (run / "eval-test" / "report.md").write_text("# report\n")
    return run


@pytest.fixture()
def models(evaluated_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary zoo holding the run as `tiny-test`."""
    folder = tmp_path / "models"
    zoo.release(evaluated_run, "tiny-test", "# Model card\n", zoo_dir=folder)
    monkeypatch.setattr(zoo, "ZOO_DIR", folder)
    return folder


def test_a_release_is_a_verified_run_folder(models: Path) -> None:
    folder = zoo.resolve_run("zoo:tiny-test")
    assert folder == models / "tiny-test" and zoo.list_models() == ["tiny-test"]
    listed = json.loads((folder / zoo.ZOO_FILE).read_text())["files"]
    assert {"checkpoint/model.safetensors", "config.json", "tokenizer/tokenizer.json", "MODEL_CARD.md"} <= set(listed)
    assert not any(name.endswith("trainer_state.pt") for name in listed)  # no optimiser state shipped
    assert load_run(folder).model.config.name == "tiny"
    assert load_config("zoo:tiny-test").name == "tiny"
    assert zoo.resolve_run("runs/x") == Path("runs/x")  # anything else is a path, unchanged


def test_a_release_ships_the_gate_and_calibration_when_the_run_has_them(evaluated_run: Path, tmp_path: Path) -> None:
    (evaluated_run / "gate").mkdir()
    (evaluated_run / "gate" / "gate.json").write_text("{}")
    (evaluated_run / "gate" / "gate.safetensors").write_bytes(b"weights")
    (evaluated_run / "calibration.json").write_text("{}")
    folder = zoo.release(evaluated_run, "with-gate", "card", zoo_dir=tmp_path / "z")
    listed = json.loads((folder / zoo.ZOO_FILE).read_text())["files"]
    assert set(zoo.OPTIONAL_FILES) <= set(listed)
    assert (folder / "gate" / "gate.safetensors").read_bytes() == b"weights"


def test_corrupt_missing_and_unknown_models_are_clear_errors(models: Path) -> None:
    with pytest.raises(zoo.ZooError, match="unknown shipped model 'zoo:other' \\(shipped: zoo:tiny-test\\)"):
        zoo.resolve_run("zoo:other")
    config = models / "tiny-test" / "config.json"
    config.write_text(config.read_text().replace("tiny", "tinx", 1))
    with pytest.raises(zoo.ZooError, match="config.json is corrupt .*git checkout"):
        zoo.resolve_run("zoo:tiny-test")
    config.unlink()
    with pytest.raises(zoo.ZooError, match="config.json is missing"):
        zoo.resolve_run("zoo:tiny-test")
    with pytest.raises(ValueError, match="config.json is missing"):
        load_config("zoo:tiny-test")


def test_a_run_that_did_not_finish_or_was_not_evaluated_is_not_released(evaluated_run: Path, tmp_path: Path) -> None:
    (evaluated_run / "eval-test" / "metrics.json").unlink()
    with pytest.raises(zoo.ZooError, match="eval-test/metrics.json"):
        zoo.release(evaluated_run, "x", "card", zoo_dir=tmp_path / "z")
    (evaluated_run / "eval-test" / "metrics.json").write_text("{}")
    info = json.loads((evaluated_run / "run.json").read_text())
    (evaluated_run / "run.json").write_text(json.dumps({**info, "finished": False}))
    with pytest.raises(zoo.ZooError, match="did not finish"):
        zoo.release(evaluated_run, "x", "card", zoo_dir=tmp_path / "z")
    assert not (tmp_path / "z" / "x").exists()


def test_fit_and_evaluate_take_a_shipped_model_by_name(
    models: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = tiny_bundle(tmp_path_factory)
    runner = CliRunner()
    result = runner.invoke(app, [
        "fit", "--init", "zoo:tiny-test", "--archive", str(tiny.archive), "--splits", str(tiny.splits),
        "--out", str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "8", "--max-steps", "1",
    ])
    assert result.exit_code == 0, result.output
    shipped = models / "tiny-test"
    trained_config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert trained_config == json.loads((shipped / "config.json").read_text())
    assert (tmp_path / "ft" / "tokenizer" / "tokenizer.json").read_bytes() == (
        shipped / "tokenizer" / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["options"]["init"] == str(shipped)

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", "--run", "zoo:tiny-test", "--archive", str(tiny.archive),
                                 "--splits", str(tiny.splits)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval-tiny-test-test" / "metrics.json").is_file()
    zoo.verify(shipped)  # evaluating a shipped model wrote nothing into its folder

    result = runner.invoke(app, ["fit", "--init", "zoo:nope", "--archive", str(tiny.archive), "--splits",
                                 str(tiny.splits), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown shipped model 'zoo:nope'" in result.output


def test_the_shipped_model_verifies_and_loads() -> None:
    folder = zoo.resolve_run("zoo:tiny-synth")
    assert folder == zoo.ZOO_DIR / "tiny-synth" and "tiny-synth" in zoo.list_models()
    run = load_run(folder)
    assert run.model.config.name == "tiny-synth-lit-facts" and run.info["finished"]  # the last stage's config
    assert run.model.config.image_appearance_dims == 32
    metrics = json.loads((folder / "eval-test" / "metrics.json").read_text())
    assert metrics["run"]["gallery_size"] == 3000  # the held-out archive, not the training split
    assert (folder / "checkpoint" / "model.safetensors").stat().st_size < 30_000_000
    assert "Not for clinical use" in (folder / zoo.CARD_FILE).read_text()


def test_the_recipe_runs_its_stages_in_order_and_refuses_a_shared_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.stages import StageError
    from training.zoo import recipe

    ran: list[str] = []
    commands: list[list[str]] = []

    def fake_stage(console: object, title: str, command: list[str]) -> None:
        ran.append(title)
        commands.append(command)
        if command[1] == "fit":  # what a finished run leaves behind
            out = Path(command[command.index("--out") + 1])
            (out / "checkpoint").mkdir(parents=True)
            (out / "checkpoint" / "model.safetensors").write_bytes(b"w")
            (out / "run.json").write_text(json.dumps({"finished": True}))
        if command[1] == "evaluate":
            run = Path(command[command.index("--run") + 1])
            (run / "eval-test").mkdir()
            (run / "eval-test" / "metrics.json").write_text("{}")

    monkeypatch.setattr(recipe, "run_stage", fake_stage)
    monkeypatch.setattr(recipe, "write_card", lambda options, paths, metrics, baseline: paths.root / "card.md")
    options = recipe.ZooOptions(out=tmp_path / "zoo", n=100, heldout_n=20, baseline=True)
    recipe.run_recipe(options)
    assert ran == [
        "training archive", "patient-level split", "held-out archive", "held-out split (every record in test)",
        "training tiny-synth", "calibration (decision offsets on train)",
        "evaluating tiny-synth on the held-out archive", "export with parity check",
        "training clip-baseline-synth", "evaluating the baseline on the held-out archive",
    ]
    with pytest.raises(StageError, match="seed of its own"):
        recipe.run_recipe(recipe.ZooOptions(out=tmp_path / "other", seed=5, heldout_seed=5))

    # with a tuning stage: the run is tuned with its image locked, and the tuned run is evaluated and exported;
    # the baseline gets the same stage with its own config
    ran.clear()
    commands.clear()
    root = tmp_path / "tuned-zoo"
    tuned = recipe.ZooOptions(out=root, n=100, heldout_n=20, baseline=True, tune_config="my.json",
                              tune_epochs=5, tune_batch_size=128, tune_reinit=("tabular",), tune_freeze=("fusion",))
    assert recipe.run_recipe(tuned).final(tuned) == root / "tuned"
    assert ran[4:] == [
        "training tiny-synth", "locked-image tuning my.json", "calibration (decision offsets on train)",
        "evaluating my.json on the held-out archive", "export with parity check", "training clip-baseline-synth",
        "locked-image tuning clip-baseline-synth", "evaluating the baseline on the held-out archive",
    ]
    by_title = dict(zip(ran, commands, strict=True))
    calibrate = by_title["calibration (decision offsets on train)"]  # the tuned run, before it is evaluated
    assert calibrate[1] == "calibrate" and calibrate[calibrate.index("--run") + 1] == str(root / "tuned")
    assert calibrate[calibrate.index("--offsets-split") + 1] == "train"
    tune = by_title["locked-image tuning my.json"]
    assert tune[tune.index("--init") + 1] == str(root / "run") and "--lock-image" in tune
    assert "--reinit=tabular" in tune and tune[tune.index("--batch-size") + 1] == "128"
    assert "--freeze=fusion" in tune
    assert tune[tune.index("--epochs") + 1] == "5"
    assert by_title["evaluating my.json on the held-out archive"][3] == str(root / "tuned")
    export = by_title["export with parity check"]
    assert export[export.index("--run") + 1] == str(root / "tuned")
    baseline_tune = by_title["locked-image tuning clip-baseline-synth"]
    assert baseline_tune[baseline_tune.index("--init") + 1] == str(root / "baseline")
    assert not any(arg.startswith(("--reinit", "--freeze")) for arg in baseline_tune)

    # with an appearance stage: it comes last, starts from the tuned run and trains only the image embedding's two
    # projections (both re-learnt) and the text's projection against photographs
    ran.clear()
    commands.clear()
    root = tmp_path / "appearance-zoo"
    spread = recipe.ZooOptions(out=root, n=100, heldout_n=20, appearance_config="look.json", appearance_epochs=2,
                               appearance_lr=3e-3, tune_config="my.json")
    assert recipe.run_recipe(spread).final(spread) == root / "appearance"
    assert ran[4:7] == ["training tiny-synth", "locked-image tuning my.json", "appearance stage look.json"]
    by_title = dict(zip(ran, commands, strict=True))
    tune = by_title["locked-image tuning my.json"]
    assert tune[tune.index("--init") + 1] == str(root / "run")
    look = by_title["appearance stage look.json"]
    assert look[look.index("--init") + 1] == str(root / "tuned") and "--lock-image" not in look
    assert look[look.index("--out") + 1] == str(root / "appearance")
    assert sorted(arg for arg in look if arg.startswith(("--reinit", "--train-only"))) == [
        "--reinit=image_appearance_proj", "--reinit=image_proj", "--train-only=image_appearance_proj",
        "--train-only=image_proj", "--train-only=text_proj"]
    assert not any(arg.startswith("--freeze") for arg in look)
    assert look[look.index("--epochs") + 1] == "2" and look[look.index("--lr") + 1] == "0.003"
    evaluated = by_title["evaluating look.json on the held-out archive"]
    assert evaluated[evaluated.index("--run") + 1] == str(root / "appearance")
    assert commands[ran.index("calibration (decision offsets on train)")][3] == str(root / "appearance")
    # with a facts stage: it comes after the appearance stage, locks the image and trains only the two projections
    # that meet in text->record search, with its own schedule; it is the run calibrated, evaluated and exported
    ran.clear()
    commands.clear()
    root = tmp_path / "facts-zoo"
    facts = recipe.ZooOptions(out=root, n=100, heldout_n=20, appearance_config="look.json", tune_config="my.json",
                              facts_config="facts.json", facts_epochs=4, facts_batch_size=128, facts_lr=5e-4)
    assert recipe.run_recipe(facts).final(facts) == root / "facts"
    assert ran[4:9] == ["training tiny-synth", "locked-image tuning my.json", "appearance stage look.json",
                        "facts stage facts.json", "calibration (decision offsets on train)"]
    by_title = dict(zip(ran, commands, strict=True))
    stage = by_title["facts stage facts.json"]
    assert stage[stage.index("--init") + 1] == str(root / "appearance") and "--lock-image" in stage
    assert sorted(arg for arg in stage if arg.startswith(("--reinit", "--train-only", "--freeze"))) == [
        "--train-only=record_proj", "--train-only=text_record_proj"]
    assert [stage[stage.index(flag) + 1] for flag in ("--epochs", "--batch-size", "--lr")] == ["4", "128", "0.0005"]
    for title in ("calibration (decision offsets on train)", "evaluating facts.json on the held-out archive",
                  "export with parity check"):
        assert str(root / "facts") in by_title[title]
    # without an appearance stage it starts from the last stage before it
    ran.clear()
    commands.clear()
    plain_facts = recipe.ZooOptions(out=tmp_path / "facts-only", n=100, heldout_n=20, facts_config="facts.json")
    recipe.run_recipe(plain_facts)
    stage = dict(zip(ran, commands, strict=True))["facts stage facts.json"]
    assert stage[stage.index("--init") + 1] == str(tmp_path / "facts-only" / "run")

    # without a tuning stage it starts from the run
    ran.clear()
    commands.clear()
    alone = recipe.ZooOptions(out=tmp_path / "appearance-only", n=100, heldout_n=20, appearance_config="look.json")
    assert recipe.run_recipe(alone).final(alone) == tmp_path / "appearance-only" / "appearance"
    look = dict(zip(ran, commands, strict=True))["appearance stage look.json"]
    assert look[look.index("--init") + 1] == str(tmp_path / "appearance-only" / "run")

    # without calibration, or with temperatures only
    ran.clear()
    recipe.run_recipe(recipe.ZooOptions(out=tmp_path / "plain", n=100, heldout_n=20, calibrate=False))
    assert not any(title.startswith("calibration") for title in ran)
    ran.clear()
    commands.clear()
    recipe.run_recipe(recipe.ZooOptions(out=tmp_path / "temperatures", n=100, heldout_n=20, offsets_split=None))
    assert "calibration" in ran and "--offsets-split" not in commands[ran.index("calibration")]


def test_the_card_of_a_tuned_recipe_describes_both_stages_and_the_tuned_model(tmp_path: Path) -> None:
    from training.zoo.card import write_card
    from training.zoo.recipe import ZooOptions, ZooPaths

    shipped = zoo.ZOO_DIR / "tiny-synth"
    options = ZooOptions(out=tmp_path, tune_config="tuned.json", tune_epochs=6, tune_batch_size=256,
                         tune_reinit=("tabular",), tune_freeze=("fusion", "image_to_fusion"))
    paths = ZooPaths(tmp_path)
    for run, config_name, steps in ((paths.run, "stage-one", 1686), (paths.tuned, "stage-two", 630)):
        run.mkdir()
        config = json.loads((shipped / "config.json").read_text()) | {"name": config_name, "image_appearance_dims": 0}
        (run / "config.json").write_text(json.dumps(config))
        (run / "run.json").write_text(json.dumps({"steps": steps, "training_seconds": 900, "finished": True,
                                                  "samples_per_second": 150.0, "precision": "bf16"}))
    calibration = {"icdr_temperature": 1.25, "sdrg_temperature": 0.9, "archive": "a", "split": "val",
                   "items": {"icdr": 1502, "sdrg": 1502}, "ece_before": {"icdr": 0.1, "sdrg": 0.1},
                   "ece_after": {"icdr": 0.05, "sdrg": 0.05}, "nll_before": {"icdr": 1.0, "sdrg": 1.0},
                   "nll_after": {"icdr": 0.9, "sdrg": 0.9},
                   "offsets": {"icdr": [0, -2.7, -1.3, -0.3, 0], "sdrg": [0] * 5, "split": "train",
                               "items": {"icdr": 5741, "sdrg": 5741}, "per_grade": 4000,
                               "macro_f1_before": {"icdr": 0.846, "sdrg": 0.8}, "macro_f1_after": {"icdr": 0.891,
                                                                                                 "sdrg": 0.8}}}
    (paths.tuned / "calibration.json").write_text(json.dumps(calibration))
    card = write_card(options, paths, {"icdr": {"quadratic_kappa": 0.95}}, None).read_text()
    assert "temperatures ICDR 1.250, SDRG 0.900 fitted on split val" in card
    assert "fitted for macro-F1 on split train (5,741 photographs, at most 4,000 per grade" in card
    assert "ICDR b = [+0.0, -2.7, -1.3, -0.3, +0.0], macro-F1 there 0.846 -> 0.891" in card
    assert "--tune-config tuned.json --tune-epochs 6 --tune-batch-size 256" in card
    assert "--tune-reinit tabular" in card
    assert "Config `stage-two`" in card  # the architecture is the tuned model's
    assert "1686 optimiser steps" in card
    assert "locked-image tuning" in card and "630 steps (6 epochs, batch 256" in card
    assert "`tabular` from random init" in card
    assert "--tune-freeze fusion --tune-freeze image_to_fusion" in card
    assert "its projection, `fusion`, `image_to_fusion` frozen as trained above, the rest trained on" in card


def test_the_card_of_a_recipe_with_an_appearance_stage_describes_it(tmp_path: Path) -> None:
    from training.zoo.card import write_card
    from training.zoo.recipe import ZooOptions, ZooPaths

    shipped = zoo.ZOO_DIR / "tiny-synth"
    options = ZooOptions(out=tmp_path, appearance_config="look.json", appearance_epochs=3, appearance_lr=2e-3,
                         tune_config="tuned.json", tune_epochs=30)
    paths = ZooPaths(tmp_path)
    appearance = {"image_appearance_dims": 32, "image_appearance_share": 0.85,
                  "image_appearance_input": "pooled_and_patches", "image_appearance_hidden": 256}
    for run, steps in ((paths.run, 1686), (paths.tuned, 3150), (paths.appearance, 1686)):
        run.mkdir()
        config = json.loads((shipped / "config.json").read_text()) | {"image_appearance_dims": 0}
        if run == paths.appearance:  # the stage's own config: the appearance part and its uniformity loss
            config = config | appearance
            config["losses"] = config["losses"] | {"image_appearance_uniformity": 2.0}
        (run / "config.json").write_text(json.dumps(config))
        (run / "run.json").write_text(json.dumps({"steps": steps, "training_seconds": 420, "finished": True,
                                                  "samples_per_second": 215.3, "precision": "bf16"}))
    card = write_card(options, paths, {"icdr": {"quadratic_kappa": 0.95}}, None).read_text()
    assert ("--tune-config tuned.json --tune-epochs 30 --tune-batch-size 256 --tune-lr 0.001 "
            "--appearance-config look.json --appearance-epochs 3 --appearance-batch-size 48 "
            "--appearance-lr 0.002") in card
    assert "the appearance stage (config `look.json`, `fit --train-only`)" in card
    assert ("every weight but the image embedding's two projections and the text's projection against photographs "
            "(`text_proj`) kept as trained above, so every grade stays what it was and so does every text->record "
            "answer") in card
    assert "grade part (`image_proj`, 96-d) re-learnt" in card
    assert "(`image_appearance_proj`, 32-d, a 2-layer MLP reading the pooled feature and the mean of the patch " \
           "tokens, share 0.85 of the unit vector) trained with a uniformity loss (weight 2)" in card
    assert "1686 steps (3 epochs, batch 48, lr 0.002) in 7 min (215.3 samples/s, bf16)" in card
    assert "the image tower and its projection frozen as trained above" in card  # the tuning, before the stage
    assert card.index("locked-image tuning (") < card.index("the appearance stage")


def test_the_card_of_a_recipe_with_a_facts_stage_describes_it_last(tmp_path: Path) -> None:
    from training.zoo.card import write_card
    from training.zoo.recipe import ZooOptions, ZooPaths

    shipped = zoo.ZOO_DIR / "tiny-synth"
    options = ZooOptions(out=tmp_path, appearance_config="look.json", facts_config="facts.json", facts_epochs=3)
    paths = ZooPaths(tmp_path)
    for run, steps in ((paths.run, 1686), (paths.appearance, 1686), (paths.facts, 315)):
        run.mkdir()
        config = json.loads((shipped / "config.json").read_text())
        if run == paths.facts:
            config["grade_part_weight"] = 0.4
            config["losses"] = config["losses"] | {"grade_counterfactual_records": True,
                                                   "text_record_grade_contrastive": 0.15, "text_grade_min_icdr": 1}
        (run / "config.json").write_text(json.dumps(config))
        (run / "run.json").write_text(json.dumps({"steps": steps, "training_seconds": 200, "finished": True,
                                                  "samples_per_second": 666.8, "precision": "bf16"}))
    card = write_card(options, paths, {"icdr": {"quadratic_kappa": 0.95}}, None).read_text()
    assert "--facts-config facts.json --facts-epochs 3 --facts-batch-size 256 --facts-lr 0.001" in card
    assert ("the facts stage (config `facts.json`, `fit --lock-image --train-only`): only the text's record head "
            "(`text_record_proj`) and the record projection (`record_proj`) trained, with the text->record loss with "
            "counterfactual hard negatives and photographs of another grade as further ones and a term that pulls "
            "each text of ICDR >= 1 towards every record of the grade it states (weight 0.15)") in card
    assert "315 steps (3 epochs, batch 256, lr 0.001) in 3 min (666.8 samples/s, bf16)" in card
    weights = next(line for line in card.splitlines() if line.startswith("- Losses (weights)"))
    assert "text_record_grade_contrastive 0.15" in weights and "text_grade_min_icdr 1" not in weights
    assert weights.endswith("; the grade terms count the texts of ICDR >= 1.")
    assert card.index("the appearance stage") < card.index("the facts stage")
    architecture = next(line for line in card.splitlines() if line.startswith("- Config "))
    assert "grade part (`grade_part_weight` 0.4)" in architecture and "133-d in all" in architecture
