"""Search and writes while the index is rebuilt in the background (memory/compaction.py), through the store.

A SQLite store with ``auto`` is filled to just under the HNSW threshold (flat index); one more batch crosses it, and
the flat -> HNSW build starts on its thread (the same path as tombstone compaction). While it runs, one query at a
time is searched and every ``--write-every``-th step adds an edit; then the same queries are searched on the swapped
index. Reported: search p50/p99 before, during and after, the build's seconds, how many searches and writes landed
during it, and whether every edit written during it is found afterwards (top-1 by its own prompt). Run::

    python -m serve.bench_compaction --encoder hashing-256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from serve.bench_store import _percentile, machine_info


def _prompt(i: int) -> str:
    return f"synthetic fact {i} about topic {i % 97} with item {i * 31 % 1009}"


def _p(lat: list[float]) -> dict[str, float]:
    return {"n": len(lat), "p50_ms": round(1e3 * _percentile(lat, 50), 3),
            "p99_ms": round(1e3 * _percentile(lat, 99), 3)}


def run(encoder: str, n_queries: int, write_every: int) -> dict[str, Any]:
    from memory.store import EditMemory
    from memory.sync import HNSW_AUTO_THRESHOLD

    n0 = HNSW_AUTO_THRESHOLD - 1
    queries = [_prompt(i) for i in range(0, n0, max(1, n0 // n_queries))][:n_queries]
    out: dict[str, Any] = {"encoder": encoder, "threshold": HNSW_AUTO_THRESHOLD, "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp, \
            EditMemory.open(f"sqlite:///{Path(tmp) / 's.db'}", encoder=encoder) as mem:
        mem.add_many({"prompt": _prompt(i), "target_new": str(i)} for i in range(n0))
        out["kind_before"] = mem.index_kind
        before = []
        for q in queries:
            t = time.perf_counter()
            mem.search(q, k=5)
            before.append(time.perf_counter() - t)
        t_start = time.perf_counter()
        mem.add_many({"prompt": _prompt(i), "target_new": str(i)} for i in range(n0, n0 + 10))  # crosses it
        out["crossing_write_ms"] = round(1e3 * (time.perf_counter() - t_start), 1)
        during, written, step = [], [], 0
        while mem.index_compacting:
            q = queries[step % len(queries)]
            t = time.perf_counter()
            mem.search(q, k=5)
            during.append(time.perf_counter() - t)
            if step % write_every == 0:
                text = f"written during the build {step}"
                written.append((text, mem.add(text, "x").id))
            step += 1
        mem.wait_for_index()
        out["build_seconds_wall"] = round(time.perf_counter() - t_start, 1)
        out["kind_after"] = mem.index_kind
        after = []
        for q in queries:
            t = time.perf_counter()
            mem.search(q, k=5)
            after.append(time.perf_counter() - t)
        found = sum(mem.search(text, k=1)[0].edit.id == eid for text, eid in written)
        mem.verify()
    out.update(search_before=_p(before), search_during=_p(during) if during else None, search_after=_p(after),
               writes_during=len(written), writes_during_found_after=found)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="hashing-256")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--write-every", type=int, default=20)
    p.add_argument("--json", type=Path, default=Path("bench_out/compaction.json"))
    a = p.parse_args()
    result = run(a.encoder, a.queries, a.write_every)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
