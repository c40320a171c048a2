"""The model zoo: pretrained runs shipped in the repository, addressed as `zoo:NAME`.

A shipped model is a run folder (`config.json`, `tokenizer/`, `feature_spec.json`, `run.json`,
`checkpoint/model.safetensors`, its held-out evaluation in `eval-test/`) plus `MODEL_CARD.md` and
`zoo.json`, which lists the sha256 of every file. Anything that takes a run folder (`evaluate --run`,
`export --run`, `fit --init`, the demo) takes `zoo:NAME` too; the files are verified before use, so a
missing or corrupt file is an error naming it, never a model that silently differs.

Only the weights and what they need are shipped (a few MB); the optimiser state is not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from index.bundle import sha256_of

ZOO_DIR = Path(__file__).parent / "models"
"""Where shipped models live, one folder per name."""
ZOO_PREFIX = "zoo:"
ZOO_FILE = "zoo.json"
CARD_FILE = "MODEL_CARD.md"
SHIPPED_FILES: tuple[str, ...] = (
    "run.json",
    "config.json",
    "feature_spec.json",
    "checkpoint/model.safetensors",
    "eval-test/metrics.json",
    "eval-test/report.md",
)
"""Files of a run that a release copies (plus everything under `tokenizer/`)."""
OPTIONAL_FILES: tuple[str, ...] = ("gate/gate.safetensors", "gate/gate.json", "calibration.json")
"""Copied when the run has them: its gradability gate (`retina-train gate fit --out RUN/gate`) and its
temperature calibration (`retina-train calibrate`), which `export` puts into the bundle."""


class ZooError(Exception):
    """A shipped model is unknown, incomplete or corrupt; the message names the model and the file."""


def list_models() -> list[str]:
    """Names of the shipped models."""
    return sorted(p.name for p in ZOO_DIR.glob("*") if (p / ZOO_FILE).is_file()) if ZOO_DIR.is_dir() else []


def is_zoo_name(value: str | Path) -> bool:
    """Whether a run argument names a shipped model (`zoo:NAME`)."""
    return str(value).startswith(ZOO_PREFIX)


def verify(folder: Path) -> dict:
    """Check every file `zoo.json` lists against its sha256; returns zoo.json. Raises ZooError."""
    index = folder / ZOO_FILE
    if not index.is_file():
        raise ZooError(f"{folder}: no {ZOO_FILE}, so this is not a shipped model")
    try:
        info = json.loads(index.read_text())
        files = dict(info["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ZooError(f"{index}: unreadable ({err})") from None
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise ZooError(f"shipped model {folder.name}: {name} is missing ({path})")
        actual = sha256_of(path)
        if actual != expected:
            raise ZooError(
                f"shipped model {folder.name}: {name} is corrupt (sha256 {actual[:12]}..., expected "
                f"{expected[:12]}...); restore it with `git checkout -- {path}`"
            )
    return info


def resolve_run(value: str | Path) -> Path:
    """The run folder a `--run` / `--init` value names: `zoo:NAME` -> the verified shipped folder; any
    other value is returned as a path, unchanged."""
    text = str(value)
    if not is_zoo_name(text):
        return Path(value)
    name = text[len(ZOO_PREFIX) :]
    folder = ZOO_DIR / name
    if not name or not (folder / ZOO_FILE).is_file():
        known = ", ".join(ZOO_PREFIX + m for m in list_models()) or "none"
        raise ZooError(f"unknown shipped model {text!r} (shipped: {known})")
    verify(folder)
    return folder


def release(run: Path, name: str, card: str, zoo_dir: Path = ZOO_DIR) -> Path:
    """Copy a finished, evaluated run into the zoo as `name` with its model card and checksums.

    Written to a temporary folder beside the target and swapped in, so a failed release leaves the
    previous one intact.
    """
    run = Path(run)
    missing = [f for f in SHIPPED_FILES if not (run / f).is_file()]
    if not (run / "tokenizer").is_dir():
        missing.append("tokenizer/")
    if missing:
        raise ZooError(f"{run} cannot be released: {', '.join(missing)} missing (train and evaluate it first)")
    if not json.loads((run / "run.json").read_text()).get("finished"):
        raise ZooError(f"{run} did not finish its schedule; resume it before releasing")
    zoo_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=zoo_dir))
    try:
        present = [f for f in OPTIONAL_FILES if (run / f).is_file()]
        for relative in (*SHIPPED_FILES, *present):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(run / relative, staging / relative)
        shutil.copytree(run / "tokenizer", staging / "tokenizer")
        (staging / CARD_FILE).write_text(card)
        files = {
            p.relative_to(staging).as_posix(): sha256_of(p) for p in sorted(staging.rglob("*")) if p.is_file()
        }
        (staging / ZOO_FILE).write_text(json.dumps({"name": name, "files": files}, indent=1) + "\n")
        staging.chmod(0o755)
        target = zoo_dir / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
