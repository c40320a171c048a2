"""Shared fixtures. Tests on ../shared reference data are opt-in through RETINA_SHARED_DATA."""

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
