"""`editmem eval`: run editing methods on a data file through the one harness and print the results table.

    editmem eval --data FILE [--format auto] --methods none,ft --model smollm2-135m [--limit N]
                 [--mode single|batch|sequential] [--batch-size B] [--checkpoints 10,100,1000] [--sample-final]
                 [--protocol teacher-forced|generate|both] [--fluency-tokens 50] [--set ft.lr=1e-3 ...] --out DIR

Writes summary.json, cases.jsonl, report.md and PNG plots into DIR (see :mod:`eval.harness`).

    editmem report RUN_DIR [RUN_DIR ...] --out DIR [--no-plots]

merges several runs' summary.json (same model, data, protocol and mode) into one report and plot
(:func:`eval.report.merge_summaries`); given ``editmem bench knowedit`` folders (shards, ``--shard i/n``) instead, it
merges their cells into one KnowEdit table, table.md/json/png in DIR (:func:`eval.knowedit.merge.merge_bench_dirs`).
torch and transformers are imported inside the eval handler, so
``editmem --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from memory.errors import ValidationError
from serve.options import method_overrides

MODES = ("single", "batch", "sequential")
PROTOCOLS = ("teacher-forced", "generate", "both")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate editing methods on a data set (single, batch or sequential editing)",
                       description="Evaluate editing methods with the one harness; writes summary.json, "
                                   "cases.jsonl, report.md and plots to --out and prints the table.")
    p.add_argument("--data", required=True, help="data file (zsRE, CounterFact, KnowEdit, MQuAKE or store JSONL)")
    p.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    p.add_argument("--methods", required=True, help="comma-separated editor names, e.g. none,ft")
    p.add_argument("--model", default="smollm2-135m", help="model alias or local folder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N cases")
    p.add_argument("--mode", choices=MODES, default="single", help="editing mode (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per apply in batch/sequential mode")
    p.add_argument("--checkpoints", default=None,
                   help="sequential mode: comma-separated edit counts to measure at (default 10,100,1000; the "
                        "number of cases is always added)")
    p.add_argument("--checkpoint-sample", type=int, default=200,
                   help="sequential mode: measure at most this many edited cases (a fixed random sample) at each "
                        "checkpoint before the last, which measures all (default: %(default)s)")
    p.add_argument("--sample-final", action="store_true",
                   help="sequential mode: the last checkpoint measures a sample too (for runs to 10,000 edits)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="teacher-forced",
                   help="metric protocol (default: %(default)s)")
    p.add_argument("--fluency-tokens", type=int, default=50,
                   help="greedy new tokens generated from each edit prompt for fluency; 0 skips fluency "
                        "(default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override an editor setting, e.g. ft.lr=1e-3 (value parsed as JSON, else a string); "
                        "repeatable")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run_eval_command)

    r = sub.add_parser("report", help="one report and plot from several eval runs (e.g. one method per run) or "
                                      "KnowEdit bench shards",
                       description="Merge the summary.json of several `editmem eval` runs of the same model, data, "
                                   "protocol and mode into one report.md, metrics.png and (sequential runs) "
                                   "sequential.png, so methods run separately can be compared in one table and "
                                   "plot. Given `editmem bench knowedit` output folders (e.g. one per --shard i/n), "
                                   "merge their cells into one KnowEdit table (table.md, table.json, table.png).")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="output folders of `editmem eval` (with summary.json) or of `editmem bench knowedit` "
                        "(with bench.json)")
    r.add_argument("--out", required=True, help="output folder for the merged report")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.set_defaults(func=run_report_command)


def _split_names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValidationError(f"--{what} needs at least one name")
    return names


def _checkpoints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(c) for c in _split_names(text, "checkpoints")]
    except ValueError:
        raise ValidationError(f"--checkpoints must be comma-separated integers, got {text!r}") from None


def _command_line(args: argparse.Namespace) -> str:
    """The command as parsed (canonical form, defaults spelled out), for the report."""
    parts = ["editmem", "eval", "--data", args.data, "--format", args.format, "--methods", args.methods,
             "--model", args.model, "--mode", args.mode, "--batch-size", str(args.batch_size),
             "--protocol", args.protocol, "--out", args.out]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    if args.checkpoints is not None:
        parts += ["--checkpoints", args.checkpoints]
    if args.mode == "sequential":
        parts += ["--checkpoint-sample", str(args.checkpoint_sample)]
    if args.sample_final:
        parts += ["--sample-final"]
    if args.fluency_tokens != 50:
        parts += ["--fluency-tokens", str(args.fluency_tokens)]
    for item in args.overrides:
        parts += ["--set", item]
    if args.no_plots:
        parts.append("--no-plots")
    return " ".join(shlex.quote(p) for p in parts)


def run_eval_command(args: argparse.Namespace) -> int:
    methods = _split_names(args.methods, "methods")
    checkpoints = _checkpoints(args.checkpoints)
    overrides = method_overrides(args.overrides)
    if args.limit is not None and args.limit < 1:
        raise ValidationError(f"--limit must be >= 1, got {args.limit}")
    data = Path(args.data)

    from editors.adaptors import load_edited_model
    from editors.retrieval.session import check_memory_editors
    from eval.datasets import load_cases
    from eval.harness import RunSettings, run_eval
    from eval.metrics import MetricSettings
    from eval.report import format_table

    check_memory_editors(methods, overrides)  # a missing scope classifier is reported before the model loads
    metric_settings = MetricSettings(fluency_tokens=args.fluency_tokens)
    cases = load_cases(data, format=args.format, limit=args.limit)
    if not cases:
        raise ValidationError(f"{data}: no cases to evaluate")
    relations = None
    if args.mode == "sequential":  # relation-aware locality where the data has relations (CounterFact; not zsRE)
        from scope.relations import case_relations_for

        relations = case_relations_for(cases, data)
    model, tokenizer = load_edited_model(args.model)  # a consolidated folder with its GRACE adaptor
    command = _command_line(args)
    settings = RunSettings(out_dir=args.out, mode=args.mode, batch_size=args.batch_size, checkpoints=checkpoints,
                           protocol=args.protocol, metric_settings=metric_settings,
                           checkpoint_sample=args.checkpoint_sample, sample_final=args.sample_final,
                           model_name=args.model, dataset_name=data.name, editor_overrides=overrides,
                           command=command, plots=not args.no_plots, relations=relations)
    summary = run_eval(model, tokenizer, cases, methods, settings)
    print(f"model {args.model} · data {data.name} ({summary['n_cases']} cases) · protocol {summary['protocol']} · "
          f"mode {summary['mode']}")
    print(format_table(summary), end="")
    print(f"written to {args.out}: summary.json, cases.jsonl, report.md" + ("" if args.no_plots else ", plots"))
    return 0


def _read_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    if not path.is_file():
        raise ValidationError(f"{folder}: no summary.json (is it an `editmem eval` output folder?)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValidationError(f"{path}: not readable as JSON ({err})") from None
    missing = [k for k in ("model", "dataset", "protocol", "mode", "n_cases", "methods") if k not in summary]
    if missing:
        raise ValidationError(f"{path}: not an eval summary (missing {', '.join(missing)})")
    return summary


def run_report_command(args: argparse.Namespace) -> int:
    from eval.knowedit.merge import is_bench_dir
    from eval.report import format_table, merge_summaries, write_report, write_summary

    folders = [Path(r) for r in args.runs]
    bench = [is_bench_dir(f) for f in folders]
    if any(bench):
        if not all(bench):
            odd = [str(f) for f, b in zip(folders, bench) if not b]
            raise ValidationError(f"cannot merge KnowEdit bench folders with eval runs ({', '.join(odd)} "
                                  "has no bench.json)")
        return _report_knowedit(folders, Path(args.out), plots=not args.no_plots)
    labels = [f.resolve().name for f in folders]
    if len(set(labels)) != len(labels):
        labels = [str(f) for f in folders]
    summary = merge_summaries([(label, _read_summary(f)) for label, f in zip(labels, folders)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, summary)
    command = " ".join(shlex.quote(p) for p in ["editmem", "report", *args.runs, "--out", args.out]
                       + (["--no-plots"] if args.no_plots else []))
    write_report(out, summary, command=command, fluency_tokens=None, plots=not args.no_plots)
    print(format_table(summary), end="")
    print(f"written to {args.out}: summary.json, report.md" + ("" if args.no_plots else ", plots"))
    return 0


def _report_knowedit(folders: list[Path], out: Path, *, plots: bool) -> int:
    from eval.knowedit.merge import merge_bench_dirs

    table = merge_bench_dirs(folders, out, plots=plots)
    print((out / "table.md").read_text(encoding="utf-8"), end="")
    cells = sum(1 for _ in (out / "cells").glob("*.json"))
    print(f"merged {cells} cells ({len(table['methods'])} methods x {len(table['tasks'])} tasks) into {out}: "
          "table.md, table.json" + ("" if not plots else ", table.png"))
    return 0
