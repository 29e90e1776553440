"""Shared test fixtures.

Real public data sets are read from $LMFORGE_DATA (default: ../shared/data beside the repository);
a test that needs an absent file skips with the file's path as the reason.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LMFORGE_DATA", REPO.parent / "shared" / "data"))


def data_file(relpath: str) -> Path:
    """Path of a shared data file, or skip the calling test when it is absent."""
    path = DATA_DIR / relpath
    if not path.exists():
        pytest.skip(f"shared data file not found: {path} (set LMFORGE_DATA)")
    return path


@pytest.fixture
def shared_data():
    return data_file
