"""Answers after an update and after a rollback, under the generate protocol (:mod:`eval.answers`).

For a memory editor (SERAC, IKE): per case, in single mode, the edit is applied; then the stored edit is updated to
another target (the next case's new target that differs from both of this case's, as a stand-in correction), then
rolled back to its first version. After each step the edit prompt and the rephrases are asked through the editor's
wrapper (:meth:`editors.retrieval.augmented.AugmentedModel.ask_many`: the chat template when the model has one,
greedy, the natural stop) and matched against the target that should now be given:

- ``edit``: the new target (reliability / generalization as the generate protocol measures them);
- ``update``: the corrected target, and ``update_old``: the share still giving the first target;
- ``rollback``: the first target again, and ``rollback_stale``: the share still giving the corrected one.

Each is reported for the edit prompts (``*_prompt``) and the rephrases (``*_rephrase``), with the count of answers
holding a leaked format string (:func:`eval.answers.find_leaks`). ``python -m eval.updates`` runs it from the
command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from eval.answers import answer_matches, find_leaks, first_answer
from memory.records import EditCase, EditRequest


def other_target(cases: Sequence[EditCase], i: int) -> str | None:
    """The first later case's (cyclically) new target that differs from case ``i``'s new target and ground truth."""
    own = {cases[i].target_new.strip().lower(), (cases[i].ground_truth or "").strip().lower()}
    for j in range(1, len(cases)):
        candidate = cases[(i + j) % len(cases)].target_new
        if candidate.strip().lower() not in own:
            return candidate
    return None


def _rates(answers: Sequence[str], target: str) -> list[float]:
    return [float(answer_matches(a, [target])) for a in answers]


def measure_updates(editor: Any, cases: Sequence[EditCase], *, max_new_tokens: int = 24,
                    progress: Any = None) -> dict[str, Any]:
    """The rates of the module docstring over ``cases``, and per-case lines (``cases``)."""
    sums: dict[str, list[float]] = {}
    lines, leaks, n_answers = [], 0, 0
    for i, case in enumerate(cases):
        new_target = other_target(cases, i)
        if new_target is None:
            continue
        prompts = [case.prompt, *case.rephrases]
        handle = editor.apply([EditRequest(case.prompt, case.target_new, subject=case.subject,
                                           ground_truth=case.ground_truth)])
        memory, (edit_id, _) = editor.memory, handle.edits[0]
        step_answers: dict[str, list[str]] = {}
        try:
            for step in ("edit", "update", "rollback"):
                if step == "update":
                    memory.update(edit_id, target_new=new_target)
                elif step == "rollback":
                    memory.rollback(edit_id, 1)
                asked = editor.model.ask_many(prompts, max_new_tokens=max_new_tokens)
                step_answers[step] = [first_answer(a.text) for a in asked]
        finally:
            handle.restore()
        checks = {"edit": case.target_new, "update": new_target, "update_old": case.target_new,
                  "rollback": case.target_new, "rollback_stale": new_target}
        line: dict[str, Any] = {"case": i, "target_new": case.target_new, "update_to": new_target,
                                "answers": step_answers}
        for name, target in checks.items():
            rates = _rates(step_answers[name.split("_")[0]], target)
            for part, values in (("prompt", rates[:1]), ("rephrase", rates[1:])):
                if values:
                    sums.setdefault(f"{name}_{part}", []).append(sum(values) / len(values))
                    line[f"{name}_{part}"] = sum(values) / len(values)
        texts = [a for answers in step_answers.values() for a in answers]
        n_answers += len(texts)
        line["leaks"] = len(find_leaks(texts))
        leaks += line["leaks"]
        lines.append(line)
        if progress is not None:
            progress(i, line)
    summary: dict[str, Any] = {k: sum(v) / len(v) for k, v in sorted(sums.items())}
    summary.update(n_cases=len(lines), answers=n_answers, leaks=leaks)
    return {"summary": summary, "cases": lines}


def main(argv: Sequence[str] | None = None) -> int:
    from editors.base import get_editor
    from editors.lm.loading import load_model
    from eval.datasets import load_cases

    p = argparse.ArgumentParser(prog="python -m eval.updates", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--method", default="serac", help="a memory editor (serac, ike)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an editor setting (e.g. mode=gated for IKE); values are JSON or strings")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    model, tok = load_model(args.model)
    cases = load_cases(args.data, limit=args.limit)
    editor = get_editor(args.method, model, tok, **overrides)
    started = time.perf_counter()

    def progress(i: int, line: dict[str, Any]) -> None:
        print(f"case {i}: {time.perf_counter() - started:.0f} s", {k: v for k, v in line.items()
                                                                 if k.endswith(("prompt", "rephrase"))},
              flush=True, file=sys.stderr)

    result = measure_updates(editor, cases, max_new_tokens=args.max_new_tokens, progress=progress)
    result["summary"].update(method=args.method, overrides=overrides, data=args.data, model=args.model,
                             seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
