"""The embedded-default demo: synthetic archive -> splits -> `tiny` trained and evaluated -> ONNX bundle ->
FAISS index -> the service, each stage skipped when its output is already there *for the same inputs*.

Stages are keyed by fingerprints, not by file existence: a run is reused when it was trained on this
archive and split (`run.json` fingerprint), a bundle when it was exported from that run's data
(`manifest.json` data_fingerprint), an index when it was built with that bundle (`index.json`
bundle_fingerprint). Anything stale is rebuilt. Each stage runs the project's own command, with its own
progress bar, so what the demo does is what a user would type.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from index.brset import read_archive
from index.bundle import BundleError, read_manifest
from index.store import IndexStoreError, read_info
from training.data import fingerprint
from training.model.factory import load_config
from training.splits import load_splits
from training.synth.archive import read_synth_manifest

DEMO_QUERY = "Left eye of a 60-year-old woman with diabetes: proliferative diabetic retinopathy with new vessels."


@dataclass(frozen=True)
class DemoOptions:
    """Where the demo lives and how big it is."""

    root: Path
    n: int = 3000
    seed: int = 1
    size: int = 224
    epochs: int = 16
    max_minutes: float = 8.0
    balance: float = 0.5


@dataclass(frozen=True)
class DemoPaths:
    """The folders and files of a demo."""

    root: Path

    @property
    def archive(self) -> Path:
        """The synthetic archive."""
        return self.root / "archive"

    @property
    def splits(self) -> Path:
        """splits.json."""
        return self.root / "splits.json"

    @property
    def run(self) -> Path:
        """The training run."""
        return self.root / "run"

    @property
    def evaluation(self) -> Path:
        """The test-split evaluation."""
        return self.root / "run" / "eval-test"

    @property
    def bundle(self) -> Path:
        """The exported bundle."""
        return self.root / "bundle"

    @property
    def index(self) -> Path:
        """The FAISS index of the archive."""
        return self.root / "index"


class DemoError(Exception):
    """A stage failed or the demo folder holds something it cannot use; the message says what."""


def _tool(name: str) -> str:
    """The path of a console script of this installation (retina-train, retina-index, retina-serve)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise DemoError(f"{name} is not installed (pip install -e '.[train,serve]')")
    return found


def _run(console: Console, title: str, command: list[str]) -> None:
    console.rule(f"[bold]{title}")
    started = time.perf_counter()
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise DemoError(f"{title} failed (exit {completed.returncode}): {' '.join(command)}")
    console.print(f"{title}: done in {time.perf_counter() - started:.0f} s")


def _reuse(console: Console, title: str, why: str) -> None:
    console.print(f"[green]reuse[/green] {title}: {why}")


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


def _bundle_fingerprints(bundle: Path) -> tuple[str, str] | None:
    """(data fingerprint, bundle fingerprint) of a bundle that verifies, else None."""
    try:
        manifest = read_manifest(bundle)
    except BundleError:
        return None
    return manifest.data_fingerprint, manifest.fingerprint


def prepare(options: DemoOptions, console: Console | None = None) -> DemoPaths:
    """Build (or reuse) every stage of the demo; returns its paths. Raises DemoError."""
    console = console or Console(stderr=True)
    paths = DemoPaths(Path(options.root))
    paths.root.mkdir(parents=True, exist_ok=True)
    train, index = _tool("retina-train"), _tool("retina-index")

    if _archive_matches(paths, options):
        _reuse(console, "archive", f"{paths.archive} ({options.n} images, seed {options.seed})")
    else:
        if paths.archive.exists():
            shutil.rmtree(paths.archive)
        _run(console, "1/6 synthetic archive", [
            train, "synth", "--out", str(paths.archive), "--n", str(options.n), "--seed", str(options.seed),
            "--size", str(options.size), "--contact-sheet", str(paths.root / "contact_sheet.png"),
        ])
    if paths.splits.is_file():
        _reuse(console, "splits", str(paths.splits))
    else:
        _run(console, "2/6 patient-level splits", [train, "split", str(paths.archive), "--out", str(paths.splits)])
    data = fingerprint(read_archive(paths.archive, check_photos=False), load_splits(paths.splits))

    if _run_fingerprint(paths.run) == data and _trained_with_current_tiny(paths.run):
        _reuse(console, "training run", f"{paths.run} was trained on this archive and split with today's `tiny`")
    else:
        if paths.run.exists():
            shutil.rmtree(paths.run)
        _run(console, "3/6 training tiny", [
            train, "fit", "--config", "tiny", "--archive", str(paths.archive), "--splits", str(paths.splits),
            "--out", str(paths.run), "--epochs", str(options.epochs), "--max-minutes", str(options.max_minutes),
            "--balance", str(options.balance),
        ])
    checkpoint = paths.run / "checkpoint" / "model.safetensors"
    metrics = paths.evaluation / "metrics.json"
    if metrics.is_file() and metrics.stat().st_mtime >= checkpoint.stat().st_mtime:
        _reuse(console, "evaluation", str(metrics))
    else:
        _run(console, "4/6 evaluation on the test split", [
            train, "evaluate", "--run", str(paths.run), "--archive", str(paths.archive), "--splits", str(paths.splits),
        ])

    exported = _bundle_fingerprints(paths.bundle)
    fresh = exported is not None and paths.bundle.stat().st_mtime >= checkpoint.stat().st_mtime
    if exported is not None and fresh and exported[0] == data:
        _reuse(console, "bundle", f"{paths.bundle} (fingerprint {exported[1]})")
    else:
        _run(console, "5/6 ONNX export with parity check", [
            train, "export", "--run", str(paths.run), "--archive", str(paths.archive), "--splits", str(paths.splits),
            "--out", str(paths.bundle),
        ])
        exported = _bundle_fingerprints(paths.bundle)
        if exported is None:  # pragma: no cover - export verifies its own output
            raise DemoError(f"{paths.bundle}: the export wrote no valid bundle")

    try:
        built_with = read_info(paths.index).bundle_fingerprint
    except IndexStoreError:
        built_with = None
    if built_with == exported[1]:
        _reuse(console, "index", f"{paths.index} was built with bundle {built_with}")
    else:
        if paths.index.exists():
            shutil.rmtree(paths.index)
        _run(console, "6/6 FAISS index of the archive", [
            index, "build", "--bundle", str(paths.bundle), "--archive", str(paths.archive), "--out", str(paths.index),
        ])
    return paths


def serve(paths: DemoPaths, host: str, port: int, exec_: Callable[[str, list[str]], None] | None = None) -> None:
    """Replace this process with `retina-serve` on the demo's bundle and index."""
    import os

    command = [_tool("retina-serve"), "--bundle", str(paths.bundle), "--index", str(paths.index),
               "--host", host, "--port", str(port)]
    (exec_ or os.execv)(command[0], command)
