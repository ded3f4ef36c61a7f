"""The whole KnowEdit table: every method on every task with one model, resumable and shardable.

Each method x task cell is one JSON file, ``DIR/cells/<task>__<method>.json``, written when the cell finishes (or
when it cannot run: ``{"not_run": why}``, e.g. MEND without a checkpoint, ROME on Sanitation's subject-less
questions). ``resume`` skips cells whose file exists; ``shard=(i, n)`` runs only the cells whose position in the grid
is ``i`` modulo ``n`` (0-based), so separate processes (Slurm array, Ray tasks) can each take a share, and
:func:`write_table` (``editmem bench knowedit --merge-only``) merges whatever cell files exist into:

- ``table.json`` / ``table.md``: rows task x metric (x protocol), columns methods, KnowEdit's units (percent;
  fluency = n-gram entropy x 100; ConvSent locality a KL divergence, lower is better; WikiBio perplexity), and for
  protocol "both" a ``gap`` row per task (teacher-forced minus generate edit success, points);
- the published Llama-2-7b-chat numbers (EasyEdit ``examples/KnowEdit.md``, 2025-04) for the same cells, and per task
  the Spearman rank correlation between our method ordering and the published one (over the methods in both, by
  edit success);
- ``table.png``: a heatmap of our teacher-forced numbers.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.harness import PROTOCOL_CHOICES
from eval.knowedit import DEFAULT_LIMIT
from eval.knowedit.cells import run_cell
from eval.knowedit.tasks import TASK_NOTES, TASKS, load_task
from eval.metrics import GENERATE, PROTOCOLS, TEACHER_FORCED, MetricSettings
from memory.errors import EditmemError, ValidationError

log = logging.getLogger(__name__)

DEFAULT_METHODS: tuple[str, ...] = ("ft", "ft_m", "adalora", "kn", "rome", "memit", "mend")
PUBLISHED_NAMES: dict[str, str] = {"SERAC": "serac", "ICE": "ike", "AdaLoRA": "adalora", "MEND": "mend",
                                   "ROME": "rome", "MEMIT": "memit", "FT-L": "ft", "FT-M": "ft_m"}
METRIC_ORDER: tuple[str, ...] = ("edit_succ", "portability", "locality", "fluency", "perplexity")
PERCENT = {"edit_succ", "portability", "locality"}
# The ft column is run as KnowEdit's FT-L (EasyEdit's FT with objective prompt_last, no norm constraint), unless the
# caller gives ft settings of its own.
DEFAULT_OVERRIDES: dict[str, dict[str, Any]] = {"ft": {"objective": "prompt_last", "norm_constraint": None}}


def with_default_overrides(given: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``given`` (method -> settings) laid over :data:`DEFAULT_OVERRIDES`: ft stays KnowEdit's FT-L in the settings
    not given."""
    return {m: {**DEFAULT_OVERRIDES.get(m, {}), **given.get(m, {})} for m in {*DEFAULT_OVERRIDES, *given}}


@dataclass(frozen=True)
class BenchSettings:
    data_dir: Path
    out_dir: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = TASKS
    limit: int | None = DEFAULT_LIMIT
    protocol: str = "both"
    resume: bool = False
    shard: tuple[int, int] = (0, 1)
    overrides: Mapping[str, Mapping[str, Any]] | None = None  # None: DEFAULT_OVERRIDES
    # how answers are generated and fluency measured: the harness's settings (chat template when the model has one)
    metrics: MetricSettings = field(default_factory=MetricSettings)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_CHOICES:
            raise ValidationError(f"unknown protocol {self.protocol!r}; choose from {', '.join(PROTOCOL_CHOICES)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValidationError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise ValidationError(f"--shard must be i/n with 0 <= i < n (got {i}/{n})")
        if self.limit is not None and self.limit < 1:
            raise ValidationError(f"--limit must be >= 1 (got {self.limit})")

    @property
    def protocols(self) -> tuple[str, ...]:
        return PROTOCOLS if self.protocol == "both" else (self.protocol,)


def cell_path(out_dir: Path, task: str, method: str) -> Path:
    return Path(out_dir) / "cells" / f"{task}__{method}.json"


def grid(settings: BenchSettings) -> list[tuple[str, str]]:
    """This shard's (task, method) cells, in grid order."""
    cells = [(t, m) for t in settings.tasks for m in settings.methods]
    i, n = settings.shard
    return [c for k, c in enumerate(cells) if k % n == i]


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    tmp.replace(path)


def run_bench(model: Any, tokenizer: Any, settings: BenchSettings, *, progress: bool = True,
              position: int | None = None) -> dict[str, Any]:
    """Run this shard's cells (skipping finished ones with ``resume``), then merge every cell file into the table.

    ``position``: the progress bar's line (one per shard process under ``--jobs``)."""
    from tqdm import tqdm

    cells = grid(settings)
    _write_json(settings.out_dir / "bench.json", {"data_dir": str(settings.data_dir), "limit": settings.limit,
                                                  "methods": list(settings.methods), "tasks": list(settings.tasks),
                                                  "protocol": settings.protocol, "chat": settings.metrics.chat,
                                                  "cloze": settings.metrics.cloze})
    todo = [c for c in cells if not (settings.resume and cell_path(settings.out_dir, *c).is_file())]
    cases = {t: load_task(t, settings.data_dir, settings.limit) for t in {t for t, _ in todo}}
    total = sum(len(cases[t]) for t, _ in todo)
    overrides = DEFAULT_OVERRIDES if settings.overrides is None else settings.overrides
    i, n = settings.shard
    desc = "knowedit" if n == 1 else f"knowedit {i}/{n}"
    with tqdm(total=total, desc=desc, unit="edit", disable=not progress, position=position) as bar:
        for task, method in todo:
            bar.set_postfix_str(f"{task} x {method}")
            start = bar.n
            try:
                result = run_cell(model, tokenizer, method, task, cases[task], settings.protocols,
                                  settings.out_dir / "runs" / f"{task}__{method}",
                                  overrides.get(method), tick=lambda: bar.update(1), settings=settings.metrics)
            except (EditmemError, FileNotFoundError) as err:
                log.warning("%s x %s not run: %s", task, method, err)
                result = {"not_run": str(err).splitlines()[0][:300]}
                bar.update(start + len(cases[task]) - bar.n)  # a cell that cannot run counts as finished
            _write_json(cell_path(settings.out_dir, task, method), {"task": task, "method": method, **result})
    return write_table(settings.out_dir, settings.methods, settings.tasks, settings.protocols, settings.data_dir)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); ``None`` for fewer than 2 points or no variance."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    syy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy)


def load_published(data_dir: Path) -> dict[str, Any] | None:
    """The published table (``published/knowedit_published.json`` beside the KnowEdit folder), if present."""
    for path in (Path(data_dir).parent / "published" / "knowedit_published.json",
                 Path(data_dir) / "published" / "knowedit_published.json"):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def _scale(task: str, metric: str, value: float | None) -> float | None:
    """Fractions as percent; ConvSent's locality is a KL divergence and stays as it is."""
    percent = metric in PERCENT and (task, metric) != ("ConvSent", "locality")
    return None if value is None else (100 * value if percent else value)


def build_table(out_dir: Path, methods: Sequence[str], tasks: Sequence[str], protocols: Sequence[str],
                published: Mapping[str, Any] | None) -> dict[str, Any]:
    """The merged table from the cell files (see the module docstring for its rows)."""
    rows: list[dict[str, Any]] = []
    not_run: dict[str, dict[str, str]] = {}
    ours_tf: dict[str, dict[str, float]] = {}
    for task in tasks:
        cells = {}
        for m in methods:
            path = cell_path(out_dir, task, m)
            cells[m] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        for m, cell in cells.items():
            if cell is not None and "not_run" in cell:
                not_run.setdefault(task, {})[m] = cell["not_run"]
        metrics = [k for k in METRIC_ORDER if any(c and "metrics" in c and any(k in b for b in c["metrics"].values())
                                                  for c in cells.values())]
        for metric in metrics:
            for p in protocols:
                values = {}
                for m, c in cells.items():
                    block = (c or {}).get("metrics", {}).get(p)
                    values[m] = _scale(task, metric, block.get(metric)) if block else None
                key = "locality_kl_lower_is_better" if (task, metric) == ("ConvSent", "locality") else metric
                pub = (published or {}).get("table", {}).get(task, {}).get(key, {})
                rows.append({"task": task, "metric": metric, "protocol": p, "values": values,
                             "published": {PUBLISHED_NAMES.get(k, k): v for k, v in pub.items()}})
                if metric == "edit_succ" and p == TEACHER_FORCED:
                    ours_tf[task] = {m: v for m, v in values.items() if v is not None}
        if set(protocols) == set(PROTOCOLS) and task != "ConvSent":  # ConvSent's numbers do not depend on it
            tf = {r["metric"]: r for r in rows if r["task"] == task and r["protocol"] == TEACHER_FORCED}
            gen = {r["metric"]: r for r in rows if r["task"] == task and r["protocol"] == GENERATE}
            if "edit_succ" in tf and "edit_succ" in gen:
                gap = {m: (None if tf["edit_succ"]["values"][m] is None or gen["edit_succ"]["values"][m] is None
                           else tf["edit_succ"]["values"][m] - gen["edit_succ"]["values"][m]) for m in methods}
                rows.append({"task": task, "metric": "edit_succ gap (tf - gen)", "protocol": "", "values": gap,
                             "published": {}})
    rank = {}
    for task, ours in ours_tf.items():
        pub = {PUBLISHED_NAMES.get(k, k): v for k, v in
               (published or {}).get("table", {}).get(task, {}).get("edit_succ", {}).items()}
        common = sorted(set(ours) & set(pub))
        rank[task] = {"methods": common, "spearman": spearman([ours[m] for m in common], [pub[m] for m in common])}
    return {"methods": list(methods), "tasks": list(tasks), "protocols": list(protocols), "rows": rows,
            "not_run": not_run, "rank_correlation": rank,
            "notes": {**{t: TASK_NOTES[t] for t in tasks if t in TASK_NOTES},
                      **({"ft": "run as FT-L: objective prompt_last, no norm constraint"} if "ft" in methods else {})},
            "published_source": (published or {}).get("source")}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_markdown(table: Mapping[str, Any]) -> str:
    methods = table["methods"]
    reasons: list[str] = []  # each distinct "why" once, as a numbered note under the table
    for task_reasons in table["not_run"].values():
        for why in task_reasons.values():
            if why not in reasons:
                reasons.append(why)
    lines = ["| task | metric | protocol | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for r in table["rows"]:
        cells = []
        for m in methods:
            why = table["not_run"].get(r["task"], {}).get(m)
            cells.append(f"not run [{reasons.index(why) + 1}]" if why else _fmt(r["values"].get(m)))
        metric = r["metric"] + (" (KL, lower is better)" if r["task"] == "ConvSent" and r["metric"] == "locality"
                                else "")
        lines.append(f"| {r['task']} | {metric} | {r['protocol']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"[{i}] not run: {why}" for i, why in enumerate(reasons, 1)]
    lines += ["", "Published (Llama-2-7b-chat, " + str(table.get("published_source") or "not found") + "):", "",
              "| task | metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for r in table["rows"]:
        if r["protocol"] in (TEACHER_FORCED, "") and r["published"]:
            lines.append(f"| {r['task']} | {r['metric']} | "
                         + " | ".join(_fmt(r["published"].get(m)) for m in methods) + " |")
    lines += ["", "Spearman rank correlation of edit success (teacher-forced) with the published ordering:", ""]
    for task, rc in table["rank_correlation"].items():
        lines.append(f"- {task}: {_fmt(rc['spearman'])} over {', '.join(rc['methods']) or 'no common methods'}")
    for task, note in table["notes"].items():
        lines.append(f"- note, {task}: {note}")
    return "\n".join(lines) + "\n"


def plot_table(table: Mapping[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r["protocol"] == TEACHER_FORCED and r["metric"] in PERCENT
            and not (r["task"] == "ConvSent" and r["metric"] == "locality")]
    if not rows:
        return None
    methods = table["methods"]
    data = [[r["values"].get(m) if r["values"].get(m) is not None else float("nan") for m in methods] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 3, 0.35 * len(rows) + 1.5))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(methods)), methods, rotation=30)
    ax.set_yticks(range(len(rows)), [f"{r['task']} {r['metric']}" for r in rows], fontsize=7)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="percent (teacher-forced)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_table(out_dir: Path, methods: Sequence[str], tasks: Sequence[str] = TASKS,
                protocols: Sequence[str] = (TEACHER_FORCED,), data_dir: Path | None = None, *,
                plots: bool = True) -> dict[str, Any]:
    """Merge the cell files under ``out_dir`` into table.json, table.md and (``plots``) table.png; returns the
    table."""
    out_dir = Path(out_dir)
    published = load_published(data_dir) if data_dir else None
    if published is None:
        meta = out_dir / "bench.json"
        if meta.is_file():
            published = load_published(Path(json.loads(meta.read_text(encoding="utf-8"))["data_dir"]))
    table = build_table(out_dir, methods, tasks, protocols, published)
    _write_json(out_dir / "table.json", table)
    (out_dir / "table.md").write_text(render_markdown(table), encoding="utf-8")
    if plots:
        plot_table(table, out_dir / "table.png")
    return table
