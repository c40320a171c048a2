"""The embedded-default demo: synthetic archive -> splits -> ONNX bundle of the shipped model -> FAISS index
-> the service, each stage skipped when its output is already there *for the same inputs*.

By default the demo serves the shipped pretrained model (`zoo:tiny-synth`, see `training.zoo`): nothing is
trained. `--train` keeps the older path that trains `tiny` from scratch on the demo archive (and
evaluates it) before exporting.

Stages are keyed by fingerprints, not by file existence: a trained run is reused when it was trained on
this archive and split (`run.json` fingerprint) with today's `tiny`, a bundle when it was exported from
exactly these weights (the manifest's `weights_sha256`), an index when it was built with that bundle
(`index.json` bundle_fingerprint). Anything stale is rebuilt. Each stage runs the project's own
command, with its own progress bar, so what the demo does is what a user would type.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from index.archive.brset import read_archive
from index.bundle import BundleError, read_manifest, sha256_of
from index.store import IndexStoreError, read_info
from training.data import fingerprint
from training.model.factory import load_config
from training.splits import load_splits
from training.stages import StageError, reuse_stage, run_stage, tool
from training.synth.archive import read_synth_manifest
from training.zoo import ZooError, resolve_run

DEMO_QUERY = "Left eye of a 60-year-old woman with diabetes: proliferative diabetic retinopathy with new vessels."
DEFAULT_MODEL = "zoo:tiny-synth"

DemoError = StageError
"""A stage failed or the demo folder holds something it cannot use; the message says what."""


@dataclass(frozen=True)
class DemoOptions:
    """Where the demo lives, how big it is, and which model it serves (shipped, or trained here)."""

    root: Path
    n: int = 3000
    seed: int = 1
    size: int = 224
    model: str = DEFAULT_MODEL
    train: bool = False
    epochs: int = 16
    max_minutes: float = 8.0
    balance: float = 0.5


@dataclass(frozen=True)
class DemoPaths:
    """The folders and files of a demo; `run` is the shipped model's folder or the run trained here."""

    root: Path
    run: Path

    @property
    def archive(self) -> Path:
        """The synthetic archive."""
        return self.root / "archive"

    @property
    def splits(self) -> Path:
        """splits.json."""
        return self.root / "splits.json"

    @property
    def evaluation(self) -> Path:
        """The model's evaluation (the shipped model's held-out one, or the test split of a trained run)."""
        return self.run / "eval-test"

    @property
    def bundle(self) -> Path:
        """The exported bundle."""
        return self.root / "bundle"

    @property
    def index(self) -> Path:
        """The FAISS index of the archive."""
        return self.root / "index"


def _archive_matches(paths: DemoPaths, options: DemoOptions) -> bool:
    made = read_synth_manifest(paths.archive)
    if not made:
        return False
    wanted = {"images": options.n, "seed": options.seed, "size": options.size}
    if any(made.get(key) != value for key, value in wanted.items()):
        raise DemoError(
            f"{paths.archive} was generated with {({k: made.get(k) for k in wanted})}, not {wanted}: "
            f"remove {paths.root} (make clean) or choose another demo folder"
        )
    return True


def _run_fingerprint(run: Path) -> str | None:
    path = run / "run.json"
    if not (path.is_file() and (run / "checkpoint" / "model.safetensors").is_file()):
        return None
    return str(json.loads(path.read_text()).get("fingerprint"))


def _trained_with_current_tiny(run: Path) -> bool:
    """Whether the run's model config is the built-in `tiny` as it is now (towers, widths, losses), so a
    demo made before `tiny` changed is retrained rather than served with the old model."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    current = load_config("tiny").model_dump(mode="json")
    compared = ("embed_dim", "vision", "fusion", "losses", "modality_dropout")
    return all(saved.get(key) == current[key] for key in compared)


def _exported_weights(bundle: Path) -> tuple[str | None, str, bool, bool] | None:
    """(weights sha256, bundle fingerprint, has a gate, is calibrated) of a bundle that verifies, else None."""
    try:
        manifest = read_manifest(bundle)
    except BundleError:
        return None
    return manifest.weights_sha256, manifest.fingerprint, manifest.gate is not None, manifest.calibration is not None


def _run_extras(run: Path) -> tuple[bool, bool]:
    """Whether a run has a gradability gate and a calibration, which its export carries."""
    return (run / "gate").is_dir(), (run / "calibration.json").is_file()


def _model_run(paths_root: Path, options: DemoOptions) -> Path:
    """The run folder the demo exports: the trained run's folder, or the verified shipped model."""
    if options.train:
        return paths_root / "run"
    try:
        return resolve_run(options.model)
    except ZooError as error:
        raise DemoError(str(error)) from None


def _train(console: Console, paths: DemoPaths, options: DemoOptions, data: str, step: str) -> None:
    """Train `tiny` on the demo archive and evaluate it (the `--train` path)."""
    train = tool("retina-train")
    if _run_fingerprint(paths.run) == data and _trained_with_current_tiny(paths.run):
        reuse_stage(console, "training run", f"{paths.run} was trained on this archive and split with today's `tiny`")
    else:
        if paths.run.exists():
            shutil.rmtree(paths.run)
        run_stage(console, f"{step} training tiny", [
            train, "fit", "--config", "tiny", "--archive", str(paths.archive), "--splits", str(paths.splits),
            "--out", str(paths.run), "--epochs", str(options.epochs), "--max-minutes", str(options.max_minutes),
            "--balance", str(options.balance),
        ])
    checkpoint = paths.run / "checkpoint" / "model.safetensors"
    metrics = paths.evaluation / "metrics.json"
    if metrics.is_file() and metrics.stat().st_mtime >= checkpoint.stat().st_mtime:
        reuse_stage(console, "evaluation", str(metrics))
    else:
        run_stage(console, f"{step} evaluation on the test split", [
            train, "evaluate", "--run", str(paths.run), "--archive", str(paths.archive), "--splits", str(paths.splits),
        ])


def prepare(options: DemoOptions, console: Console | None = None) -> DemoPaths:
    """Build (or reuse) every stage of the demo; returns its paths. Raises DemoError."""
    console = console or Console(stderr=True)
    root = Path(options.root)
    paths = DemoPaths(root, _model_run(root, options))
    paths.root.mkdir(parents=True, exist_ok=True)
    train, index = tool("retina-train"), tool("retina-index")
    total = 6 if options.train else 5

    if _archive_matches(paths, options):
        reuse_stage(console, "archive", f"{paths.archive} ({options.n} images, seed {options.seed})")
    else:
        if paths.archive.exists():
            shutil.rmtree(paths.archive)
        run_stage(console, f"1/{total} synthetic archive", [
            train, "synth", "--out", str(paths.archive), "--n", str(options.n), "--seed", str(options.seed),
            "--size", str(options.size), "--contact-sheet", str(paths.root / "contact_sheet.png"),
        ])
    if paths.splits.is_file():
        reuse_stage(console, "splits", str(paths.splits))
    else:
        run_stage(console, f"2/{total} patient-level splits",
                  [train, "split", str(paths.archive), "--out", str(paths.splits)])
    if options.train:
        data = fingerprint(read_archive(paths.archive, check_photos=False), load_splits(paths.splits))
        _train(console, paths, options, data, f"3/{total}")

    weights = sha256_of(paths.run / "checkpoint" / "model.safetensors")
    exported = _exported_weights(paths.bundle)
    source = "the run trained here" if options.train else options.model
    if exported is not None and exported[0] == weights and exported[2:] == _run_extras(paths.run):
        reuse_stage(console, "bundle", f"{paths.bundle} holds {source} (fingerprint {exported[1]})")
    else:
        run_stage(console, f"{total - 1}/{total} ONNX export of {source} with parity check", [
            train, "export", "--run", str(paths.run), "--archive", str(paths.archive), "--splits", str(paths.splits),
            "--out", str(paths.bundle),
        ])
        exported = _exported_weights(paths.bundle)
        if exported is None:  # pragma: no cover - export verifies its own output
            raise DemoError(f"{paths.bundle}: the export wrote no valid bundle")

    try:
        info = read_info(paths.index)
        # An index without an integrity record (built by an older version) is rebuilt, not served unverified.
        built_with = info.bundle_fingerprint if info.sha256 is not None else None
    except IndexStoreError:
        built_with = None
    if built_with == exported[1]:
        reuse_stage(console, "index", f"{paths.index} was built with bundle {built_with}")
    else:
        if paths.index.exists():
            shutil.rmtree(paths.index)
        run_stage(console, f"{total}/{total} FAISS index of the archive", [
            index, "build", "--bundle", str(paths.bundle), "--archive", str(paths.archive), "--out", str(paths.index),
        ])
    return paths


def serve(paths: DemoPaths, host: str, port: int, exec_: Callable[[str, list[str]], None] | None = None) -> None:
    """Replace this process with `retina-serve` on the demo's bundle and index."""
    import os

    command = [tool("retina-serve"), "--bundle", str(paths.bundle), "--index", str(paths.index),
               "--host", host, "--port", str(port)]
    (exec_ or os.execv)(command[0], command)
