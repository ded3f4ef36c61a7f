"""Plain data types shared by every layer, one family for one fact: the edit request an editor applies, the
normalised edit case a dataset gives (with its probes), the stored edit record (a version), and a search hit. A case
and a record each give their request with ``.request()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from memory.errors import ValidationError


@dataclass(frozen=True)
class EditRequest:
    """One requested edit: after it, ``prompt`` should be completed by ``target_new``."""

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValidationError("an edit request needs a non-empty prompt")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise ValidationError(f"the edit request for {self.prompt!r} needs a non-empty target_new")
        if self.subject is not None and self.subject not in self.prompt:
            raise ValidationError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")



@dataclass(frozen=True)
class Probe:
    """A (prompt, answer) pair used to test locality or portability. ``aliases`` holds other accepted answers."""

    prompt: str
    answer: str
    kind: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditCase:
    """One edit as every data source is normalised to it (zsRE, CounterFact, KnowEdit, MQuAKE, the store's JSONL).

    ``prompt`` never contains a ``{}`` template: the subject is already filled in. ``memory.formats`` documents how
    each source maps onto these fields.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    case_id: str | None = None
    source: str | None = None
    # Free-form provenance carried through the store (relation ids, MQuAKE grouping, a stored edit's own metadata).
    # Left out of the hash so an EditCase stays hashable; it still takes part in ==.
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)

    def request(self) -> EditRequest:
        """The edit this case asks for."""
        return EditRequest(self.prompt, self.target_new, subject=self.subject, ground_truth=self.ground_truth)


@dataclass(frozen=True)
class EditRecord:
    """One version of one stored edit. ``id`` is stable across versions; ``version`` counts from 1."""

    id: int
    version: int
    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False
    valid_from: datetime | None = None
    valid_to: datetime | None = None

    @property
    def is_current(self) -> bool:
        return self.valid_to is None and not self.deleted

    def request(self) -> EditRequest:
        """The edit this version asks for (what a weight editor writes for it)."""
        return EditRequest(self.prompt, self.target_new, subject=self.subject, ground_truth=self.ground_truth)


@dataclass(frozen=True)
class Hit:
    """A search result: the current record and its similarity (cosine, higher is closer)."""

    edit: EditRecord
    score: float
