"""Fixtures and helpers shared by the store's tests (imported by tests/test_store_*.py and tests/test_cli_store.py).

``store_url`` runs a test on SQLite and, when EDITMEM_TEST_PG_URL is set, on PostgreSQL in a fresh schema that is
dropped afterwards. Every store test uses the hashing encoder (fast, model-free) unless marked integration.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

ENCODER = "hashing-256"


@pytest.fixture(autouse=True)
def _editmem_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Index files of PostgreSQL stores go to a per-test cache folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDITMEM_CACHE", str(cache))
    return cache


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
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_store_url")


def open_store(url: str, **kwargs: Any) -> Any:
    from memory import EditMemory

    kwargs.setdefault("encoder", ENCODER)
    return EditMemory.open(url, **kwargs)


def write_knowedit(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """A KnowEdit-layout JSON file (a list of {prompt, target_new, subject, ...})."""
    path.write_text(json.dumps(list(rows)), encoding="utf-8")
    return path


FACTS = [
    {"prompt": "The capital of France is", "target_new": "Lyon", "subject": "France", "ground_truth": "Paris"},
    {"prompt": "The Eiffel Tower is located in", "target_new": "Rome", "subject": "Eiffel Tower"},
    {"prompt": "Apple was founded by", "target_new": "Bill Gates", "subject": "Apple"},
    {"prompt": "The official language of Brazil is", "target_new": "Spanish", "subject": "Brazil"},
    {"prompt": "Marie Curie was born in", "target_new": "Lyon", "subject": "Marie Curie"},
]


def snapshot(mem: Any) -> dict[str, Any]:
    """Everything a failed write must leave unchanged: edits with their history, index ids, change counter."""
    from sqlalchemy import select

    from memory.schema import meta

    with mem._read() as conn:
        seq = conn.execute(select(meta.c.change_seq)).scalar_one()
    records = mem.list(include_deleted=True)
    return {"len": len(mem), "records": records, "history": {r.id: mem.history(r.id) for r in records},
            "index": mem.index_ids(), "rows": mem.current_row_ids(), "seq": seq}
