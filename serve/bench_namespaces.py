"""Namespace isolation and open time at a given size: two namespaces of ``n`` synthetic edits each in one SQLite
store, written from the same templates so that each namespace's prompts are the other's nearest neighbours; every
edit's own prompt is searched (k=10) in the *other* namespace, and any hit of a foreign edit is a leak (must be 0).
Also: open time with the saved index (loaded, not rebuilt) and the store's bytes per edit. Hashing encoder (no
model). Run: ``python -m serve.bench_namespaces --n 20000``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def count_leaks(mem: Any, queries: Sequence[str], own: set[int], other: set[int], k: int = 10) -> int:
    """Search ``mem`` (k results each, in batches) by ``queries``; how many results are edits of ``other``
    (AssertionError if a result is in neither set)."""
    leaks = 0
    for start in range(0, len(queries), 256):
        for row in mem.search_many(list(queries[start:start + 256]), k):
            leaks += sum(h.edit.id in other for h in row)
            assert all(h.edit.id in own or h.edit.id in other for h in row), "a result of neither namespace"
    return leaks


def run(n: int, encoder: str = "hashing-256", queries: int = 2000) -> dict[str, Any]:
    from memory.store import EditMemory

    out: dict[str, Any] = {"n_per_namespace": n, "encoder": encoder}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 's.db'}"
        ids: dict[str, set[int]] = {}
        prompts: dict[str, list[str]] = {}
        t = time.perf_counter()
        for ns in ("a", "b"):
            with EditMemory.open(url, encoder=encoder, namespace=ns) as mem:
                items = [{"prompt": f"The fact number {i} about subject {i % 997} is", "target_new": f"{ns}{i}"}
                         for i in range(n)]
                ids[ns] = {r.id for r in mem.add_many(items)}
                prompts[ns] = [it["prompt"] for it in items]
        out["import_seconds"] = round(time.perf_counter() - t, 1)
        for ns, other in (("a", "b"), ("b", "a")):
            t = time.perf_counter()
            mem = EditMemory.open(url, namespace=ns)
            out[f"open_seconds_{ns}"] = round(time.perf_counter() - t, 3)
            with mem:
                out[f"index_kind_{ns}"] = mem.index_kind
                qs = prompts[other][:queries]
                out[f"leaks_{ns}"] = count_leaks(mem, qs, ids[ns], ids[other])
                out[f"queries_{ns}"] = len(qs)
        db = Path(tmp) / "s.db"
        out["sqlite_bytes_per_edit"] = round(db.stat().st_size / (2 * n), 1)
        out["index_files"] = {p.name: p.stat().st_size for p in Path(tmp).glob("*.faiss")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--queries", type=int, default=2000)
    a = p.parse_args()
    print(json.dumps(run(a.n, queries=a.queries), indent=1))


if __name__ == "__main__":
    main()
