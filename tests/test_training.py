"""`retina-train fit`: run folder, determinism, exact resume, data fingerprint, and DDP over 2 processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from index.archive.brset import read_archive
from training.cli import app
from training.run import CHECKPOINT_DIR, MODEL_FILE
from training.splits import make_splits, save_splits
from training.synth.archive import write_archive
from training.synth.priors import sample_records
from training.train import FitOptions, fit

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    write_archive(sample_records(64, seed=1), root / "archive", size=224, seed=1)
    splits = make_splits(read_archive(root / "archive").records, seed=0)
    save_splits(splits, root / "splits.json")
    return root / "archive", root / "splits.json"


def _options(data: tuple[Path, Path], out: Path, **overrides) -> FitOptions:
    archive, splits = data
    values = dict(config="tiny", archive=archive, splits=splits, out=out, epochs=1, batch_size=8,
                  max_steps=4, precision="fp32", seed=3)
    values.update(overrides)
    return FitOptions(**values)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / CHECKPOINT_DIR / MODEL_FILE))


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _spy_on_forward(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Record every batch the model's forward receives (the list fills as training runs)."""
    from training.model.model import RetinaAlignModel

    seen: list[dict[str, torch.Tensor]] = []
    forward = RetinaAlignModel.forward

    def spy(self: RetinaAlignModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append(batch)
        return forward(self, batch)

    monkeypatch.setattr(RetinaAlignModel, "forward", spy)
    return seen


def test_fit_writes_a_complete_run(data: tuple[Path, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(tmp_path / "run"),
        "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--precision", "bf16",
    ])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for name in ("run.json", "config.json", "feature_spec.json", "tokenizer/tokenizer.json",
                 f"{CHECKPOINT_DIR}/{MODEL_FILE}", f"{CHECKPOINT_DIR}/trainer_state.pt"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["finished"] and info["steps"] == 2 and info["precision"] == "bf16"
    steps = _log(run)
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["total"] == s["total"] and s["total"] > 0 for s in steps)  # finite, positive
    assert {"contrastive_image_text", "contrastive_text_record", "icdr", "sdrg", "icdr_image_only",
            "sdrg_image_only"} <= set(steps[0])
    again = runner.invoke(app, ["fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(run)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_training_is_deterministic_for_a_seed(data: tuple[Path, Path], tmp_path: Path) -> None:
    fit(_options(data, tmp_path / "a", max_steps=2))
    fit(_options(data, tmp_path / "b", max_steps=2))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s["total"] for s in _log(tmp_path / "a")] == [s["total"] for s in _log(tmp_path / "b")]


def test_resume_continues_exactly(data: tuple[Path, Path], tmp_path: Path) -> None:
    fit(_options(data, tmp_path / "straight"))

    class Interrupted(Exception):
        pass

    def crash_at_step_3(metrics: dict) -> None:
        if metrics["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(_options(data, tmp_path / "resumed", checkpoint_every=1), on_step=crash_at_step_3)
    # Resumed with another --config: the run continues the model it recorded in RUN/config.json.
    fit(_options(data, tmp_path / "resumed", checkpoint_every=1, config="clip-baseline"))
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    totals = [s["total"] for s in _log(tmp_path / "resumed")]
    assert totals == [s["total"] for s in _log(tmp_path / "straight")]


def test_resume_refuses_a_different_archive_or_split(data: tuple[Path, Path], tmp_path: Path) -> None:
    fit(_options(data, tmp_path / "run", max_steps=1))
    splits = json.loads(data[1].read_text())
    splits["train"], splits["val"] = splits["train"][:-1], splits["val"] + splits["train"][-1:]
    other = tmp_path / "other_splits.json"
    other.write_text(json.dumps(splits))
    with pytest.raises(ValueError, match="cannot resume"):
        fit(_options(data, tmp_path / "run", splits=other, max_steps=2))


def test_init_starts_from_earlier_weights(data: tuple[Path, Path], tmp_path: Path) -> None:
    fit(_options(data, tmp_path / "base", max_steps=1))
    fit(_options(data, tmp_path / "tuned", max_steps=1, init=tmp_path / "base", lr=1e-12))
    base, tuned = _weights(tmp_path / "base"), _weights(tmp_path / "tuned")
    # With a vanishing learning rate the fine-tuned weights stay those it started from.
    assert all(torch.allclose(base[k].float(), tuned[k].float(), atol=1e-6) for k in base)
    assert (tmp_path / "tuned" / "tokenizer" / "tokenizer.json").read_text() == (
        tmp_path / "base" / "tokenizer" / "tokenizer.json").read_text()


def test_counterfactual_records_train_text_to_record_against_hard_negatives(
    data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.model import load_config

    config = load_config("tiny").model_dump()
    config["losses"]["counterfactual_records"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    seen = _spy_on_forward(monkeypatch)
    fit(_options(data, tmp_path / "run", config=str(tmp_path / "config.json"), max_steps=2))
    assert len(seen) == 2
    for batch in seen:
        assert batch["counterfactual_tabular"].shape == batch["tabular"].shape
        present = batch["counterfactual_present"]
        assert present.float().mean() > 0.5  # the synthetic narratives state eye, sex, age, ... nearly always
        differs = (batch["counterfactual_tabular"] != batch["tabular"]).any(dim=1)
        assert torch.equal(differs, present)
    log = _log(tmp_path / "run")
    assert all(0 < step["contrastive_text_record"] < 1e3 for step in log)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["losses"]["counterfactual_records"] is True


def test_locked_image_tuning_trains_everything_but_the_image_tower(
    data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit(_options(data, tmp_path / "base", max_steps=1))
    seen = _spy_on_forward(monkeypatch)
    result = runner.invoke(app, [
        "fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(tmp_path / "locked"),
        "--init", str(tmp_path / "base"), "--lock-image", "--epochs", "1", "--batch-size", "8",
        "--max-steps", "2", "--precision", "fp32", "--lr", "1e-2",
    ])
    assert result.exit_code == 0, result.output
    assert len(seen) == 2
    assert all("pixels" not in b and b["image_states"].ndim == 3 for b in seen)
    base, locked = _weights(tmp_path / "base"), _weights(tmp_path / "locked")
    image_keys = [k for k in base if k.startswith(("image.", "image_proj."))]
    assert image_keys and all(torch.equal(base[k], locked[k]) for k in image_keys)
    moved = [k for k in base if k.startswith(("text.", "tabular.", "fusion.")) and not torch.equal(base[k], locked[k])]
    assert len(moved) > 10
    assert json.loads((tmp_path / "locked" / "run.json").read_text())["options"]["lock_image"] is True


def test_frozen_modules_keep_their_initial_weights(data: tuple[Path, Path], tmp_path: Path) -> None:
    fit(_options(data, tmp_path / "base", max_steps=1))
    result = runner.invoke(app, [
        "fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(tmp_path / "frozen"),
        "--init", str(tmp_path / "base"), "--lock-image", "--freeze", "fusion", "--freeze", "image_to_fusion",
        "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--precision", "fp32", "--lr", "1e-2",
    ])
    assert result.exit_code == 0, result.output
    base, frozen = _weights(tmp_path / "base"), _weights(tmp_path / "frozen")
    kept = [k for k in base if k.startswith(("fusion.", "image_to_fusion.", "image."))]
    assert len(kept) > 20 and all(torch.equal(base[k], frozen[k]) for k in kept)
    moved = [k for k in base if k.startswith(("text.", "tabular_to_fusion.")) and not torch.equal(base[k], frozen[k])]
    assert len(moved) > 10
    with pytest.raises(ValueError, match="--freeze fusoin: config .* has no module of that name"):
        fit(_options(data, tmp_path / "typo", max_steps=1, init=tmp_path / "base", freeze=["fusoin"]))
    with pytest.raises(ValueError, match="a module from random init that never trains"):
        _options(data, tmp_path / "both", init=tmp_path / "base", freeze=["tabular"], reinit=["tabular"])


def test_train_only_trains_the_named_modules_and_keeps_everything_else(data: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    fit(_options(data, tmp_path / "base", max_steps=1))
    result = runner.invoke(app, [
        "fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(tmp_path / "only"),
        "--init", str(tmp_path / "base"), "--train-only", "image_proj", "--train-only", "tabular_proj",
        "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--precision", "fp32", "--lr", "1e-2",
    ])
    assert result.exit_code == 0, result.output
    base, only = _weights(tmp_path / "base"), _weights(tmp_path / "only")
    moved = {k for k in base if not torch.equal(base[k], only[k])}
    assert moved == {"image_proj.weight", "tabular_proj.weight"}  # temperatures, towers, heads: all as they were
    assert json.loads((tmp_path / "only" / "run.json").read_text())["options"]["train_only"] == [
        "image_proj", "tabular_proj"]
    result = runner.invoke(app, [
        "fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(tmp_path / "both"),
        "--init", str(tmp_path / "base"), "--train-only", "image_proj", "--freeze", "fusion",
    ])
    assert result.exit_code == 2 and "--train-only and --freeze" in result.output
    with pytest.raises(ValueError, match="--reinit text is not under --train-only"):
        _options(data, tmp_path / "x", init=tmp_path / "base", train_only=["image_proj"], reinit=["text"])
    with pytest.raises(ValueError, match="--train-only imag_proj: config .* has no module of that name"):
        fit(_options(data, tmp_path / "typo", max_steps=1, init=tmp_path / "base", train_only=["imag_proj"]))


def test_freeze_all_but_puts_the_modules_with_nothing_to_train_in_eval_mode() -> None:
    from training.model import create_model
    from training.run import freeze_all_but

    model = create_model("tiny-synth", tabular_width=8)
    model.train()
    freeze_all_but(model, ["image_proj"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["image_proj.weight"]
    assert not model.image.training and not model.text.training and not model.fusion.training
    assert model.image_proj.training


def test_freeze_modules_stops_gradients_and_keeps_eval_mode() -> None:
    from training.model import create_model
    from training.run import freeze_modules

    model = create_model("tiny-synth", tabular_width=8)  # its image tower has a convolutional stem
    model.train()
    freeze_modules(model, ["image"])  # the stem's BatchNorm statistics must not move in a frozen tower
    frozen = [m for n, m in model.named_modules() if n == "image" or n.startswith("image.")]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen)
    assert not any(m.training for m in frozen) and model.text.training
    assert not any(p.requires_grad for p in model.image.parameters())
    assert all(p.requires_grad for p in model.text.parameters())


def test_locked_image_states_are_the_towers_output_in_eval_mode(data: tuple[Path, Path], tmp_path: Path) -> None:
    from training.hardware import choose_precision
    from training.run import load_run, split_for_evaluation
    from training.train import locked_image_states

    fit(_options(data, tmp_path / "base", max_steps=1))
    run = load_run(tmp_path / "base")
    split = split_for_evaluation(read_archive(data[0]), json.loads(data[1].read_text())["train"][:10], run)
    seen: list[tuple[int, int]] = []
    states = locked_image_states(run.model, split, choose_precision("fp32", torch.device("cpu")), torch.device("cpu"),
                                 lambda done, total: seen.append((done, total)), chunk=4)
    from training.data import normalise

    spec = run.model.config.vision.image
    with torch.no_grad():
        expected = run.model.image(normalise(torch.from_numpy(split.images), spec.mean, spec.std))
    assert states.shape == expected.shape and torch.allclose(states, expected, atol=1e-5)
    assert seen == [(4, 10), (8, 10), (10, 10)]


def test_lock_image_and_reinit_need_init(data: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--lock-image needs --init"):
        _options(data, tmp_path / "run", lock_image=True)
    with pytest.raises(ValueError, match="--freeze needs --init"):
        _options(data, tmp_path / "run", freeze=["fusion"])
    result = runner.invoke(app, [
        "fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(tmp_path / "run"),
        "--reinit", "tabular", "--max-steps", "1",
    ])
    assert result.exit_code == 2 and "--reinit needs --init" in " ".join(result.output.split())


def test_reinit_lets_a_tuned_config_change_one_module(data: tuple[Path, Path], tmp_path: Path) -> None:
    from training.model import load_config

    fit(_options(data, tmp_path / "base", max_steps=1))
    tiny = load_config("tiny")
    periodic = tiny.model_copy(update={"tabular": tiny.tabular.model_copy(update={"numeric_encoding": "periodic"})})
    (tmp_path / "periodic.json").write_text(periodic.model_dump_json())
    config = str(tmp_path / "periodic.json")
    with pytest.raises(ValueError, match="or --reinit the changed modules"):
        fit(_options(data, tmp_path / "strict", config=config, max_steps=1, init=tmp_path / "base"))
    with pytest.raises(ValueError, match="--reinit tabulr: config .* has no module of that name"):
        fit(_options(data, tmp_path / "typo", config=config, max_steps=1, init=tmp_path / "base", reinit=["tabulr"]))
    fit(_options(data, tmp_path / "tuned", config=config, max_steps=1, init=tmp_path / "base", reinit=["tabular"],
                 lr=1e-12))
    base, tuned = _weights(tmp_path / "base"), _weights(tmp_path / "tuned")
    kept = [k for k in base if not k.startswith("tabular.")]
    assert all(torch.allclose(base[k].float(), tuned[k].float(), atol=1e-6) for k in kept)
    assert "tabular.periodic.frequencies" in tuned and "tabular.periodic.frequencies" not in base


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_init_from_weights_of_another_architecture_fails_clearly(data: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"image.trunk.pos_embed": torch.zeros(1, 197, 192)}, str(tmp_path / "other.safetensors"))
    result = runner.invoke(app, [
        "fit", "--archive", str(data[0]), "--splits", str(data[1]), "--out", str(tmp_path / "run"),
        "--init", str(tmp_path / "other.safetensors"), "--max-steps", "1",
    ])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "do not fit config 'tiny'" in output and "image.trunk.pos_embed: (1, 197, 192) in the file" in output
    assert not (tmp_path / "run").exists(), "a failed --init must not leave a run folder behind"


def test_two_processes_see_the_global_batch(data: tuple[Path, Path], tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo): the logged loss of a step equals the single-process loss on
    the same global batch, because embeddings are all-gathered for the contrastive loss."""
    archive, splits = data
    # The baseline without dropout: the only randomness left is drawn per global batch, so one process
    # and two must compute the same numbers.
    config = json.loads((ROOT / "training/model/configs/clip-baseline.json").read_text())
    config["text"]["bert_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path = tmp_path / "clip-no-dropout.json"
    config_path.write_text(json.dumps(config))
    fit(_options(data, tmp_path / "single", config=str(config_path), max_steps=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "training.cli", "fit", "--config", str(config_path),
        "--archive", str(archive), "--splits", str(splits), "--out", str(tmp_path / "ddp"), "--epochs", "1",
        "--batch-size", "8", "--max-steps", "2", "--precision", "fp32", "--seed", "3",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2
    single, ddp = _log(tmp_path / "single"), _log(tmp_path / "ddp")
    assert len(single) == len(ddp) == 2
    for a, b in zip(single, ddp, strict=True):
        assert b["contrastive_image_text"] == pytest.approx(a["contrastive_image_text"], abs=1e-4)


def test_grade_balanced_sampling_draws_more_rare_grades() -> None:
    import numpy as np

    from training.data import epoch_order, sampling_weights

    grades = np.array([0] * 930 + [4] * 70)
    assert sampling_weights(grades, 0.0) is None
    weights = sampling_weights(grades, 0.5)
    assert weights is not None and weights.sum() == pytest.approx(1.0)
    drawn = grades[epoch_order(len(grades), seed=0, epoch=0, weights=weights)]
    # count^-0.5 weighting: share of grade 4 = 70*70^-0.5 / (70*70^-0.5 + 930*930^-0.5) ~ 0.215
    assert 0.17 < (drawn == 4).mean() < 0.26
    assert np.array_equal(drawn, grades[epoch_order(len(grades), seed=0, epoch=0, weights=weights)])
