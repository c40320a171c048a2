"""The run folder: what `retina-train fit` writes, and how evaluate, export and bench read it back.

    RUN/run.json            options, archive fingerprint, state (finished or not)
    RUN/config.json         the resolved model config (what `--resume` rebuilds the model from)
    RUN/tokenizer/          the tokenizer (tokenizer.json)
    RUN/feature_spec.json   the tabular feature spec fitted on the training split
    RUN/metrics.jsonl       one line per optimiser step: losses, learning rate, samples/s
    RUN/checkpoint/         model.safetensors + trainer_state.pt (optimiser, schedule, RNG, position)

Nothing here trains: the loop is `training.train`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from index.archive.brset import Archive
from index.tabular import FeatureSpec
from training.data import SplitData, load_split
from training.model.factory import create_model
from training.model.model import RetinaAlignModel
from training.tokenizer import load_tokenizer

CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"


@dataclass
class RunFiles:
    """Paths inside a run folder."""

    root: Path

    @property
    def state(self) -> Path:
        """The trainer state of the last checkpoint (present when the run can be resumed)."""
        return self.checkpoint / STATE_FILE

    @property
    def weights(self) -> Path:
        """The model weights of the last checkpoint."""
        return self.checkpoint / MODEL_FILE

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def feature_spec(self) -> Path:
        return self.root / "feature_spec.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR


@dataclass
class LoadedRun:
    """A trained run loaded for evaluation or export."""

    files: RunFiles
    model: RetinaAlignModel
    tokenizer: object
    spec: FeatureSpec
    info: dict


@dataclass
class TrainerState:
    """What a checkpoint holds besides the weights: where the loop was and the RNG states."""

    optimizer: dict
    position: dict
    torch_rng: torch.Tensor
    jitter_rng: torch.Tensor


def init_weights(model: RetinaAlignModel, init: Path, reinit: Sequence[str] = ()) -> None:
    """Load earlier weights (`--init`) (a run folder or a safetensors file) strictly into the model, except
    the parameters under the module names in `reinit` (`--reinit tabular`), which keep their fresh random
    init whatever the file holds (so a tuned config may change those modules)."""
    path = init / CHECKPOINT_DIR / MODEL_FILE if init.is_dir() else init
    if not path.is_file():
        raise FileNotFoundError(f"--init {init}: no {MODEL_FILE} found (expected a run folder or a file)")

    def fresh(key: str) -> bool:
        return any(is_under(key, name) for name in reinit)

    _check_module_names(model, reinit, "--reinit")
    own = {k: v for k, v in model.state_dict().items() if not fresh(k)}
    state = {k: v for k, v in load_file(str(path)).items() if not fresh(k)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        examples = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in reshaped[:2]]
        examples += [f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
        hint = f" (--config {init / 'config.json'})" if (init / "config.json").is_file() else ""
        raise ValueError(
            f"--init {init}: its weights do not fit config {model.config.name!r} ({len(reshaped)} of another "
            f"shape, {len(missing)} missing, {len(unexpected)} unexpected; e.g. {'; '.join(examples)}). "
            f"Fine-tune with the config those weights were trained with{hint}, or --reinit the changed modules."
        )
    model.load_state_dict(state, strict=not reinit)


def freeze_modules(model: RetinaAlignModel, names: Sequence[str]) -> None:
    """Stop gradients to every parameter under the module names in `names` (`--freeze fusion`) and put those
    modules in eval mode (no dropout; BatchNorm statistics left alone): they compute what `--init`'s weights
    computed while the rest of the model trains. Call it after `model.train()`."""
    _check_module_names(model, names, "--freeze")
    for key, param in model.named_parameters():
        if any(is_under(key, name) for name in names):
            param.requires_grad_(False)
    for key, module in model.named_modules():
        if any(is_under(key, name) for name in names):
            module.eval()


def freeze_all_but(model: RetinaAlignModel, names: Sequence[str]) -> None:
    """Stop gradients to every parameter outside the module names in `names` (`--train-only image_proj`), and
    put every module left with nothing to train in eval mode: only those modules learn, the rest compute what
    `--init`'s weights computed (its temperatures included). Call it after `model.train()`."""
    _check_module_names(model, names, "--train-only")
    for key, param in model.named_parameters():
        if not any(is_under(key, name) for name in names):
            param.requires_grad_(False)
    for _, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(param.requires_grad for param in params):
            module.eval()


def is_under(key: str, name: str) -> bool:
    """Whether the parameter or buffer `key` belongs to the module `name` (or is it)."""
    return key == name or key.startswith(name + ".")


def _check_module_names(model: RetinaAlignModel, names: Sequence[str], option: str) -> None:
    unmatched = [name for name in names if not any(is_under(k, name) for k in model.state_dict())]
    if unmatched:
        raise ValueError(f"{option} {unmatched[0]}: config {model.config.name!r} has no module of that name")


def save_checkpoint(
    files: RunFiles,
    model: RetinaAlignModel,
    optimizer: torch.optim.Optimizer,
    position: dict,
    jitter_generator: torch.Generator,
) -> None:
    """Write the checkpoint into a temporary folder, then swap it in (never a half-written one)."""
    tmp = files.root / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / MODEL_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "position": position,
            "torch_rng": torch.get_rng_state(),
            "jitter_rng": jitter_generator.get_state(),
        },
        tmp / STATE_FILE,
    )
    old = files.root / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if files.checkpoint.exists():
        os.replace(files.checkpoint, old)
    os.replace(tmp, files.checkpoint)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(files: RunFiles, model: RetinaAlignModel) -> TrainerState:
    """Load the last checkpoint's weights into `model` (strictly) and return its trainer state."""
    state = torch.load(files.state, weights_only=False)
    model.load_state_dict(load_file(str(files.weights)), strict=True)
    return TrainerState(state["optimizer"], state["position"], state["torch_rng"], state["jitter_rng"])


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint a resumed run restarts from (they are replayed)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def write_json(path: Path, data: dict) -> None:
    """Write `data` as JSON through a temporary file (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def load_run(run: Path, device: str = "cpu") -> LoadedRun:
    """Load a trained run (config, tokenizer, feature spec, weights) in eval mode."""
    files = RunFiles(Path(run))
    for path in (files.run_json, files.config, files.feature_spec, files.checkpoint / MODEL_FILE):
        if not path.exists():
            raise FileNotFoundError(f"{run} is not a complete run: {path.name} is missing")
    tokenizer = load_tokenizer(files.tokenizer)
    spec = FeatureSpec.model_validate_json(files.feature_spec.read_text())
    towers_log = logging.getLogger("training.model.towers")
    level = towers_log.level
    towers_log.setLevel(logging.ERROR)  # the towers' "random init" notice is moot: weights follow
    try:
        model = create_model(files.config, tabular_width=spec.width, numeric_columns=spec.numeric_value_columns,
                             tokenizer=tokenizer, checkpoint=files.checkpoint / MODEL_FILE)
    finally:
        towers_log.setLevel(level)
    model.to(device).eval()
    return LoadedRun(files, model, tokenizer, spec, json.loads(files.run_json.read_text()))


def split_for_evaluation(archive: Archive, ids: list[str], run: LoadedRun) -> SplitData:
    """Load a split with the run's image size and feature spec."""
    return load_split(archive, ids, run.model.config.vision.image, run.spec)
