"""Routing quality at scale: store every case's edit, then route its rephrases (each should reach its own edit) and
its locality prompts (each should reach none, unless it asks what another stored edit changed).

Counts, per query: a rephrase routed to its own edit is a true positive; routed to another edit, a false positive
(and a miss); routed nowhere, a miss. ``precision = TP / (TP + FP)``, ``recall = TP / rephrases``. Both are given for
the bare queries and for the queries with their answer appended (what teacher-forced evaluation routes on, see
:mod:`editors.retrieval.augmented`).

Strict labels (``precision``): a locality prompt routed to any edit is a false positive. With every case's edit stored
at once, a locality prompt is sometimes about a subject that has an edit of its own (CounterFact's neighbourhood
prompts name other subjects, and some of those are edited too); ``fp_locality_named_subject`` counts those routings
and ``precision_unambiguous`` leaves them out.

Relation-aware labels (``relation_aware``, when the cases' relations are given, see :mod:`scope.relations`): a locality
prompt of case c asks c's relation. It is in the scope of a stored edit e exactly when it names e's subject and e's
relation is c's: routed to such an e it is a true positive (``tp_locality_in_scope``), routed elsewhere a false
positive, not routed a miss (``missed_locality_in_scope``). Relations that may be the same (an ambiguous template,
:func:`scope.relations.same_relation`) count as the same. Locality prompts are split by whether they name the
subject of any stored edit (``named_subject``) or of none (``no_subject``), and precision is given for each group:
``TP / (TP + wrong-edit FP + that group's locality FP)``, the named group's TP including its in-scope routings.
Subjects are matched as whole-word phrases, case-insensitively (``\\w+`` tokens).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from memory.records import EditCase
from scope.features import names_subject
from scope.relations import same_relation
from scope.router import Router

_WORD = re.compile(r"\w+")
MAX_SUBJECT_WORDS = 12


def _with_answer(text: str, answer: str) -> str:
    return text + answer if text.endswith((" ", "\n")) else f"{text} {answer}"


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD.findall(text))


class SubjectIndex:
    """Which stored edits' subjects a text names (whole-word phrases, case-insensitive)."""

    def __init__(self, subjects: Sequence[str | None], edit_ids: Sequence[int]):
        self._by_words: dict[tuple[str, ...], list[int]] = {}
        for subject, eid in zip(subjects, edit_ids):
            key = _words(subject or "")
            if key and len(key) <= MAX_SUBJECT_WORDS:
                self._by_words.setdefault(key, []).append(eid)

    def named(self, text: str) -> set[int]:
        words = _words(text)
        out: set[int] = set()
        for i in range(len(words)):
            for n in range(1, min(MAX_SUBJECT_WORDS, len(words) - i) + 1):
                out.update(self._by_words.get(words[i:i + n], ()))
        return out


def routing_report(router: Router, cases: Sequence[EditCase], edit_ids: Sequence[int], *, batch: int = 256,
                   progress: bool = False, relations: Sequence[str | None] | None = None,
                   query_cases: Sequence[int] | None = None) -> dict[str, Any]:
    """Route every rephrase and locality prompt of ``cases`` (whose edits are ``edit_ids`` in ``router.memory``);
    with ``relations`` (one per case, None where unknown) also the relation-aware figures. ``query_cases`` (indices
    into ``cases``) routes only those cases' prompts, the labels still coming from every stored case (so that cases
    a scope head was trained on can be stored without being counted)."""
    from tqdm.auto import tqdm

    if relations is not None and len(relations) != len(cases):
        raise ValueError("relations must give one relation per case")
    relation_of = dict(zip(edit_ids, relations)) if relations is not None else {}
    subjects = SubjectIndex([c.subject for c in cases], edit_ids)
    # text, expected edit id (None: no edit), variant, case relation (locality prompts)
    queries: list[tuple[str, int | None, str, str | None]] = []
    chosen = range(len(cases)) if query_cases is None else query_cases
    for i in chosen:
        case, eid = cases[i], edit_ids[i]
        for r in case.rephrases:
            queries.append((r, eid, "bare", None))
            queries.append((_with_answer(r, case.target_new), eid, "with_answer", None))
        rel = relations[i] if relations is not None else None
        for p in case.locality:
            queries.append((p.prompt, None, "bare", rel))
            queries.append((_with_answer(p.prompt, p.answer), None, "with_answer", rel))
    keys = ("tp", "fp_wrong_edit", "fp_locality", "fp_locality_named_subject", "rephrases", "locality",
            "locality_no_subject", "locality_named_subject", "locality_in_scope", "fp_locality_no_subject",
            "fp_locality_named_relation_aware", "tp_locality_in_scope", "missed_locality_in_scope")
    counts = {v: dict.fromkeys(keys, 0) for v in ("bare", "with_answer")}
    t0 = time.perf_counter()
    with tqdm(total=len(queries), desc="routing", unit="query", disable=not progress, leave=False) as bar:
        for start in range(0, len(queries), batch):
            chunk = queries[start:start + batch]
            for (text, expected, variant, rel), d in zip(chunk, router.route([q[0] for q in chunk])):
                c = counts[variant]
                if expected is None:
                    _count_locality(c, text, rel, d, subjects, relation_of)
                else:
                    c["rephrases"] += 1
                    if d.edit is not None and d.edit.id == expected:
                        c["tp"] += 1
                    elif d.in_scope:
                        c["fp_wrong_edit"] += 1
            bar.update(len(chunk))
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"n_edits": len(edit_ids), "query_cases": len(chosen),
                           "threshold": router.classifier.threshold, "k": router.k,
                           "seconds": round(seconds, 2), "queries_per_second": round(len(queries) / seconds, 1)}
    for variant, c in counts.items():
        fp = c["fp_wrong_edit"] + c["fp_locality"]
        clear_fp = fp - c["fp_locality_named_subject"]
        out[variant] = {**{k: c[k] for k in keys[:6]},
                        "precision": _ratio(c["tp"], c["tp"] + fp, 1.0),
                        "precision_unambiguous": _ratio(c["tp"], c["tp"] + clear_fp, 1.0),
                        "recall": _ratio(c["tp"], c["rephrases"]),
                        "locality_false_positive_rate": _ratio(c["fp_locality"], c["locality"])}
        if relations is not None:
            out[variant]["relation_aware"] = _relation_aware(c)
    return out


def _count_locality(c: dict[str, int], text: str, rel: str | None, d: Any, subjects: SubjectIndex,
                    relation_of: dict[int, str | None]) -> None:
    c["locality"] += 1
    c["fp_locality"] += int(d.in_scope)
    c["fp_locality_named_subject"] += int(d.in_scope and names_subject(text, d.edit.subject))
    named = subjects.named(text)
    in_scope = {e for e in named if same_relation(relation_of.get(e), rel)}
    if not named:
        c["locality_no_subject"] += 1
        c["fp_locality_no_subject"] += int(d.in_scope)
        return
    c["locality_named_subject"] += 1
    c["locality_in_scope"] += int(bool(in_scope))
    if d.in_scope and d.edit.id in in_scope:
        c["tp_locality_in_scope"] += 1
    elif d.in_scope:
        c["fp_locality_named_relation_aware"] += 1
    elif in_scope:
        c["missed_locality_in_scope"] += 1


def _relation_aware(c: dict[str, int]) -> dict[str, Any]:
    tp, wrong = c["tp"], c["fp_wrong_edit"]
    fp_none, fp_named, tp_named = c["fp_locality_no_subject"], c["fp_locality_named_relation_aware"], \
        c["tp_locality_in_scope"]
    return {"locality_no_subject": c["locality_no_subject"], "locality_named_subject": c["locality_named_subject"],
            "locality_in_scope": c["locality_in_scope"], "fp_locality_no_subject": fp_none,
            "fp_locality_named_subject": fp_named, "tp_locality_in_scope": tp_named,
            "missed_locality_in_scope": c["missed_locality_in_scope"],
            "precision": _ratio(tp + tp_named, tp + tp_named + wrong + fp_none + fp_named, 1.0),
            "precision_no_subject": _ratio(tp, tp + wrong + fp_none, 1.0),
            "precision_named_subject": _ratio(tp + tp_named, tp + tp_named + wrong + fp_named, 1.0),
            "locality_fp_rate_no_subject": _ratio(fp_none, c["locality_no_subject"]),
            "locality_fp_rate_named_subject": _ratio(fp_named, c["locality_named_subject"] - c["locality_in_scope"])}


def _ratio(num: int, den: int, empty: float | None = None) -> float | None:
    return num / den if den else empty
