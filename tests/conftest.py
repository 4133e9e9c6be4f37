"""Shared pytest fixtures.

Real data lives in ``../shared/data`` beside the checkout (or where ``SLIDESTREAM_SHARED_DATA``
points); tests that need it use the ``shared_data`` fixture and skip with a reason when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent


def _shared_data_dir() -> Path | None:
    env = os.environ.get("SLIDESTREAM_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(_REPO.parent / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``shared/data``; skips the test when it is absent."""
    path = _shared_data_dir()
    if path is None:
        pytest.skip(
            "real data not available: ../shared/data is absent (set SLIDESTREAM_SHARED_DATA)"
        )
    return path


@pytest.fixture(scope="session")
def shared_tools() -> Path:
    """Path to ``shared/tools`` (the QuPath GeoJSON validator); skips when absent."""
    data = _shared_data_dir()
    tools = data.parent / "tools" if data is not None else None
    if tools is None or not (tools / "check_qupath_geojson.py").is_file():
        pytest.skip("QuPath GeoJSON validator not available: ../shared/tools is absent")
    return tools
