"""Routing quality at scale: store every case's edit, then route its rephrases (each should reach its own edit) and
its locality prompts (each should reach none).

Counts, per query: a rephrase routed to its own edit is a true positive; routed to another edit, a false positive
(and a miss); routed nowhere, a miss. A locality prompt routed to any edit is a false positive.
``precision = TP / (TP + FP)``, ``recall = TP / rephrases``. Both are given for the bare queries and for the queries
with their answer appended (what teacher-forced evaluation routes on, see :mod:`editors.retrieval.augmented`).

With every case's edit stored at once, a locality prompt is sometimes about a subject that has an edit of its own
(CounterFact's neighbourhood prompts name other subjects, and some of those are edited too, at times with the same
relation). Such a prompt routed to an edit whose subject it names is counted as a false positive all the same, and
also reported as ``fp_locality_named_subject``; ``precision_unambiguous`` leaves those out, for reading the strict
figure.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from memory.records import EditCase
from scope.features import names_subject
from scope.router import Router


def _with_answer(text: str, answer: str) -> str:
    return text + answer if text.endswith((" ", "\n")) else f"{text} {answer}"


def routing_report(router: Router, cases: Sequence[EditCase], edit_ids: Sequence[int], *, batch: int = 256,
                   progress: bool = False) -> dict[str, Any]:
    """Route every rephrase and locality prompt of ``cases`` (whose edits are ``edit_ids`` in ``router.memory``)."""
    from tqdm.auto import tqdm

    queries: list[tuple[str, int | None, str]] = []  # text, expected edit id (None: no edit), variant
    for case, eid in zip(cases, edit_ids):
        for r in case.rephrases:
            queries.append((r, eid, "bare"))
            queries.append((_with_answer(r, case.target_new), eid, "with_answer"))
        for p in case.locality:
            queries.append((p.prompt, None, "bare"))
            queries.append((_with_answer(p.prompt, p.answer), None, "with_answer"))
    counts = {v: {"tp": 0, "fp_wrong_edit": 0, "fp_locality": 0, "fp_locality_named_subject": 0, "rephrases": 0,
                  "locality": 0}
              for v in ("bare", "with_answer")}
    t0 = time.perf_counter()
    with tqdm(total=len(queries), desc="routing", unit="query", disable=not progress, leave=False) as bar:
        for start in range(0, len(queries), batch):
            chunk = queries[start:start + batch]
            for (text, expected, variant), d in zip(chunk, router.route([q[0] for q in chunk])):
                c = counts[variant]
                if expected is None:
                    c["locality"] += 1
                    c["fp_locality"] += int(d.in_scope)
                    c["fp_locality_named_subject"] += int(d.in_scope and names_subject(text, d.edit.subject))
                else:
                    c["rephrases"] += 1
                    if d.in_scope and d.edit.id == expected:
                        c["tp"] += 1
                    elif d.in_scope:
                        c["fp_wrong_edit"] += 1
            bar.update(len(chunk))
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"n_edits": len(edit_ids), "threshold": router.classifier.threshold, "k": router.k,
                           "seconds": round(seconds, 2), "queries_per_second": round(len(queries) / seconds, 1)}
    for variant, c in counts.items():
        fp = c["fp_wrong_edit"] + c["fp_locality"]
        clear_fp = fp - c["fp_locality_named_subject"]
        out[variant] = {**c, "precision": c["tp"] / (c["tp"] + fp) if c["tp"] + fp else 1.0,
                        "precision_unambiguous": c["tp"] / (c["tp"] + clear_fp) if c["tp"] + clear_fp else 1.0,
                        "recall": c["tp"] / c["rephrases"] if c["rephrases"] else None,
                        "locality_false_positive_rate": c["fp_locality"] / c["locality"] if c["locality"] else None}
    return out
