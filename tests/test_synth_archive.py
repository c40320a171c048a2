"""`retina-train synth` and `retina-train split` end to end through the CLI, and `retina-index describe`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from index.archive.brset import read_archive
from index.cli import app as index_app
from training.cli import app as train_app
from training.splits import check_patient_disjoint, load_splits
from training.synth.archive import read_inventory
from training.synth.lesions import DR_LESIONS, PROLIFERATIVE, grades_compatible
from training.synth.priors import sample_records
from training.text.narratives import stated_icdr_grades

FIXTURE_LABELS = Path(__file__).parent / "fixtures" / "brset" / "labels.csv"
runner = CliRunner()


def _synth(out: Path, *args: str) -> None:
    result = runner.invoke(train_app, ["synth", "--out", str(out), "--size", "128", "--workers", "1", *args])
    assert result.exit_code == 0, result.output


def _digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            sha.update(path.relative_to(folder).as_posix().encode())
            sha.update(path.read_bytes())
    return sha.hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "archive"
    _synth(out, "--n", "80", "--seed", "3", "--contact-sheet", str(out.parent / "sheet.png"))
    return out


def test_archive_has_brset_layout_narratives_and_inventory(archive: Path) -> None:
    result = read_archive(archive)
    assert len(result.records) == 80
    assert not result.report.rows_without_photo and not result.report.photos_without_row
    assert result.report.rejected_total == 0
    assert all(r.narrative for r in result.records)
    for record in result.records:
        assert record.image_id not in record.narrative and record.patient_id not in record.narrative.split()
        stated = stated_icdr_grades(record.narrative)
        assert stated <= {record.dr_icdr}, (record.dr_icdr, record.narrative)
    assert [line["image_id"] for line in read_inventory(archive)] == [r.image_id for r in result.records]
    assert (archive.parent / "sheet.png").stat().st_size > 10_000


def test_inventory_lesions_match_grades(archive: Path) -> None:
    for line in read_inventory(archive):
        icdr, sdrg, counts = line["dr_icdr"], line["dr_sdrg"], line["counts"]
        dr = {kind for kind in counts if kind in DR_LESIONS and sum(counts[kind].values()) > 0}
        assert line["grade_conflict"] == (not grades_compatible(icdr, sdrg))
        if line["grade_conflict"]:
            continue
        if icdr == 0:
            assert not dr
        if icdr == 1:
            assert dr == {"microaneurysm"}
        if sdrg == 2:
            blots = counts["blot_haemorrhage"]
            assert sorted(v >= 4 for v in blots.values()) == [False, True]
        if icdr == 4:
            assert dr & set(PROLIFERATIVE)
        if icdr in (1, 2, 3):
            assert not dr & set(PROLIFERATIVE)


def test_same_seed_writes_the_same_archive(tmp_path: Path) -> None:
    _synth(tmp_path / "a", "--n", "12", "--seed", "9")
    _synth(tmp_path / "b", "--n", "12", "--seed", "9")
    _synth(tmp_path / "c", "--n", "12", "--seed", "10")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_labels_mode_renders_one_photo_per_given_row(tmp_path: Path) -> None:
    _synth(tmp_path / "real", "--labels", str(FIXTURE_LABELS), "--seed", "1")
    given = read_archive(FIXTURE_LABELS.parent, check_photos=False).records
    written = read_archive(tmp_path / "real").records
    assert [r.image_id for r in written] == [r.image_id for r in given]
    assert [r.dr_icdr for r in written] == [r.dr_icdr for r in given]
    assert len(list((tmp_path / "real" / "fundus_photos").glob("*.jpg"))) == len(given)


def test_existing_archive_is_not_overwritten_without_asking(archive: Path) -> None:
    result = runner.invoke(train_app, ["synth", "--out", str(archive), "--n", "5", "--size", "128"])
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert len(read_archive(archive).records) == 80


def test_failed_run_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.synth.archive as archive_module

    calls = {"n": 0}
    real_render = archive_module.render_fundus

    def failing_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(archive_module, "render_fundus", failing_render)
    with pytest.raises(RuntimeError):
        archive_module.write_archive(
            sample_records(10, seed=0),
            tmp_path / "out",
            size=96,
            seed=0,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_labels_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(train_app, ["synth", "--out", str(tmp_path / "x"), "--labels", str(tmp_path / "no.csv")])
    assert result.exit_code == 2
    assert "no.csv" in result.output
    assert not (tmp_path / "x").exists()


def test_split_cli_writes_patient_disjoint_splits(archive: Path, tmp_path: Path) -> None:
    result = runner.invoke(train_app, ["split", str(archive), "--out", str(tmp_path / "splits.json")])
    assert result.exit_code == 0, result.output
    splits = load_splits(tmp_path / "splits.json")
    assert set(splits) == {"train", "val", "test"}
    check_patient_disjoint(read_archive(archive).records, splits)
    assert json.loads((tmp_path / "splits.json").read_text()) == splits


def test_describe_prints_the_parse_report(archive: Path) -> None:
    result = runner.invoke(index_app, ["describe", str(archive)])
    assert result.exit_code == 0, result.output
    assert "ICDR grade" in result.output and "SDRG grade" in result.output
    assert "patients" in result.output


def test_describe_names_a_missing_folder(tmp_path: Path) -> None:
    result = runner.invoke(index_app, ["describe", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "nowhere" in result.output
