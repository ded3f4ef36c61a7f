"""The store at a large size, measured through the store (issue 17's "store at 1,000,000 edits" targets).

Synthetic edits come from templates over CounterFact's relations: every (subject, relation template) pair of the
EasyEdit split (templates and relation ids as :mod:`scope.relations` reads them), with a target drawn from the answers
the data gives that relation; which pairs, in which order, and which targets are deterministic from ``--seed``. They
are written as JSONL shards of ``--batch`` edits and imported with ``EditMemory.import_file`` (what ``editmem import``
calls) into a fresh SQLite store, with the real encoder by default. Measured, each against its target:

1. import throughput vs the bare encoder's own throughput on the same texts (a sample of ``--ratio-sample``);
2. ``search`` p50 minus the bare encoder's p50 (interleaved, k=5) on held-out synthetic prompts (pairs not stored),
   once the index has grown into HNSW; recall@1 of the same queries against exact search over the live vectors as
   SQL stores them; with ``--rebuild``, recall is measured first on the graph the import grew, then the index is
   rebuilt in one batch from SQL (``EditMemory.rebuild_index``, what ``editmem rebuild-index`` does; timed) and
   everything after is measured on the rebuilt graph;
3. open time of the saved store (close, reopen, first search), checking the index file was loaded, not rebuilt;
4. after deleting ``--delete`` (10%) of the edits (the first 500 one by one, the rest with ``delete_many``),
   searches by the deleted edits' own prompts: no deleted
   edit may come back; then (``--compact``) more deletions until the tombstones cross the compaction threshold, the
   background compaction's time, and the same check after the swap;
5. memory per edit: process RSS growth over the import, SQL file and index file bytes per edit.

``--namespaces 2`` also imports the same prompts (other targets) into a second namespace and checks that searches in
each namespace by the other's prompts never return the other's edits (:func:`serve.bench_namespaces.count_leaks`).

``--measure STORE.db`` measures a kept store (``--keep``) again instead: recall@1 and search time at each of
``--ef-sweep`` and the default efSearch, interleaved query by query (one encoder call, then one search at each depth
in turn, the order rotating), so the depths are compared under the same load (:func:`ef_paired`). With ``--top-up``
it first imports edits until the store holds ``--n`` live ones again (after the run's deletions) and rebuilds the
index in one batch; with ``--route N`` it also times the default router (the shipped scope head and relation
reranker), encoding included, at the router's depth and the index's, on N held-out and N stored prompts.

Run (results in ``--out``/result.json; a markdown table is printed)::

    EDITMEM_DATA=../shared/data OMP_NUM_THREADS=1 nice -n 10 python -m serve.bench_million --n 100000 \\
        --out runs/million
    python -m serve.bench_million --n 20000 --encoder hashing-256 --namespaces 2 --out runs/million-hashing
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memory.encoder import DEFAULT_ENCODER
from serve.bench_namespaces import count_leaks
from serve.bench_store import CF_FILES, _percentile, bench_search, machine_info

log = logging.getLogger(__name__)

SINGLE_DELETES = 500  # deletions timed one by one (`delete`); the rest go through `delete_many`
BULK = 10_000  # edits per `delete_many` call
TARGETS = {"import_ratio": 0.8, "search_added_p50_ms": 2.0, "recall_at_1": 0.98, "open_seconds": 10.0}


# --- synthetic edits --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Templates:
    """What the synthetic edits are made of: subjects, relation templates (``"{} plays the"``) with their relation
    ids, and the answers seen for each relation."""

    subjects: tuple[str, ...]
    templates: tuple[str, ...]
    relations: tuple[str, ...]  # relation of templates[i]
    answers: dict[str, tuple[str, ...]]

    @property
    def size(self) -> int:
        return len(self.subjects) * len(self.templates)


def load_templates(data_dir: Path) -> Templates:
    """Templates over the EasyEdit CounterFact split's relations (``data_dir/counterfact``)."""
    from scope.relations import RelationTable, rome_files, template_of

    table = RelationTable.from_rome_files(rome_files(data_dir))
    subjects: set[str] = set()
    relation_of: dict[str, str] = {}
    answers: dict[str, set[str]] = {}
    for name in CF_FILES:
        with open(data_dir / "counterfact" / "easyedit_split" / name, encoding="utf-8") as f:
            for case in json.load(f):
                subject, prompt = case["subject"], case["prompt"]
                tmpl = template_of(prompt, subject)
                if tmpl is None or "{}" not in tmpl or tmpl.count("{") != 1:
                    continue
                rel = table.relation(int(case["case_id"]), prompt, subject) or f"tmpl:{tmpl}"
                subjects.add(subject)
                relation_of.setdefault(tmpl, rel)
                answers.setdefault(rel, set()).update(a for a in (case["target_new"], case["ground_truth"]) if a)
    templates = tuple(sorted(relation_of))
    return Templates(tuple(sorted(subjects)), templates, tuple(relation_of[t] for t in templates),
                     {r: tuple(sorted(a)) for r, a in answers.items()})


def synthetic_edits(templates: Templates, start: int, stop: int, seed: int) -> Iterator[dict[str, Any]]:
    """Edits ``start..stop-1`` of the seed's sequence: distinct (subject, template) pairs in a seeded order (an
    affine permutation of the pair numbers), each with a seeded answer of its relation."""
    size = templates.size
    if stop > size:
        raise ValueError(f"only {size:,} distinct (subject, template) pairs; asked for {stop:,}")
    rng = random.Random(seed)
    step = rng.randrange(1, size)
    while np.gcd(step, size) != 1:
        step += 1
    offset = rng.randrange(size)
    n_templates = len(templates.templates)
    for i in range(start, stop):
        pair = (offset + i * step) % size
        subject, t = templates.subjects[pair // n_templates], pair % n_templates
        rel = templates.relations[t]
        options = templates.answers[rel]
        target = options[random.Random(seed * 1_000_003 + i).randrange(len(options))]
        yield {"prompt": templates.templates[t].replace("{}", subject, 1), "subject": subject,
               "target_new": target, "relation_id": rel}


def write_shard(items: Sequence[dict[str, Any]], path: Path, suffix: str = "") -> None:
    """Items as JSONL records that ``import_file`` reads (the KnowEdit-style layout: prompt, subject, target_new)."""
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"prompt": it["prompt"], "subject": it["subject"],
                                "target_new": it["target_new"] + suffix}, ensure_ascii=False) + "\n")


# --- measurements -----------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """This process's resident set size (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def import_edits(mem: Any, templates: Templates, n: int, seed: int, batch: int, tmp: Path,
                 suffix: str = "") -> dict[str, Any]:
    """Import edits 0..n-1 in JSONL shards of ``batch``; only ``import_file`` is timed."""
    seconds, added = 0.0, 0
    for start in range(0, n, batch):
        items = list(synthetic_edits(templates, start, min(n, start + batch), seed))
        path = tmp / "shard.jsonl"
        write_shard(items, path, suffix)
        del items
        t = time.perf_counter()
        added += mem.import_file(path)
        seconds += time.perf_counter() - t
        log.info("imported %d of %d edits into %s (%.0f s)", start + batch if start + batch < n else n, n,
                 mem.namespace, seconds)
    return {"n": n, "added": added, "import_seconds": seconds, "import_per_s": added / seconds}


def encoder_throughput(encoder: Any, texts: Sequence[str]) -> dict[str, Any]:
    """The bare encoder on ``texts`` in the store's own batches (memory.sync.encode)."""
    from memory.sync import encode

    encoder.encode(list(texts[:64]))  # warm
    t = time.perf_counter()
    encode(encoder, list(texts))
    s = time.perf_counter() - t
    return {"n": len(texts), "seconds": s, "per_s": len(texts) / s}


def exact_best(mem: Any, encoder: Any, queries: Sequence[str]) -> tuple[np.ndarray, int]:
    """The best inner product of each query over the live edits' vectors as SQL stores them (exact search), and how
    many live vectors there are."""
    row_ids = sorted(mem.current_row_ids())
    vectors = mem._index_sync.vectors_for(row_ids)  # read from SQL (the store's embeddings table)
    q = encoder.encode(list(queries))
    best = np.empty(len(q), dtype=np.float32)
    for start in range(0, len(q), 256):
        best[start:start + 256] = (q[start:start + 256] @ vectors.T).max(axis=1)
    return best, len(row_ids)


def store_recall(mem: Any, queries: Sequence[str], best: np.ndarray, tol: float = 1e-5, *,
                 ef_search: int | None = None) -> float:
    """recall@1 of ``search`` (at HNSW depth ``ef_search``, default the index's own) against the exact best scores
    (a hit counts when its score is within ``tol`` of the exact best, so exact ties count either way)."""
    hits: list[Any] = []
    for start in range(0, len(queries), 256):
        hits.extend(mem.search_many(list(queries[start:start + 256]), 1, ef_search=ef_search))
    got = np.asarray([h[0].score if h else -np.inf for h in hits], dtype=np.float32)
    return float(np.mean(got >= best - tol))


def ef_sweep(mem: Any, encoder: Any, queries: Sequence[str], best: np.ndarray, efs: Sequence[int],
             n_timed: int = 200) -> list[dict[str, Any]]:
    """recall@1 and search latency over the encoder at other HNSW search depths (each search's own depth; the live
    index's ``ef_search`` is left alone); ``n_timed`` 0 measures recall only."""
    if mem._index_sync.index.kind != "hnsw":
        return []
    out = []
    for ef in efs:
        row = {"ef_search": ef, "recall_at_1": store_recall(mem, queries, best, ef_search=ef)}
        if n_timed:
            timed = bench_search(mem, encoder, queries[:n_timed], ef_search=ef)
            row.update(added_p50_ms=timed["added_p50_ms"], n_timed=timed["n_queries"])
        out.append(row)
    return out


def rotated(items: Sequence[Any], n: int) -> list[Any]:
    """``items`` starting at position ``n`` (mod their number): the order interleaved timings rotate through, so that
    no variant always runs first after the encoder."""
    items = list(items)
    return items[n % len(items):] + items[:n % len(items)]


def ef_paired(mem: Any, encoder: Any, queries: Sequence[str], best: np.ndarray, efs: Sequence[int]
              ) -> list[dict[str, Any]]:
    """recall@1 at each HNSW search depth in ``efs``, then their search times interleaved: per query one bare
    encoder call and one ``search`` (k=5) at each depth, in an order that rotates from query to query. Per depth:
    p50 of search minus p50 of the encoder (``added_p50_ms``) and p50 of the per-query difference (``paired``)."""
    index = mem._index_sync.index
    if index.kind != "hnsw":
        raise ValueError(f"the store's index is {index.kind}, not hnsw")
    efs = list(efs)
    rows = ef_sweep(mem, encoder, queries, best, efs, n_timed=0)  # recall at each depth
    mem.search(queries[0], k=5)
    encoder.encode([queries[0]])
    enc: list[float] = []
    srch: dict[int, list[float]] = {ef: [] for ef in efs}
    for n, q in enumerate(queries):
        t = time.perf_counter()
        encoder.encode([q])
        enc.append(time.perf_counter() - t)
        for ef in rotated(efs, n):
            t = time.perf_counter()
            mem.search(q, k=5, ef_search=ef)
            srch[ef].append(time.perf_counter() - t)
    for row in rows:
        lat = srch[row["ef_search"]]
        row.update(n_timed=len(lat), encoder_p50_ms=1e3 * _percentile(enc, 50),
                   added_p50_ms=1e3 * (_percentile(lat, 50) - _percentile(enc, 50)),
                   paired_extra_p50_ms=1e3 * _percentile([a - b for a, b in zip(lat, enc)], 50))
    return rows


def top_up(mem: Any, encoder: Any, templates: Templates, s: MillionSettings, tmp: Path,
           queries: Sequence[str]) -> tuple[dict[str, Any], tuple[np.ndarray, int] | None]:
    """Import more synthetic edits until the store holds ``s.n`` live edits (after a run's deletions), taking them
    after the held-out queries (edits ``n + queries`` on, which no run stored); measure recall@1 of ``queries`` on
    the graph the import grew, then rebuild the index in one batch (so what is measured next is a one-batch graph, as
    round 8's `--rebuild` measured). Returns the report and :func:`exact_best` of ``queries`` over the live edits
    (None when nothing was added), which the rebuild leaves as it is."""
    live0 = len(mem)
    missing = s.n - live0
    out: dict[str, Any] = {"live_before": live0, "added": 0, "import_seconds": 0.0}
    exact = None
    start = s.n + s.queries
    if missing > 0:
        if start + missing > templates.size:
            raise ValueError(f"topping up {missing:,} edits needs pairs past the {templates.size:,} there are")
        for first in range(start, start + missing, s.batch):
            items = list(synthetic_edits(templates, first, min(start + missing, first + s.batch), s.seed))
            path = tmp / "top_up.jsonl"
            write_shard(items, path)
            t = time.perf_counter()
            out["added"] += mem.import_file(path)
            out["import_seconds"] += time.perf_counter() - t
            path.unlink()
            log.info("topped up %d of %d edits (%.0f s)", out["added"], missing, out["import_seconds"])
        mem.wait_for_index()
        out["grown_index"] = _index_state(mem)
        exact = exact_best(mem, encoder, queries)
        out["grown_recall_at_1"] = store_recall(mem, queries, exact[0])
        t = time.perf_counter()
        mem.rebuild_index()
        out["rebuild_seconds"] = time.perf_counter() - t
    out.update(live_after=len(mem), index=_index_state(mem))
    return out, exact


def stored_prompts(mem: Any, n: int, seed: int) -> list[str]:
    """The prompts of ``n`` live edits drawn at random by id (ids are 1..the highest; deleted ones are skipped)."""
    from sqlalchemy import func, select

    from memory.errors import NotFoundError
    from memory.schema import edits

    rng = random.Random(seed + 2)
    with mem._read() as conn:
        top = int(conn.execute(select(func.max(edits.c.edit_id))).scalar_one() or 0)
    seen: set[int] = set()
    out: list[str] = []
    while len(out) < n and len(seen) < top:
        i = rng.randint(1, top)
        if i in seen:
            continue
        seen.add(i)
        try:
            r = mem.get(i)
        except NotFoundError:
            continue
        if not r.deleted:
            out.append(r.prompt)
    return out


def route_timing(mem: Any, encoder: Any, held_out: Sequence[str], stored: Sequence[str],
                 depths: Sequence[int | None]) -> list[dict[str, Any]]:
    """The whole routing of one query (encoding it, searching at the router's depth, the scope head and the relation
    reranker: the default router, :func:`editors.retrieval.setup.load_rerankers` with ``"default"``) at each of
    ``depths`` (None: the index's own), interleaved per query with one bare encoder call so they share the load; on
    held-out prompts (no edit of theirs stored) and stored edits' own prompts (in scope, so every stage runs). Per
    depth and group: p50 / p90 of the routing, p50 of routing minus the encoder's p50, p50 of the per-query
    difference (``paired``), and the fraction routed."""
    from editors.retrieval.setup import DEFAULT_SCOPE, load_classifier, load_rerankers
    from scope.router import Router

    classifier = load_classifier(DEFAULT_SCOPE)
    relation, _ = load_rerankers("default", None, classifier=classifier)
    if relation is None:
        raise ValueError("the shipped relation reranker does not fit the default scope head")
    routers = [Router(mem, classifier, reranker=relation, ef_search=d) for d in depths]
    for r in routers:
        r.route([held_out[0]])  # warm
    rows = []
    for group, queries in (("held_out", held_out), ("stored", stored)):
        enc: list[float] = []
        lat: list[list[float]] = [[] for _ in routers]
        routed = [0] * len(routers)
        for n, q in enumerate(queries):
            t = time.perf_counter()
            encoder.encode([q])
            enc.append(time.perf_counter() - t)
            for i in rotated(range(len(routers)), n):
                t = time.perf_counter()
                decision = routers[i].route([q])[0]
                lat[i].append(time.perf_counter() - t)
                routed[i] += decision.in_scope
        for i, depth in enumerate(depths):
            rows.append({"group": group, "ef_search": depth, "n": len(queries), "routed": routed[i] / len(queries),
                         "route_p50_ms": 1e3 * _percentile(lat[i], 50), "route_p90_ms": 1e3 * _percentile(lat[i], 90),
                         "encoder_p50_ms": 1e3 * _percentile(enc, 50),
                         "added_p50_ms": 1e3 * (_percentile(lat[i], 50) - _percentile(enc, 50)),
                         "paired_added_p50_ms": 1e3 * _percentile([a - b for a, b in zip(lat[i], enc)], 50)})
    return rows


def measure_kept(store: Path, settings: MillionSettings, data_dir: Path, *, grow: bool = False,
                 route: int = 0) -> dict[str, Any]:
    """``--measure``: a kept store's search depths compared query by query (:func:`ef_paired`), on the held-out
    prompts the run that made it used (``--n`` and ``--seed`` must be that run's). ``grow`` (``--top-up``): first
    bring the store back to ``--n`` live edits (:func:`top_up`); ``route`` (``--route N``): then time the default
    router on N held-out and N stored prompts (:func:`route_timing`) at its own depth and at the index's."""
    from memory.encoder import get_encoder
    from memory.store import EditMemory
    from scope.router import ROUTE_EF_SEARCH

    s = settings
    templates = load_templates(data_dir)
    encoder = get_encoder(s.encoder)
    queries = [e["prompt"] for e in synthetic_edits(templates, s.n, s.n + s.queries, s.seed)]
    t = time.perf_counter()
    with EditMemory.open(f"sqlite:///{store}", encoder=encoder) as mem:
        out: dict[str, Any] = {"store": str(store), "open_seconds": time.perf_counter() - t,
                               "index": _index_state(mem)}
        exact = None
        if grow:
            out["top_up"], exact = top_up(mem, encoder, templates, s, store.parent, queries)
        best, n_live = exact if exact is not None else exact_best(mem, encoder, queries)
        default = mem._index_sync.index.ef_search
        efs = list(dict.fromkeys([default, *s.ef_sweep]))
        out.update(n_live=n_live, n_queries=len(queries), default_ef_search=default,
                   ef_paired=ef_paired(mem, encoder, queries, best, efs)
                   if mem._index_sync.index.kind == "hnsw" else [])
        if route:
            stored = stored_prompts(mem, route, s.seed)
            out["route"] = route_timing(mem, encoder, queries[:route], stored, [ROUTE_EF_SEARCH, None])
    return out


def deleted_leaks(mem: Any, prompts: Sequence[str], deleted: set[int], n_searches: int, k: int = 5) -> dict[str, Any]:
    """``n_searches`` searches (k results each) by deleted edits' own prompts; how many results name a deleted edit."""
    queries = [prompts[i % len(prompts)] for i in range(n_searches)]
    leaked = results = 0
    t = time.perf_counter()
    for start in range(0, len(queries), 256):
        for row in mem.search_many(queries[start:start + 256], k):
            results += len(row)
            leaked += sum(h.edit.id in deleted for h in row)
    return {"searches": len(queries), "results": results, "deleted_returned": leaked,
            "seconds": time.perf_counter() - t}


def _index_state(mem: Any) -> dict[str, Any]:
    index = mem._index_sync.index
    return {"kind": index.kind, "vectors": index.ntotal, "live": len(index), "tombstones": index.n_stale,
            "built": index.built, "grown": index.grown, "needs_compaction": index.needs_rebuild,
            "outgrown": index.outgrown, "compacting": mem.index_compacting}


class _BuildCounter(logging.Handler):
    """Counts the store's "built ... index" log lines (a rebuild from SQL)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.builds = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("built "):
            self.builds += 1


def delete_and_check(mem: Any, ids: Sequence[int], prompts: dict[int, str], fraction: float, searches: int,
                     compact: bool, seed: int, timing: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Delete ``fraction`` of ``ids`` one by one; check searches by their prompts (and ``timing()``, the search
    latency with the tombstones in place); optionally go on deleting until the tombstones are compacted in the
    background and check again."""
    from memory import index as index_module

    rng = random.Random(seed + 1)
    order = list(ids)
    rng.shuffle(order)
    n_del = round(fraction * len(order))
    deleted: set[int] = set()

    def delete(some: Sequence[int], singles: int = 0) -> tuple[float, float]:
        """The first ``singles`` one by one (``delete``), the rest in bulk (``delete_many``, BULK a call): the
        seconds each way."""
        t = time.perf_counter()
        for i in some[:singles]:
            mem.delete(i)
            deleted.add(i)
        t1 = time.perf_counter()
        for start in range(singles, len(some), BULK):
            part = some[start:start + BULK]
            mem.delete_many(part)
            deleted.update(part)
        return t1 - t, time.perf_counter() - t1

    out: dict[str, Any] = {"fraction": fraction, "deleted": n_del}
    singles = min(n_del, SINGLE_DELETES)
    s_one, s_bulk = delete(order[:n_del], singles)
    out["delete_per_s"] = singles / s_one if s_one else None
    out["delete_many_per_s"] = (n_del - singles) / s_bulk if n_del > singles and s_bulk else None
    out["after_delete"] = _index_state(mem)
    out["check"] = deleted_leaks(mem, [prompts[i] for i in order[:n_del]], deleted, searches)
    if timing is not None:
        out["search"] = timing()
    index = mem._index_sync.index
    if not compact or index.kind != "hnsw":  # a flat index removes in place: no tombstones to compact
        return out
    # the tombstone count that starts a compaction (memory.index.VectorIndex.needs_rebuild)
    limit = max(index_module.STALE_MIN, index_module.STALE_FRACTION * index.ntotal)
    more = max(0, int(limit) + 1 - index.n_stale)
    t = time.perf_counter()
    s = sum(delete(order[n_del:n_del + more]))
    started = mem.index_compacting
    lat: list[float] = []
    while mem.index_compacting:  # searches go on against the old index during the build
        q = prompts[order[len(lat) % len(deleted)]]
        t1 = time.perf_counter()
        hits = mem.search(q, 5)
        lat.append(time.perf_counter() - t1)
        assert not any(h.edit.id in deleted for h in hits), "a deleted edit came back during compaction"
        time.sleep(0.05)
    mem.wait_for_index()
    out["compaction"] = {"extra_deleted": more, "delete_seconds": s, "threshold": int(limit),
                         "started_in_background": started,
                         "seconds_until_swapped": time.perf_counter() - t - s,
                         "searches_during": len(lat),
                         "search_p50_ms_during": 1e3 * _percentile(lat, 50) if lat else None,
                         "after": _index_state(mem),
                         "check": deleted_leaks(mem, [prompts[i] for i in order[:n_del + more]], deleted, searches)}
    return out


# --- the run ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MillionSettings:
    n: int
    encoder: str = DEFAULT_ENCODER
    batch: int = 100_000
    queries: int = 1000
    ratio_sample: int = 10_000
    delete: float = 0.1
    searches: int = 10_000
    compact: bool = True
    namespaces: int = 1
    seed: int = 0
    ef_sweep: tuple[int, ...] = (128, 512)  # HNSW search depths measured beside the default
    rebuild: bool = False  # rebuild the index in one batch after the import (recall measured before and after)

    def __post_init__(self) -> None:
        if self.n < 100 or self.batch < 1 or self.queries < 10 or self.ratio_sample < 10:
            raise ValueError("n must be >= 100, batch >= 1, queries and ratio_sample >= 10")
        if not 0 < self.delete < 1 or self.searches < 1 or self.namespaces not in (1, 2):
            raise ValueError("delete must be in (0, 1), searches >= 1, namespaces 1 or 2")


def run(settings: MillionSettings, data_dir: Path, workdir: Path) -> dict[str, Any]:
    from memory.encoder import get_encoder
    from memory.store import EditMemory

    s = settings
    templates = load_templates(data_dir)
    if s.n + s.queries > templates.size:
        raise ValueError(f"--n {s.n:,} plus {s.queries} queries exceeds the {templates.size:,} distinct pairs")
    encoder = get_encoder(s.encoder)
    out: dict[str, Any] = {"settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
                           "templates": {"subjects": len(templates.subjects), "templates": len(templates.templates),
                                         "relations": len(set(templates.relations)), "pairs": templates.size}}
    db = workdir / "million.db"
    url = f"sqlite:///{db}"
    ns_names = ["default"] if s.namespaces == 1 else ["a", "b"]
    sample = [e["prompt"] for e in synthetic_edits(templates, 0, min(s.n, s.ratio_sample), s.seed)]
    out["encoder"] = encoder_throughput(encoder, sample)
    rss0 = rss_bytes()
    for i, ns in enumerate(ns_names):
        with EditMemory.open(url, encoder=encoder, namespace=ns) as mem:
            imp = import_edits(mem, templates, s.n, s.seed, s.batch, workdir, suffix="" if i == 0 else " (b)")
            imp["ratio"] = imp["import_per_s"] / out["encoder"]["per_s"]
            imp["rss_growth_bytes_per_edit"] = (rss_bytes() - rss0) / ((i + 1) * s.n)
            t = time.perf_counter()
            mem.wait_for_index()  # a flat index past the HNSW threshold grows into HNSW in the background
            imp["index_ready_wait_seconds"] = time.perf_counter() - t
            imp["index"] = _index_state(mem)
            out.setdefault("import", {})[ns] = imp
    out["encoder_after"] = encoder_throughput(encoder, sample)  # the load may have changed meanwhile
    ns = ns_names[0]
    queries = [e["prompt"] for e in synthetic_edits(templates, s.n, s.n + s.queries, s.seed)]
    with EditMemory.open(url, encoder=encoder, namespace=ns) as mem:
        exact = None  # the exact best over the live vectors in SQL, which a rebuild leaves as they are
        if s.rebuild:
            exact = best, n_live = exact_best(mem, encoder, queries)
            out["grown"] = {"ef_search": mem._index_sync.index.ef_search,
                            "recall_at_1": store_recall(mem, queries, best),
                            "ef_sweep": ef_sweep(mem, encoder, queries, best, s.ef_sweep, n_timed=0)}
            t = time.perf_counter()
            mem.rebuild_index()
            out["rebuild"] = {"seconds": time.perf_counter() - t, "index": _index_state(mem)}
        out["search"] = bench_search(mem, encoder, queries)  # timed before the exact search runs, as without rebuild
        best, n_live = exact if exact is not None else exact_best(mem, encoder, queries)
        out["recall"] = {"n_queries": len(queries), "n_live": n_live, "ef_search": mem._index_sync.index.ef_search,
                         "recall_at_1": store_recall(mem, queries, best)}
        out["ef_sweep"] = ef_sweep(mem, encoder, queries, best, s.ef_sweep)
        out["rss_after_search_bytes"] = rss_bytes()
    sql_bytes = sum(p.stat().st_size for p in workdir.glob(db.name + "*") if not p.name.endswith(".faiss"))
    out["sizes"] = {"sql_bytes": sql_bytes, "sql_bytes_per_edit": sql_bytes / (len(ns_names) * s.n),
                    "index_files": {p.name: p.stat().st_size for p in workdir.glob("*.faiss")}}
    out["sizes"]["index_bytes_per_edit"] = sum(out["sizes"]["index_files"].values()) / (len(ns_names) * s.n)
    counter = _BuildCounter()
    logging.getLogger("memory.sync").addHandler(counter)
    try:
        t = time.perf_counter()
        mem = EditMemory.open(url, encoder=encoder, namespace=ns)
        opened = time.perf_counter() - t
        mem.search(queries[0], 5)
        out["open"] = {"open_seconds": opened, "open_and_first_search_seconds": time.perf_counter() - t,
                       "rebuilt": counter.builds > 0, "index": _index_state(mem)}
    finally:
        logging.getLogger("memory.sync").removeHandler(counter)
    with mem:
        if s.namespaces == 2:
            out["namespaces"] = namespace_leaks(url, encoder, templates, s)
        ids = [r.id for r in mem]
        prompts = {r.id: r.prompt for r in mem}
        out["delete"] = delete_and_check(mem, ids, prompts, s.delete, s.searches, s.compact, s.seed,
                                         timing=lambda: bench_search(mem, encoder, queries))
        mem.verify()
    return out


def namespace_leaks(url: str, encoder: Any, templates: Templates, s: MillionSettings) -> dict[str, Any]:
    """Search each namespace by the other's prompts (the same texts: its own edits are the nearest neighbours)."""
    from memory.store import EditMemory

    queries = [e["prompt"] for e in synthetic_edits(templates, 0, min(s.n, s.searches), s.seed)]
    ids: dict[str, set[int]] = {}
    for ns in ("a", "b"):
        with EditMemory.open(url, encoder=encoder, namespace=ns) as m:
            ids[ns] = {r.id for r in m}
    out: dict[str, Any] = {}
    for ns, other in (("a", "b"), ("b", "a")):
        with EditMemory.open(url, encoder=encoder, namespace=ns) as m:
            out[ns] = {"edits": len(ids[ns]), "queries": len(queries),
                       "leaks": count_leaks(m, queries, ids[ns], ids[other])}
    return out


# --- report -----------------------------------------------------------------------------------------------------------
def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render_markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    first = next(iter(r["import"].values()))
    lines = [f"Store at {s['n']:,} synthetic edits ({r['templates']['templates']} CounterFact templates over "
             f"{r['templates']['relations']} relations x {r['templates']['subjects']:,} subjects), encoder "
             f"{s['encoder']}, {r['time']}, load average {r['load_average_start'][0]:.1f} -> "
             f"{r['load_average_end'][0]:.1f}. Command: `{r['command']}`", "",
             "| measurement | value | target | |", "|---|---|---|---|"]
    lines.append(f"| import throughput (`import_file`, shards of {s['batch']:,}) | {first['import_per_s']:.0f} edits/s "
                 f"vs bare encoder {r['encoder']['per_s']:.0f} texts/s (after: {r['encoder_after']['per_s']:.0f}): "
                 f"ratio **{first['ratio']:.2f}** | ≥ 0.8 | {_verdict(first['ratio'] >= TARGETS['import_ratio'])} |")
    sr = r["search"]
    lines.append(f"| `search` k=5, {sr['n_queries']} held-out prompts, {first['index']['kind']} index | p50 "
                 f"{sr['search_p50_ms']:.2f} ms vs encoder {sr['encoder_p50_ms']:.2f} ms: added **"
                 f"{sr['added_p50_ms']:.2f} ms** (paired {sr['paired_extra_p50_ms']:.2f} ms) | ≤ 2 ms "
                 f"| {_verdict(sr['added_p50_ms'] <= TARGETS['search_added_p50_ms'])} |")
    rc = r["recall"]
    if "grown" in r:
        g, rb = r["grown"], r["rebuild"]
        sweep = ", ".join(f"{e['recall_at_1']:.3f} at {e['ef_search']}" for e in g["ef_sweep"])
        lines.append(f"| recall@1 on the graph the import grew (ef_search {g['ef_search']}; {sweep}), then "
                     f"`rebuild_index` in one batch | **{g['recall_at_1']:.3f}**; rebuilt in {rb['seconds']:.0f} s "
                     f"| reported | |")
    lines.append(f"| recall@1 vs exact search over the {rc['n_live']:,} live vectors in SQL (ef_search "
                 f"{rc['ef_search']}) | **{rc['recall_at_1']:.3f}"
                 f"** | ≥ 0.98 | {_verdict(rc['recall_at_1'] >= TARGETS['recall_at_1'])} |")
    for e in r.get("ef_sweep", []):
        ok = e["recall_at_1"] >= TARGETS["recall_at_1"] and e["added_p50_ms"] <= TARGETS["search_added_p50_ms"]
        lines.append(f"| the same at HNSW ef_search={e['ef_search']} (default {rc['ef_search']}) | recall@1 "
                     f"**{e['recall_at_1']:.3f}**, search added p50 {e['added_p50_ms']:.2f} ms ({e['n_timed']} timed) "
                     f"| ≥ 0.98, ≤ 2 ms | {_verdict(ok)} |")
    op = r["open"]
    lines.append(f"| open the saved store (index {'rebuilt' if op['rebuilt'] else 'loaded'}) + first search "
                 f"| {op['open_seconds']:.2f} s + first search = **{op['open_and_first_search_seconds']:.2f} s** "
                 f"| ≤ 10 s, loaded | {_verdict(op['open_and_first_search_seconds'] <= 10 and not op['rebuilt'])} |")
    d = r["delete"]
    bulk = f", bulk {d['delete_many_per_s']:.0f}/s" if d.get("delete_many_per_s") else ""
    lines.append(f"| delete {d['fraction']:.0%} ({d['deleted']:,}; one by one {d['delete_per_s']:.0f}/s{bulk}), then "
                 f"{d['check']['searches']:,} searches by their prompts | **{d['check']['deleted_returned']}** deleted "
                 f"returned; {d['after_delete']['tombstones']:,} tombstones, compaction "
                 f"{'due' if d['after_delete']['needs_compaction'] else 'not due'}; search added p50 "
                 f"{d['search']['added_p50_ms']:.2f} ms | 0 | {_verdict(d['check']['deleted_returned'] == 0)} |")
    if "compaction" in d:
        c = d["compaction"]
        lines.append(f"| background compaction ({c['extra_deleted']:,} more deletions, threshold {c['threshold']:,}) "
                     f"| swapped after {c['seconds_until_swapped']:.1f} s, {c['searches_during']} searches during "
                     f"it (p50 {c['search_p50_ms_during'] or 0:.1f} ms); after: {c['after']['tombstones']} tombstones, "
                     f"**{c['check']['deleted_returned']}** deleted returned | 0 "
                     f"| {_verdict(c['check']['deleted_returned'] == 0)} |")
    sz = r["sizes"]
    lines.append(f"| memory per edit | RSS growth {first['rss_growth_bytes_per_edit']:.0f} B, SQL "
                 f"{sz['sql_bytes_per_edit']:.0f} B, index file {sz['index_bytes_per_edit']:.0f} B | reported | |")
    if "namespaces" in r:
        ns = r["namespaces"]
        leaks = sum(v["leaks"] for v in ns.values())
        lines.append(f"| two namespaces of {s['n']:,}: searches by the other's prompts (k=10) | "
                     f"**{leaks}** foreign results in {sum(v['queries'] for v in ns.values()):,} searches | 0 "
                     f"| {_verdict(leaks == 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench_million", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="edits per namespace (default: %(default)s)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER)
    p.add_argument("--batch", type=int, default=100_000, help="edits per imported file (default: %(default)s)")
    p.add_argument("--queries", type=int, default=1000, help="held-out prompts for search and recall")
    p.add_argument("--ratio-sample", type=int, default=10_000, help="texts the bare encoder is timed on")
    p.add_argument("--delete", type=float, default=0.1, help="fraction deleted (default: %(default)s)")
    p.add_argument("--searches", type=int, default=10_000, help="searches after deleting (default: %(default)s)")
    p.add_argument("--no-compact", dest="compact", action="store_false",
                   help="skip deleting on until the tombstones are compacted")
    p.add_argument("--namespaces", type=int, choices=(1, 2), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ef-sweep", default="128,512", help="other HNSW ef_search values measured ('' for none)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("EDITMEM_DATA", "../shared/data")))
    p.add_argument("--workdir", type=Path, default=None, help="where the store is written (default: a temp folder)")
    p.add_argument("--rebuild", action="store_true",
                   help="after the import, measure recall, rebuild the index in one batch (timed) and measure on that")
    p.add_argument("--keep", action="store_true",
                   help="keep the store (a new folder under --workdir) for later measurements instead of deleting it")
    p.add_argument("--measure", type=Path, default=None, metavar="STORE.db",
                   help="measure a kept store's search depths (the default and --ef-sweep) query by query instead "
                        "of building a store (--n and --seed: the run that made it)")
    p.add_argument("--top-up", action="store_true",
                   help="with --measure: first import edits until the store holds --n live ones again, then rebuild "
                        "its index in one batch")
    p.add_argument("--route", type=int, default=0, metavar="N",
                   help="with --measure: also time the default router (shipped head + relation reranker) on N "
                        "held-out and N stored prompts")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if (args.top_up or args.route) and args.measure is None:
        p.error("--top-up and --route go with --measure")
    if args.route < 0 or args.route > args.queries:
        p.error("--route must be between 0 and --queries")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        settings = MillionSettings(n=args.n, encoder=args.encoder, batch=args.batch, queries=args.queries,
                                   ratio_sample=args.ratio_sample, delete=args.delete, searches=args.searches,
                                   compact=args.compact, namespaces=args.namespaces, seed=args.seed,
                                   rebuild=args.rebuild,
                                   ef_sweep=tuple(int(e) for e in args.ef_sweep.split(",") if e.strip()))
    except ValueError as err:
        p.error(str(err))
    command = "python -m serve.bench_million " + shlex.join(sys.argv[1:] if argv is None else argv)
    load0, t0 = os.getloadavg(), time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    if args.measure is not None:
        if not args.measure.is_file():
            p.error(f"--measure: no store file {args.measure}")
        result = measure_kept(args.measure, settings, args.data, grow=args.top_up, route=args.route)
    elif args.keep:
        kept = Path(tempfile.mkdtemp(prefix="editmem-million-", dir=args.workdir))
        result = run(settings, args.data, kept)
        result["kept_store"] = str(kept / "million.db")
    else:
        with tempfile.TemporaryDirectory(prefix="editmem-million-", dir=args.workdir) as tmp:
            result = run(settings, args.data, Path(tmp))
    result.update({"command": command, "machine": machine_info(), "time": started,
                   "wall_seconds": time.perf_counter() - t0, "load_average_start": load0,
                   "load_average_end": os.getloadavg(), "peak_rss_bytes": _peak_rss()})
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("top_up", "ef_paired", "route") if k in result}, indent=1)
          if args.measure is not None else render_markdown(result))
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


if __name__ == "__main__":
    raise SystemExit(main())
