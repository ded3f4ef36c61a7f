"""Relation-aware locality for sequential runs: leave out the locality probes that ask what a stored edit changed.

With many edits stored at once, a CounterFact locality (neighbourhood) prompt of case c sometimes names the subject
of another stored edit e and asks e's relation too (a neighbourhood prompt asks c's relation, about another subject).
Such a prompt is in e's scope: answering it with e's new object is right, and the strict locality figure (the answer
must not change) counts it as a failure. With relation labels (:mod:`scope.relations`), a probe of case c is **in
scope** at a checkpoint when it names (as a whole-word phrase, :class:`scope.evaluate.SubjectIndex`) the subject of a
case stored by then whose relation may be c's (:func:`scope.relations.same_relation`); relation-aware locality is
the strict measure over the other probes. The same labels as the routing figures (:mod:`scope.evaluate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from memory.records import EditCase
from scope.evaluate import SubjectIndex
from scope.relations import same_relation


class StoredSubjects:
    """The subjects and relations of the first ``stored`` cases, for labelling locality probes."""

    def __init__(self, cases: Sequence[EditCase], relations: Sequence[str | None], stored: int):
        if len(relations) != len(cases):
            raise ValueError(f"relations must give one relation per case ({len(relations)} for {len(cases)})")
        self._cases, self._relations = cases, relations
        self._subjects = SubjectIndex([c.subject for c in cases[:stored]], list(range(stored)))

    def in_scope(self, index: int) -> list[bool]:
        """Per locality probe of case ``index`` (each asks that case's relation): whether it is in a stored edit's
        scope."""
        relation = self._relations[index]
        return [any(same_relation(self._relations[j], relation) for j in self._subjects.named(p.prompt))
                for p in self._cases[index].locality]


def relation_aware(flags: Sequence[Sequence[bool]], probes: Sequence[Mapping[str, Sequence[float]]],
                   protocols: Sequence[str]) -> dict[str, Any]:
    """Relation-aware locality over measured cases: ``flags[i]`` (in scope, per locality probe) and ``probes[i]``
    (protocol -> per-probe unchanged value) of case i. Per protocol, the mean over cases of each case's mean over its
    probes not in scope (cases with none left out, None if no case has one), with the counts."""
    out: dict[str, Any] = {"locality_probes": sum(len(f) for f in flags),
                           "locality_in_scope": sum(sum(f) for f in flags), "locality": {}}
    for protocol in protocols:
        per_case = []
        for case_flags, case_probes in zip(flags, probes):
            values = list(case_probes.get(protocol, ()))
            if len(values) != len(case_flags):
                raise ValueError("one unchanged value per locality probe is needed")
            kept = [v for v, inside in zip(values, case_flags) if not inside]
            if kept:
                per_case.append(sum(kept) / len(kept))
        out["locality"][protocol] = sum(per_case) / len(per_case) if per_case else None
    return out
