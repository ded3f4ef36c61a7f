"""Consolidate N stored edits into a model's weights in batches, delete some, and check two things (issue 16):

1. the saved folder is **bit-identical** to a rebuild of the base model from the store's remaining weight records
   (:func:`editors.weights.rebuild_stored`), file by file and tensor by tensor;
2. the **remaining edits still answer**: reliability, generalization and locality of (a sample of) the edits left in
   the weights, teacher-forced and generated, on the saved folder as a user loads it
   (:func:`editors.adaptors.load_edited_model`), locality against the unedited base model's answers.

Everything goes through the functions ``editmem consolidate`` and ``editmem delete`` call
(:func:`editors.consolidation.consolidate`, :func:`editors.consolidation.weights_follow`), in a fresh SQLite store
with the model-free ``hashing-256`` encoder (no routing is involved). Run::

    D=../shared/data
    OMP_NUM_THREADS=1 python -m serve.bench_consolidation --data $D/counterfact/easyedit_split/counterfact-edit.json \\
        --edits 1000 --batch-size 100 --delete 10 --method alphaedit \\
        --set stats_corpus=$D/text_corpus/wikitext-2-raw_wiki.test.raw --sample 100 --out runs/consolidation

The deleted edits are spread evenly over the batches (one from each of ``--delete`` evenly spaced positions), so each
deletion rewrites its batch mates (a batch is one joint update). Results go to ``--out``/result.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def spread(ids: Sequence[int], k: int) -> list[int]:
    """``k`` of ``ids`` at evenly spaced positions (the middle of each of ``k`` equal stretches)."""
    if not 0 <= k <= len(ids):
        raise ValueError(f"cannot pick {k} of {len(ids)} edits")
    step = len(ids) / k if k else 0
    return [ids[int(i * step + step / 2)] for i in range(k)]


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (names relative to it)."""
    from memory.files import file_sha256

    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def same_tensors(a: Any, b: Any) -> list[str]:
    """Names of the parameters that differ (or exist in only one) between two models' state dicts."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sorted(n for n in set(sa) | set(sb) if n not in sa or n not in sb or not torch.equal(sa[n], sb[n]))


def evaluate(model: Any, tokenizer: Any, cases: Sequence[Any], references: Sequence[Any],
             protocols: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Mean reliability / generalization / locality of ``cases`` on ``model`` under each protocol."""
    from eval.metrics import MetricSettings, aggregate, measure_case

    settings = MetricSettings(fluency_tokens=0)
    scores = [measure_case(model, tokenizer, c, protocols, reference=r, settings=settings)
              for c, r in zip(cases, references)]
    return {p: aggregate([s.values[p] for s in scores]) for p in protocols}


def run(data: str, out: Path, *, edits: int, batch_size: int, delete: int, method: str, model: str,
        overrides: dict[str, Any], sample: int, protocols: Sequence[str], seed: int = 0) -> dict[str, Any]:
    from editors.adaptors import load_edited_model
    from editors.consolidation import consolidate, weights_follow
    from editors.lm.loading import load_model
    from editors.weights import rebuild_stored
    from eval.datasets import load_cases
    from eval.metrics import MetricSettings, aggregate, measure_case
    from memory import EditMemory
    from memory.formats.jsonl import case_from_record

    out.mkdir(parents=True, exist_ok=True)
    folder, rebuilt_dir = out / "model", out / "rebuilt"
    if folder.exists() or rebuilt_dir.exists() or (out / "store.db").exists():
        raise SystemExit(f"{out} already holds a run; give a new --out")
    result: dict[str, Any] = {"method": method, "edits": edits, "batch_size": batch_size, "delete": delete,
                              "settings": overrides, "protocols": list(protocols)}
    cases = load_cases(data, limit=edits)
    with EditMemory.open(f"sqlite:///{out / 'store.db'}", encoder="hashing-256") as mem:
        records = mem.add_many(cases)
        ids = [r.id for r in records]
        gone = spread(ids, delete)
        kept = [i for i in ids if i not in set(gone)]
        measured = sorted(random.Random(seed).sample(kept, min(sample, len(kept))))
        eval_cases = [case_from_record(mem.get(i)) for i in measured]

        base, tokenizer = load_model(model)
        t0 = time.perf_counter()
        pre = [measure_case(base, tokenizer, c, protocols, settings=MetricSettings(fluency_tokens=0))
               for c in eval_cases]
        references = [s.reference for s in pre]
        result["reference_seconds"] = time.perf_counter() - t0
        result["base"] = {p: aggregate([s.values[p] for s in pre]) for p in protocols}  # the same pass, not a second

        t0 = time.perf_counter()
        done = consolidate(mem, method, folder, model=model, batch_size=batch_size, overrides=overrides,
                           progress=True)
        result["consolidate_seconds"] = time.perf_counter() - t0
        result["records"] = len(done.records)
        model_id = done.model.id
        edited, etok = load_edited_model(folder)
        result["after_consolidation"] = evaluate(edited, etok, eval_cases, references, protocols)
        del edited

        delete_seconds = []
        for edit_id in gone:
            t0 = time.perf_counter()
            with weights_follow(mem, edit_id, report=log.info):
                mem.delete(edit_id)
            delete_seconds.append(time.perf_counter() - t0)
        result["deleted"] = gone
        result["delete_seconds"] = delete_seconds

        t0 = time.perf_counter()
        stored = rebuild_stored(mem, base, model_id, tokenizer)
        stored.save(rebuilt_dir)
        result["rebuild_seconds"] = time.perf_counter() - t0
        live, rebuilt = folder_digests(folder), folder_digests(rebuilt_dir)
        result["files_differing"] = sorted(n for n in set(live) | set(rebuilt) if live.get(n) != rebuilt.get(n))
        saved, _ = load_edited_model(folder)
        result["tensors_differing"] = same_tensors(saved, stored.model)
        result["bit_identical"] = not result["files_differing"] and not result["tensors_differing"]
        result["after_delete"] = evaluate(saved, etok, eval_cases, references, protocols)
        result["held_edits"] = sum(len(r.edits) for r in mem.weight_records(model_id=model_id))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from serve.options import key_values

    p = argparse.ArgumentParser(prog="python -m serve.bench_consolidation", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--edits", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--delete", type=int, default=10)
    p.add_argument("--method", default="alphaedit")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sample", type=int, default=100, help="remaining edits measured (default: %(default)s)")
    p.add_argument("--protocol", default="both", choices=["teacher-forced", "generate", "both"])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.edits < 1 or args.batch_size < 1 or args.sample < 1 or not 0 <= args.delete <= args.edits:
        p.error("--edits, --batch-size and --sample must be >= 1 and --delete between 0 and --edits")
    protocols = ["teacher-forced", "generate"] if args.protocol == "both" else [args.protocol]
    t0 = time.perf_counter()
    result = run(args.data, args.out, edits=args.edits, batch_size=args.batch_size, delete=args.delete,
                 method=args.method, model=args.model, overrides=key_values(args.overrides, example="l2=10"),
                 sample=args.sample, protocols=protocols)
    result.update({"command": "python -m serve.bench_consolidation " + shlex.join(sys.argv[1:] if argv is None
                                                                                   else argv),
                   "wall_seconds": time.perf_counter() - t0, "load_average": os.getloadavg(),
                   "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("bit_identical", "files_differing", "base", "after_consolidation",
                                             "after_delete", "consolidate_seconds", "delete_seconds",
                                             "rebuild_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
