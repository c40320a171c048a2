"""Atomic file writes: a temporary file in the target's folder, fsync, then `os.replace`.

A reader (or a crash) sees either the previous file or the complete new one, never a partial write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    with Path(path).open("rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield an empty temporary path next to `path` to write to. On a normal exit it is fsynced and
    renamed onto `path` (and the folder fsynced); on an exception it is deleted and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        yield temp
        fsync_file(temp)
        os.chmod(temp, 0o644)  # mkstemp creates 0600
        os.replace(temp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_target(path) as temp:
        temp.write_text(text, encoding="utf-8")
