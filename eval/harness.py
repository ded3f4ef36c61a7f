"""One evaluation harness for every editor: single, batch and sequential editing, measured the same way.

The harness knows nothing about any method. It builds each editor by name (``editors.get_editor``), hands it
``EditRequest``s, measures ``editor.model`` with :mod:`eval.metrics`, and undoes every edit with ``handle.restore()``.

Modes
    ``single``      for each case: apply([request]), measure it, restore.
    ``batch``       apply ``batch_size`` requests at once, measure each of them, restore.
    ``sequential``  edits accumulate (``batch_size`` requests per apply) and are only restored at the end, newest
                    first. At each checkpoint (default 10, 100, 1000, clipped to the number of cases, always including
                    it) the edited-so-far cases are measured: all of them, or a fixed random sample of
                    ``checkpoint_sample`` of them (seed ``seed``) when there are more; the last checkpoint
                    measures every case (or, with ``sample_final``, a sample too, for runs to 10,000 edits), and
                    those are the per-case lines and the headline numbers. The samples are drawn before any edit,
                    and pre-edit values are measured only for the cases some checkpoint measures.

Pre-edit values (and the locality reference predictions) are measured once per case on the unedited base model and
shared by every method; that is sound because the harness checks, after each method, that a checksum of every
parameter is bit-identical to the one taken before the run, and stops with an error naming the editor if not.

``edit_seconds`` is the **mean wall time per edit**: the time of the ``apply`` calls only (not measuring, not
restoring), summed and divided by the number of edits. In batch/sequential mode an apply of B requests counts as B
edits of 1/B of its time each.

Outputs, in ``out_dir``, written as the run goes:
    ``cases.jsonl``   one line per case and method (see :func:`_case_line`), flushed after each line;
    ``checkpoints.jsonl``  sequential mode: one line per method and checkpoint (``{"method": ..., "n_edits": ...,
                      "n_measured": ..., five metrics}``) as soon as it is measured, so a long run that is stopped
                      keeps its curve so far;
    ``summary.json``  written at the start, after each method and, in sequential mode, after each checkpoint (an
                      unfinished method's entry is its last checkpoint's, with ``"unfinished"``); its shape is
                      documented in :data:`eval.report.SUMMARY_SHAPE`;
    ``report.md`` and PNG plots (see :mod:`eval.report`), at the end.

Relation-aware locality (sequential mode, given ``relations``, one per case): each checkpoint also reports
``"relation_aware"``: locality over the probes that do not ask what an edit stored by then changed, per protocol, and
how many probes were left out (:mod:`eval.locality_labels`). The five metrics stay the strict ones.

Memory and weights apart (sequential mode, an editor that keeps some edits in memory and moves others into the
weights, such as ``hybrid``: it has a ``held`` list of the (store id, version) answered from memory, and its handles
give the store ``ids`` of the edits each apply added): each checkpoint also reports ``"by_part"``, the metrics of the
measured cases still answered from memory (``"memory"``) and of those moved into the weights (``"weights"``), each
with its own ``n_measured``; the final per-case lines say which (``"part"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editors.base import EditRequest, WeightEditHandle, available_editors, get_editor
from eval.answers import edit_leaks
from eval.locality_labels import StoredSubjects, relation_aware
from eval.metrics import (
    GENERATE,
    PROTOCOLS,
    TEACHER_FORCED,
    CaseScores,
    MetricSettings,
    aggregate,
    measure_case,
)
from eval.report import write_report, write_summary
from memory.errors import EditmemError, ValidationError
from memory.records import EditCase

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("single", "batch", "sequential")
BOTH = "both"
PROTOCOL_CHOICES: tuple[str, ...] = (TEACHER_FORCED, GENERATE, BOTH)
DEFAULT_CHECKPOINTS: tuple[int, ...] = (10, 100, 1000)


@dataclass(frozen=True)
class EvalSettings:
    """What to run and how. Validated on construction; a bad value raises ``ValidationError``."""

    methods: tuple[str, ...]
    mode: str = "single"
    batch_size: int = 1
    checkpoints: tuple[int, ...] | None = None
    protocol: str = TEACHER_FORCED
    checkpoint_sample: int = 200
    sample_final: bool = False
    seed: int = 0
    metrics: MetricSettings = field(default_factory=MetricSettings)
    relations: tuple[str | None, ...] | None = None  # per case: relation-aware locality (eval.locality_labels)

    def __post_init__(self) -> None:
        if isinstance(self.methods, str) or not self.methods:
            raise ValidationError("give at least one editing method, as a list of names")
        if len(set(self.methods)) != len(self.methods):
            raise ValidationError(f"a method is named twice in {list(self.methods)}")
        if self.mode not in MODES:
            raise ValidationError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.protocol not in PROTOCOL_CHOICES:
            raise ValidationError(f"unknown protocol {self.protocol!r}; choose from {', '.join(PROTOCOL_CHOICES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValidationError(f"batch_size must be an integer >= 1 (got {self.batch_size!r})")
        if self.mode == "single" and self.batch_size != 1:
            raise ValidationError("mode 'single' edits one case at a time; use mode 'batch' for batch_size > 1")
        if self.checkpoints is not None:
            if self.mode != "sequential":
                raise ValidationError("checkpoints only apply to mode 'sequential'")
            if not self.checkpoints or any(not isinstance(c, int) or c < 1 for c in self.checkpoints):
                raise ValidationError(f"checkpoints must be positive integers (got {list(self.checkpoints)})")
        if self.checkpoint_sample < 1:
            raise ValidationError(f"checkpoint_sample must be >= 1 (got {self.checkpoint_sample})")
        if self.sample_final and self.mode != "sequential":
            raise ValidationError("sample_final only applies to mode 'sequential'")
        if self.relations is not None and self.mode != "sequential":
            raise ValidationError("relation-aware locality (relations) only applies to mode 'sequential'")

    @property
    def protocols(self) -> tuple[str, ...]:
        """The metric protocols measured: both of them for ``protocol="both"``."""
        return PROTOCOLS if self.protocol == BOTH else (self.protocol,)

    def checkpoints_for(self, n: int) -> list[int]:
        """Sequential checkpoints for ``n`` cases: the requested ones (default 10/100/1000) below ``n``, then ``n``."""
        wanted = self.checkpoints if self.checkpoints is not None else DEFAULT_CHECKPOINTS
        return sorted({c for c in wanted if c < n} | {n})


def _parameter_checksum(model: Any) -> str:
    """A hash of the bytes of every parameter and buffer, in name order: equal iff bit-identical (up to blake2b)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, tensor in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _request(case: EditCase, index: int) -> EditRequest:
    try:
        return case.request()
    except ValidationError as err:
        raise ValidationError(f"case {index} (id {case.case_id}): {err}") from None


class _PreCache:
    """Pre-edit measurements of each case on the unedited base model, made once and shared by every method."""

    def __init__(self, model: Any, tokenizer: Any, cases: Sequence[EditCase], settings: EvalSettings):
        self.model, self.tokenizer, self.cases, self.settings = model, tokenizer, cases, settings
        self._scores: dict[int, CaseScores] = {}

    def has(self, index: int) -> bool:
        return index in self._scores

    def get(self, index: int) -> CaseScores:
        if index not in self._scores:
            self._scores[index] = measure_case(self.model, self.tokenizer, self.cases[index], self.settings.protocols,
                                               settings=self.settings.metrics)
        return self._scores[index]


def _case_line(index: int, case: EditCase, method: str, settings: EvalSettings, pre: CaseScores, post: CaseScores,
               edit_seconds: float, **extra: Any) -> dict[str, Any]:
    """One line of cases.jsonl.

    ``{"index", "case_id", "method", "mode", "edit_seconds", "scores": {"<protocol>": {"pre": {5 metrics},
    "post": {5 metrics}}}}`` plus ``"batch"`` (batch mode: which apply call) or ``"n_edits"`` (sequential: how many
    edits were in the model when the case was measured).
    """
    line: dict[str, Any] = {"index": index, "case_id": case.case_id, "method": method, "mode": settings.mode,
                            "edit_seconds": edit_seconds}
    line.update(extra)
    line["scores"] = {p: {"pre": pre.values[p], "post": post.values[p]} for p in settings.protocols}
    if GENERATE in settings.protocols:
        line["leaks"] = len(edit_leaks(pre.answers, post.answers))
        line["answers"] = list(post.answers)
    return line


@dataclass
class _MethodResult:
    lines: list[dict[str, Any]] = field(default_factory=list)
    apply_seconds: float = 0.0
    n_edits: int = 0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def _metric_block(values_by_protocol: Sequence[Mapping[str, Mapping[str, float | None]]],
                  settings: EvalSettings) -> dict[str, Any]:
    """The five metrics (first protocol at the top) and, for protocol 'both', the per-protocol blocks."""
    per_protocol = {p: aggregate([v[p] for v in values_by_protocol]) for p in settings.protocols}
    block: dict[str, Any] = dict(per_protocol[settings.protocols[0]])
    if settings.protocol == BOTH:
        block["by_protocol"] = per_protocol
    return block


def _write_line(sink: Any, record: Mapping[str, Any]) -> None:
    """One JSON line, flushed at once (the .jsonl outputs are read while a run goes on)."""
    sink.write(json.dumps(record) + "\n")
    sink.flush()


class _Runner:
    def __init__(self, model: Any, tokenizer: Any, cases: Sequence[EditCase], settings: EvalSettings,
                 sink: Any, progress: bool, checkpoint_sink: Any = None,
                 on_checkpoint: Callable[[str, _MethodResult], None] | None = None):
        self.model, self.tokenizer, self.cases, self.settings = model, tokenizer, cases, settings
        self.sink = sink
        self.checkpoint_sink = checkpoint_sink
        self.on_checkpoint = on_checkpoint
        self.progress = progress
        self.pre = _PreCache(model, tokenizer, cases, settings)

    def _bar(self, method: str, total: int, desc: str | None = None):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc or f"{method} ({self.settings.mode})", unit="case",
                    disable=not self.progress, leave=False)

    def _measure(self, editor: Any, index: int) -> CaseScores:
        return measure_case(editor.model, self.tokenizer, self.cases[index], self.settings.protocols,
                            reference=self.pre.get(index).reference, settings=self.settings.metrics)

    def _emit(self, result: _MethodResult, line: dict[str, Any]) -> None:
        result.lines.append(line)
        _write_line(self.sink, line)

    def _apply(self, editor: Any, indices: Sequence[int], result: _MethodResult):
        requests = [_request(self.cases[i], i) for i in indices]
        start = time.perf_counter()
        handle = editor.apply(requests)
        seconds = time.perf_counter() - start
        result.apply_seconds += seconds
        result.n_edits += len(indices)
        return handle, seconds / len(indices)

    def run_method(self, method: str, editor: Any) -> _MethodResult:
        if self.settings.mode == "sequential":
            return self._sequential(method, editor)
        result = _MethodResult()
        n, size = len(self.cases), self.settings.batch_size
        with self._bar(method, n) as bar:
            for batch_no, start in enumerate(range(0, n, size)):
                indices = list(range(start, min(start + size, n)))
                for i in indices:
                    self.pre.get(i)
                handle, per_edit = self._apply(editor, indices, result)
                try:
                    posts = [(i, self._measure(editor, i)) for i in indices]
                finally:
                    handle.restore()
                for i, post in posts:
                    extra = {"batch": batch_no} if self.settings.mode == "batch" else {}
                    self._emit(result, _case_line(i, self.cases[i], method, self.settings, self.pre.get(i), post,
                                                  per_edit, **extra))
                bar.update(len(indices))
        return result

    def _sample_plan(self, checkpoints: Sequence[int], n: int) -> dict[int, list[int]]:
        """Which cases each checkpoint measures (the same for every method: drawn from ``seed`` alone)."""
        rng = random.Random(self.settings.seed)
        plan = {}
        for checkpoint in checkpoints:
            measured = list(range(checkpoint))
            sampled = checkpoint < n or self.settings.sample_final
            if sampled and len(measured) > self.settings.checkpoint_sample:
                measured = sorted(rng.sample(measured, self.settings.checkpoint_sample))
            plan[checkpoint] = measured
        return plan

    def _sequential(self, method: str, editor: Any) -> _MethodResult:
        result = _MethodResult()
        n, size = len(self.cases), self.settings.batch_size
        checkpoints = self.settings.checkpoints_for(n)
        plan = self._sample_plan(checkpoints, n)
        needed = sorted(set().union(*plan.values()))
        missing = [i for i in needed if not self.pre.has(i)]
        if missing:
            with self._bar(method, len(missing), desc="pre-edit measurements") as bar:
                for i in missing:
                    self.pre.get(i)
                    bar.update(1)
        handles: list[Any] = []
        per_edit_seconds: dict[int, float] = {}
        edit_of: dict[int, int] = {}  # case index -> store id, for an editor that splits memory and weights
        splits = hasattr(editor, "held")
        done = 0
        try:
            with self._bar(method, n) as bar:
                for checkpoint in checkpoints:
                    while done < checkpoint:
                        indices = list(range(done, min(done + size, checkpoint)))
                        handle, per_edit = self._apply(editor, indices, result)
                        if handles and isinstance(handle, WeightEditHandle) \
                                and isinstance(handles[-1], WeightEditHandle):
                            handles[-1].absorb(handle)  # one original per touched weight, not one per edit
                        else:
                            handles.append(handle)
                        for i in indices:
                            per_edit_seconds[i] = per_edit
                        if splits and hasattr(handle, "ids"):
                            edit_of.update(zip(indices, handle.ids, strict=True))
                        done = indices[-1] + 1
                        bar.update(len(indices))
                    measured = plan[checkpoint]
                    final = checkpoint == n
                    bar.set_postfix_str(f"measuring {len(measured)} at {checkpoint} edits")
                    relations = self.settings.relations
                    stored = StoredSubjects(self.cases, relations, checkpoint) if relations is not None else None
                    posts, flags, probes = [], [], []
                    in_memory = {e for e, _ in editor.held} if edit_of else None
                    parts: dict[str, list[Any]] = {"memory": [], "weights": []}
                    for i in measured:
                        post = self._measure(editor, i)
                        posts.append(post.values)
                        if stored is not None:
                            flags.append(stored.in_scope(i))
                            probes.append(post.locality_probes)
                        part = {}
                        if in_memory is not None:
                            part = {"part": "memory" if edit_of.get(i) in in_memory else "weights"}
                            parts[part["part"]].append(post.values)
                        if final:
                            self._emit(result, _case_line(i, self.cases[i], method, self.settings, self.pre.get(i),
                                                          post, per_edit_seconds[i], n_edits=done, **part))
                    entry: dict[str, Any] = {"n_edits": checkpoint, "n_measured": len(measured)}
                    entry.update(_metric_block(posts, self.settings))
                    if stored is not None:
                        entry["relation_aware"] = relation_aware(flags, probes, self.settings.protocols)
                    if in_memory is not None:
                        entry["by_part"] = {name: {"n_measured": len(values), **_metric_block(values, self.settings)}
                                            for name, values in parts.items() if values}
                    result.checkpoints.append(entry)
                    log.info("%s: %d edits, %s", method, checkpoint, entry)
                    if self.checkpoint_sink is not None:
                        _write_line(self.checkpoint_sink, {"method": method, **entry})
                    if self.on_checkpoint is not None and not final:
                        self.on_checkpoint(method, result)
        finally:
            for handle in reversed(handles):
                handle.restore()
        return result


@dataclass(frozen=True)
class RunSettings:
    """How :func:`run_eval` runs (mode, batch size, checkpoints, protocol, metric settings, sampling, seed), what
    each method is given (``editor_overrides``: method name -> keyword overrides of its settings, as
    ``get_editor(name, ..., **o)``) and where and how it reports (``out_dir``, the names in the report, the
    ``command`` recorded in report.md, the progress bar, the plots). Checked when the run starts."""

    out_dir: str | Path
    mode: str = "single"
    batch_size: int = 1
    checkpoints: Sequence[int] | None = None
    protocol: str = TEACHER_FORCED
    metric_settings: MetricSettings | None = None
    checkpoint_sample: int = 200
    sample_final: bool = False
    seed: int = 0
    model_name: str = "model"
    dataset_name: str = "dataset"
    editor_overrides: Mapping[str, Mapping[str, Any]] | None = None
    command: str | None = None
    progress: bool = True
    plots: bool = True
    relations: Sequence[str | None] | None = None


def run_eval(model: Any, tokenizer: Any, cases: Sequence[EditCase], methods: Sequence[str],
             settings: RunSettings | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate every method in ``methods`` on ``cases`` and return the summary (also written to
    ``settings.out_dir``). ``settings``: a :class:`RunSettings`; or give its fields as keyword ``options`` instead
    (not both). See the module docstring for modes, timing and outputs."""
    if settings is None:
        try:
            settings = RunSettings(**options)
        except TypeError as err:
            raise ValidationError(f"run_eval: {err}") from None
    elif options:
        raise ValidationError(f"run_eval takes a RunSettings or keyword options, not both (got {sorted(options)})")
    run = settings
    out_dir, model_name, dataset_name = run.out_dir, run.model_name, run.dataset_name
    editor_overrides, command, progress, plots = run.editor_overrides, run.command, run.progress, run.plots
    settings_ = EvalSettings(methods=tuple(methods), mode=run.mode, batch_size=run.batch_size,
                             checkpoints=tuple(run.checkpoints) if run.checkpoints is not None else None,
                             protocol=run.protocol, checkpoint_sample=run.checkpoint_sample,
                             sample_final=run.sample_final, seed=run.seed,
                             metrics=run.metric_settings if run.metric_settings is not None else MetricSettings(),
                             relations=tuple(run.relations) if run.relations is not None else None)
    return _run_eval(model, tokenizer, cases, settings_, out_dir=out_dir, model_name=model_name,
                     dataset_name=dataset_name, editor_overrides=editor_overrides, command=command,
                     progress=progress, plots=plots)


def _run_eval(model: Any, tokenizer: Any, cases: Sequence[EditCase], settings: EvalSettings, *,
              out_dir: str | Path, model_name: str, dataset_name: str,
              editor_overrides: Mapping[str, Mapping[str, Any]] | None, command: str | None, progress: bool,
              plots: bool) -> dict[str, Any]:
    cases = list(cases)
    if not cases:
        raise ValidationError("no cases to evaluate")
    known = available_editors()
    unknown = [m for m in settings.methods if m not in known]
    if unknown:
        raise ValidationError(f"unknown editing method(s) {unknown}; available: {', '.join(known)}")
    overrides = dict(editor_overrides or {})
    stray = sorted(set(overrides) - set(settings.methods))
    if stray:
        raise ValidationError(f"settings given for method(s) {stray} that are not being run")
    for i, case in enumerate(cases):  # refuse a bad case before spending time on any method
        _request(case, i)
    if settings.relations is not None and len(settings.relations) != len(cases):
        raise ValidationError(f"relations must give one relation per case ({len(settings.relations)} for "
                              f"{len(cases)} cases)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"model": model_name, "dataset": dataset_name, "protocol": settings.protocol,
                               "mode": settings.mode, "n_cases": len(cases), "methods": {}}
    reference_checksum = _parameter_checksum(model)
    with ExitStack() as files:
        sink = files.enter_context(open(out / "cases.jsonl", "w", encoding="utf-8"))
        checkpoint_sink = (files.enter_context(open(out / "checkpoints.jsonl", "w", encoding="utf-8"))
                           if settings.mode == "sequential" else None)
        def unfinished(method: str, result: _MethodResult) -> None:
            # A sequential run's summary.json holds each checkpoint as soon as it is measured, so a run stopped
            # before its last checkpoint can still be reported (editmem report): its numbers are the last
            # checkpoint's, marked unfinished.
            entry = {k: v for k, v in result.checkpoints[-1].items() if k not in ("n_edits", "n_measured")}
            entry.update({"edit_seconds": result.apply_seconds / result.n_edits if result.n_edits else None,
                          "n": result.checkpoints[-1]["n_measured"], "checkpoints": list(result.checkpoints),
                          "unfinished": {"n_edits": result.checkpoints[-1]["n_edits"], "of": len(cases)}})
            summary["methods"][method] = entry
            write_summary(out, summary)

        write_summary(out, summary)  # model, data, protocol and mode, before any method has finished
        runner = _Runner(model, tokenizer, cases, settings, sink, progress, checkpoint_sink, unfinished)
        for method in settings.methods:
            editor = get_editor(method, model, tokenizer, **overrides.get(method, {}))
            started = time.perf_counter()
            result = runner.run_method(method, editor)
            if _parameter_checksum(model) != reference_checksum:
                raise EditmemError(f"editor {method!r} did not restore the model: its parameters differ from before "
                                   "the run after every edit was undone; results so far are in "
                                   f"{out / 'cases.jsonl'}")
            posts = [{p: line["scores"][p]["post"] for p in settings.protocols} for line in result.lines]
            entry = _metric_block(posts, settings)
            entry["edit_seconds"] = result.apply_seconds / result.n_edits if result.n_edits else None
            entry["n"] = len(result.lines)
            if GENERATE in settings.protocols:
                entry["leaks"] = sum(line["leaks"] for line in result.lines)
            if settings.mode == "sequential":
                entry["checkpoints"] = result.checkpoints
                if "relation_aware" in result.checkpoints[-1]:  # the last checkpoint measured these cases
                    entry["relation_aware"] = result.checkpoints[-1]["relation_aware"]
            summary["methods"][method] = entry
            log.info("%s done in %.1f s: %s", method, time.perf_counter() - started, entry)
            write_summary(out, summary)
    write_report(out, summary, command=command, batch_size=settings.batch_size,
                 fluency_tokens=settings.metrics.fluency_tokens, plots=plots)
    return summary

