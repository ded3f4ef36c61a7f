"""Where a search's time over the encoder goes, stage by stage, on a saved store (issue 17's "search p50 <= encoder +
2 ms").

Interleaves one bare encoder call and one ``search`` per query, as :func:`serve.bench_store.bench_search` does, and
times the stages inside ``search`` with wrappers: the change-counter read and catch-up (``IndexSync.catch_up``), the
FAISS call (``memory.index._search``) and the hit rows' read (``EditMemory._current_records``). It also times the
FAISS call alone on the same queries' vectors (encoded beforehand, searched one after another): the difference from
the in-search figure is what running right after the encoder costs. (Repeating one query instead measures a
cache-warm graph walk, several times faster than a real one: 0.96 against 1.45 ms at 750,000 MiniLM edits.)

Run on any store (the queries are made from its own prompts, so they find neighbours; no edit is written)::

    python -m serve.bench_search_stages --store sqlite:///runs/million/w1m_b/editmem-million-XXXX/million.db \\
        --queries 300 --out runs/search_stages.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGES = ("catch_up", "faiss", "rows")


@contextmanager
def timed_stages() -> Iterator[dict[str, list[float]]]:
    """Wrap the three stages of ``EditMemory.search_many`` with timers for the duration of the block."""
    import memory.index as index_module
    import memory.store as store_module
    import memory.sync as sync_module

    times: dict[str, list[float]] = {name: [] for name in STAGES}
    targets = [(sync_module.IndexSync, "catch_up", "catch_up"), (index_module, "_search", "faiss"),
               (store_module.EditMemory, "_current_records", "rows")]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]

    def wrap(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name].append(time.perf_counter() - t)
        return timed

    for (owner, attr, name), (_, _, fn) in zip(targets, originals):
        setattr(owner, attr, wrap(fn, name))
    try:
        yield times
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def _ms(values: Sequence[float]) -> float:
    return 1e3 * statistics.median(values)


def stage_times(mem: Any, queries: Sequence[str], k: int = 5) -> dict[str, Any]:
    """Medians (ms): the bare encoder, ``search``, their difference, each stage inside ``search``, and the FAISS call
    alone on the queries' vectors, one after another."""
    if not queries:
        raise ValueError("give at least one query")
    encoder = mem.encoder
    mem.search(queries[0], k=k)  # warm-up: loads and catches up the index
    encoder.encode([queries[0]])
    enc, srch = [], []
    with timed_stages() as times:
        for q in queries:
            t = time.perf_counter()
            encoder.encode([q])
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            mem.search(q, k=k)
            srch.append(time.perf_counter() - t)
    index = mem._index_sync.index
    vectors = encoder.encode(list(queries))
    alone = []
    for row in range(len(vectors)):
        t = time.perf_counter()
        index.search(vectors[row:row + 1], k)
        alone.append(time.perf_counter() - t)
    return {"n_edits": len(mem), "index": index.kind, "n_queries": len(queries), "encoder_ms": _ms(enc),
            "search_ms": _ms(srch), "added_ms": _ms(srch) - _ms(enc),
            "stages_ms": {name: _ms(values) for name, values in times.items() if values},
            "faiss_alone_ms": _ms(alone)}


def store_queries(mem: Any, n: int) -> list[str]:
    """``n`` query texts from the store's own prompts (each with a question word put in front, so none is a stored
    text itself)."""
    out: list[str] = []
    for record in mem.list(limit=n):
        out.append(f"Tell me: {record.prompt}")
    if not out:
        raise ValueError("the store has no edits to make queries from")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True,
                   help="store URL (no edit is written; an older store is migrated on open, as always)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here too")
    args = p.parse_args(argv)
    if args.queries < 1 or args.k < 1:
        p.error("--queries and -k must be >= 1")
    from memory.store import EditMemory
    from serve.bench_store import machine_info

    with EditMemory.open(args.store, namespace=args.namespace) as mem:
        result = stage_times(mem, store_queries(mem, args.queries), k=args.k)
    result.update({"machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
