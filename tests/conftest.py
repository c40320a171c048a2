"""Shared fixtures. Tests on ../shared reference data are opt-in through RETINA_SHARED_DATA.

`paths` and `photo` serve the tests of the running service (test_service.py, test_web_page.py): the
session's tiny bundle, its index and archive, and one indexed photograph.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared reference data folder named by RETINA_SHARED_DATA; skips the test when unset."""
    value = os.environ.get("RETINA_SHARED_DATA")
    if not value:
        pytest.skip("set RETINA_SHARED_DATA to the shared reference data folder to run this test")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"RETINA_SHARED_DATA={value} is not a folder")
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bundle, index, archive)."""
    from service_server import tiny_index  # imported here: it builds with torch, which most tests never load

    tiny, index = tiny_index(tmp_path_factory)
    return tiny.bundle, index, tiny.archive


@pytest.fixture(scope="module")
def photo(paths: tuple[Path, Path, Path]) -> tuple[int, bytes]:
    """An indexed archive photograph: (its id in the index, its bytes)."""
    from service_server import indexed_photo

    _, index, archive = paths
    return indexed_photo(index, archive)
