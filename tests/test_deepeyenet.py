"""The DeepEyeNet reader, on a small fixture in DeepEyeNet's JSON format (tests/fixtures/deepeyenet)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from index.archive.brset import ArchiveError
from index.archive.deepeyenet import missing_images, read_deepeyenet, split_keywords

FIXTURE = Path(__file__).parent / "fixtures" / "deepeyenet" / "DeepEyeNet_train.json"


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """A DeepEyeNet folder: the fixture's train split, with images for all entries but the last."""
    shutil.copy(FIXTURE, tmp_path / "DeepEyeNet_train.json")
    for name in ("case_001.jpg", "case_002.jpg", "case_003.jpg"):
        path = tmp_path / "eyenet0420" / "train_set" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(path)
    return tmp_path


def _write_json(root: Path, split: str, data: object) -> Path:
    path = root / f"DeepEyeNet_{split}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _entry(image: str = "eyenet0420/valid_set/x.jpg") -> dict[str, dict[str, str]]:
    return {image: {"keywords": "a, b", "clinical-description": "text"}}


def test_reads_the_fixture(dataset: Path) -> None:
    cases = read_deepeyenet(dataset, "train")
    assert len(cases) == 4
    first, second, third, _ = cases
    assert first.image_path == dataset.resolve() / "eyenet0420" / "train_set" / "case_001.jpg"
    assert first.image_path.is_absolute()
    assert first.keywords == ["proliferative diabetic retinopathy", "neovascularization"]
    assert first.description.startswith("54-year-old man")
    assert first.split == "train"
    assert second.keywords == ["branch retinal vein occlusion", "macular edema"]
    assert second.description == "Superotemporal flame hemorrhages with cystoid macular edema, left eye."
    assert third.description.endswith('"intermediate AMD".')


def test_missing_images_are_listed(dataset: Path) -> None:
    cases = read_deepeyenet(dataset, "train")
    (missing,) = missing_images(cases)
    assert missing.image_path.name == "case_004_not_shipped.jpg"
    assert not missing.image_path.exists()


def test_split_keywords() -> None:
    assert split_keywords(" a,b ,, c ,") == ["a", "b", "c"]
    assert split_keywords("") == []


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="DeepEyeNet_valid.json"):
        read_deepeyenet(tmp_path, "valid")


def test_unknown_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown DeepEyeNet split"):
        read_deepeyenet(tmp_path, "dev")  # type: ignore[arg-type]


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "DeepEyeNet_test.json"
    path.write_text('[\n  {"a.jpg": {"keywords": "x"\n]', encoding="utf-8")
    with pytest.raises(ArchiveError) as error:
        read_deepeyenet(tmp_path, "test")
    message = str(error.value)
    assert str(path) in message and "malformed JSON at line 3, column 1" in message


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"a.jpg": {"keywords": "x", "clinical-description": "y"}, "b.jpg": {}}, "exactly one key"),
        ("eyenet0420/x.jpg", "exactly one key"),
        ({"a.jpg": ["x", "y"]}, "must be an object"),
        ({"a.jpg": {"keywords": ["x"], "clinical-description": "y"}}, "'keywords' must be a string"),
        ({"a.jpg": {"keywords": "x"}}, "'clinical-description' must be a string"),
        ({"../outside.jpg": {"keywords": "x", "clinical-description": "y"}}, "leaves the dataset folder"),
        ({"eyenet0420/../../x.jpg": {"keywords": "x", "clinical-description": "y"}}, "leaves the dataset"),
        ({"/etc/passwd": {"keywords": "x", "clinical-description": "y"}}, "is absolute"),
        ({"": {"keywords": "x", "clinical-description": "y"}}, "empty image path"),
    ],
)
def test_bad_entries_name_file_and_index(tmp_path: Path, bad: object, expected: str) -> None:
    path = _write_json(tmp_path, "valid", [_entry(), bad])
    with pytest.raises(ArchiveError) as error:
        read_deepeyenet(tmp_path, "valid")
    message = str(error.value)
    assert f"{path}, entry 1" in message
    assert expected in message


def test_top_level_must_be_a_list(tmp_path: Path) -> None:
    _write_json(tmp_path, "test", _entry())
    with pytest.raises(ArchiveError, match="expected a JSON list"):
        read_deepeyenet(tmp_path, "test")
