"""A tiny exported bundle for tests: a 64-photograph synthetic archive, a 2-step `tiny` run (with the text's
record head, `record_text_head`, so that text -> record search has its own vector, and the periodic numeric
encoding of the tabular tower, as the shipped model has), an fp32 export.

Built once per test session (about 30 s on 2 cores) and shared by every module that asks for it, so
that test_export.py and test_embedder.py do not pay for it twice. Not a test module (no `test_` prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from index.archive.brset import read_archive
from training.export import ParityReport, export_bundle
from training.model import load_config
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
        tiny = load_config("tiny")
        tabular = tiny.tabular.model_copy(update={"numeric_encoding": "periodic"})
        # with an appearance part of the image embedding and a grade part of the search embeddings, so export and
        # serving carry the joined, wider embedding (its losses stay tiny's: the demo tests serve this run as one
        # trained with today's `tiny`)
        config = tiny.model_copy(update={"record_text_head": True, "tabular": tabular, "image_appearance_dims": 16,
                                         "grade_part_weight": 0.5})
        (root / "tiny.json").write_text(config.model_dump_json(indent=1))
        fit(FitOptions(config=str(root / "tiny.json"), archive=root / "archive", splits=root / "splits.json",
                       out=root / "run", epochs=1, batch_size=8, max_steps=2, precision="fp32", seed=3))
        report = export_bundle(root / "run", root / "archive", root / "splits.json", root / "bundle")
        _built["tiny"] = TinyBundle(root / "archive", root / "splits.json", root / "run", root / "bundle", report)
    return _built["tiny"]


@dataclass(frozen=True)
class GatedBundle:
    """The tiny run exported with a gradability gate trained for one epoch on a small archive with many
    defects, its fundus threshold set above a cat photograph's probability (`other`: refused as not a fundus
    photograph; `fundus_like`: an archive photograph, accepted), and an index of the tiny archive."""

    archive: Path
    gate: Path
    bundle: Path
    index: Path
    fundus_like: bytes
    other: bytes


def _jpeg(image: object) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)  # type: ignore[attr-defined]
    return buffer.getvalue()


def gated_bundle(factory: pytest.TempPathFactory) -> GatedBundle:
    """The session's gated bundle and its index, built on first use (about a minute on 2 cores)."""
    if "gated" not in _built_gated:
        import io
        import json

        from PIL import Image

        from index.build import BuildOptions, build_index
        from index.bundle import MANIFEST_FILE
        from index.embedder import Embedder
        from training.gate.negatives import skimage_samples
        from training.gate.train import GateOptions, fit_gate

        tiny = tiny_bundle(factory)
        root = factory.mktemp("gated-bundle")
        write_archive(sample_records(40, seed=5, quality_defects=0.5), root / "archive", size=224, seed=5)
        splits = make_splits(read_archive(root / "archive").records, seed=0, fractions=(0.7, 0.3, 0.0))
        fit_gate(read_archive(root / "archive"), splits, root / "gate",
                 GateOptions(epochs=1, batch_size=16, negative_share=0.5))
        export_bundle(tiny.run, tiny.archive, tiny.splits, root / "bundle", gate=root / "gate")
        photo = next((tiny.archive / "fundus_photos").glob("*.jpg")).read_bytes()
        cat = _jpeg(skimage_samples(("chelsea",))["chelsea"])
        # The archive photograph passes the layout rule (index.gate.fundus_layout), the cat does not: with the
        # network's threshold above the cat's probability, the cat is "not a fundus photograph" whatever a
        # one-epoch gate thinks of it.
        (answer,) = Embedder(root / "bundle", device="cpu").check_gradability(
            [Image.open(io.BytesIO(cat)).convert("RGB")]
        )
        p_cat = answer.probabilities["fundus"]
        assert p_cat < 0.9999, f"a one-epoch gate is sure the cat is a fundus photograph ({p_cat})"
        manifest = json.loads((root / "bundle" / MANIFEST_FILE).read_text())
        manifest["gate"]["fundus_threshold"] = min(0.9999, (p_cat + 1) / 2)
        (root / "bundle" / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        fundus_like, other = photo, cat
        build_index(BuildOptions(bundle=root / "bundle", archive=tiny.archive, out=root / "index", batch_size=16,
                                 device="cpu"))
        _built_gated["gated"] = GatedBundle(root / "archive", root / "gate", root / "bundle", root / "index",
                                            fundus_like, other)
    return _built_gated["gated"]


_built_gated: dict[str, GatedBundle] = {}
