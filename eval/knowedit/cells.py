"""One cell of the KnowEdit table: one method on one task's cases, single edits (apply one, measure, restore).

Every cell returns ``{protocol: {metric: value}}`` in the table's units: fractions in [0, 1], ``fluency`` in bits x 100
(as EasyEdit prints n-gram entropy), ConvSent ``locality`` a KL divergence (lower is better), WikiBio ``perplexity``.

- Fact tasks (WikiData_recent, ZsRE, WikiData_counterfact) go through :func:`eval.harness.run_eval`:
  ``edit_succ`` = reliability, ``portability``, ``locality``, ``fluency``.
- WikiBio: :func:`eval.metrics.measure_case` per case (``edit_succ`` = token accuracy of the target sentence,
  ``locality`` on Relation_Specificity) and the perplexity of the target given the passage after the edit.
- ConvSent: :mod:`eval.knowedit.metrics` (log-probability based, so the same number under either protocol).
- Sanitation: ``measure_case`` for locality on the retained questions and the teacher-forced token accuracy of the
  refusal; under ``generate``, ``edit_succ`` is the normalised containment of the refusal in the first answer that
  ``measure_case`` generated for the edit question.

Every generated answer comes from :func:`eval.metrics.measure_case` (directly, or through ``run_eval``) with the
cell's :class:`eval.metrics.MetricSettings`, so the bench's ``generate`` protocol is the harness's
(:mod:`eval.answers`): the question as the user's message through the model's chat template when it has one
(``chat="auto"``), else a plain completion; ``cloze="complete"`` continues cloze prompts (WikiBio's passages,
WikiData's "The mother of X is") as plain text. Fluency is ROME's (the edit prompt continued as plain text) under
either protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from editors.base import Editor, get_editor
from eval.harness import run_eval
from eval.knowedit.metrics import (
    convsent_success,
    kl_divergence,
    perplexity,
    response_distributions,
    response_logprobs,
    sanitation_success,
)
from eval.knowedit.tasks import FACT_TASKS, ConvSentCase
from eval.metrics import GENERATE, TEACHER_FORCED, MetricSettings, greedy_generate, measure_case, n_gram_entropy

Metrics = dict[str, dict[str, float | None]]


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _fluency_x100(model: Any, tok: Any, prompt: str, tokens: int) -> float | None:
    if not tokens:
        return None
    text = greedy_generate(model, tok, [prompt], tokens)[0]
    return 100 * n_gram_entropy([prompt + text])


def _each(editor: Editor, cases: Sequence[Any], before: Callable[[Any], Any], after: Callable[[Any, Any], dict],
          tick: Callable[[], None]) -> list[dict]:
    """For each case: ``before(case)`` on the unedited model, apply its edit, ``after(case, pre)``, restore."""
    rows = []
    for case in cases:
        pre = before(case)
        handle = editor.apply([case.request()])
        try:
            rows.append(after(case, pre))
        finally:
            handle.restore()
        tick()
    return rows


def _fact_cell(model: Any, tok: Any, method: str, cases: Sequence[Any], protocol: str, out_dir: Path,
               overrides: Mapping[str, Any], settings: MetricSettings) -> Metrics:
    summary = run_eval(model, tok, cases, [method], protocol=protocol, out_dir=out_dir / "harness",
                       editor_overrides={method: dict(overrides)} if overrides else None, metric_settings=settings,
                       progress=False, plots=False)
    entry = summary["methods"][method]
    blocks = entry.get("by_protocol") or {summary["protocol"]: entry}
    return {p: {"edit_succ": b["reliability"], "portability": b["portability"], "locality": b["locality"],
                "fluency": None if b["fluency"] is None else 100 * b["fluency"]} for p, b in blocks.items()}


def _wikibio(editor: Editor, tok: Any, cases: Sequence[Any], protocols: Sequence[str], tick: Callable[[], None],
             settings: MetricSettings) -> Metrics:
    def after(case: Any, pre: Any) -> dict:
        post = measure_case(editor.model, tok, case, protocols, reference=pre.reference, settings=settings)
        lp = response_logprobs(editor.model, tok, case.prompt, [case.target_new])[0]
        return {"scores": post.values, "perplexity": perplexity(-lp)}

    rows = _each(editor, cases, lambda c: measure_case(editor.model, tok, c, protocols, settings=settings), after,
                 tick)
    return {p: {"edit_succ": _mean([r["scores"][p]["reliability"] for r in rows]),
                "locality": _mean([r["scores"][p]["locality"] for r in rows]),
                "fluency": _mean([None if r["scores"][p]["fluency"] is None else 100 * r["scores"][p]["fluency"]
                                  for r in rows]),
                "perplexity": _mean([r["perplexity"] for r in rows])} for p in protocols}


def _convsent(editor: Editor, tok: Any, cases: Sequence[ConvSentCase], protocols: Sequence[str],
              tick: Callable[[], None], settings: MetricSettings) -> Metrics:
    def before(case: ConvSentCase) -> dict:
        m = editor.model
        return {"lp_target": _mean(response_logprobs(m, tok, case.prompt, case.targets)),
                "other": response_distributions(m, tok, case.ask(case.other_topic), case.other_responses)}

    def after(case: ConvSentCase, pre: dict) -> dict:
        m = editor.model
        lp_t = _mean(response_logprobs(m, tok, case.prompt, case.targets))
        lp_o = _mean(response_logprobs(m, tok, case.prompt, case.opposite))
        assert lp_t is not None and lp_o is not None
        other = response_distributions(m, tok, case.ask(case.other_topic), case.other_responses)
        return {"edit_succ": convsent_success(lp_t, lp_o, lp_t - pre["lp_target"]),
                "locality": kl_divergence(pre["other"], other),
                "fluency": _fluency_x100(m, tok, case.prompt, settings.fluency_tokens)}

    rows = _each(editor, cases, before, after, tick)
    block = {k: _mean([r[k] for r in rows]) for k in ("edit_succ", "locality", "fluency")}
    return {p: dict(block) for p in protocols}


def _sanitation(editor: Editor, tok: Any, cases: Sequence[Any], protocols: Sequence[str],
                tick: Callable[[], None], settings: MetricSettings) -> Metrics:
    def after(case: Any, pre: Any) -> dict:
        post = measure_case(editor.model, tok, case, protocols, reference=pre.reference, settings=settings)
        # post.answers[0]: the first answer to the edit question (case_probes puts reliability first)
        contains = (sanitation_success(post.answers[0], case.target_new, case.ground_truth) if post.answers
                    else None)
        return {"scores": post.values, "contains": contains}

    rows = _each(editor, cases, lambda c: measure_case(editor.model, tok, c, protocols, settings=settings), after,
                 tick)
    out: Metrics = {}
    for p in protocols:
        succ = [r["contains"] for r in rows] if p == GENERATE else [r["scores"][p]["reliability"] for r in rows]
        out[p] = {"edit_succ": _mean(succ), "locality": _mean([r["scores"][p]["locality"] for r in rows]),
                  "fluency": _mean([None if r["scores"][p]["fluency"] is None else 100 * r["scores"][p]["fluency"]
                                    for r in rows])}
    return out


def run_cell(model: Any, tok: Any, method: str, task: str, cases: Sequence[Any], protocols: Sequence[str],
             out_dir: str | Path, overrides: Mapping[str, Any] | None = None,
             tick: Callable[[], None] = lambda: None, settings: MetricSettings | None = None) -> dict[str, Any]:
    """Run ``method`` on ``task``'s ``cases``; ``{"metrics": {protocol: {metric: value}}, "n", "seconds"}``.
    ``tick`` is called after each case (fact tasks: once, at the end); ``settings`` are the metrics' (chat template,
    cloze handling, fluency tokens), the same for every task."""
    settings = settings if settings is not None else MetricSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    protocols = list(protocols)
    if task in FACT_TASKS:
        protocol = "both" if len(protocols) == 2 else protocols[0]
        metrics = _fact_cell(model, tok, method, cases, protocol, out, overrides or {}, settings)
        for _ in cases:
            tick()
    else:
        editor = get_editor(method, model, tok, **dict(overrides or {}))
        runner = {"WikiBio": _wikibio, "ConvSent": _convsent, "Sanitation": _sanitation}[task]
        metrics = runner(editor, tok, cases, protocols, tick, settings)
    return {"metrics": metrics, "n": len(cases), "seconds": time.perf_counter() - started,
            "protocols": protocols or [TEACHER_FORCED]}
