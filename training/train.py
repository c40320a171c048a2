"""The training application: `retina-train fit`.

A run folder holds everything needed to evaluate, resume or export the model:

    RUN/run.json            options, archive fingerprint, state (finished or not)
    RUN/config.json         the resolved model config
    RUN/tokenizer/          the tokenizer (tokenizer.json)
    RUN/feature_spec.json   the tabular feature spec fitted on the training split
    RUN/metrics.jsonl       one line per optimiser step: losses, learning rate, samples/s
    RUN/checkpoint/         model.safetensors + trainer_state.pt (optimiser, schedule, RNG, position)

Determinism: the batch order is a function of (seed, epoch), the texts of (seed, epoch, image id), and the
RNG states are checkpointed, so on CPU a run is reproducible for a seed and `--resume` continues exactly.
Several processes (`torchrun`): each rank takes its slice of every global batch, and the contrastive
losses all-gather embeddings with gradients so they see the global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from index.archive.brset import Archive, read_archive
from index.preprocess import Illumination
from index.tabular import FeatureSpec, fit_feature_spec
from training.data import (
    BatchBuilder,
    SplitData,
    draw_jitter,
    fingerprint,
    global_batches,
    load_split,
    sampling_weights,
    stored_narrative,
    training_narrative,
)
from training.hardware import choose_precision, describe_machine
from training.model.config import ModelConfig
from training.model.factory import create_model, load_config
from training.model.losses import class_weights
from training.model.model import RetinaAlignModel
from training.splits import load_splits
from training.tokenizer import load_tokenizer, train_wordpiece

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
NARRATIVE_SEEDS_FOR_TOKENIZER = 4


class FitOptions(BaseModel):
    """Everything `retina-train fit` takes (the run's record of how it was trained)."""

    config: str
    archive: Path
    splits: Path
    out: Path
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=2)
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 0
    init: Path | None = None
    max_minutes: float | None = Field(default=None, gt=0)
    checkpoint_every: int = Field(default=0, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    balance: float = Field(default=0.0, ge=0, le=1)
    illumination: Illumination | None = None


@dataclass
class RunFiles:
    """Paths inside a run folder."""

    root: Path

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


def _distributed() -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun; (rank, world size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CPU (fast on AMX) or GPU; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Norms, biases, embeddings of positions/modalities and logit scales are not decayed.
        if param.ndim < 2 or "logit_scale" in name or "pos_embed" in name or "token" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _prepare_text_and_tabular(
    options: FitOptions, files: RunFiles, archive: Archive, train_ids: list[str]
) -> tuple[object, FeatureSpec]:
    """Tokenizer and feature spec: from --init's run, the config's pretrained tokenizer, or fitted here."""
    by_id = {r.image_id: r for r in archive.records}
    train_records = [by_id[i] for i in train_ids]
    init_run = RunFiles(Path(options.init)) if options.init and Path(options.init).is_dir() else None
    if init_run is not None:
        shutil.copytree(init_run.tokenizer, files.tokenizer, dirs_exist_ok=True)
        shutil.copy(init_run.feature_spec, files.feature_spec)
        return load_tokenizer(files.tokenizer), FeatureSpec.model_validate_json(files.feature_spec.read_text())
    config = load_config(options.config)
    if config.text.tokenizer == "train":
        texts = [stored_narrative(r, options.seed) for r in train_records]
        texts += [training_narrative(r, epoch, options.seed) for epoch in range(NARRATIVE_SEEDS_FOR_TOKENIZER)
                  for r in train_records]
        tokenizer = train_wordpiece(texts, config.text.vocab_size, files.tokenizer, config.text.max_length)
    else:
        tokenizer = load_tokenizer(config.text.tokenizer_source)
        tokenizer.save_pretrained(files.tokenizer)
    spec = fit_feature_spec(train_records)
    files.feature_spec.write_text(spec.model_dump_json(indent=1))
    return tokenizer, spec


def _model_config(options: FitOptions) -> ModelConfig:
    """The config named by --config, with --illumination (when given) in place of the config's own."""
    config = load_config(options.config)
    if options.illumination is None:
        return config
    vision = config.vision.model_copy(update={"illumination": options.illumination})
    return config.model_copy(update={"vision": vision})


def _init_weights(model: RetinaAlignModel, init: Path) -> None:
    """Load earlier weights (a run folder or a safetensors file) strictly into the model."""
    path = init / CHECKPOINT_DIR / MODEL_FILE if init.is_dir() else init
    if not path.is_file():
        raise FileNotFoundError(f"--init {init}: no {MODEL_FILE} found (expected a run folder or a file)")
    state = load_file(str(path))
    own = model.state_dict()
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
            f"Fine-tune with the config those weights were trained with{hint}."
        )
    model.load_state_dict(state, strict=True)


def _save_checkpoint(
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


def _global_mean(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss values averaged over all ranks (each rank's losses are means over its equal share of the
    global batch, so this is the global batch's loss)."""
    names = sorted(losses)
    values = torch.stack([losses[n].detach().float() for n in names])
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(names, values.tolist(), strict=True))


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint a resumed run restarts from (they are replayed)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


ProgressCallback = Callable[[dict], None]


def fit(options: FitOptions, on_step: ProgressCallback | None = None,
        on_load: Callable[[int, int], None] | None = None) -> dict:
    """Train (or resume) a run; returns the run summary written to run.json.

    `on_step(metrics)` is called after every optimiser step on rank 0; `on_load(done, total)` while the
    photographs are decoded.
    """
    rank, world_size, device = _distributed()
    precision = choose_precision(options.precision, device)
    files = RunFiles(Path(options.out))
    resume = (files.checkpoint / STATE_FILE).is_file()
    if files.run_json.exists() and not resume:
        raise FileExistsError(f"{files.root} already holds a run without a checkpoint; choose another --out")
    torch.manual_seed(options.seed)
    created_here = not files.root.exists()

    archive = read_archive(options.archive)
    splits = load_splits(options.splits)
    for name in ("train", "val"):
        if name not in splits:
            raise ValueError(f"{options.splits}: no '{name}' split")
    data_fingerprint = fingerprint(archive, splits)

    if resume:
        info = json.loads(files.run_json.read_text())
        if info["fingerprint"] != data_fingerprint:
            raise ValueError(
                f"cannot resume {files.root}: it was trained on archive/splits {info['fingerprint'][:12]}, "
                f"these are {data_fingerprint[:12]}"
            )
        tokenizer = load_tokenizer(files.tokenizer)
        spec = FeatureSpec.model_validate_json(files.feature_spec.read_text())
    else:
        if rank == 0:
            files.root.mkdir(parents=True, exist_ok=True)
            tokenizer, spec = _prepare_text_and_tabular(options, files, archive, splits["train"])
        if dist.is_initialized():
            dist.barrier()
        if rank != 0:
            tokenizer = load_tokenizer(files.tokenizer)
            spec = FeatureSpec.model_validate_json(files.feature_spec.read_text())
        info = {
            "options": json.loads(options.model_dump_json()),
            "fingerprint": data_fingerprint,
            "world_size": world_size,
            "finished": False,
        }
        if rank == 0:
            _write_json(files.run_json, info)

    config = _model_config(options)
    if resume and files.config.is_file():
        # A resumed run continues the model it checkpointed, whatever --config says now.
        recorded = load_config(files.config)
        if recorded != config:
            log.warning("resuming %s with its recorded config %s (--config %s differs)", files.root,
                        recorded.name, options.config)
        config = recorded
    model = create_model(config, tabular_width=spec.width, tokenizer=tokenizer)
    if options.init is not None and not resume:
        try:
            _init_weights(model, Path(options.init))
        except (ValueError, FileNotFoundError):
            if rank == 0 and created_here:
                shutil.rmtree(files.root, ignore_errors=True)  # nothing trained: leave no run to resume
            raise
    config = model.config
    if rank == 0:
        files.config.write_text(config.model_dump_json(indent=1))

    def progress_load(done: int) -> None:
        progress_load.count += done  # type: ignore[attr-defined]
        if on_load and rank == 0:
            on_load(progress_load.count, len(splits["train"]))  # type: ignore[attr-defined]

    progress_load.count = 0  # type: ignore[attr-defined]
    train = load_split(archive, splits["train"], config.vision.image_spec(), spec, progress_load)
    scheme = config.losses.class_weighting
    model.set_class_weights(
        class_weights(np.bincount(train.icdr[train.icdr >= 0], minlength=config.num_icdr), scheme),
        class_weights(np.bincount(train.sdrg[train.sdrg >= 0], minlength=config.num_sdrg), scheme),
    )
    model.to(device)

    global_batch = options.batch_size
    if global_batch % world_size:
        raise ValueError(f"--batch-size {global_batch} must be a multiple of the {world_size} processes")
    local_batch = global_batch // world_size
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(train)} images, fewer than one batch of {global_batch}")
    total_steps = steps_per_epoch * options.epochs
    if options.max_steps is not None:
        total_steps = min(total_steps, options.max_steps)
    warmup = int(options.warmup_fraction * total_steps)

    optimizer = _optimizer(model, options.lr, options.weight_decay)
    jitter_generator = torch.Generator().manual_seed(options.seed + 17)
    position = {"step": 0, "epoch": 0, "step_in_epoch": 0, "seconds": 0.0}
    if resume:
        state = torch.load(files.checkpoint / STATE_FILE, weights_only=False)
        model.load_state_dict(load_file(str(files.checkpoint / MODEL_FILE)), strict=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        jitter_generator.set_state(state["jitter_rng"])
        position = state["position"]
        if rank == 0:
            _truncate_log(files.metrics, position["step"])
        log.info("resuming %s at step %d (epoch %d)", files.root, position["step"], position["epoch"])

    trained: torch.nn.Module = model
    if world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    builder = BatchBuilder(train, tokenizer, config.vision.mean, config.vision.std, config.text.max_length)
    weights = sampling_weights(train.icdr, options.balance)
    model.train()
    started = time.perf_counter()
    budget = options.max_minutes * 60 if options.max_minutes else None
    stopped_early = False
    with files.metrics.open("a") if rank == 0 else nullcontext() as metrics_log:
        while position["step"] < total_steps:
            epoch = position["epoch"]
            batches = list(global_batches(len(train), global_batch, options.seed, epoch, weights))
            for rows in batches[position["step_in_epoch"] :]:
                if position["step"] >= total_steps:
                    break
                step_started = time.perf_counter()
                mine = slice(rank * local_batch, (rank + 1) * local_batch)
                jitter_params = draw_jitter(jitter_generator, global_batch)[mine]
                texts = [training_narrative(train.records[i], epoch, options.seed) for i in rows[mine]]
                batch = {k: v.to(device) for k, v in builder.batch(rows[mine], texts, jitter_params).items()}
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(position["step"], total_steps, options.lr, warmup)
                with autocast_context(precision.precision, device):
                    losses = trained(batch)
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                position["step"] += 1
                position["step_in_epoch"] += 1
                values = _global_mean(losses)
                seconds = time.perf_counter() - step_started
                position["seconds"] += seconds
                if rank == 0:
                    record = {
                        "step": position["step"],
                        "epoch": epoch + position["step_in_epoch"] / steps_per_epoch,
                        **{k: round(v, 5) for k, v in values.items()},
                        "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": round(float(grad_norm), 4),
                        "samples_per_s": round(global_batch / seconds, 2),
                    }
                    metrics_log.write(json.dumps(record) + "\n")
                    metrics_log.flush()
                    if on_step:
                        on_step({**record, "total_steps": total_steps})
                if rank == 0 and options.checkpoint_every and position["step"] % options.checkpoint_every == 0:
                    _save_checkpoint(files, model, optimizer, position, jitter_generator)
                if budget is not None and time.perf_counter() - started > budget:
                    stopped_early = True
                    break
            if stopped_early:
                break
            if position["step_in_epoch"] >= len(batches):
                position["epoch"] += 1
                position["step_in_epoch"] = 0
            if rank == 0:
                _save_checkpoint(files, model, optimizer, position, jitter_generator)
    if rank == 0:
        _save_checkpoint(files, model, optimizer, position, jitter_generator)
    info.update(
        finished=position["step"] >= total_steps,
        stopped_by_time_budget=stopped_early,
        steps=position["step"],
        total_steps=total_steps,
        train_images=len(train),
        training_seconds=round(position["seconds"], 1),
        samples_per_second=round(position["step"] * global_batch / max(position["seconds"], 1e-9), 2),
        precision=precision.precision,
        precision_reason=precision.reason,
        device=str(device),
        machine=describe_machine(device),
        threads=torch.get_num_threads(),
    )
    if rank == 0:
        _write_json(files.run_json, info)
    if dist.is_initialized():
        dist.barrier()
    return info


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
        model = create_model(files.config, tabular_width=spec.width, tokenizer=tokenizer,
                             checkpoint=files.checkpoint / MODEL_FILE)
    finally:
        towers_log.setLevel(level)
    model.to(device).eval()
    return LoadedRun(files, model, tokenizer, spec, json.loads(files.run_json.read_text()))


def split_for_evaluation(archive: Archive, ids: list[str], run: LoadedRun) -> SplitData:
    """Load a split with the run's image size and feature spec."""
    return load_split(archive, ids, run.model.config.vision.image_spec(), run.spec)
