"""Shared fixtures. Tests run offline; real benchmark files are read from ../shared/data beside the checkout."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

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


@pytest.fixture
def editmem_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Index files of PostgreSQL stores go to a per-test cache folder (store tests use it with ``usefixtures``)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDITMEM_CACHE", str(cache))
    return cache


@pytest.fixture
def no_ambient_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither a statistics corpus nor a default store from the environment (weight-store tests use it)."""
    monkeypatch.delenv("EDITMEM_STATS_CORPUS", raising=False)
    monkeypatch.delenv("EDITMEM_STORE", raising=False)


@pytest.fixture
def pg_store_url(pg_url: str) -> Any:
    """A PostgreSQL store URL whose tables live in a fresh schema (search_path), dropped after the test."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"editmem_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(make_url(pg_url).set(drivername="postgresql+psycopg"))
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_url).set(drivername="postgresql+psycopg").update_query_dict(
        {"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL: SQLite in tmp_path and, when EDITMEM_TEST_PG_URL is set, PostgreSQL in a fresh schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_store_url")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Run the suite with one intra-op thread. Tiny models gain nothing from more, and on a shared 2-core machine
    OpenMP's spinning threads make them 15x (and worse) slower. The setting is put back at the end."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_edit_store(tmp_path, monkeypatch, capsys) -> str:
    """URL of a fresh SQLite store (hashing encoder) holding one edit, "The capital of Japan is" -> "Lima", made with
    the CLI; ``EDITMEM_STORE`` is unset and the CLI's output so far is discarded."""
    from serve.cli import main

    monkeypatch.delenv("EDITMEM_STORE", raising=False)
    store = f"sqlite:///{tmp_path / 'ask.db'}"
    assert main(["--store", store, "init", "--encoder", "hashing-256"]) == 0
    assert main(["--store", store, "add", "--prompt", "The capital of Japan is", "--target", "Lima"]) == 0
    capsys.readouterr()
    return store
