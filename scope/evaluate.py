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

The same rule for rephrases (``*_same_fact`` figures in ``relation_aware``): CounterFact holds several cases that edit
one fact (the same subject and relation, other targets: "The twin city of Rabat is" twice), and with all of them
stored a rephrase of one is in the scope of the others too. Routed to another stored edit whose subject it names and
whose relation is its case's, it counts as in scope (``tp_same_fact``), not as a wrong edit: ``recall_same_fact`` and
the ``precision_*_same_fact`` figures count such routings as true positives. The strict figures (own edit only) stay
beside them. The threshold sweep (``sweep``) uses the same-fact figures.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from memory.records import EditCase
from scope.calibrate import NAMED_SUBJECT, NO_SUBJECT, REPHRASE, choose_routing_point, routing_points
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
                   query_cases: Sequence[int] | None = None, sweep: bool = False,
                   targets: tuple[float, float] = (0.99, 0.95)) -> dict[str, Any]:
    """Route every rephrase and locality prompt of ``cases`` (whose edits are ``edit_ids`` in ``router.memory``);
    with ``relations`` (one per case, None where unknown) also the relation-aware figures. ``query_cases`` (indices
    into ``cases``) routes only those cases' prompts, the labels still coming from every stored case (so that cases
    a scope head was trained on can be stored without being counted).

    ``sweep`` (needs ``relations`` and a router without a cross-encoder) adds, per variant, what every other threshold
    would have given on the same routings (:func:`scope.calibrate.calibrate_routing` with ``targets``: precision on
    prompts that name no edited subject, on those that do): the best threshold, whether it meets both targets, and
    a few points of the curve."""
    from tqdm.auto import tqdm

    if relations is not None and len(relations) != len(cases):
        raise ValueError("relations must give one relation per case")
    if sweep and (relations is None or getattr(router, "cross", None) is not None):
        raise ValueError("a threshold sweep needs relations and a router without a cross-encoder")
    relation_of = dict(zip(edit_ids, relations)) if relations is not None else {}
    subjects = SubjectIndex([c.subject for c in cases], edit_ids)
    # text, expected edit id (None: no edit), variant, case relation (locality prompts)
    queries: list[tuple[str, int | None, str, str | None]] = []
    chosen = range(len(cases)) if query_cases is None else query_cases
    for i in chosen:
        case, eid = cases[i], edit_ids[i]
        rel = relations[i] if relations is not None else None
        for r in case.rephrases:
            queries.append((r, eid, "bare", rel))
            queries.append((_with_answer(r, case.target_new), eid, "with_answer", rel))
        for p in case.locality:
            queries.append((p.prompt, None, "bare", rel))
            queries.append((_with_answer(p.prompt, p.answer), None, "with_answer", rel))
    keys = ("tp", "fp_wrong_edit", "fp_locality", "fp_locality_named_subject", "rephrases", "locality",
            "locality_no_subject", "locality_named_subject", "locality_in_scope", "fp_locality_no_subject",
            "fp_locality_named_relation_aware", "tp_locality_in_scope", "missed_locality_in_scope", "tp_same_fact")
    counts = {v: dict.fromkeys(keys, 0) for v in ("bare", "with_answer")}
    # per variant: (best candidate's score or NaN, group, whether that candidate is right), for the sweep
    records: dict[str, list[tuple[float, int, bool]]] = {"bare": [], "with_answer": []}
    t0 = time.perf_counter()
    with tqdm(total=len(queries), desc="routing", unit="query", disable=not progress, leave=False) as bar:
        for start in range(0, len(queries), batch):
            chunk = queries[start:start + batch]
            for (text, expected, variant, rel), d in zip(chunk, router.route([q[0] for q in chunk])):
                c = counts[variant]
                top = d.candidates[0].id if d.candidates else None
                score = d.score if d.score is not None else float("nan")
                if expected is None:
                    group, right = _count_locality(c, text, rel, d, top, subjects, relation_of)
                else:
                    same_fact = _same_fact(text, rel, expected, subjects, relation_of)
                    group, right = REPHRASE, top == expected or top in same_fact
                    c["rephrases"] += 1
                    if d.edit is not None and d.edit.id == expected:
                        c["tp"] += 1
                    elif d.edit is not None:
                        c["fp_wrong_edit"] += 1
                        c["tp_same_fact"] += int(d.edit.id in same_fact)
                records[variant].append((score, group, right))
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
        if sweep:
            out[variant]["sweep"] = _sweep(records[variant], targets)
    return out


def _sweep(records: list[tuple[float, int, bool]], targets: tuple[float, float], n_points: int = 12
           ) -> dict[str, Any]:
    scores = np.asarray([r[0] for r in records], dtype=np.float64)
    groups = np.asarray([r[1] for r in records], dtype=np.int64)
    right = np.asarray([r[2] for r in records], dtype=bool)
    points = routing_points(scores, groups, right)
    best, met = choose_routing_point(points, *targets)
    picked = [points[i] for i in np.unique(np.linspace(0, len(points) - 1, n_points).round().astype(int))] \
        if points else []
    return {"targets": {"no_subject": targets[0], "named_subject": targets[1]}, "met": met,
            "best": best.to_json() if best is not None else None, "curve": [p.to_json() for p in picked]}


def _same_fact(text: str, rel: str | None, own: int, subjects: SubjectIndex,
               relation_of: dict[int, str | None]) -> set[int]:
    """The other stored edits a rephrase of edit ``own`` (relation ``rel``) is in the scope of: those whose subject it
    names and whose relation is ``rel`` (none without relations)."""
    if rel is None:
        return set()
    return _asking(subjects.named(text), rel, relation_of) - {own}


def _asking(named: set[int], rel: str | None, relation_of: dict[int, str | None]) -> set[int]:
    """The edits among ``named`` (whose subjects a text names) that change relation ``rel``: the text is in their
    scope."""
    return {e for e in named if same_relation(relation_of.get(e), rel)}


def _count_locality(c: dict[str, int], text: str, rel: str | None, d: Any, top: int | None,
                    subjects: SubjectIndex, relation_of: dict[int, str | None]) -> tuple[int, bool]:
    """Count one locality prompt's routing ``d``; returns its sweep group and whether its best candidate ``top``
    is an edit it is in the scope of."""
    c["locality"] += 1
    c["fp_locality"] += int(d.in_scope)
    c["fp_locality_named_subject"] += int(d.in_scope and names_subject(text, d.edit.subject))
    named = subjects.named(text)
    in_scope = _asking(named, rel, relation_of)
    if not named:
        c["locality_no_subject"] += 1
        c["fp_locality_no_subject"] += int(d.in_scope)
        return NO_SUBJECT, False
    c["locality_named_subject"] += 1
    c["locality_in_scope"] += int(bool(in_scope))
    if d.in_scope and d.edit.id in in_scope:
        c["tp_locality_in_scope"] += 1
    elif d.in_scope:
        c["fp_locality_named_relation_aware"] += 1
    elif in_scope:
        c["missed_locality_in_scope"] += 1
    return NAMED_SUBJECT, top in in_scope


def _relation_aware(c: dict[str, int]) -> dict[str, Any]:
    tp, wrong = c["tp"], c["fp_wrong_edit"]
    fp_none, fp_named, tp_named = c["fp_locality_no_subject"], c["fp_locality_named_relation_aware"], \
        c["tp_locality_in_scope"]
    tp_fact, wrong_fact = tp + c["tp_same_fact"], wrong - c["tp_same_fact"]
    return {"locality_no_subject": c["locality_no_subject"], "locality_named_subject": c["locality_named_subject"],
            "locality_in_scope": c["locality_in_scope"], "fp_locality_no_subject": fp_none,
            "fp_locality_named_subject": fp_named, "tp_locality_in_scope": tp_named,
            "missed_locality_in_scope": c["missed_locality_in_scope"],
            "precision": _ratio(tp + tp_named, tp + tp_named + wrong + fp_none + fp_named, 1.0),
            "precision_no_subject": _ratio(tp, tp + wrong + fp_none, 1.0),
            "precision_named_subject": _ratio(tp + tp_named, tp + tp_named + wrong + fp_named, 1.0),
            "locality_fp_rate_no_subject": _ratio(fp_none, c["locality_no_subject"]),
            "locality_fp_rate_named_subject": _ratio(fp_named, c["locality_named_subject"] - c["locality_in_scope"]),
            "tp_same_fact": c["tp_same_fact"],
            "recall_same_fact": _ratio(tp_fact, c["rephrases"]),
            "precision_no_subject_same_fact": _ratio(tp_fact, tp_fact + wrong_fact + fp_none, 1.0),
            "precision_named_subject_same_fact": _ratio(tp_fact + tp_named, tp_fact + tp_named + wrong_fact + fp_named,
                                                        1.0)}


def _ratio(num: int, den: int, empty: float | None = None) -> float | None:
    return num / den if den else empty


def calibrate_in_store(classifier: Any, cases: Sequence[EditCase], relations: Sequence[str | None],
                       held: Sequence[int], encoder: Any, *, reranker: Any = None, k: int = 5,
                       targets: tuple[float, float] = (0.99, 0.95), progress: bool = False) -> dict[str, Any]:
    """The threshold at which ``classifier`` (behind ``reranker``, if given) routes best in a store the size of its
    data: every case of ``cases`` stored (a temporary in-memory store on ``encoder``), the prompts of the cases
    ``held`` (indices: ones it was not trained on) routed, and the threshold chosen on those routings for the
    relation-aware precision ``targets`` (no edited subject named / one named), then the best recall
    (:func:`scope.calibrate.calibrate_routing`). Returns the bare prompts' ``sweep`` (``best``: the point, ``met``)
    and the held-out routing figures at the classifier's own threshold."""
    from memory.store import EditMemory

    if not held:
        raise ValueError("no held-out cases to calibrate on")
    with EditMemory.open("sqlite://", encoder=encoder) as mem:
        ids = [r.id for r in mem.add_many([{"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject}
                                           for c in cases], progress=progress)]
        report = routing_report(Router(mem, classifier, k=k, reranker=reranker), cases, ids, progress=progress,
                                relations=relations, query_cases=held, sweep=True, targets=targets)
    return {"stored": len(ids), "held_out_cases": len(held), "sweep": report["bare"]["sweep"],
            "at_own_threshold": report["bare"]["relation_aware"]}
