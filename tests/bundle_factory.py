"""A tiny exported bundle for tests: a 64-photograph synthetic archive, a 2-step `tiny` run, an fp32 export.

Built once per test session (about 30 s on 2 cores) and shared by every module that asks for it, so
that test_export.py and test_embedder.py do not pay for it twice. Not a test module (no `test_` prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from index.archive.brset import read_archive
from training.export import ParityReport, export_bundle
from training.splits import make_splits, save_splits
from training.synth.archive import write_archive
from training.synth.priors import sample_records
from training.train import FitOptions, fit


@dataclass(frozen=True)
class TinyBundle:
    """Paths of the shared archive, run and bundle, and the fp32 export's parity report."""

    archive: Path
    splits: Path
    run: Path
    bundle: Path
    report: ParityReport


_built: dict[str, TinyBundle] = {}


def tiny_bundle(factory: pytest.TempPathFactory) -> TinyBundle:
    """The session's tiny bundle, built on first use."""
    if "tiny" not in _built:
        root = factory.mktemp("tiny-bundle")
        write_archive(sample_records(64, seed=1), root / "archive", size=224, seed=1)
        save_splits(make_splits(read_archive(root / "archive").records, seed=0), root / "splits.json")
        fit(FitOptions(config="tiny", archive=root / "archive", splits=root / "splits.json", out=root / "run",
                       epochs=1, batch_size=8, max_steps=2, precision="fp32", seed=3))
        report = export_bundle(root / "run", root / "archive", root / "splits.json", root / "bundle")
        _built["tiny"] = TinyBundle(root / "archive", root / "splits.json", root / "run", root / "bundle", report)
    return _built["tiny"]
