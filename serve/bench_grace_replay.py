"""How long the store takes to rebuild a GRACE adaptor from its records (issue 16).

An edited model's GRACE adaptor is *defined* as the replay of its applied GRACE records in order
(:func:`editors.adaptors.replay`), and the store replays it whenever it opens the model, removes a record (a
delete, rollback or update) or, in ``editmem serve``, follows the folder. This times that replay on synthetic
records shaped like SmolLM2-135M's (keys of 1,536, values of 576, two entries per edit: the plain prompt's and the
chat-framed one's), with no model forward pass, so it isolates the codebook's own work. Run::

    OMP_NUM_THREADS=1 python -m serve.bench_grace_replay --edits 250,1000,3000 --out bench_out/grace_replay.json

Keys are random around a shared centre (``--spread`` sets how far apart, in units of the centre's scale), so some
radii overlap and inserts merge, shrink or update entries as real conflicts do.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def records(n: int, *, spread: float, seed: int = 0, d_in: int = 1536, d_out: int = 576) -> list[tuple[dict, bytes]]:
    """``n`` synthetic GRACE records: (settings, insert blob) as the store keeps them, two entries each."""
    import torch

    from editors.adaptors import pack_insert

    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(d_in, generator=gen)
    settings = {"layer": 0, "epsilon": 0.1, "same_key": 1e-3}
    out = []
    for i in range(n):
        keys = centre + spread * torch.randn(2, d_in, generator=gen)
        out.append((settings, pack_insert(keys, torch.randn(2, d_out, generator=gen), f"target {i % 50}")))
    return out


def run(sizes: Sequence[int], *, spread: float, repeats: int) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from editors.adaptors import replay
    from editors.methods.grace import Codebook
    from serve.bench_store import machine_info

    # only a layer to name (the codebook is built aside, never hooked); nothing runs through the model
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    rows = []
    for n in sizes:
        inserts = records(n, spread=spread)
        seconds = []
        for _ in range(repeats):
            book = Codebook(model, 0, attach=False)
            t0 = time.perf_counter()
            replay(book, inserts)
            seconds.append(time.perf_counter() - t0)
        rows.append({"edits": n, "entries": len(book.entries), "median_s": statistics.median(seconds),
                     "min_s": min(seconds), "max_s": max(seconds), "repeats": repeats})
        print(f"{n} edits -> {len(book.entries)} entries: replay median {statistics.median(seconds):.3f} s", flush=True)
    return {"rows": rows, "spread": spread, "machine": machine_info(), "command": shlex.join(sys.argv)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench_grace_replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--edits", default="250,1000", help="comma-separated record counts (default: %(default)s)")
    p.add_argument("--spread", type=float, default=0.05, help="key spread around the centre (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.edits.split(",") if x.strip()]
    if not sizes or min(sizes) < 1 or args.repeats < 1:
        p.error("--edits needs positive counts and --repeats at least 1")
    result = run(sizes, spread=args.spread, repeats=args.repeats)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
