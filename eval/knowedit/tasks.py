"""KnowEdit's six tasks: where each one's file is under the data folder and how it becomes cases.

Three are fact edits that :func:`memory.formats.read_cases` already reads as :class:`~memory.records.EditCase`
(WikiData_recent, ZsRE, WikiData_counterfact), and Sanitation too (the refusal is the target, the retained questions
are dealt out as locality probes). WikiBio and ConvSent, which the generic ``editmem import`` refuses, are read here:

- **WikiBio** (:func:`load_wikibio`): ``text`` (a Wikipedia passage) is the prompt, ``labels`` (the next sentence, the
  hallucination correction) the target, ``concept`` the subject when it occurs in the text, and
  ``locality.Relation_Specificity`` the locality probes. No portability, no rephrases.
- **ConvSent** (:func:`load_convsent`): one :class:`ConvSentCase` per topic ``ent``, asked as
  ``"What do you think of {ent}?"``. The target sentiment alternates over the file (even records positive, odd
  negative, so a slice has both) and the edit's target is the first response of that sentiment; the case's
  locality is the next record's topic (cyclically) with its first two positive and two negative responses. The
  data has no training split (``blender_train.json`` is missing), so no method here is trained on ConvSent.

Files (the data README describes them): WikiData_recent has only ``recent_train.json`` (its test file is missing,
so the train file stands in), and WikiData_counterfact's test is the reconstructed ``test_cf.reconstructed.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory.errors import ValidationError
from memory.formats import read_cases
from memory.records import EditCase, EditRequest, Probe

TASK_FILES: dict[str, str] = {
    "WikiData_recent": "wiki_recent/recent_train.json",
    "ZsRE": "ZsRE/ZsRE-test-all.json",
    "WikiBio": "WikiBio/wikibio-test-all.json",
    "WikiData_counterfact": "wiki_counterfact/test_cf.reconstructed.json",
    "ConvSent": "ConvSent/blender_test.json",
    "Sanitation": "Sanitation/trivia_qa_test.json",
}
TASKS: tuple[str, ...] = tuple(TASK_FILES)
FACT_TASKS: tuple[str, ...] = ("WikiData_recent", "ZsRE", "WikiData_counterfact")
TASK_NOTES: dict[str, str] = {
    "WikiData_recent": "recent_test.json is missing; recent_train.json stands in",
    "WikiData_counterfact": "test_cf.json reconstructed from the generate-10 release",
    "ConvSent": "no training split (blender_train.json missing): no method is trained on ConvSent",
}


@dataclass(frozen=True)
class ConvSentCase:
    """One ConvSent edit: make the model talk about ``topic`` with ``sentiment`` (``"positive"``/``"negative"``)."""

    topic: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    sentiment: str
    other_topic: str
    other_responses: tuple[str, ...]

    @staticmethod
    def ask(topic: str) -> str:
        return f"What do you think of {topic}?"

    @property
    def prompt(self) -> str:
        return self.ask(self.topic)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.positive if self.sentiment == "positive" else self.negative

    @property
    def opposite(self) -> tuple[str, ...]:
        return self.negative if self.sentiment == "positive" else self.positive

    def request(self) -> EditRequest:
        return EditRequest(self.prompt, self.targets[0], subject=self.topic)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValidationError(f"{path}: cannot read it as JSON ({err})") from None


def _answers(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [a for v in value for a in _answers(v)]
    return []


def load_wikibio(path: str | Path, limit: int | None = None) -> list[EditCase]:
    """WikiBio records as edit cases (see the module docstring)."""
    path = Path(path)
    data = _json(path)
    if not isinstance(data, list):
        raise ValidationError(f"{path}: expected a JSON array of WikiBio records")
    cases = []
    for i, r in enumerate(data[:limit] if limit else data):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k].strip() for k in ("text", "labels")):
            raise ValidationError(f"{path}: record {i} (0-based) needs non-empty 'text' and 'labels'")
        concept = r.get("concept") if isinstance(r.get("concept"), str) and r["concept"] in r["text"] else None
        probes = []
        for item in (r.get("locality") or {}).get("Relation_Specificity") or []:
            answers = _answers(item.get("ground_truth"))
            if isinstance(item.get("prompt"), str) and answers:
                probes.append(Probe(item["prompt"], answers[0], "Relation_Specificity", tuple(answers[1:])))
        cases.append(EditCase(r["text"], r["labels"].strip(), concept, locality=tuple(probes), case_id=str(i),
                              source="wikibio"))
    return cases


def load_convsent(path: str | Path, limit: int | None = None) -> list[ConvSentCase]:
    """ConvSent records as :class:`ConvSentCase` (see the module docstring)."""
    path = Path(path)
    data = _json(path)
    if not isinstance(data, list) or not data:
        raise ValidationError(f"{path}: expected a non-empty JSON array of ConvSent records")
    rows: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    for i, r in enumerate(data):
        pos = [s.strip() for s in r.get("pos", []) if isinstance(s, str) and s.strip()] if isinstance(r, dict) else []
        neg = [s.strip() for s in r.get("neg", []) if isinstance(s, str) and s.strip()] if isinstance(r, dict) else []
        if not isinstance(r, dict) or not isinstance(r.get("ent"), str) or not pos or not neg:
            raise ValidationError(f"{path}: record {i} (0-based) needs 'ent' and non-empty 'pos' and 'neg'")
        rows.append((r["ent"], tuple(pos), tuple(neg)))
    n = len(rows) if not limit else min(limit, len(rows))
    cases = []
    for i in range(n):
        topic, positive, negative = rows[i]
        other, opos, oneg = rows[(i + 1) % len(rows)]
        cases.append(ConvSentCase(topic, positive, negative, "positive" if i % 2 == 0 else "negative", other,
                                  opos[:2] + oneg[:2]))
    return cases


def load_task(task: str, data_dir: str | Path, limit: int | None = None) -> list[Any]:
    """The cases of ``task`` (one of :data:`TASKS`) from the KnowEdit folder ``data_dir``, the first ``limit``."""
    if task not in TASK_FILES:
        raise ValidationError(f"unknown KnowEdit task {task!r}; choose from {', '.join(TASKS)}")
    path = Path(data_dir) / TASK_FILES[task]
    if not path.is_file():
        raise ValidationError(f"{task}: data file {path} is missing")
    if task == "WikiBio":
        return load_wikibio(path, limit)
    if task == "ConvSent":
        return load_convsent(path, limit)
    cases = read_cases(path)
    return cases[:limit] if limit else cases
