"""Which index kind the store should use at which size: flat vs HNSW through the store's own ``VectorIndex`` on
clustered synthetic unit vectors (the shape of sentence embeddings, see :func:`serve.bench_store._clustered_vectors`).

Per size and kind: build seconds, single-query search p50/p99 (k=5, as the router asks), recall@1 against exact
search, bytes per vector of the saved file, load (open) seconds, and, after removing 10% of the ids, how many of
the queries' results still name a removed id (must be 0). Run: ``python -m serve.bench_index --sizes 10000,100000``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serve.bench_store import _clustered_vectors, _percentile, machine_info


def bench_kind(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int = 5) -> dict[str, Any]:
    from memory.index import IndexHeader, VectorIndex

    n, dim = vectors.shape
    ids = np.arange(1, n + 1, dtype=np.int64)
    index = VectorIndex(IndexHeader("bench", "synthetic", dim, kind, 0))
    t = time.perf_counter()
    index.add(ids, vectors)
    build_s = time.perf_counter() - t
    lat, top = [], []
    for row in queries:
        t = time.perf_counter()
        _, got = index.search(row[None, :], k)
        lat.append(time.perf_counter() - t)
        top.append(int(got[0, 0]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "i.faiss"
        index.save(path)
        size = path.stat().st_size
        t = time.perf_counter()
        loaded = VectorIndex.load(path)
        load_s = time.perf_counter() - t
    assert loaded is not None
    removed = set(np.random.default_rng(1).choice(ids, n // 10, replace=False).tolist())
    loaded.remove(removed)
    leaked = 0
    for row in queries:
        _, got = loaded.search(row[None, :], k)
        leaked += int(bool(set(got[0].tolist()) & removed))
    return {"kind": kind, "n": n, "build_seconds": round(build_s, 2), "p50_ms": 1e3 * _percentile(lat, 50),
            "p99_ms": 1e3 * _percentile(lat, 99), "recall_at_1": float(np.mean(np.asarray(top) == truth)),
            "bytes_per_vector": size / n, "load_seconds": round(load_s, 3), "queries_leaking_removed": leaked}


def run(sizes: Sequence[int], dim: int, n_queries: int, seed: int, kinds: Sequence[str]) -> list[dict[str, Any]]:
    import faiss

    out = []
    for n in sizes:
        rng = np.random.default_rng(seed)
        vectors = _clustered_vectors(n, dim, rng)
        picks = rng.integers(0, n, n_queries)
        q = vectors[picks] + 0.5 * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        exact = faiss.IndexFlatIP(dim)
        exact.add(vectors)
        truth = exact.search(q, 1)[1][:, 0] + 1
        for kind in kinds:
            row = bench_kind(kind, vectors, q, truth)
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--kinds", default="flat,hnsw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows = run([int(s) for s in a.sizes.split(",")], a.dim, a.queries, a.seed, a.kinds.split(","))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
