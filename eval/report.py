"""report.md and PNG plots from an evaluation summary (the dict :func:`eval.harness.run_eval` returns).

The table follows EasyEdit's layout: one row per method, Reliability / Generalization / Locality / Portability as
percentages, Fluency in bits, edit time in seconds per edit. Plots use matplotlib's object API with the Agg canvas
(no pyplot, so no global backend is set): ``metrics.png`` (grouped bars per method, one panel per protocol, fluency
on its own panel since it is not a fraction) and, for sequential runs, ``sequential.png`` (each metric against the
number of edits, one line per method).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memory.errors import ValidationError

FRACTIONS: tuple[str, ...] = ("reliability", "generalization", "locality", "portability")
SUMMARY_SHAPE = """\
summary.json
  {"model": str, "dataset": str, "protocol": "teacher-forced" | "generate" | "both", "mode": str, "n_cases": int,
   "methods": {"<name>": {"reliability": f, "generalization": f, "locality": f, "portability": f,
                          "fluency": bits, "edit_seconds": s, "n": int, ...}}}
  Fractions are in [0, 1]; a metric no case has probes for is null. fluency is in bits (weighted 2/3-gram entropy of
  the edit prompt and its greedy continuation, default 50 new tokens; the same number under either protocol).
  edit_seconds is the mean apply time per edit. n is the number of cases measured.
  protocol "both": the five metrics at the top of each method are the teacher-forced ones (so the single-protocol shape
  still reads right), and "by_protocol": {"teacher-forced": {five metrics}, "generate": {five metrics}} holds both.
  mode "sequential": each method also has "checkpoints": [{"n_edits": k, "n_measured": m, five metrics
  [, "by_protocol": {...}] [, "relation_aware": {"locality": {"<protocol>": f}, "locality_in_scope": int,
  "locality_probes": int}]}, ...]; the top-level numbers are those after all edits (the last checkpoint), and so is a
  top-level "relation_aware" (given the cases' relations: locality over the probes not in a stored edit's scope).
  An editor that keeps some edits in memory and moves others into the weights (hybrid) also has, per checkpoint,
  "by_part": {"memory": {"n_measured": m, five metrics [, "by_protocol"]}, "weights": {...}} (a part no measured
  case is in is left out).
  A method still running (or stopped) after a checkpoint has "unfinished": {"n_edits": k, "of": n}, and its
  top-level numbers are those of its last checkpoint so far.
"""

HEADERS = {"reliability": "Reliability", "generalization": "Generalization", "locality": "Locality",
           "portability": "Portability", "fluency": "Fluency"}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value >= 0.01 else f"{value:.2g}"


def _blocks(summary: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Protocol name -> metric values of one method (or one checkpoint)."""
    if "by_protocol" in entry:
        return dict(entry["by_protocol"])
    return {summary["protocol"]: entry}


def format_table(summary: Mapping[str, Any]) -> str:
    """The results as a Markdown table: method × metrics, one table per protocol."""
    protocols = list(_blocks(summary, next(iter(summary["methods"].values()))) if summary["methods"] else [])
    out: list[str] = []
    for protocol in protocols:
        if len(protocols) > 1:
            out.append(f"Protocol: {protocol}\n")
        out.append("| Method | Reliability (%) | Generalization (%) | Locality (%) | Portability (%) | "
                   "Fluency (bits) | Edit time (s/edit) | N |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, entry in summary["methods"].items():
            values = _blocks(summary, entry)[protocol]
            cells = [_pct(values.get(m)) for m in FRACTIONS]
            if entry.get("unfinished"):
                name = f"{name} (unfinished: {entry['unfinished']['n_edits']} of {entry['unfinished']['of']} edits)"
            out.append(f"| {name} | " + " | ".join(cells) + f" | {_num(values.get('fluency'))} | "
                       f"{_seconds(entry.get('edit_seconds'))} | {entry.get('n')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def format_gap(summary: Mapping[str, Any]) -> str:
    """Protocol 'both': generate minus teacher-forced, in points, per method and metric, and the leaked answers."""
    out = ["| Method | Reliability (pts) | Generalization (pts) | Locality (pts) | Portability (pts) | "
           "Leaked answers |", "|---|---:|---:|---:|---:|---:|"]
    for name, entry in summary["methods"].items():
        blocks = entry.get("by_protocol", {})
        tf, gen = blocks.get("teacher-forced", {}), blocks.get("generate", {})
        cells = []
        for m in FRACTIONS:
            a, b = gen.get(m), tf.get(m)
            cells.append("–" if a is None or b is None else f"{100 * (a - b):+.1f}")
        out.append(f"| {name} | " + " | ".join(cells) + f" | {entry.get('leaks', '–')} |")
    return "\n".join(out) + "\n"


def format_checkpoints(summary: Mapping[str, Any]) -> str:
    """Sequential runs: one Markdown table per method of the metrics at each checkpoint (every protocol)."""
    out: list[str] = []
    for name, entry in summary["methods"].items():
        rows = entry.get("checkpoints") or []
        if not rows:
            continue
        aware = any("relation_aware" in row for row in rows)
        out.append(f"#### {name}\n")
        out.append("| Edits | Measured | Protocol | Reliability (%) | Generalization (%) | Locality (%) | "
                   "Portability (%) | Fluency (bits) |"
                   + (" Locality, relation-aware (%) | Locality probes in an edit's scope |" if aware else ""))
        out.append("|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if aware else ""))
        for row in rows:
            for protocol, values in _blocks(summary, row).items():
                line = (f"| {row['n_edits']} | {row['n_measured']} | {protocol} | "
                        + " | ".join(_pct(values.get(m)) for m in FRACTIONS)
                        + f" | {_num(values.get('fluency'))} |")
                if aware:
                    ra = row.get("relation_aware") or {}
                    scoped = (f"{ra['locality_in_scope']} / {ra['locality_probes']}"
                              if "locality_probes" in ra else "–")
                    line += f" {_pct((ra.get('locality') or {}).get(protocol))} | {scoped} |"
                out.append(line)
        out.append("")
        if aware:
            out.append("Relation-aware locality leaves out the locality probes that ask what an edit stored by then "
                       "changed (they name its subject and ask its relation; eval/locality_labels.py).\n")
        if any("by_part" in row for row in rows):
            out.append(_parts_table(summary, rows))
    return "\n".join(out)


def _parts_table(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The measured cases still answered from memory and those moved into the weights, apart (hybrid)."""
    out = ["The same checkpoints, the measured edits still answered from memory and those moved into the weights:\n",
           "| Edits | Part | Measured | Protocol | Reliability (%) | Generalization (%) | Locality (%) |",
           "|---:|---|---:|---|---:|---:|---:|"]
    for row in rows:
        for part, block in (row.get("by_part") or {}).items():
            for protocol, values in _blocks(summary, block).items():
                out.append(f"| {row['n_edits']} | {part} | {block['n_measured']} | {protocol} | "
                           + " | ".join(_pct(values.get(m)) for m in FRACTIONS[:3]) + " |")
    return "\n".join(out) + "\n"


def spread_ticks(ticks: Sequence[int], log: bool, min_gap: float = 0.1) -> list[int]:
    """The checkpoint ticks to label: the first, the last, and those in between at least ``min_gap`` of the axis
    (log or linear) away from their labelled neighbours, so labels such as 150, 200, 250 on a log axis to 3,000 do not
    overlap. Every checkpoint is still plotted; only its label may be left out."""
    if len(ticks) <= 2:
        return list(ticks)
    pos = [math.log(t) if log else float(t) for t in ticks]
    span = (pos[-1] - pos[0]) or 1.0
    kept = [0]
    for i in range(1, len(ticks) - 1):
        if pos[i] - pos[kept[-1]] >= min_gap * span and pos[-1] - pos[i] >= min_gap * span:
            kept.append(i)
    kept.append(len(ticks) - 1)
    return [ticks[i] for i in kept]


def write_summary(out_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` into ``out_dir`` through a temporary file, so a reader never sees half of it."""
    path = Path(out_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def merge_summaries(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One summary holding the methods of several runs (``(label, summary)`` pairs), for one table and one plot.

    The runs must share model, dataset, protocol and mode, or the comparison would not be like for like; a method
    name that occurs in more than one run is shown as ``name (label)``. ``n_cases`` is the largest of the runs', and
    ``runs`` lists each run's label, methods and number of cases.
    """
    if not runs:
        raise ValidationError("merging needs at least one run")
    first_label, first = runs[0]
    for label, summary in runs[1:]:
        for key in ("model", "dataset", "protocol", "mode"):
            if summary.get(key) != first.get(key):
                raise ValidationError(f"runs {first_label} and {label} differ in {key} "
                                      f"({first.get(key)!r} vs {summary.get(key)!r}); only like runs can be merged")
    counts: dict[str, int] = {}
    for _, summary in runs:
        for name in summary["methods"]:
            counts[name] = counts.get(name, 0) + 1
    methods: dict[str, Any] = {}
    for label, summary in runs:
        for name, entry in summary["methods"].items():
            methods[name if counts[name] == 1 else f"{name} ({label})"] = entry
    return {"model": first["model"], "dataset": first["dataset"], "protocol": first["protocol"],
            "mode": first["mode"], "n_cases": max(s["n_cases"] for _, s in runs), "methods": methods,
            "runs": [{"label": label, "methods": list(s["methods"]), "n_cases": s["n_cases"]} for label, s in runs]}


def write_report(out_dir: str | Path, summary: Mapping[str, Any], *, command: str | None = None,
                 batch_size: int | None = None, fluency_tokens: int | None = 50, plots: bool = True) -> list[Path]:
    """Write report.md (and the plots unless ``plots`` is false) into ``out_dir``; return the paths written.

    ``fluency_tokens`` None: not known (a merged report); the text then points to each run's own report."""
    out = Path(out_dir)
    written: list[Path] = []
    if plots and summary["methods"]:
        written.append(plot_metrics(summary, out / "metrics.png"))
        if summary["mode"] == "sequential":
            written.append(plot_sequential(summary, out / "sequential.png"))
    lines = [
        "# Editing evaluation",
        "",
        f"- Model: `{summary['model']}`",
        f"- Dataset: `{summary['dataset']}` ({summary['n_cases']} cases)",
        f"- Protocol: {summary['protocol']}",
        f"- Mode: {summary['mode']}" + (f" (batch size {batch_size})" if batch_size and batch_size > 1 else ""),
    ]
    if command:
        lines.append(f"- Command: `{command}`")
    for run in summary.get("runs", []):
        lines.append(f"- Run `{run['label']}`: {', '.join(run['methods'])} ({run['n_cases']} cases)")
    lines += ["", "## Results", "", format_table(summary)]
    if summary["protocol"] == "both" and summary["methods"]:
        lines += ["## Generate minus teacher-forced", "", format_gap(summary)]
    elif summary["protocol"] == "generate" and summary["methods"]:
        lines += ["Leaked format strings in generated answers: "
                  + ", ".join(f"{n} {e.get('leaks', '–')}" for n, e in summary["methods"].items()), ""]
    if summary["mode"] == "sequential":
        lines += ["## Metrics by number of edits", "", format_checkpoints(summary)]
    lines += [
        "## How to read it",
        "",
        "Teacher-forced: token accuracy of the answer given the prompt (reliability: edit prompt -> new target; "
        "generalization: rephrases -> new target; portability: portability probes -> their answers) and, for "
        "locality, the share of predicted answer tokens of unrelated probes unchanged by the edit "
        "(EasyEdit, Wang et al. 2024). Generate: the answer a user reads (the question through the chat template "
        "when the model has one, greedy decoding to end of turn, first line and sentence), scored 1 when it contains "
        "the normalised target or an alias; locality is 1 when the normalised answer is unchanged; leaked answers "
        "hold a context format's words ('(answer:', 'New Fact', 'Prompt:', '(Example:') or chat-template residue "
        "and differ from the unedited model's answer. "
        + (f"Fluency: weighted 2/3-gram entropy in bits of the edit prompt and {fluency_tokens} greedy new tokens "
           "(ROME); the same number under either protocol. " if fluency_tokens
           else "Fluency: weighted 2/3-gram entropy in bits of the edit prompt and its greedy continuation (ROME; "
                "the number of tokens is in each run's own report); – where a run did not measure it. "
           if fluency_tokens is None else "Fluency: not measured. ")
        + "Edit time: mean seconds of `apply` per edit.",
        "",
        "```",
        SUMMARY_SHAPE.rstrip(),
        "```",
        "",
    ]
    if plots and summary["methods"]:
        lines += ["![metrics](metrics.png)", ""]
        if summary["mode"] == "sequential":
            lines += ["![sequential](sequential.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    written.append(path)
    return written


LEGEND_INSIDE = 6  # the most lines a sequential plot labels inside its first panel


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_metrics(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bars: for each protocol a panel of the four fractions per method; fluency (bits) on its own panel."""
    methods = list(summary["methods"])
    protocols = list(_blocks(summary, summary["methods"][methods[0]]))
    fig = _figure(4.5 * len(protocols) + 3, 3.6)
    axes = fig.subplots(1, len(protocols) + 1, width_ratios=[3] * len(protocols) + [1.2])
    width = 0.8 / max(len(methods), 1)
    for ax, protocol in zip(axes, protocols):
        for k, name in enumerate(methods):
            values = _blocks(summary, summary["methods"][name])[protocol]
            xs = [x + k * width for x in range(len(FRACTIONS))]
            heights = [values.get(m) for m in FRACTIONS]
            ax.bar([x for x, h in zip(xs, heights) if h is not None], [h for h in heights if h is not None],
                   width, label=name, color=f"C{k}")
            for x, h in zip(xs, heights):
                if h is None:  # no probes of this kind in the data: say so rather than draw a zero
                    ax.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(FRACTIONS))],
                      [HEADERS[m] for m in FRACTIONS], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(protocol, fontsize=10)
        ax.set_ylabel("fraction")
    axes[0].legend(fontsize=8)
    fluency = [summary["methods"][m].get("fluency") for m in methods]
    axes[-1].bar(range(len(methods)), [f if f is not None else 0.0 for f in fluency],
                 color=[f"C{k}" for k in range(len(methods))])
    axes[-1].set_xticks(range(len(methods)), methods, fontsize=8)
    axes[-1].set_title("fluency", fontsize=10)
    axes[-1].set_ylabel("bits")
    fig.suptitle(f"{summary['model']} · {summary['dataset']} · {summary['mode']}", fontsize=10)
    fig.savefig(path)
    return Path(path)


def plot_sequential(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Each metric against the number of edits, one line per method (and line style per protocol)."""
    metrics: Sequence[str] = (*FRACTIONS, "fluency")
    n_lines = len(summary["methods"]) * (2 if summary["protocol"] == "both" else 1)
    below = n_lines > LEGEND_INSIDE  # a long legend goes under the panels instead of over the first one
    fig = _figure(3.2 * len(metrics), 3.2 + (0.22 * math.ceil(n_lines / 4) if below else 0))
    axes = fig.subplots(1, len(metrics))
    styles = ["-o", "--s"]
    all_x: set[int] = set()
    for k, (name, entry) in enumerate(summary["methods"].items()):
        rows = entry.get("checkpoints") or []
        if not rows:
            continue
        xs = [r["n_edits"] for r in rows]
        all_x.update(xs)
        for s, protocol in enumerate(_blocks(summary, rows[0])):
            for ax, metric in zip(axes, metrics):
                if metric == "fluency" and s > 0:
                    continue  # fluency is the same number under either protocol
                ys = [_blocks(summary, r)[protocol].get(metric) for r in rows]
                ys = [float("nan") if y is None else y for y in ys]
                label = name if summary["protocol"] != "both" else f"{name} ({protocol})"
                ax.plot(xs, ys, styles[s % 2], color=f"C{k}", label=label, markersize=4)
    ticks = sorted(all_x)
    for ax, metric in zip(axes, metrics):
        ax.set_title(HEADERS[metric], fontsize=10)
        ax.set_xlabel("edits")
        if not ax.lines or all(math.isnan(y) for line in ax.lines for y in line.get_ydata()):
            # a fraction is null when the data has no probes of its kind; fluency when it was switched off
            ax.text(0.5, 0.5, "not measured" if metric == "fluency" else "no probes", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        log_x = bool(ticks) and ticks[-1] / ticks[0] >= 20
        if log_x:
            ax.set_xscale("log")
        shown = spread_ticks(ticks, log_x)
        ax.set_xticks(shown, [str(t) for t in shown], fontsize=8)
        ax.minorticks_off()
        if metric != "fluency":
            ax.set_ylim(-0.02, 1.02)
    axes[-1].set_ylabel("bits")
    if below:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=7)
    else:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{summary['model']} · {summary['dataset']} · sequential", fontsize=10)
    fig.savefig(path)
    return Path(path)
