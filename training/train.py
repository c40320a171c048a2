"""The training loop: `retina-train fit`.

`fit` is three parts: `_setup` (data, tokenizer, feature spec, model, optimiser; from the checkpoint
when resuming), `_train_step` (one optimiser step on this rank's share of a global batch) and `_finish`
(the final checkpoint and the run summary). The run folder it writes is `training.run`'s.

Locked-image tuning (`--lock-image`, after `--init`): the image tower and its projection are frozen, and
their output for every training photograph is computed once before the first step (no brightness jitter
then); each step reads those states instead of running the tower. A step then costs the text tower and the
joint transformer only, so batches can be much larger at the same budget: what the contrastive losses on
the facts side (text -> record, text -> tabular) need most. `--freeze MODULE` keeps more of `--init`'s
weights as they are (e.g. `--freeze fusion --freeze image_to_fusion`: the grading from a photograph, which
runs through those and the image tower only, then stays exactly as the initial run graded). `--train-only
MODULE` freezes everything else instead (e.g. the image embedding's projections alone).

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
import random
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
from pydantic import BaseModel, Field, model_validator

from index.archive.brset import Archive, read_archive
from index.preprocess import Illumination
from index.records import FundusRecord
from index.tabular import FeatureSpec, fit_feature_spec
from training.data import (
    BatchBuilder,
    Counterfactuals,
    SplitData,
    draw_jitter,
    fingerprint,
    global_batches,
    load_split,
    normalise,
    sampling_weights,
    stored_narrative,
    training_narrative,
    training_narrative_and_facts,
)
from training.hardware import PrecisionChoice, autocast_context, choose_precision, describe_machine
from training.model.config import ModelConfig
from training.model.factory import create_model, load_config
from training.model.losses import class_weights
from training.model.model import RetinaAlignModel
from training.run import (
    RunFiles,
    freeze_all_but,
    freeze_modules,
    init_weights,
    is_under,
    load_checkpoint,
    save_checkpoint,
    truncate_log,
    write_json,
)
from training.splits import load_splits
from training.synth.archive import read_synth_manifest
from training.text.counterfactual import CounterfactualPool
from training.tokenizer import load_tokenizer, train_wordpiece

log = logging.getLogger(__name__)

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
    lock_image: bool = False
    reinit: list[str] = Field(default_factory=list)
    freeze: list[str] = Field(default_factory=list)
    train_only: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> FitOptions:
        if self.lock_image and self.init is None:
            raise ValueError("--lock-image needs --init: a locked image tower keeps the weights it starts from")
        if self.reinit and self.init is None:
            raise ValueError("--reinit needs --init: without it every module starts from random init anyway")
        if self.freeze and self.init is None:
            raise ValueError("--freeze needs --init: a frozen module keeps the weights it starts from")
        both = sorted(set(self.freeze) & set(self.reinit))
        if both:
            raise ValueError(f"--freeze {both[0]} and --reinit {both[0]}: a module from random init that never trains")
        if self.train_only:
            if self.init is None:
                raise ValueError("--train-only needs --init: the modules it freezes keep the weights they start from")
            if self.freeze:
                raise ValueError("--train-only and --freeze: give one (--train-only freezes all it does not name)")
            outside = [n for n in self.reinit if not any(is_under(n, t) for t in self.train_only)]
            if outside:
                raise ValueError(f"--reinit {outside[0]} is not under --train-only: a module from random init that "
                                 "never trains")
        return self


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
    image = config.vision.image.model_copy(update={"illumination": options.illumination})
    vision = config.vision.model_copy(update={"image": image})
    return config.model_copy(update={"vision": vision})


def _global_mean(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss values averaged over all ranks (each rank's losses are means over its equal share of the
    global batch, so this is the global batch's loss)."""
    names = sorted(losses)
    values = torch.stack([losses[n].detach().float() for n in names])
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(names, values.tolist(), strict=True))


ProgressCallback = Callable[[dict], None]


@dataclass
class _Session:
    """Everything one `fit` holds while it trains."""

    options: FitOptions
    rank: int
    world_size: int
    device: torch.device
    precision: PrecisionChoice
    files: RunFiles
    info: dict
    train: SplitData
    model: RetinaAlignModel
    trained: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    builder: BatchBuilder
    jitter_generator: torch.Generator
    position: dict
    weights: np.ndarray | None
    steps_per_epoch: int
    total_steps: int
    warmup: int
    counterfactual_source: _CounterfactualSource | None = None

    @property
    def local_batch(self) -> int:
        """This rank's share of a global batch."""
        return self.options.batch_size // self.world_size

    def checkpoint(self) -> None:
        """Save the model, optimiser, RNG and loop position (rank 0 only)."""
        if self.rank == 0:
            save_checkpoint(self.files, self.model, self.optimizer, self.position, self.jitter_generator)


@dataclass
class _CounterfactualSource:
    """What a step needs to draw text -> record hard negatives (`losses.counterfactual_records`)."""

    pool: CounterfactualPool
    spec: FeatureSpec
    narrative_seed: int

    def draw(self, records: list[FundusRecord], epoch: int, seed: int, step: int) -> tuple[list[str], Counterfactuals]:
        """The rows' training texts and one counterfactual record per row (where its text allows one)."""
        written = [training_narrative_and_facts(r, epoch, seed, self.narrative_seed) for r in records]
        rng = random.Random(1_000_003 * seed + step)
        drawn = Counterfactuals.draw(records, [facts for _, facts in written], rng, self.pool, self.spec)
        return [text for text, _ in written], drawn


def _counterfactual_source(config: ModelConfig, train: SplitData, spec: FeatureSpec,
                           archive: Path) -> _CounterfactualSource | None:
    """The hard-negative source of a config that trains with counterfactual records, else None."""
    if not config.losses.counterfactual_records:
        return None
    narrative_seed = int(read_synth_manifest(archive).get("seed", 0))
    return _CounterfactualSource(CounterfactualPool.from_records(train.records), spec, narrative_seed)


def _run_info(options: FitOptions, files: RunFiles, archive: Archive, splits: dict[str, list[str]],
              world_size: int, resume: bool) -> dict:
    """The run record: read back when resuming (after checking the data is the same), else a new one."""
    data_fingerprint = fingerprint(archive, splits)
    if not resume:
        return {
            "options": json.loads(options.model_dump_json()),
            "fingerprint": data_fingerprint,
            "world_size": world_size,
            "finished": False,
        }
    info = json.loads(files.run_json.read_text())
    if info["fingerprint"] != data_fingerprint:
        raise ValueError(
            f"cannot resume {files.root}: it was trained on archive/splits {info['fingerprint'][:12]}, "
            f"these are {data_fingerprint[:12]}"
        )
    return info


def _tokenizer_and_spec(options: FitOptions, files: RunFiles, archive: Archive, train_ids: list[str],
                        rank: int, resume: bool) -> tuple[object, FeatureSpec]:
    """Rank 0 prepares the tokenizer and feature spec of a new run; everyone else (and a resumed run)
    reads them from the run folder."""
    if not resume and rank == 0:
        files.root.mkdir(parents=True, exist_ok=True)
        prepared = _prepare_text_and_tabular(options, files, archive, train_ids)
        if dist.is_initialized():
            dist.barrier()
        return prepared
    if not resume and dist.is_initialized():
        dist.barrier()
    return load_tokenizer(files.tokenizer), FeatureSpec.model_validate_json(files.feature_spec.read_text())


def _resolved_config(options: FitOptions, files: RunFiles, resume: bool) -> ModelConfig:
    """The model config: `--config` (with `--illumination`) for a new run; RUN/config.json when resuming,
    since a resumed run continues the model it checkpointed whatever `--config` says now."""
    config = _model_config(options)
    if not (resume and files.config.is_file()):
        return config
    recorded = load_config(files.config)
    if recorded != config:
        log.warning("resuming %s with its recorded config %s (--config %s differs)", files.root,
                    recorded.name, options.config)
    return recorded


def _setup(options: FitOptions, on_load: Callable[[int, int], None] | None,
           on_cache: Callable[[int, int], None] | None = None) -> _Session:
    """Read the data, build (or restore) the model and optimiser: everything before the first step."""
    rank, world_size, device = _distributed()
    precision = choose_precision(options.precision, device)
    files = RunFiles(Path(options.out))
    resume = files.state.is_file()
    if files.run_json.exists() and not resume:
        raise FileExistsError(f"{files.root} already holds a run without a checkpoint; choose another --out")
    torch.manual_seed(options.seed)
    created_here = not files.root.exists()

    archive = read_archive(options.archive)
    splits = load_splits(options.splits)
    for name in ("train", "val"):
        if name not in splits:
            raise ValueError(f"{options.splits}: no '{name}' split")
    info = _run_info(options, files, archive, splits, world_size, resume)
    tokenizer, spec = _tokenizer_and_spec(options, files, archive, splits["train"], rank, resume)
    if rank == 0 and not resume:
        write_json(files.run_json, info)

    model = create_model(_resolved_config(options, files, resume), tabular_width=spec.width,
                         numeric_columns=spec.numeric_value_columns, tokenizer=tokenizer)
    if options.init is not None and not resume:
        try:
            init_weights(model, Path(options.init), options.reinit)
        except (ValueError, FileNotFoundError):
            if rank == 0 and created_here:
                shutil.rmtree(files.root, ignore_errors=True)  # nothing trained: leave no run to resume
            raise
    config = model.config
    if rank == 0:
        files.config.write_text(config.model_dump_json(indent=1))

    loaded = 0

    def progress_load(done: int) -> None:
        nonlocal loaded
        loaded += done
        if on_load and rank == 0:
            on_load(loaded, len(splits["train"]))

    train = load_split(archive, splits["train"], config.vision.image, spec, progress_load)
    scheme = config.losses.class_weighting
    model.set_class_weights(
        class_weights(np.bincount(train.icdr[train.icdr >= 0], minlength=config.num_icdr), scheme),
        class_weights(np.bincount(train.sdrg[train.sdrg >= 0], minlength=config.num_sdrg), scheme),
    )
    model.to(device)
    model.train()
    builder = BatchBuilder(train, tokenizer, config.vision.image, config.text.max_length)
    if options.lock_image:
        model.lock_image()
        builder.image_states = locked_image_states(model, train, precision, device, on_cache if rank == 0 else None)
        train.images = train.images[:0]  # the states replace the decoded photographs (several GB at 224 px)
    freeze_modules(model, options.freeze)  # after train(): frozen modules stay in eval mode
    if options.train_only:
        freeze_all_but(model, options.train_only)

    global_batch = options.batch_size
    if global_batch % world_size:
        raise ValueError(f"--batch-size {global_batch} must be a multiple of the {world_size} processes")
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(train)} images, fewer than one batch of {global_batch}")
    total_steps = steps_per_epoch * options.epochs
    if options.max_steps is not None:
        total_steps = min(total_steps, options.max_steps)

    optimizer = _optimizer(model, options.lr, options.weight_decay)
    jitter_generator = torch.Generator().manual_seed(options.seed + 17)
    position = {"step": 0, "epoch": 0, "step_in_epoch": 0, "seconds": 0.0}
    if resume:
        state = load_checkpoint(files, model)
        optimizer.load_state_dict(state.optimizer)
        torch.set_rng_state(state.torch_rng)
        jitter_generator.set_state(state.jitter_rng)
        position = state.position
        if rank == 0:
            truncate_log(files.metrics, position["step"])
        log.info("resuming %s at step %d (epoch %d)", files.root, position["step"], position["epoch"])

    trained: torch.nn.Module = model
    if world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    return _Session(
        options=options, rank=rank, world_size=world_size, device=device, precision=precision, files=files,
        info=info, train=train, model=model, trained=trained, optimizer=optimizer,
        builder=builder,
        jitter_generator=jitter_generator, position=position,
        weights=sampling_weights(train.icdr, options.balance), steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, warmup=int(options.warmup_fraction * total_steps),
        counterfactual_source=_counterfactual_source(config, train, spec, Path(options.archive)),
    )


def locked_image_states(model: RetinaAlignModel, train: SplitData, precision: PrecisionChoice, device: torch.device,
                        on_progress: Callable[[int, int], None] | None = None, chunk: int = 64) -> torch.Tensor:
    """The image tower's output (N, tokens, width) for every photograph of the split, in eval mode, kept in
    float32 on the CPU: what a locked tower would compute at every step. `on_progress(done, total)`."""
    image = model.image
    image.eval()
    spec = model.config.vision.image
    states: torch.Tensor | None = None
    with torch.no_grad(), autocast_context(precision.precision, device):
        for start in range(0, len(train), chunk):
            pixels = normalise(torch.from_numpy(train.images[start : start + chunk]), spec.mean, spec.std)
            out = image(pixels.to(device)).float().cpu()
            if states is None:
                states = torch.empty((len(train), *out.shape[1:]), dtype=torch.float32)
            states[start : start + len(out)] = out
            if on_progress:
                on_progress(start + len(out), len(train))
    if states is None:
        raise ValueError("the training split has no photographs to lock the image tower on")
    log.info("locked image tower: %d photographs' states cached (%.1f GB)", len(train),
             states.numel() * 4 / 1e9)
    return states


def _train_step(session: _Session, rows: np.ndarray, epoch: int) -> dict:
    """One optimiser step on this rank's share of the global batch `rows`; returns its metrics record."""
    options, position = session.options, session.position
    global_batch = options.batch_size
    step_started = time.perf_counter()
    mine = slice(session.rank * session.local_batch, (session.rank + 1) * session.local_batch)
    jitter_params = draw_jitter(session.jitter_generator, global_batch)[mine]
    records = [session.train.records[i] for i in rows[mine]]
    counterfactuals = None
    if session.counterfactual_source is not None:
        texts, counterfactuals = session.counterfactual_source.draw(records, epoch, options.seed, position["step"])
    else:
        texts = [training_narrative(r, epoch, options.seed) for r in records]
    built = session.builder.batch(rows[mine], texts, jitter_params, counterfactuals)
    batch = {k: v.to(session.device) for k, v in built.items()}
    for group in session.optimizer.param_groups:
        group["lr"] = learning_rate(position["step"], session.total_steps, options.lr, session.warmup)
    with autocast_context(session.precision.precision, session.device):
        losses = session.trained(batch)
    session.optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(session.model.parameters(), 1.0)
    session.optimizer.step()
    position["step"] += 1
    position["step_in_epoch"] += 1
    values = _global_mean(losses)
    seconds = time.perf_counter() - step_started
    position["seconds"] += seconds
    return {
        "step": position["step"],
        "epoch": epoch + position["step_in_epoch"] / session.steps_per_epoch,
        **{k: round(v, 5) for k, v in values.items()},
        "lr": session.optimizer.param_groups[0]["lr"],
        "grad_norm": round(float(grad_norm), 4),
        "samples_per_s": round(global_batch / seconds, 2),
    }


def _finish(session: _Session, stopped_early: bool) -> dict:
    """Save the last checkpoint and write the run summary (run.json); returns it."""
    session.checkpoint()
    position, info = session.position, session.info
    info.update(
        finished=position["step"] >= session.total_steps,
        stopped_by_time_budget=stopped_early,
        steps=position["step"],
        total_steps=session.total_steps,
        train_images=len(session.train),
        training_seconds=round(position["seconds"], 1),
        samples_per_second=round(position["step"] * session.options.batch_size / max(position["seconds"], 1e-9), 2),
        precision=session.precision.precision,
        precision_reason=session.precision.reason,
        device=str(session.device),
        machine=describe_machine(session.device),
        threads=torch.get_num_threads(),
    )
    if session.rank == 0:
        write_json(session.files.run_json, info)
    if dist.is_initialized():
        dist.barrier()
    return info


def fit(options: FitOptions, on_step: ProgressCallback | None = None,
        on_load: Callable[[int, int], None] | None = None,
        on_cache: Callable[[int, int], None] | None = None) -> dict:
    """Train (or resume) a run; returns the run summary written to run.json.

    `on_step(metrics)` is called after every optimiser step on rank 0; `on_load(done, total)` while the
    photographs are decoded; `on_cache(done, total)` while a locked image tower's states are computed.
    """
    session = _setup(options, on_load, on_cache)
    position = session.position
    started = time.perf_counter()
    budget = options.max_minutes * 60 if options.max_minutes else None
    stopped_early = False
    with session.files.metrics.open("a") if session.rank == 0 else nullcontext() as metrics_log:
        while position["step"] < session.total_steps and not stopped_early:
            epoch = position["epoch"]
            batches = list(global_batches(len(session.train), options.batch_size, options.seed, epoch,
                                          session.weights))
            for rows in batches[position["step_in_epoch"] :]:
                if position["step"] >= session.total_steps:
                    break
                record = _train_step(session, rows, epoch)
                if session.rank == 0:
                    metrics_log.write(json.dumps(record) + "\n")
                    metrics_log.flush()
                    if on_step:
                        on_step({**record, "total_steps": session.total_steps})
                if options.checkpoint_every and position["step"] % options.checkpoint_every == 0:
                    session.checkpoint()
                if budget is not None and time.perf_counter() - started > budget:
                    stopped_early = True
                    break
            if stopped_early:
                break
            if position["step_in_epoch"] >= len(batches):
                position["epoch"] += 1
                position["step_in_epoch"] = 0
            session.checkpoint()
    return _finish(session, stopped_early)
