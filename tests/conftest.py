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


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny tensors: one intra-op thread is faster (no OpenMP hand-off) and makes CPU
    timings independent of whatever else runs on the machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
