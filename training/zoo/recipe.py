"""`retina-train zoo`: the recipe of a shipped model, one command from nothing to a model card.

Stages (each the project's own command, reused when its output is already there for the same inputs, so
an interrupted recipe continues where it stopped):

1. a large synthetic training archive (its own seed) and its patient-level split;
2. a held-out synthetic archive (another seed, used nowhere in training) whose every record is the test set;
3. training (resumed when a run was stopped by `--max-minutes`);
4. with `--tune-config`, locked-image tuning of the run (`fit --lock-image`, in ROOT/tuned): the image
   tower stays as trained, the text, tabular and joint-transformer sides train on with large batches;
5. with `--appearance-config`, the appearance stage of the latest run (in ROOT/appearance): only the image
   embedding's two projections and the text's projection against photographs train (`fit --train-only`): the
   grade projection is re-learnt, the appearance projection (`image_appearance_dims`) trained, which spreads
   the image->image similarity scores, and the text's image projection follows them. Everything else, the image
   tower, the grading path, the text tower, the text's record head and the tabular side, stays as trained, so
   every grade and every text->record answer stays what it was (with a config that has a record head for the
   text, `record_text_head`; without one, the text's projection serves records too);
6. with `--facts-config`, the facts stage of the latest run (in ROOT/facts): only the two projections that meet
   in text->record search, the text's record head and the record projection, train (`fit --lock-image
   --train-only`), with large batches like tuning: the losses of that config (e.g. a term that pulls a text
   towards the records of the grade it states) reshape record search and nothing else, every photograph's
   embedding and every grade stay what they were;
7. calibration of the final run (`retina-train calibrate`: temperatures on the validation split, and
   with `offsets_split` per-grade decision offsets fitted for macro-F1 on that split; RUN/calibration.json,
   which evaluation, export and release use);
8. evaluation on the held-out archive of the final run (written to RUN/eval-test, which the export and the
   release carry);
9. export to a bundle, checked against PyTorch on the training archive's validation split;
10. optionally the CLIP-style baseline trained (and tuned, with its own config; it has no appearance stage, since
   its config has no appearance part) and evaluated the same way, and the comparison table;
11. the model card (MODEL_CARD.md), and with `--release NAME` the shipped copy in `training/zoo/models/NAME`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from training.stages import StageError, reuse_stage, run_stage, tool
from training.synth.archive import read_synth_manifest
from training.zoo import CARD_FILE, release
from training.zoo.card import write_card


@dataclass(frozen=True)
class ZooOptions:
    """What the recipe trains and on what."""

    out: Path
    config: str = "tiny-synth"
    baseline_config: str = "clip-baseline-synth"
    n: int = 30_000
    seed: int = 7001
    heldout_n: int = 3_000
    heldout_seed: int = 7002
    size: int = 224
    epochs: int = 3
    batch_size: int = 48
    lr: float = 5e-4
    balance: float = 0.5
    precision: str = "auto"
    max_minutes: float | None = None
    baseline: bool = False
    release: str | None = None
    appearance_config: str | None = None
    appearance_epochs: int = 3
    appearance_batch_size: int = 48
    appearance_lr: float = 2e-3
    facts_config: str | None = None
    facts_epochs: int = 3
    facts_batch_size: int = 256
    facts_lr: float = 1e-3
    tune_config: str | None = None
    tune_epochs: int = 10
    tune_batch_size: int = 256
    tune_lr: float = 1e-3
    tune_reinit: tuple[str, ...] = ()
    tune_freeze: tuple[str, ...] = ()
    calibrate: bool = True
    offsets_split: str | None = "train"


@dataclass(frozen=True)
class ZooPaths:
    """The folders and files of a recipe's output."""

    root: Path

    @property
    def archive(self) -> Path:
        """The synthetic training archive."""
        return self.root / "train-archive"

    @property
    def splits(self) -> Path:
        """Its patient-level train/val/test split."""
        return self.root / "splits.json"

    @property
    def heldout(self) -> Path:
        """The held-out synthetic archive."""
        return self.root / "heldout-archive"

    @property
    def heldout_splits(self) -> Path:
        """The held-out archive's split: every record in `test`."""
        return self.root / "heldout-splits.json"

    @property
    def run(self) -> Path:
        """The training run of the model."""
        return self.root / "run"

    @property
    def appearance(self) -> Path:
        """The appearance stage of the run (`--appearance-config`)."""
        return self.root / "appearance"

    @property
    def facts(self) -> Path:
        """The facts stage of the run (`--facts-config`)."""
        return self.root / "facts"

    def before_facts(self, options: ZooOptions) -> Path:
        """The run the facts stage starts from: the last of the stages before it."""
        return self.appearance if options.appearance_config else self.before_appearance(options)

    def before_appearance(self, options: ZooOptions) -> Path:
        """The run the appearance stage starts from: the tuned run when there is one."""
        return self.tuned if options.tune_config else self.run

    @property
    def tuned(self) -> Path:
        """The locked-image tuning of the run (`--tune-config`)."""
        return self.root / "tuned"

    @property
    def baseline(self) -> Path:
        """The training run of the CLIP-style baseline."""
        return self.root / "baseline"

    @property
    def baseline_tuned(self) -> Path:
        """The baseline's locked-image tuning (with `--tune-config`)."""
        return self.root / "baseline-tuned"

    def final(self, options: ZooOptions) -> Path:
        """The run the recipe evaluates, exports and releases: the last of its stages."""
        return self.facts if options.facts_config else self.before_facts(options)

    @property
    def bundle(self) -> Path:
        """The exported bundle."""
        return self.root / "bundle"


def _archive(console: Console, title: str, path: Path, n: int, seed: int, size: int) -> None:
    made = read_synth_manifest(path)
    wanted = {"images": n, "seed": seed, "size": size}
    if made and all(made.get(k) == v for k, v in wanted.items()):
        reuse_stage(console, title, f"{path} ({n} images, seed {seed})")
        return
    if path.exists():
        raise StageError(f"{path} holds another archive ({ {k: made.get(k) for k in wanted} }, not {wanted}); "
                         "remove it or choose another --out")
    run_stage(console, title, [tool("retina-train"), "synth", "--out", str(path), "--n", str(n),
                               "--seed", str(seed), "--size", str(size)])


def _split(console: Console, title: str, archive: Path, out: Path, val: float, test: float) -> None:
    if out.is_file():
        reuse_stage(console, title, str(out))
        return
    run_stage(console, title, [tool("retina-train"), "split", str(archive), "--out", str(out),
                               "--val", str(val), "--test", str(test)])


Stage = Literal["train", "appearance", "tune", "facts"]
"""A training stage of the recipe; each has its own schedule (epochs, batch size, peak lr)."""

APPEARANCE_REINIT = ("image_proj", "image_appearance_proj")
"""What the appearance stage learns anew (`--reinit`): the image embedding's grade projection (now narrower) and its
appearance projection."""

APPEARANCE_TRAIN = (*APPEARANCE_REINIT, "text_proj")
"""What the appearance stage trains (`--train-only`): those two and the text's projection against photographs, which
only the image-text loss reads where the text has a record head of its own (`record_text_head`; without one it
serves records too); every other weight stays as the stage before left it."""

FACTS_TRAIN = ("text_record_proj", "record_proj")
"""What the facts stage trains (`--train-only`, with `--lock-image`): the two projections whose embeddings meet in
text->record search, the text's record head and the record projection."""


def _schedule(options: ZooOptions, stage: Stage) -> tuple[int, int, float]:
    """(epochs, batch size, peak lr) of a stage: "train", "appearance", "tune" or "facts"."""
    if stage == "facts":
        return options.facts_epochs, options.facts_batch_size, options.facts_lr
    if stage == "appearance":
        return options.appearance_epochs, options.appearance_batch_size, options.appearance_lr
    if stage == "tune":
        return options.tune_epochs, options.tune_batch_size, options.tune_lr
    return options.epochs, options.batch_size, options.lr


def _stage_flags(stage: Stage, start: Path | None, modules: dict[str, tuple[str, ...]]) -> list[str]:
    """`fit` flags of a stage that starts from the run `start`: `--init`, `--lock-image` for tuning and the facts
    stage, and for each (flag, names) of `modules` (e.g. "reinit": ("tabular",)) that flag once per name."""
    if start is None:
        return []
    flags = ["--init", str(start)] + (["--lock-image"] if stage in ("tune", "facts") else [])
    return flags + [f"--{flag}={name}" for flag, names in modules.items() for name in names]


def _train(console: Console, title: str, options: ZooOptions, paths: ZooPaths, config: str, run: Path,
           stage: Stage = "train", start: Path | None = None, reinit: tuple[str, ...] = (),
           freeze: tuple[str, ...] = (), train_only: tuple[str, ...] = ()) -> None:
    """Train `run` with the schedule of `stage` ("train", "appearance", "tune" or "facts"), from the run `start`
    when given (`--init`; "tune" and "facts" add `--lock-image`), with `--train-only` / `--reinit` / `--freeze`
    each of `train_only` / `reinit` / `freeze`."""
    info_path = run / "run.json"
    if info_path.is_file() and json.loads(info_path.read_text()).get("finished"):
        reuse_stage(console, title, f"{run} finished its schedule")
        return
    epochs, batch_size, lr = _schedule(options, stage)
    command = [
        tool("retina-train"), "fit", "--config", config, "--archive", str(paths.archive), "--splits",
        str(paths.splits), "--out", str(run), "--epochs", str(epochs), "--batch-size", str(batch_size),
        "--lr", str(lr), "--balance", str(options.balance), "--precision", options.precision,
        "--checkpoint-every", "100",
        *_stage_flags(stage, start, {"train-only": train_only, "reinit": reinit, "freeze": freeze}),
    ]
    if options.max_minutes is not None:
        command += ["--max-minutes", str(options.max_minutes)]
    if (run / "checkpoint" / "trainer_state.pt").is_file():
        command.append("--resume")  # a resumed run reads its checkpoint; --init then only keeps the image locked
    run_stage(console, title, command)
    if not json.loads(info_path.read_text()).get("finished"):
        raise StageError(f"{run} stopped at the --max-minutes budget before its schedule ended; "
                         "run the same command again to resume it")


def _calibrate(console: Console, options: ZooOptions, run: Path) -> None:
    """Fit RUN/calibration.json (temperatures on val; decision offsets on `options.offsets_split`)."""
    calibration = run / "calibration.json"
    checkpoint = run / "checkpoint" / "model.safetensors"
    if calibration.is_file() and calibration.stat().st_mtime >= checkpoint.stat().st_mtime:
        reuse_stage(console, "calibration", str(calibration))
        return
    command = [tool("retina-train"), "calibrate", "--run", str(run)]
    if options.offsets_split:
        command += ["--offsets-split", options.offsets_split]
    run_stage(console, "calibration" + (f" (decision offsets on {options.offsets_split})"
                                        if options.offsets_split else ""), command)


def _weights_changed(run: Path) -> float:
    """When the run's checkpoint or its calibration (if any) last changed: what evaluation and export read."""
    calibration = run / "calibration.json"
    return max((run / "checkpoint" / "model.safetensors").stat().st_mtime,
               calibration.stat().st_mtime if calibration.is_file() else 0.0)


def _evaluate(console: Console, title: str, paths: ZooPaths, run: Path) -> dict:
    metrics = run / "eval-test" / "metrics.json"
    if metrics.is_file() and metrics.stat().st_mtime >= _weights_changed(run):
        reuse_stage(console, title, str(metrics))
    else:
        run_stage(console, title, [tool("retina-train"), "evaluate", "--run", str(run), "--archive",
                                   str(paths.heldout), "--splits", str(paths.heldout_splits), "--split", "test"])
    return json.loads(metrics.read_text())


def run_recipe(options: ZooOptions, console: Console | None = None) -> ZooPaths:
    """Run (or continue) every stage of the recipe; returns its paths. Raises StageError."""
    console = console or Console(stderr=True)
    paths = ZooPaths(Path(options.out))
    paths.root.mkdir(parents=True, exist_ok=True)
    if options.heldout_seed == options.seed:
        raise StageError("the held-out archive needs a seed of its own (--heldout-seed differs from --seed)")

    _archive(console, "training archive", paths.archive, options.n, options.seed, options.size)
    _split(console, "patient-level split", paths.archive, paths.splits, 0.05, 0.05)
    _archive(console, "held-out archive", paths.heldout, options.heldout_n, options.heldout_seed, options.size)
    _split(console, "held-out split (every record in test)", paths.heldout, paths.heldout_splits, 0.0, 1.0)
    _train(console, f"training {options.config}", options, paths, options.config, paths.run)
    if options.tune_config:
        _train(console, f"locked-image tuning {options.tune_config}", options, paths, options.tune_config, paths.tuned,
               stage="tune", start=paths.run, reinit=options.tune_reinit, freeze=options.tune_freeze)
    if options.appearance_config:
        _train(console, f"appearance stage {options.appearance_config}", options, paths, options.appearance_config,
               paths.appearance, stage="appearance", start=paths.before_appearance(options), reinit=APPEARANCE_REINIT,
               train_only=APPEARANCE_TRAIN)
    if options.facts_config:
        _train(console, f"facts stage {options.facts_config}", options, paths, options.facts_config, paths.facts,
               stage="facts", start=paths.before_facts(options), train_only=FACTS_TRAIN)
    final = paths.final(options)
    if options.calibrate:
        _calibrate(console, options, final)
    final_config = options.facts_config or options.appearance_config or options.tune_config or options.config
    metrics = _evaluate(console, f"evaluating {final_config} on the held-out archive", paths, final)
    bundle_manifest = paths.bundle / "manifest.json"
    if bundle_manifest.is_file() and bundle_manifest.stat().st_mtime >= _weights_changed(final):
        reuse_stage(console, "export", str(paths.bundle))
    else:
        run_stage(console, "export with parity check", [
            tool("retina-train"), "export", "--run", str(final), "--archive", str(paths.archive),
            "--splits", str(paths.splits), "--out", str(paths.bundle),
        ])
    baseline_metrics = None
    if options.baseline:
        _train(console, f"training {options.baseline_config}", options, paths, options.baseline_config, paths.baseline)
        baseline_final = paths.baseline
        if options.tune_config:  # the same budget: the baseline is tuned too, with its own losses
            _train(console, f"locked-image tuning {options.baseline_config}", options, paths,
                   options.baseline_config, paths.baseline_tuned, stage="tune", start=paths.baseline)
            baseline_final = paths.baseline_tuned
        baseline_metrics = _evaluate(console, "evaluating the baseline on the held-out archive", paths, baseline_final)
    card = write_card(options, paths, metrics, baseline_metrics)
    console.print(f"model card: {card}")
    if options.release:
        shipped = release(final, options.release, card.read_text())
        console.print(f"released as zoo:{options.release} in {shipped}")
    return paths


__all__ = ["CARD_FILE", "ZooOptions", "ZooPaths", "run_recipe"]
