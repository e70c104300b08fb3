"""Shared fixtures: where the real NIH data lives, and a private image cache per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # The resized-image cache must not leak between test sessions or into ~/.cache.
    os.environ["XRAY_CACHE"] = str(tmp_path_factory.mktemp("xray-cache"))


@pytest.fixture
def nih_dir():
    d = SHARED_DATA / "nih"
    if not (d / "Data_Entry_2017_v2020.csv.gz").is_file():
        pytest.skip(f"real NIH data not found at {d}")
    return d


@pytest.fixture
def nih64_dir():
    d = SHARED_DATA / "nih-64px"
    if not (d / "images").is_dir():
        pytest.skip(f"NIH 64 px set not found at {d}")
    return d
