"""Read DeepEyeNet (used for zero-shot evaluation).

DeepEyeNet ships `DeepEyeNet_{train,valid,test}.json` in its root folder. Each file is a JSON list of
single-key objects::

    [{"eyenet0420/train_set/xxx.jpg": {"keywords": "a, b", "clinical-description": "..."}}, ...]

whose keys are image paths relative to the root. The reader checks the shape strictly and names the
file and entry index of anything else. It does not require the images to exist: call
`missing_images` to list the cases whose photograph is not on disk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

from index.archive.brset import ArchiveError

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = get_args(Split)


class DeepEyeNetCase(BaseModel):
    """One DeepEyeNet image with its keywords and clinical description."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_path: Path
    """Absolute path under the dataset root (the file may not exist; see `missing_images`)."""
    keywords: list[str]
    description: str
    split: str


def deepeyenet_file(root: Path, split: Split) -> Path:
    """The JSON file of a split: `<root>/DeepEyeNet_<split>.json`."""
    if split not in SPLITS:
        raise ValueError(f"unknown DeepEyeNet split {split!r} (expected one of {', '.join(SPLITS)})")
    return Path(root) / f"DeepEyeNet_{split}.json"


def split_keywords(text: str) -> list[str]:
    """Split a DeepEyeNet keyword string on commas; items stripped, empty items dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _image_path(root: Path, relative: str, json_path: Path, index: int) -> Path:
    """Resolve an entry's image path under root, refusing absolute paths and `..` escapes."""
    where = f"{json_path}, entry {index}"
    if not relative.strip():
        raise ArchiveError(f"{where}: empty image path")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or Path(relative).is_absolute():
        raise ArchiveError(f"{where}: image path {relative!r} is absolute (expected a path under {root})")
    if ".." in pure.parts:
        raise ArchiveError(f"{where}: image path {relative!r} leaves the dataset folder {root}")
    # Lexical check only, so that a symlinked image folder inside root still works.
    return root.joinpath(*pure.parts)


def read_deepeyenet(root: Path, split: Split) -> list[DeepEyeNetCase]:
    """Read one split of DeepEyeNet; image paths become absolute paths under `root`.

    Raises `ArchiveError` on a missing file, malformed JSON (with its line and column) or an entry
    not of the expected shape (with its index, counted from 0), and ValueError on an unknown split.
    """
    json_path = deepeyenet_file(root, split)
    root = Path(root).resolve()
    if not json_path.is_file():
        raise ArchiveError(f"DeepEyeNet file not found: {json_path}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ArchiveError(
            f"{json_path}: malformed JSON at line {error.lineno}, column {error.colno} "
            f"(character {error.pos}): {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise ArchiveError(f"{json_path}: not UTF-8 text (byte {error.start}: {error.reason})") from error
    if not isinstance(data, list):
        raise ArchiveError(
            f"{json_path}: expected a JSON list of {{image_path: {{...}}}} objects, "
            f"found {type(data).__name__}"
        )
    cases: list[DeepEyeNetCase] = []
    for index, entry in enumerate(data):
        where = f"{json_path}, entry {index}"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ArchiveError(f"{where}: expected an object with exactly one key (the image path)")
        ((relative, fields),) = entry.items()
        if not isinstance(fields, dict):
            raise ArchiveError(f"{where}: the value of {relative!r} must be an object")
        keywords = fields.get("keywords")
        description = fields.get("clinical-description")
        if not isinstance(keywords, str):
            raise ArchiveError(f"{where}: 'keywords' must be a string of comma-separated keywords")
        if not isinstance(description, str):
            raise ArchiveError(f"{where}: 'clinical-description' must be a string")
        cases.append(
            DeepEyeNetCase(
                image_path=_image_path(root, relative, json_path, index),
                keywords=split_keywords(keywords),
                description=description.strip(),
                split=split,
            )
        )
    return cases


def missing_images(cases: Sequence[DeepEyeNetCase]) -> list[DeepEyeNetCase]:
    """The cases whose image file does not exist."""
    return [case for case in cases if not case.image_path.is_file()]
