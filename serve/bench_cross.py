"""What the cross-encoder reranker adds to an in-scope query: the time to score a query's gated candidates (issue 17's
"reranked routing p50 <= 25 ms on CPU").

The router (:class:`scope.router.Router` with ``cross=``) encodes the query, searches the store and runs the scope
head as it does without a reranker, then scores only the candidates the head gates: usually one or two for a query in
scope, none for one outside every edit's scope. This measures that last step alone, on a saved reranker
(:meth:`scope.cross_rerank.CrossReranker.load`): the median of ``--repeats`` calls of ``score`` for 1, 2 and 5
candidates, after one warm-up call each. The full routing latency under a store is ``python -m serve.bench_routing
--cross FOLDER`` (its ``route_p50_ms_in_scope_excluding_encoder``).

Run::

    OMP_NUM_THREADS=2 python -m serve.bench_cross --cross runs/rerank/cross_cf4000_product --out bench_cross.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

QUERY = "Which instrument does Toko Yasuda play?"
CANDIDATES = ("Toko Yasuda plays the", "Toko Yasuda, the", "Toko Yasuda is a citizen of",
              "The mother tongue of Toko Yasuda is", "Toko Yasuda works in the field of")


def score_latency(reranker: Any, sizes: Sequence[int] = (1, 2, 5), repeats: int = 100) -> dict[int, float]:
    """Median milliseconds of ``reranker.score`` for a query with ``n`` candidates, for each ``n`` in ``sizes``."""
    out = {}
    for n in sizes:
        if not 1 <= n <= len(CANDIDATES):
            raise ValueError(f"candidates per query must be 1..{len(CANDIDATES)}, got {n}")
        queries, edits = [QUERY] * n, list(CANDIDATES[:n])
        reranker.score(queries, edits)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            reranker.score(queries, edits)
            times.append(time.perf_counter() - t)
        out[n] = 1e3 * statistics.median(times)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from scope.cross_rerank import CrossReranker
    from serve.bench_store import machine_info

    p = argparse.ArgumentParser(prog="python -m serve.bench_cross", description=__doc__.split("\n\n")[0])
    p.add_argument("--cross", type=Path, required=True, help="a saved reranker folder (editmem train-rerank --out)")
    p.add_argument("--base", type=Path, default=None, help="its base model folder (default: the installed MiniLM)")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    reranker = CrossReranker.load(args.cross, args.base)
    load0 = os.getloadavg()
    medians = score_latency(reranker, repeats=args.repeats)
    result = {"cross": str(args.cross), "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
              "score_p50_ms": {str(n): ms for n, ms in medians.items()}, "machine": machine_info(),
              "load_average_start": load0, "load_average_end": os.getloadavg()}
    for n, ms in medians.items():
        print(f"{n} candidate(s): {ms:.2f} ms (median of {args.repeats}, {torch.get_num_threads()} torch threads)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
