"""The BRSET-layout archive reader and writer, on real BRSET rows (tests/fixtures/brset/labels.csv).

The fixture holds 62 real rows of BRSET v1.0.0 with the original header, BOM and CRLF line ends.
Line numbers below are those of the fixture (the header is line 1).
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

import index.archive.brset as brset
from index.archive.brset import (
    COLUMN_TO_FIELD,
    ArchiveError,
    ParseReport,
    find_labels_file,
    read_archive,
    read_labels,
    write_labels_csv,
)
from index.archive.cells import (
    REPAIR_DECIMAL_COMMA,
    REPAIR_LETTER_O,
    REPAIR_NAO_DURATION,
    REPAIR_PORTUGUESE_YES_NO,
)
from index.records import Assessment, Eye, FundusRecord, Sex

FIXTURE = Path(__file__).parent / "fixtures" / "brset" / "labels.csv"
HEADER = list(COLUMN_TO_FIELD)


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, FundusRecord], ParseReport]:
    records, report = read_labels(FIXTURE)
    return {record.image_id: record for record in records}, report


def _fixture_rows() -> list[list[str]]:
    with FIXTURE.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == HEADER
    return rows[1:]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _row(**changes: str) -> list[str]:
    """The first fixture row (img00001) with some cells changed, by BRSET column name."""
    row = list(_fixture_rows()[0])
    for column, value in changes.items():
        row[HEADER.index(column)] = value
    return row


def _photo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (120, 40, 20)).save(path)


# --- the real rows ------------------------------------------------------------------------------


def test_fixture_reads_every_row(parsed: tuple[dict[str, FundusRecord], ParseReport]) -> None:
    records, report = parsed
    assert len(records) == 62
    assert report.total_rows == 62 and report.records == 62
    assert report.patients == 37
    assert report.rejected_rows == [] and report.duplicates == []
    assert report.missing_columns == [] and report.extra_columns == []
    assert [column.column for column in report.columns] == HEADER
    assert report.rejected_total == 1
    assert report.repaired_total == 8


def test_decimal_commas_are_repaired(parsed: tuple[dict[str, FundusRecord], ParseReport]) -> None:
    records, report = parsed
    assert records["img00225"].diabetes_time_y == 0.5
    assert records["img00226"].diabetes_time_y == 0.5
    assert records["img01000"].diabetes_time_y == 0.2  # "0,20"
    assert records["img01004"].diabetes_time_y == 10.0  # "10,00"
    column = report.column("diabetes_time_y")
    assert column is not None
    (group,) = [group for group in column.repaired if group.how == REPAIR_DECIMAL_COMMA]
    assert group.count == 5
    assert group.lines == [37, 38, 40, 41, 44]
    assert group.examples == ["0,5", "0,20", "10,00"]


def test_letter_o_is_read_as_zero(parsed: tuple[dict[str, FundusRecord], ParseReport]) -> None:
    records, report = parsed
    assert records["img12344"].diabetes_time_y == 10.0
    assert records["img12345"].diabetes_time_y == 10.0
    column = report.column("diabetes_time_y")
    assert column is not None
    (group,) = [group for group in column.repaired if group.how == REPAIR_LETTER_O]
    assert (group.count, group.lines, group.examples) == (2, [61, 62], ["1O"])


def test_nao_duration_is_missing_and_reported(parsed: tuple[dict[str, FundusRecord], ParseReport]) -> None:
    records, report = parsed
    assert records["img14775"].diabetes_time_y is None
    column = report.column("diabetes_time_y")
    assert column is not None
    (group,) = [group for group in column.repaired if group.how == REPAIR_NAO_DURATION]
    assert (group.count, group.lines, group.examples) == (1, [63], ["Não"])
    # 16 empty cells and the "Não": missing, never 0.
    assert column.missing == 17
    assert column.n_repaired == 8 and column.n_rejected == 0


def test_bv_in_optic_disc_is_rejected_with_its_line(
    parsed: tuple[dict[str, FundusRecord], ParseReport],
) -> None:
    records, report = parsed
    record = records["img08220"]
    assert record.optic_disc is None
    assert record.vessels is Assessment.NORMAL  # the rest of the row is kept
    assert record.exam_eye is Eye.LEFT
    column = report.column("optic_disc")
    assert column is not None
    (group,) = column.rejected
    assert (group.value, group.count, group.lines) == ("bv", 1, [59])
    assert "1" in group.reason and "2" in group.reason
    assert column.missing == 0


def test_missing_values_stay_none(parsed: tuple[dict[str, FundusRecord], ParseReport]) -> None:
    records, report = parsed
    empty = records["img00999"]  # NA age and comorbidities, empty duration and insuline
    assert empty.patient_age is None
    assert empty.comorbidities is None
    assert empty.diabetes_time_y is None
    assert empty.insulin is None
    assert records["img01007"].insulin is None  # literal NA
    assert records["img01034"].comorbidities == "0"  # "0" is text, kept
    assert records["img00025"].comorbidities == "diabetes1, SAH"
    counts = {column.column: column.missing for column in report.columns}
    assert counts["patient_age"] == 8
    assert counts["insuline"] == 19  # 16 empty + 3 NA
    assert counts["comorbidities"] == 9
    assert counts["DR_ICDR"] == 0


def test_codes_map_to_enums_and_booleans(parsed: tuple[dict[str, FundusRecord], ParseReport]) -> None:
    records, _ = parsed
    first = records["img00001"]
    assert first.patient_id == "1"
    assert first.camera == "Canon CR"
    assert first.patient_age == 48.0
    assert first.diabetes_time_y == 12.0
    assert first.insulin is True and first.diabetes is True
    assert first.patient_sex is Sex.MALE and first.exam_eye is Eye.RIGHT
    assert first.nationality == "Brazil"
    assert first.increased_cup_disc is True and first.scar is False
    assert first.quality_adequate is True
    assert records["img00002"].exam_eye is Eye.LEFT
    assert records["img00002"].optic_disc is Assessment.ABNORMAL
    assert records["img00003"].patient_sex is Sex.FEMALE
    assert records["img01000"].insulin is False
    assert records["img00999"].diabetes is False
    assert records["img00999"].camera == "NIKON NF5050"
    inadequate = records["img01003"]
    assert inadequate.quality_adequate is False
    assert inadequate.focus is Assessment.ABNORMAL
    scarred = records["img00020"]
    assert (scarred.scar, scarred.nevus, scarred.amd, scarred.increased_cup_disc) == (True, True, False, True)
    assert records["img01004"].dr_icdr == 2 and records["img01004"].dr_sdrg == 3
    assert sum(not record.quality_adequate for record in records.values()) == 13
    assert all(record.narrative is None for record in records.values())


def test_grade_counts(parsed: tuple[dict[str, FundusRecord], ParseReport]) -> None:
    _, report = parsed
    assert report.icdr_counts == {"0": 51, "1": 2, "2": 4, "3": 3, "4": 2, "missing": 0}
    assert report.sdrg_counts == {"0": 51, "1": 3, "2": 1, "3": 5, "4": 2, "missing": 0}


def test_render_is_a_readable_report(parsed: tuple[dict[str, FundusRecord], ParseReport]) -> None:
    _, report = parsed
    text = report.render()
    assert str(FIXTURE) in text
    assert "Rows: 62" in text and "patients: 37" in text
    assert "repaired 5 x decimal comma (e.g. '0,5', '0,20', '10,00'): lines 37, 38, 40, 41, 44" in text
    assert "rejected 1 x 'bv'" in text and "line 59" in text
    assert "ICDR grade    count   share  name" in text
    assert "0                51   82.3%  no diabetic retinopathy" in text  # 51 / 62
    assert "R2 pre-proliferative retinopathy (4 or more" in text
    assert "Photos: not checked" in text


# --- other spellings and messy values -----------------------------------------------------------


def test_brset_v101_spelling(tmp_path: Path) -> None:
    rows = _fixture_rows()
    rows[0][HEADER.index("insuline")] = "No"  # img00001 was "yes"
    rows[1][HEADER.index("diabetes")] = "YES"
    header = ["Illuminaton" if name == "iluminaton" else name for name in HEADER]
    _write_csv(tmp_path / "labels_brset.csv", header, rows)
    assert find_labels_file(tmp_path) == tmp_path / "labels_brset.csv"
    archive = read_archive(tmp_path, check_photos=False)
    assert archive.labels_path == tmp_path / "labels_brset.csv"
    expected, _ = read_labels(FIXTURE)
    expected[0] = expected[0].model_copy(update={"insulin": False})
    assert archive.records == expected
    column = archive.report.column("iluminaton")
    assert column is not None and column.column == "Illuminaton" and column.field == "illumination"
    assert archive.report.missing_columns == []
    assert archive.report.repaired_total == 8  # case variants are plain values, not repairs
    assert archive.records[0].illumination is Assessment.NORMAL


def test_header_names_are_matched_loosely(tmp_path: Path) -> None:
    header = ["\ufeff Image_ID ", "PATIENT_ID", "dr_icdr", "Illumination", "quality"]
    path = _write_csv(tmp_path / "labels.csv", header, [["a1", "7", "3", "2", "inadequate"]])
    (record,), report = read_labels(path)
    assert record == FundusRecord(
        image_id="a1", patient_id="7", dr_icdr=3, illumination=Assessment.ABNORMAL, quality_adequate=False
    )
    assert "iluminaton" not in report.missing_columns
    assert "camera" in report.missing_columns and "DR_SDRG" in report.missing_columns
    assert report.icdr_counts["3"] == 1 and report.sdrg_counts["missing"] == 1


def test_messy_values(tmp_path: Path) -> None:
    rows = [
        _row(image_id="p1", insuline="sim", diabetes="Não", patient_age="1O"),
        _row(image_id="p2", insuline="N/A", patient_age="nan", diabetes_time_y="0,5"),
        _row(image_id="p3", patient_age="130", DR_ICDR="5", DR_SDRG="x", scar="2", patient_sex="3"),
        _row(image_id="p4", patient_age="-1", diabetes_time_y="Não", exam_eye="1.0", quality="good"),
        _row(image_id="p5", patient_age=" 61.5 ", diabetes_time_y="abc", insuline="maybe", camera="NA"),
        _row(image_id="p6", patient_age="", diabetes_time_y="101", comorbidities=" SAH "),
    ]
    path = _write_csv(tmp_path / "labels.csv", HEADER, rows)
    records, report = read_labels(path)
    by_id = {record.image_id: record for record in records}
    assert len(records) == 6 and report.rejected_rows == []

    assert by_id["p1"].insulin is True and by_id["p1"].diabetes is False and by_id["p1"].patient_age == 10.0
    assert by_id["p2"].insulin is None and by_id["p2"].patient_age is None
    assert by_id["p3"].patient_age is None and by_id["p3"].dr_icdr is None and by_id["p3"].dr_sdrg is None
    assert by_id["p3"].scar is None and by_id["p3"].patient_sex is None
    assert by_id["p4"].patient_age is None and by_id["p4"].diabetes_time_y is None
    assert by_id["p4"].exam_eye is Eye.RIGHT and by_id["p4"].quality_adequate is None
    assert by_id["p5"].patient_age == 61.5 and by_id["p5"].diabetes_time_y is None
    assert by_id["p5"].insulin is None and by_id["p5"].camera is None
    assert by_id["p6"].patient_age is None and by_id["p6"].diabetes_time_y is None
    assert by_id["p6"].comorbidities == "SAH"

    def rejected(column: str) -> dict[str, list[int]]:
        col = report.column(column)
        assert col is not None
        return {group.value: group.lines for group in col.rejected}

    def repaired(column: str) -> dict[str, list[int]]:
        col = report.column(column)
        assert col is not None
        return {group.how: group.lines for group in col.repaired}

    assert rejected("patient_age") == {"130": [4], "-1": [5]}
    assert repaired("patient_age") == {REPAIR_LETTER_O: [2]}
    assert rejected("diabetes_time_y") == {"abc": [6], "101": [7]}
    assert repaired("diabetes_time_y") == {REPAIR_DECIMAL_COMMA: [3], REPAIR_NAO_DURATION: [5]}
    assert repaired("insuline") == {REPAIR_PORTUGUESE_YES_NO: [2]}
    assert repaired("diabetes") == {REPAIR_PORTUGUESE_YES_NO: [2]}
    assert rejected("insuline") == {"maybe": [6]}
    assert rejected("DR_ICDR") == {"5": [4]} and rejected("DR_SDRG") == {"x": [4]}
    assert rejected("scar") == {"2": [4]} and rejected("patient_sex") == {"3": [4]}
    assert rejected("quality") == {"good": [5]}
    assert "exam_eye" in [column.column for column in report.columns if column.repaired]
    missing = {column.column: column.missing for column in report.columns}
    assert missing["patient_age"] == 2  # "nan" and "" (rejected ages are not "missing")
    assert missing["insuline"] == 1
    assert missing["camera"] == 1
    assert report.icdr_counts["missing"] == 1


def test_line_numbers_follow_multiline_cells(tmp_path: Path) -> None:
    header = [*HEADER, "narrative"]
    rows = [
        [*_row(image_id="n1"), "first line\nsecond line\nthird line"],
        [*_row(image_id="n2", DR_ICDR="9"), "one line"],
    ]
    path = _write_csv(tmp_path / "labels.csv", header, rows)
    records, report = read_labels(path)
    assert records[0].narrative == "first line\nsecond line\nthird line"
    column = report.column("DR_ICDR")
    assert column is not None
    assert column.rejected[0].lines == [5]  # n1 spans lines 2-4


def test_duplicate_image_ids_are_rejected(tmp_path: Path) -> None:
    rows = _fixture_rows()
    rows.append(list(rows[4]))  # img00005 again, line 64
    rows.append(_row(image_id="img00005", patient_id="999"))  # line 65
    path = _write_csv(tmp_path / "labels.csv", HEADER, rows)
    records, report = read_labels(path)
    assert len(records) == 62 and report.total_rows == 64
    assert [record.image_id for record in records].count("img00005") == 1
    (duplicate,) = report.duplicates
    assert (duplicate.image_id, duplicate.kept_line, duplicate.rejected_lines) == ("img00005", 6, [64, 65])
    assert [(row.line, row.image_id) for row in report.rejected_rows] == [(64, "img00005"), (65, "img00005")]
    assert "duplicate image_id (first on line 6)" in report.rejected_rows[0].reason
    assert "line 64: img00005: duplicate" in report.render()


def test_unusable_rows_are_rejected_whole(tmp_path: Path) -> None:
    rows = [
        _row(image_id=""),  # line 2
        _row(image_id="ok1", patient_id="NA"),  # line 3
        _row(image_id="../escape"),  # line 4
        _row(image_id="ok2")[:-1],  # line 5: one cell short
        _row(image_id="ok3"),  # line 6
    ]
    path = _write_csv(tmp_path / "labels.csv", HEADER, rows)
    records, report = read_labels(path)
    assert [record.image_id for record in records] == ["ok3"]
    reasons = {row.line: row.reason for row in report.rejected_rows}
    assert reasons[2] == "image_id is missing"
    assert reasons[3] == "patient_id is missing"
    assert reasons[4] == "image_id is not a plain file name"
    assert reasons[5] == "expected 34 cells, found 33"
    assert report.total_rows == 5 and report.records == 1


# --- photos -------------------------------------------------------------------------------------


def test_photo_cross_check(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / "labels.csv")
    photos = tmp_path / "fundus_photos"
    ids = [row[0] for row in _fixture_rows()]
    for image_id in ids[:59]:
        _photo(photos / f"{image_id}.jpg")
    _photo(photos / f"{ids[59]}.png")
    _photo(photos / f"{ids[60]}.JPG")
    _photo(photos / "img99999.jpg")  # no row
    _photo(photos / "stray.TIF")  # no row
    (photos / "notes.txt").write_text("not a photo")
    (photos / ".DS_Store").write_bytes(b"\0")

    archive = read_archive(tmp_path)
    report = archive.report
    assert report.photos_checked and report.photos_dir_found
    assert report.rows_without_photo == [ids[61]]
    assert report.photos_without_row == ["img99999.jpg", "stray.TIF"]
    assert archive.photo_path(ids[0]) == photos / f"{ids[0]}.jpg"
    assert archive.photo_path(ids[59]) == photos / f"{ids[59]}.png"
    assert archive.photo_path(ids[60]) == photos / f"{ids[60]}.JPG"
    assert archive.photo_path(ids[61]) is None  # a record without a photo
    assert archive.photo_path("img99999") is None  # a photo without a record
    assert archive.photo_path("../labels") is None
    text = report.render()
    assert "1 rows without a photo, 2 photos without a row" in text
    assert "img99999.jpg" in text


def test_missing_photos_folder_is_not_fatal(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / "labels.csv")
    archive = read_archive(tmp_path)
    assert len(archive.records) == 62
    assert archive.report.photos_dir_found is False
    assert len(archive.report.rows_without_photo) == 62
    assert archive.photo_path("img00001") is None
    assert "no fundus_photos/ folder" in archive.report.render()
    unchecked = read_archive(tmp_path, check_photos=False)
    assert unchecked.report.photos_checked is False and unchecked.report.rows_without_photo == []


# --- errors -------------------------------------------------------------------------------------


def test_missing_archive_folder(tmp_path: Path) -> None:
    folder = tmp_path / "nowhere"
    with pytest.raises(ArchiveError, match="archive folder not found") as error:
        read_archive(folder)
    assert str(folder) in str(error.value)


def test_missing_labels_file(tmp_path: Path) -> None:
    (tmp_path / "other.csv").write_text("a,b\n")
    with pytest.raises(ArchiveError) as error:
        read_archive(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "labels.csv" in message and "labels_brset.csv" in message and "other.csv" in message
    with pytest.raises(ArchiveError, match="label file not found"):
        read_labels(tmp_path / "labels.csv")


def test_both_label_files_is_an_error(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / "labels.csv")
    shutil.copy(FIXTURE, tmp_path / "labels_brset.csv")
    with pytest.raises(ArchiveError, match="both labels.csv and labels_brset.csv"):
        find_labels_file(tmp_path)


def test_csv_without_required_column(tmp_path: Path) -> None:
    header = [name for name in HEADER if name != "patient_id"]
    path = _write_csv(tmp_path / "labels.csv", header, [])
    with pytest.raises(ArchiveError) as error:
        read_labels(path)
    message = str(error.value)
    assert str(path) in message
    assert "missing required column(s) patient_id" in message
    assert "columns found: image_id, camera" in message


def test_two_spellings_of_one_column_is_an_error(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "labels.csv", ["image_id", "patient_id", "iluminaton", "Illuminaton"], [])
    with pytest.raises(ArchiveError, match="line 1"):
        read_labels(path)


def test_empty_and_non_utf8_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ArchiveError, match="empty"):
        read_labels(empty)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image_id,patient_id,diabetes_time_y\na,1,Não\n".encode("latin-1"))
    with pytest.raises(ArchiveError, match="latin.csv, line 2: not UTF-8"):
        read_labels(latin)


# --- writing ------------------------------------------------------------------------------------


def test_round_trip_of_the_fixture(tmp_path: Path) -> None:
    records, _ = read_labels(FIXTURE)
    out = tmp_path / "archive" / "labels.csv"
    write_labels_csv(records, out)
    again, report = read_labels(out)
    assert again == records
    # The rejected "bv" is written as NA, so it reads back as plain missing.
    assert report.rejected_total == 0 and report.repaired_total == 0
    text = out.read_text(encoding="utf-8")
    assert text.splitlines()[0] == ",".join(HEADER)
    assert "img00225,114,Canon CR,13,diabetes1,0.5,yes,2,1,yes,Brazil,1,1,1,0,0" in text
    assert [path.name for path in out.parent.iterdir()] == ["labels.csv"]  # no temporary file left


def test_round_trip_with_narratives_and_missing_values(tmp_path: Path) -> None:
    records = [
        FundusRecord(image_id="a", patient_id="1"),  # every other field None
        FundusRecord(
            image_id="b",
            patient_id="1",
            camera="Canon CR",
            patient_age=61.5,
            comorbidities="diabetes, SAH",
            diabetes_time_y=0.1,
            insulin=False,
            patient_sex=Sex.FEMALE,
            exam_eye=Eye.LEFT,
            diabetes=True,
            optic_disc=Assessment.ABNORMAL,
            dr_icdr=4,
            dr_sdrg=3,
            illumination=Assessment.NORMAL,
            drusen=True,
            other=False,
            quality_adequate=False,
            narrative='Left eye, "PDR": neovascularisation,\nand a pre-retinal haemorrhage.\r\nDone.',
        ),
        FundusRecord(image_id="c", patient_id="2", narrative="  leading and trailing spaces  "),
    ]
    path = tmp_path / "labels.csv"
    write_labels_csv(records, path)
    again, report = read_labels(path)
    assert again == records
    assert report.column("narrative") is not None
    with path.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == [*HEADER, "narrative"]


def test_write_replaces_atomically_and_cleans_up_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, _ = read_labels(FIXTURE)
    path = tmp_path / "labels.csv"
    write_labels_csv(records[:3], path)
    before = path.read_bytes()

    calls = {"n": 0}
    original = brset._format_cell

    def crash_midway(field: str, value: object) -> str:
        calls["n"] += 1
        if calls["n"] > 200:
            raise RuntimeError("simulated crash")
        return original(field, value)

    monkeypatch.setattr(brset, "_format_cell", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_labels_csv(records, path)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["labels.csv"]


def test_write_refuses_duplicate_ids(tmp_path: Path) -> None:
    record = FundusRecord(image_id="a", patient_id="1")
    with pytest.raises(ValueError, match="duplicate image_id 'a'"):
        write_labels_csv([record, record], tmp_path / "labels.csv")
    assert not (tmp_path / "labels.csv").exists()


# --- the whole real file (opt-in) ---------------------------------------------------------------


@pytest.mark.shared_data
def test_full_real_brset_file(shared_data_dir: Path) -> None:
    started = time.perf_counter()
    records, report = read_labels(shared_data_dir / "brset" / "labels-v1.0.0.csv")
    seconds = time.perf_counter() - started
    assert len(records) == 16_266 and report.total_rows == 16_266
    assert report.patients == 8_524
    assert report.rejected_rows == []
    assert report.icdr_counts == {"0": 15_210, "1": 162, "2": 310, "3": 190, "4": 394, "missing": 0}
    age = report.column("patient_age")
    assert age is not None and age.missing == 5_445
    optic_disc = report.column("optic_disc")
    assert optic_disc is not None
    assert [(group.value, group.lines) for group in optic_disc.rejected] == [("bv", [8221])]
    duration = report.column("diabetes_time_y")
    assert duration is not None
    repairs = {group.how: group for group in duration.repaired}
    assert repairs[REPAIR_LETTER_O].lines == [12345, 12346]
    assert repairs[REPAIR_NAO_DURATION].lines == [14776]
    assert sum(record.diabetes_time_y == 0.5 for record in records) == 16
    assert report.rejected_total == 1
    assert seconds < 5.0, f"reading the real file took {seconds:.2f} s"
