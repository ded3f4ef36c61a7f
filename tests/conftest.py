"""Shared fixtures. Tests run offline; real benchmark files are read from ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("EDITMEM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"benchmark data not found at {DATA} (set EDITMEM_DATA)")
    return DATA


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of a PostgreSQL database for tests; CI starts one (.ci/run). Outside CI the tests skip without it."""
    url = os.environ.get("EDITMEM_TEST_PG_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI=true but EDITMEM_TEST_PG_URL is not set: .ci/run should have started PostgreSQL")
        pytest.skip("no PostgreSQL (set EDITMEM_TEST_PG_URL)")
    return url
