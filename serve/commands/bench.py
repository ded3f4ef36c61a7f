"""`editmem bench ...`: benchmarks that write their results, with the machine and the command, to BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from eval.knowedit import DEFAULT_LIMIT as KNOWEDIT_LIMIT
from memory.encoder import DEFAULT_ENCODER

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark and record it in BENCHMARKS.md")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    bsub.required = True
    s = bsub.add_parser("store", help="import throughput, search latency, HNSW at scale, rephrase recall@1")
    s.add_argument("--data", type=Path, default=DEFAULT_DATA, help="benchmark data folder (default: %(default)s)")
    s.add_argument("--encoder", default=DEFAULT_ENCODER)
    s.add_argument("--sizes", default="10000,100000", help="store sizes for search latency (default: %(default)s)")
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--hnsw-n", type=int, default=1_000_000, help="synthetic vectors for HNSW; 0 skips")
    s.add_argument("--no-recall", action="store_true", help="skip recall@1 over all 21,919 CounterFact edits")
    s.add_argument("--only", default=None,
                   help="comma-separated parts to run (import, search, recall, hnsw); the others are kept from --json")
    s.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="markdown file to update")
    s.add_argument("--json", type=Path, default=Path("bench_out/store.json"), help="raw results")
    s.set_defaults(func=run_store)

    h = bsub.add_parser("http", help="HTTP overhead over in-process answers, out-of-scope cost, concurrent throughput")
    h.add_argument("--model", default="smollm2-135m")
    h.add_argument("--data", default=None, help="edit cases to store first (e.g. counterfact-edit.json)")
    h.add_argument("--limit", type=int, default=10_000)
    h.add_argument("--encoder", default="all-MiniLM-L6-v2")
    h.add_argument("--scope", default="cosine")
    h.add_argument("--tokens", type=int, default=8)
    h.add_argument("--repeats", type=int, default=5)
    h.add_argument("--clients", type=int, default=8)
    h.add_argument("--requests", type=int, default=32)
    h.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    h.add_argument("--rounds", type=int, default=2,
                   help="concurrent runs with and without the batch wait, alternated (default: %(default)s)")
    h.set_defaults(func=run_http)
    k = bsub.add_parser("knowedit", help="every method on every KnowEdit task: the KnowEdit table, resumable")
    k.add_argument("--data", type=Path, default=DEFAULT_DATA / "knowedit",
                   help="KnowEdit folder (default: %(default)s)")
    k.add_argument("--model", default="smollm2-135m", help="model alias or local folder (default: %(default)s)")
    k.add_argument("--methods", default=None,
                   help="comma-separated methods (default: ft,ft_m,adalora,kn,rome,memit,mend)")
    k.add_argument("--tasks", default=None, help="comma-separated tasks (default: all six)")
    k.add_argument("--limit", type=int, default=KNOWEDIT_LIMIT, help="cases per task (default: %(default)s)")
    k.add_argument("--protocol", default="both", choices=["teacher-forced", "generate", "both"],
                   help="teacher-forced (the published tables' protocol), generate (what a person reads) or both, "
                        "with the gap as a row (default: %(default)s)")
    k.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override an editor setting, e.g. mend.checkpoint=smollm2-cf (value parsed as JSON, else a "
                        "string); repeatable; ft keeps KnowEdit's FT-L settings unless they are overridden")
    k.add_argument("--jobs", type=int, default=1,
                   help="run the grid as N shard processes on this machine and merge them into --out (default: "
                        "%(default)s; 2 keeps both cores of a 2-core machine busy)")
    k.add_argument("--out", type=Path, required=True, help="output folder (cells/, table.md, table.json, table.png)")
    k.add_argument("--resume", action="store_true", help="skip method x task cells already finished in --out")
    k.add_argument("--shard", default="0/1", help="run only cells i mod n of the grid, as i/n (default: %(default)s)")
    k.add_argument("--merge-only", action="store_true",
                   help="run nothing: merge the cell files in --out (shards in other folders: editmem report)")
    k.add_argument("--chat", default="auto", choices=["auto", "never"],
                   help="generate protocol: the question as the user's message through the model's chat template "
                        "when it has one (auto), or plain completion always (default: %(default)s)")
    k.add_argument("--cloze", default="chat", choices=["chat", "complete"],
                   help="generate protocol: cloze prompts (not ending in '?') through the chat template too (chat) "
                        "or continued as plain text (complete) (default: %(default)s)")
    k.set_defaults(func=run_knowedit)

    ld = bsub.add_parser("load", help="bounded load (clients mixing chat, search, writes) and a SIGKILL fault test")
    ld.add_argument("--model", required=True, help="model alias or local folder")
    ld.add_argument("--clients", type=int, default=16)
    ld.add_argument("--duration", type=float, default=60.0, help="seconds of steady load (default: %(default)s)")
    ld.add_argument("--kill-after", type=float, default=5.0, help="seconds into the second run the server is "
                                                                 "killed with SIGKILL (default: %(default)s)")
    ld.add_argument("--encoder", default="hashing-256", help="encoder of the fresh store (default: %(default)s)")
    ld.add_argument("--json", type=Path, default=Path("bench_out/load.json"), help="raw results")
    ld.set_defaults(func=run_load)


def run_store(args: argparse.Namespace) -> int:
    from memory.errors import ValidationError
    from serve.bench_store import (
        PARTS,
        SECTION,
        StoreBenchSettings,
        render_markdown,
        run_store_bench,
        write_section,
    )

    try:
        sizes = tuple(int(x) for x in args.sizes.split(","))
    except ValueError:
        raise ValidationError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    parts = tuple(p.strip() for p in args.only.split(",")) if args.only else PARTS
    settings = StoreBenchSettings(data_dir=args.data, encoder=args.encoder, import_n=min(sizes), sizes=sizes,
                                  n_queries=args.queries, hnsw_n=args.hnsw_n, recall_all=not args.no_recall,
                                  parts=parts)
    results = run_store_bench(settings)
    if args.only and args.json.exists():  # keep the earlier results of the parts not run now
        earlier = json.loads(args.json.read_text(encoding="utf-8"))
        results = {**earlier, **results, "machine": results["machine"]}
    command = "editmem " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("editmem") \
        else "editmem bench store"
    body = render_markdown(results, command)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    write_section(args.out, SECTION, body)
    print(body)
    return 0


def run_http(args: argparse.Namespace) -> int:
    import torch

    from serve.bench_http import run_http_bench

    torch.set_num_threads(args.threads)
    report = run_http_bench(args.model, data=args.data, limit=args.limit, encoder=args.encoder, scope=args.scope,
                            tokens=args.tokens, repeats=args.repeats, clients=args.clients, requests=args.requests,
                            rounds=args.rounds)
    report["command"] = " ".join(shlex.quote(a) for a in ["editmem", *sys.argv[1:]])
    report["threads"] = args.threads
    print(json.dumps(report, indent=2))
    return 0


def run_knowedit(args: argparse.Namespace) -> int:
    from eval.knowedit.bench import DEFAULT_METHODS, BenchSettings, run_bench, with_default_overrides, write_table
    from eval.knowedit.tasks import TASKS
    from eval.metrics import MetricSettings
    from memory.errors import ValidationError

    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        i, n = shard
    except ValueError:
        raise ValidationError(f"--shard must be i/n, got {args.shard!r}") from None
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else DEFAULT_METHODS
    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS
    from serve.options import method_overrides

    overrides = with_default_overrides(method_overrides(args.overrides))
    settings = BenchSettings(data_dir=args.data, out_dir=args.out, methods=methods, tasks=tasks, limit=args.limit,
                             protocol=args.protocol, resume=args.resume, shard=(i, n), overrides=overrides,
                             metrics=MetricSettings(chat=args.chat, cloze=args.cloze))
    if args.merge_only:
        write_table(args.out, methods, tasks, settings.protocols, args.data)
    elif args.jobs != 1:
        from eval.knowedit.parallel import run_bench_jobs

        run_bench_jobs(args.model, settings, args.jobs)
    else:
        from editors.lm.loading import load_model

        model, tokenizer = load_model(args.model)
        run_bench(model, tokenizer, settings)
    print((args.out / "table.md").read_text(encoding="utf-8"))
    return 0


def run_load(args: argparse.Namespace) -> int:
    import tempfile

    from memory.store import EditMemory
    from serve.bench_load import run_load_bench

    with tempfile.TemporaryDirectory(prefix="editmem-bench-load-") as tmp:
        store = f"sqlite:///{Path(tmp) / 'load.db'}"
        with EditMemory.open(store, encoder=args.encoder) as mem:
            mem.add(prompt="The capital of Japan is", target_new="Lima", subject="Japan")
        report = run_load_bench(store, args.model, clients=args.clients, duration=args.duration,
                                kill_after=args.kill_after)
    report["command"] = " ".join(shlex.quote(a) for a in ["editmem", *sys.argv[1:]])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0
