"""Running the project's own commands as the stages of a longer job (the demo, the zoo recipe).

Each stage runs the console script a user would type, with its own progress bar, so what a recipe does is
what a person could repeat by hand; a stage whose output is already there for the same inputs is
reported as reused instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console


class StageError(Exception):
    """A stage failed or a folder holds something a recipe cannot use; the message says what."""


def tool(name: str) -> str:
    """The path of a console script of this installation (retina-train, retina-index, retina-serve)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise StageError(f"{name} is not installed (pip install -e '.[train,serve]')")
    return found


def run_stage(console: Console, title: str, command: list[str]) -> None:
    """Run one stage's command in the foreground; raises StageError when it fails."""
    console.rule(f"[bold]{title}")
    started = time.perf_counter()
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise StageError(f"{title} failed (exit {completed.returncode}): {' '.join(command)}")
    console.print(f"{title}: done in {time.perf_counter() - started:.0f} s")


def reuse_stage(console: Console, title: str, why: str) -> None:
    """Say that a stage's output is already there and is reused."""
    console.print(f"[green]reuse[/green] {title}: {why}")
