"""Which relation a prompt asks: relation ids for CounterFact cases, for relation-aware routing labels
(:mod:`scope.evaluate`) and for training the relation reranker (:mod:`scope.rerank`).

ROME-format CounterFact (``requested_rewrite.relation_id``, Wikidata ids such as ``P19``) gives each case's relation
directly, and its prompt templates (``"{} originates from"``) map every other case with the same template to it.
The EasyEdit split carries no relation ids but the same ``case_id`` numbering and templates, so a case's relation is:
its ROME record's id when there is one, else its template's ids (a template such as ``"{} is developed by"`` asks P176
or P178 in different cases: the relation is then ``"P176|P178"``, and :func:`same_relation` treats relations that
share an id as the same), else the template itself (``"tmpl:{} ..."``, a stand-in equal only to itself). A
CounterFact neighbourhood (locality) prompt asks the relation of its own case, about another subject.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memory.records import EditCase


def template_of(prompt: str, subject: str | None) -> str | None:
    """``prompt`` with its subject replaced by ``{}`` (None when the subject does not occur in it)."""
    if not subject or subject not in prompt:
        return None
    return prompt.replace(subject, "{}", 1)


@dataclass
class RelationTable:
    """Relation ids by case id and by prompt template (see the module docstring)."""

    by_case: dict[int, str] = field(default_factory=dict)
    by_template: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def from_rome_files(cls, paths: Iterable[str | Path]) -> RelationTable:
        table = cls()
        for path in paths:
            for record in json.loads(Path(path).read_text(encoding="utf-8")):
                rr = record.get("requested_rewrite") or {}
                rel, prompt = rr.get("relation_id"), rr.get("prompt")
                if not rel:
                    continue
                if record.get("case_id") is not None:
                    table.by_case[int(record["case_id"])] = str(rel)
                if prompt:
                    table.by_template.setdefault(str(prompt), set()).add(str(rel))
        return table

    def relation(self, case_id: int | None, prompt: str, subject: str | None) -> str | None:
        """The relation a case's prompt asks (None when neither its id nor its template says)."""
        if case_id is not None and case_id in self.by_case:
            return self.by_case[case_id]
        tmpl = template_of(prompt, subject)
        if tmpl is None:
            return None
        rels = self.by_template.get(tmpl)
        return "|".join(sorted(rels)) if rels else f"tmpl:{tmpl}"

    def case_relations(self, cases: Sequence[EditCase]) -> list[str | None]:
        """Each case's relation: its ``metadata["relation_id"]`` if set, else :meth:`relation` (its ``case_id`` read
        as an int when it is one)."""
        out: list[str | None] = []
        for c in cases:
            if c.metadata.get("relation_id"):  # ROME-format CounterFact carries it
                out.append(str(c.metadata["relation_id"]))
                continue
            try:
                cid = int(c.case_id) if c.case_id is not None else None
            except (TypeError, ValueError):
                cid = None
            out.append(self.relation(cid, c.prompt, c.subject))
        return out


def same_relation(a: str | None, b: str | None) -> bool:
    """Whether two relations (as :meth:`RelationTable.relation` gives them) may be the same: they share an id."""
    if a is None or b is None:
        return False
    return a == b or bool(set(a.split("|")) & set(b.split("|")))


def rome_files(data_dir: str | Path) -> list[Path]:
    """The ROME-format CounterFact files under ``data_dir`` (``counterfact/rome_format/*.json``)."""
    return sorted((Path(data_dir) / "counterfact" / "rome_format").glob("*.json"))


def case_relations_for(cases: Sequence[EditCase], data_path: str | Path,
                       rome_dir: str | Path | None = None) -> list[str | None] | None:
    """Relations of ``cases`` read from ``data_path``: from the ROME-format files in ``rome_dir`` (default: a
    ``rome_format`` folder beside the data file's folder) and the cases' own ``relation_id`` metadata; None when no
    case has a relation (zsRE: its locality prompts are unrelated questions, so strict labels are right for it)."""
    folder = Path(rome_dir) if rome_dir is not None else Path(data_path).resolve().parent.parent / "rome_format"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    relations = RelationTable.from_rome_files(files).case_relations(cases)
    return relations if any(r is not None for r in relations) else None
