"""Edit time per request for every editing method, measured in one process on one model (issue 16).

Each method gets a fresh editor on the same loaded model, then edits the first ``--edits`` cases of a data file one
request at a time (single mode: apply, then restore, so every edit starts from the unedited model). Reported apart:

- ``setup``: building the editor (for SERAC and IKE this loads the scope head, the counterfactual model or the
  demonstrations),
- ``one-off``: the work done once per model and layer and then cached on disk: the MLP key statistics of ROME, MEMIT
  and AlphaEdit (computed into a fresh, empty cache folder, so the time is the real cost and not a cache read) and
  AlphaEdit's null-space projections; ``--keep-cache`` reads the normal cache instead,
- ``edit``: the median (and min / max) wall time of ``apply`` for one request, after the one-off work,
- ``restore``: the median time of ``restore()``.

Run::

    D=../shared/data
    OMP_NUM_THREADS=1 python -m serve.bench_edit_time --data $D/counterfact/easyedit_split/counterfact-edit.json \\
        --stats-corpus $D/text_corpus/wikitext-2-raw_wiki.test.raw --edits 5 --out bench_out/edit_time.json

A method is written ``NAME`` or ``NAME+KEY=VALUE+...`` (values parsed as JSON, else strings), e.g.
``rome+key_mode=original`` for ROME's original key (the default is r-ROME's). A method that cannot run here (MEND
without a trained checkpoint, IKE without its demonstration file) is reported as not run, with the reason, and the
others go on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("rome,rome+key_mode=original,memit,alphaedit,grace,ft,mend,serac,ike")
LOCATE_METHODS = ("rome", "memit", "alphaedit")


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"rome+key_mode=consistent"`` -> ``("rome", {"key_mode": "consistent"})``; a bad item raises ValueError."""
    name, *pairs = spec.strip().split("+")
    if not name:
        raise ValueError(f"empty method name in {spec!r}")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method setting {pair!r} in {spec!r} is not KEY=VALUE")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return name, overrides


def _one_off(editor: Any, name: str) -> dict[str, float]:
    """Time the cached per-layer work of a locate editor before its first edit (nothing for other methods)."""
    if name not in LOCATE_METHODS:
        return {}
    layers = editor.edit_layers() if hasattr(editor, "edit_layers") else (editor.edit_layer(),)
    t0 = time.perf_counter()
    stats = editor.layer_stats(tuple(layers))
    out = {"statistics_seconds": time.perf_counter() - t0,
           "statistics_cached": float(all(s.from_cache for s in stats.values()))}
    if hasattr(editor, "projection"):
        t0 = time.perf_counter()
        for layer, layer_stats in stats.items():
            editor.projection(layer, layer_stats)
        out["projection_seconds"] = time.perf_counter() - t0
    return out


def time_method(spec: str, model: Any, tokenizer: Any, requests: Sequence[Any],
                stats_corpus: str | None) -> dict[str, Any]:
    """Setup, one-off and per-request edit and restore times of one method (see the module docstring)."""
    from editors.base import get_editor

    name, overrides = parse_method(spec)
    if name in LOCATE_METHODS and stats_corpus and "stats_corpus" not in overrides:
        overrides["stats_corpus"] = stats_corpus
    t0 = time.perf_counter()
    try:
        editor = get_editor(name, model, tokenizer, **overrides)
        setup = time.perf_counter() - t0
        one_off = _one_off(editor, name)
        edits, restores = [], []
        for request in requests:
            t0 = time.perf_counter()
            handle = editor.apply([request])
            edits.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            handle.restore()
            restores.append(time.perf_counter() - t0)
    except Exception as err:  # one method that cannot run here must not stop the others
        log.warning("%s not run: %s", spec, err)
        return {"method": spec, "not_run": f"{type(err).__name__}: {err}"}
    return {"method": spec, "setup_seconds": setup, **one_off, "n": len(edits),
            "edit_median": statistics.median(edits), "edit_min": min(edits), "edit_max": max(edits),
            "restore_median": statistics.median(restores), "edits": edits}


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = ["| method | edit, median (min-max) | restore, median | setup | one-off: statistics "
             "| one-off: projection |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "not_run" in r:
            lines.append(f"| {r['method']} | not run: {r['not_run']} | | | | |")
            continue
        stats = r.get("statistics_seconds")
        stats_text = _seconds(stats) + (" (cache read)" if r.get("statistics_cached") else "") if stats else "–"
        lines.append(f"| {r['method']} | {_seconds(r['edit_median'])} ({_seconds(r['edit_min'])}-"
                     f"{_seconds(r['edit_max'])}) | {_seconds(r['restore_median'])} | {_seconds(r['setup_seconds'])} "
                     f"| {stats_text} | {_seconds(r.get('projection_seconds'))} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench_edit_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="edit cases (any format editmem eval reads)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated methods, NAME or NAME+KEY=VALUE (default: %(default)s)")
    p.add_argument("--edits", type=int, default=5, help="requests edited per method, one at a time")
    p.add_argument("--stats-corpus", default=None, help="text corpus for ROME/MEMIT/AlphaEdit statistics")
    p.add_argument("--keep-cache", action="store_true",
                   help="read cached statistics instead of computing them into a fresh cache folder")
    p.add_argument("--out", type=Path, default=Path("bench_out/edit_time.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.edits < 1:
        p.error("--edits must be at least 1")
    try:
        specs = [s for s in args.methods.split(",") if s.strip()]
        for spec in specs:
            parse_method(spec)
    except ValueError as err:
        p.error(str(err))

    from editors.lm.loading import load_model
    from eval.datasets import load_cases

    cases = load_cases(args.data, limit=args.edits)
    requests = [c.request() for c in cases]
    model, tokenizer = load_model(args.model)  # from the normal cache, before the statistics cache is moved
    saved = os.environ.get("EDITMEM_CACHE")
    with tempfile.TemporaryDirectory(prefix="editmem-bench-cache-") as fresh:
        if not args.keep_cache:
            os.environ["EDITMEM_CACHE"] = fresh  # statistics and projections computed, not read
        try:
            rows = []
            for spec in specs:
                log.info("timing %s", spec)
                rows.append(time_method(spec, model, tokenizer, requests, args.stats_corpus))
        finally:
            if saved is None:
                os.environ.pop("EDITMEM_CACHE", None)
            else:
                os.environ["EDITMEM_CACHE"] = saved
    result = {"command": "python -m serve.bench_edit_time " + shlex.join(sys.argv[1:] if argv is None else argv),
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor()
              or platform.machine(), "cpus": os.cpu_count(), "torch_threads": _threads(),
              "load_average": os.getloadavg(), "model": args.model, "data": str(args.data), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"\nload average at the end: {result['load_average']}; raw results in {args.out}")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    raise SystemExit(main())
