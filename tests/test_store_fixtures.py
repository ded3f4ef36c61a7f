"""Helpers shared by the store's tests (imported by tests/test_store_*.py and tests/test_cli_store.py).

The fixtures ``store_url``, ``pg_store_url`` and ``editmem_cache`` live in tests/conftest.py; ``pg_store_url`` is
re-exported here for modules that still import it. Every store test uses the hashing encoder (fast, model-free)
unless marked integration.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import pg_store_url as pg_store_url  # re-exported fixture

ENCODER = "hashing-256"


@pytest.fixture(autouse=True)
def _editmem_cache(editmem_cache: Path) -> Path:
    """Autouse form of ``editmem_cache`` (tests/conftest.py) for modules that import it."""
    return editmem_cache


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
