"""`retina-index import`: public DR label files plus a photo folder -> a BRSET-layout archive."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from index.archive.brset import read_archive
from index.archive.importer import (
    BUILTIN_MAPPINGS,
    REPORT_NAME,
    ArchiveImportError,
    ImportReport,
    builtin_mapping,
    detect_mapping,
    import_archive,
    load_mapping,
)
from index.cli import app
from index.records import Eye

runner = CliRunner()


def _photo(path: Path, seed: int = 0) -> Path:
    """A small real photograph (JPEG/PNG/TIFF by suffix)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def eyepacs(tmp_path: Path) -> tuple[Path, Path]:
    """EyePACS layout: `image,level`, files `<id>.jpeg`; with every kind of bad input."""
    images = tmp_path / "train"
    for seed, name in enumerate(["10_left.jpeg", "10_right.JPEG", "15_left.jpeg", "99_right.jpeg"]):
        _photo(images / name, seed)
    (images / "20_left.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (images / "notes.txt").write_text("not a photo")
    labels = _csv(
        tmp_path / "trainLabels.csv",
        "image,level\n10_left,0\n10_right,2\n15_left,4\n20_left,1\n30_right,3\n10_left,1\n",
    )
    return images, labels


def test_eyepacs_import_reads_back_with_patients_eyes_and_report(eyepacs: tuple[Path, Path], tmp_path: Path) -> None:
    images, labels = eyepacs
    before = _snapshot(images)
    labels_before = labels.read_bytes()
    out = tmp_path / "archive"

    report = import_archive(images, labels, out)

    assert report.mapping == "eyepacs"
    assert report.rows == 6 and report.imported == 3 and report.patients == 2
    assert [(d.line, d.image_id) for d in report.duplicates] == [(7, "10_left")]
    assert [(r.line, r.image_id) for r in report.rows_without_photo] == [(6, "30_right")]
    assert report.photos_without_row == ["99_right.jpeg"]
    skipped = {s.file: s for s in report.skipped}
    assert set(skipped) == {"20_left.jpeg", "notes.txt"}
    assert skipped["20_left.jpeg"].image_id == "20_left" and skipped["20_left.jpeg"].line == 5
    assert "decoded" in skipped["20_left.jpeg"].reason or "readable" in skipped["20_left.jpeg"].reason
    assert "unsupported file type '.txt'" in skipped["notes.txt"].reason
    assert report.icdr_counts == {"0": 1, "1": 0, "2": 1, "3": 0, "4": 1, "missing": 0}

    archive = read_archive(out)
    assert archive.report.rejected_rows == [] and archive.report.photos_without_row == []
    assert archive.report.rows_without_photo == []
    by_id = {record.image_id: record for record in archive.records}
    assert set(by_id) == {"10_left", "10_right", "15_left"}
    assert by_id["10_left"].patient_id == by_id["10_right"].patient_id == "10"
    assert by_id["10_left"].exam_eye == Eye.LEFT and by_id["10_right"].exam_eye == Eye.RIGHT
    assert by_id["15_left"].patient_id == "15" and by_id["15_left"].exam_eye == Eye.LEFT
    assert [by_id[i].dr_icdr for i in ("10_left", "10_right", "15_left")] == [0, 2, 4]
    # Labels the source lacks stay missing.
    assert all(r.dr_sdrg is None and r.patient_age is None and r.patient_sex is None for r in archive.records)
    assert all(r.macular_edema is None for r in archive.records)
    # Photos are byte-identical copies; the sources are untouched.
    photo = archive.photo_path("10_right")
    assert photo is not None and photo.name == "10_right.jpeg"
    assert photo.read_bytes() == (images / "10_right.JPEG").read_bytes()
    assert not photo.is_symlink() and photo.stat().st_ino != (images / "10_right.JPEG").stat().st_ino
    assert _snapshot(images) == before and labels.read_bytes() == labels_before
    saved = ImportReport.model_validate_json((out / REPORT_NAME).read_text())
    assert saved == report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".archive.")]  # no temp folder left


def test_aptos_import_explicit_and_auto(tmp_path: Path) -> None:
    images = tmp_path / "train_images"
    for seed, name in enumerate(["000c1434d8d7.png", "001639a390f0.png", "0024cdab0c1e.png"]):
        _photo(images / name, seed)
    labels = _csv(tmp_path / "train.csv", "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n0024cdab0c1e,1\n")
    assert detect_mapping(["id_code", "diagnosis"]).name == "aptos2019"
    for mapping, out in (("aptos2019", tmp_path / "a"), ("auto", tmp_path / "b")):
        report = import_archive(images, labels, out, mapping=mapping)
        assert report.mapping == "aptos2019" and report.imported == 3
        archive = read_archive(out)
        grades = {r.image_id: (r.dr_icdr, r.patient_id, r.exam_eye) for r in archive.records}
        assert grades == {
            "000c1434d8d7": (2, "000c1434d8d7", None),
            "001639a390f0": (4, "001639a390f0", None),
            "0024cdab0c1e": (1, "0024cdab0c1e", None),
        }
        assert archive.photo_path("001639a390f0") == out / "fundus_photos" / "001639a390f0.png"


def test_idrid_grading_with_trailing_spaces_and_empty_columns(tmp_path: Path) -> None:
    images = tmp_path / "a. Training Set"
    for seed, name in enumerate(["IDRiD_001.jpg", "IDRiD_002.jpg", "IDRiD_003.jpg"]):
        _photo(images / name, seed)
    labels = _csv(
        tmp_path / "a. IDRiD_Disease Grading_Training Labels.csv",
        "Image name,Retinopathy grade,Risk of macular edema ,,\n"
        "IDRiD_001,3,2,,\nIDRiD_002,0,0,,\nIDRiD_003,2,1,,\n",
    )
    report = import_archive(images, labels, tmp_path / "out")
    assert report.mapping == "idrid" and report.imported == 3
    records = {r.image_id: r for r in read_archive(tmp_path / "out").records}
    assert {k: (r.dr_icdr, r.macular_edema) for k, r in records.items()} == {
        "IDRiD_001": (3, True), "IDRiD_002": (0, False), "IDRiD_003": (2, True),
    }


def test_messidor2_ids_with_extension_and_missing_grade(tmp_path: Path) -> None:
    images = tmp_path / "IMAGES"
    names = ["20051020_43808_0100_PP.png", "20051020_43832_0100_PP.png", "IM000001.JPG"]
    for seed, name in enumerate(names):
        _photo(images / name, seed)
    labels = _csv(
        tmp_path / "messidor_data.csv",
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051020_43808_0100_PP.png,0,0,1\n20051020_43832_0100_PP.png,,,0\nIM000001.JPG,3,1,1\n",
    )
    report = import_archive(images, labels, tmp_path / "out")
    assert report.mapping == "messidor2" and report.imported == 3
    assert report.icdr_counts["missing"] == 1
    archive = read_archive(tmp_path / "out")
    records = {r.image_id: r for r in archive.records}
    assert {k: (r.dr_icdr, r.macular_edema, r.quality_adequate) for k, r in records.items()} == {
        "20051020_43808_0100_PP": (0, False, True),
        "20051020_43832_0100_PP": (None, None, False),
        "IM000001": (3, True, True),
    }
    photo = archive.photo_path("IM000001")
    assert photo is not None and photo.name == "IM000001.jpg"


def test_generic_json_mapping_with_value_maps(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    for seed, name in enumerate(["a1.tif", "a2.tif", "b1.tif"]):
        _photo(images / name, seed)
    labels = _csv(
        tmp_path / "clinic.csv",
        "file;grade;eye;pid;age;sex\na1;moderate;OD;P1;61,5;F\na2;none;OS;P1;61;F\nb1;weird;OS;P2;;M\n",
    )
    mapping = tmp_path / "clinic.json"
    mapping.write_text(json.dumps({
        "name": "clinic",
        "image_column": "file",
        "extensions": ["tif"],
        "fields": [
            {"column": "grade", "field": "dr_icdr", "required": True,
             "values": {"none": 0, "mild": 1, "moderate": 2, "severe": 3, "proliferative": 4}},
            {"column": "eye", "field": "exam_eye"},
            {"column": "pid", "field": "patient_id"},
            {"column": "age", "field": "patient_age"},
            {"column": "sex", "field": "patient_sex"},
        ],
    }))
    report = import_archive(images, labels, tmp_path / "out", mapping=str(mapping))
    assert report.mapping == "clinic" and report.imported == 3 and report.patients == 2
    assert [(g.column, g.value, g.count, g.lines) for g in report.rejected_values] == [("grade", "weird", 1, [4])]
    records = {r.image_id: r for r in read_archive(tmp_path / "out").records}
    a1, a2, b1 = records["a1"], records["a2"], records["b1"]
    assert (a1.dr_icdr, a1.exam_eye, a1.patient_id, a1.patient_age, a1.patient_sex) == (2, Eye.RIGHT, "P1", 61.5, 2)
    assert (a2.dr_icdr, a2.exam_eye, a2.patient_id) == (0, Eye.LEFT, "P1")
    assert (b1.dr_icdr, b1.patient_age, b1.patient_id) == (None, None, "P2")


def test_unknown_columns_error_lists_columns_and_mappings(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    _photo(images / "x.jpg")
    labels = _csv(tmp_path / "odd.csv", "photo,severity\nx,1\n")
    with pytest.raises(ArchiveImportError) as caught:
        import_archive(images, labels, tmp_path / "out")
    message = str(caught.value)
    assert "'photo'" in message and "'severity'" in message
    for name in BUILTIN_MAPPINGS:
        assert name in message
    assert "level|icdr" in message
    assert not (tmp_path / "out").exists()

    result = runner.invoke(app, ["import", "--images", str(images), "--labels", str(labels), "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "match no mapping" in result.output and "'severity'" in result.output and "messidor2" in result.output


def test_mapping_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "image_column": "f", "fields": [{"column": "g", "field": "grade"}]}))
    with pytest.raises(ArchiveImportError, match="unknown record field 'grade'"):
        load_mapping(bad)
    with pytest.raises(ArchiveImportError, match="neither a known mapping"):
        load_mapping("kaggle")
    # A named mapping whose columns are absent says which are needed.
    images = tmp_path / "photos"
    _photo(images / "x.jpg")
    labels = _csv(tmp_path / "l.csv", "image,grade\nx,1\n")
    with pytest.raises(ArchiveImportError, match="needs column"):
        import_archive(images, labels, tmp_path / "out", mapping="aptos2019")
    for name in BUILTIN_MAPPINGS:
        assert builtin_mapping(name).name == name


def test_refuses_non_empty_output_and_overwrites_on_request(eyepacs: tuple[Path, Path], tmp_path: Path) -> None:
    images, labels = eyepacs
    out = tmp_path / "archive"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveImportError, match="not empty"):
        import_archive(images, labels, out)
    assert (out / "keep.txt").read_text() == "mine"
    import_archive(images, labels, out, overwrite=True)
    assert not (out / "keep.txt").exists() and len(read_archive(out).records) == 3
    # The output may never hold (and so replace) a source.
    with pytest.raises(ArchiveImportError, match="holds the source"):
        import_archive(images, labels, tmp_path, overwrite=True)
    assert images.is_dir() and labels.is_file()
    # An empty existing folder is fine.
    (tmp_path / "empty").mkdir()
    assert import_archive(images, labels, tmp_path / "empty").imported == 3


def test_link_modes(eyepacs: tuple[Path, Path], tmp_path: Path) -> None:
    images, labels = eyepacs
    before = _snapshot(images)
    import_archive(images, labels, tmp_path / "hard", link="hardlink")
    import_archive(images, labels, tmp_path / "soft", link="symlink")
    hard = tmp_path / "hard" / "fundus_photos" / "15_left.jpeg"
    soft = tmp_path / "soft" / "fundus_photos" / "15_left.jpeg"
    assert hard.stat().st_ino == (images / "15_left.jpeg").stat().st_ino
    assert soft.is_symlink() and os.path.samefile(soft, images / "15_left.jpeg")
    assert len(read_archive(tmp_path / "soft").records) == 3
    assert read_archive(tmp_path / "soft").report.rows_without_photo == []
    assert _snapshot(images) == before


def test_cli_import_prints_summary(eyepacs: tuple[Path, Path], tmp_path: Path) -> None:
    images, labels = eyepacs
    out = tmp_path / "archive"
    result = runner.invoke(app, ["import", "--images", str(images), "--labels", str(labels), "--out", str(out),
                                 "--map", "eyepacs"])
    assert result.exit_code == 0, result.output
    assert "eyepacs" in result.output and "20_left.jpeg" in result.output and "30_right" in result.output
    assert len(read_archive(out).records) == 3
    again = runner.invoke(app, ["import", "--images", str(images), "--labels", str(labels), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    both = runner.invoke(app, ["import", "--images", str(images), "--labels", str(labels), "--out",
                               str(tmp_path / "x"), "--link", "--symlink"])
    assert both.exit_code == 2


@pytest.mark.shared_data
def test_import_shared_eyepacs_sample(shared_data_dir: Path, tmp_path: Path) -> None:
    source = shared_data_dir / "eyepacs-sample"
    before = _snapshot(source / "images")
    report = import_archive(source / "images", source / "labels.csv", tmp_path / "archive")
    assert report.mapping == "eyepacs" and report.rows == 130 and report.imported == 130
    assert report.skipped == [] and report.duplicates == [] and report.rows_without_photo == []
    assert report.icdr_counts == {"0": 50, "1": 20, "2": 20, "3": 20, "4": 20, "missing": 0}
    archive = read_archive(tmp_path / "archive")
    assert len(archive.records) == 130 and archive.report.photos_without_row == []
    patients = {record.patient_id for record in archive.records}
    assert 60 <= len(patients) <= 80 and report.patients == len(patients)
    by_id = {record.image_id: record for record in archive.records}
    assert by_id["eyepacs_10_left"].patient_id == by_id["eyepacs_10_right"].patient_id == "10"
    assert by_id["eyepacs_10_left"].exam_eye == Eye.LEFT and by_id["eyepacs_10_right"].exam_eye == Eye.RIGHT
    assert _snapshot(source / "images") == before
