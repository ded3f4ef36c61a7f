"""Validation of an edit's fields: what the store's writes and its import accept, and the content key.

:func:`edit_fields` checks the keyword arguments of ``EditMemory.add``; :func:`fields_of` does the same for an
EditCase, an EditRecord or a dict. A bad field raises :class:`InvalidField`, which the store turns into
ValidationError and its import into FormatError (with the record number).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, overload

import numpy as np

from memory.errors import ValidationError
from memory.records import EditCase, EditRecord

UPDATABLE = ("prompt", "target_new", "subject", "ground_truth", "rephrases", "metadata")
MAX_ID = 2**63 - 1  # SQL BIGINT: the largest id or version either backend can hold


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text on both backends (a NUL byte, which PostgreSQL refuses; a lone
    surrogate, i.e. invalid UTF-8 such as a stray byte in a shell argument), or None if it can."""
    if "\x00" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"is not valid UTF-8 (character {err.start}: a stray byte or lone surrogate)"
    return None


class InvalidField(Exception):
    """A bad field: converted to ValidationError by the API and to FormatError (with record number) by import."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class EditFields:
    """The content of one edit version, validated."""

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def content_key(self) -> str:
        # computed once per instance (import asks for it several times per edit: a sha256 over JSON each time was
        # a quarter of import's own cost); cached_property writes the instance dict, so the frozen class allows it
        return content_key(self.prompt, self.target_new, self.subject)

    def same_as(self, other: EditFields) -> bool:
        return (self.prompt, self.target_new, self.subject, self.ground_truth, self.rephrases) == \
            (other.prompt, other.target_new, other.subject, other.ground_truth, other.rephrases) and \
            dict(self.metadata) == dict(other.metadata)


def content_key(prompt: str, target_new: str, subject: str | None) -> str:
    """sha256 of (prompt, target_new, subject): the key import uses to skip edits the store already holds."""
    return hashlib.sha256(json.dumps([prompt, target_new, subject], ensure_ascii=False).encode("utf-8")).hexdigest()


@overload
def _text(value: Any, name: str, *, required: Literal[True]) -> str: ...


@overload
def _text(value: Any, name: str, *, required: bool) -> str | None: ...


def _text(value: Any, name: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise InvalidField(name, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidField(name, f"must be a string, got {type(value).__name__}")
    problem = text_problem(value)
    if problem:
        raise InvalidField(name, problem)
    if not value.strip():
        if required:
            raise InvalidField(name, "must not be empty")
        return None
    return value


def _rephrases(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidField("rephrases", f"must be a list of strings, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise InvalidField("rephrases", f"item {i} must be a non-empty string, got {item!r}")
        problem = text_problem(item)
        if problem:
            raise InvalidField("rephrases", f"item {i} {problem}")
        out.append(item)
    return tuple(out)


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidField("metadata", f"must be a mapping with string keys, got {type(value).__name__}")
    try:
        text = json.dumps(dict(value), ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise InvalidField("metadata", f"must be JSON-serialisable: {err}") from None
    problem = text_problem(text)
    if problem:  # JSON escapes a NUL (\u0000), which both backends take; a lone surrogate cannot be encoded
        raise InvalidField("metadata", problem)
    return json.loads(text)


def edit_fields(prompt: Any, target_new: Any, subject: Any = None, ground_truth: Any = None, rephrases: Any = (),
                metadata: Any = None) -> EditFields:
    """The validated fields of one edit, given as ``EditMemory.add`` takes them; InvalidField if one is bad."""
    return EditFields(prompt=_text(prompt, "prompt", required=True),
                      target_new=_text(target_new, "target_new", required=True),
                      subject=_text(subject, "subject", required=False),
                      ground_truth=_text(ground_truth, "ground_truth", required=False),
                      rephrases=_rephrases(rephrases), metadata=_metadata(metadata))


def fields_of(item: Any) -> EditFields:
    """Validated fields of an EditCase, an EditRecord or a dict with the keyword arguments of ``add``."""
    if isinstance(item, EditCase):
        from memory.formats import case_to_metadata  # the one owner of the EditCase <-> metadata mapping

        try:
            metadata = case_to_metadata(item)
        except ValidationError as err:
            raise InvalidField("metadata", str(err)) from None
        return edit_fields(item.prompt, item.target_new, item.subject, item.ground_truth, item.rephrases, metadata)
    if isinstance(item, EditRecord):
        return edit_fields(item.prompt, item.target_new, item.subject, item.ground_truth, item.rephrases, item.metadata)
    if isinstance(item, Mapping):
        unknown = set(item) - set(UPDATABLE)
        if unknown:
            raise InvalidField(sorted(unknown)[0], f"unknown field (known: {', '.join(UPDATABLE)})")
        return edit_fields(**{k: item[k] for k in UPDATABLE if k in item})
    raise InvalidField("item", f"must be an EditCase or a dict, got {type(item).__name__}")


def check_id(edit_id: Any, name: str = "id") -> int:
    """``edit_id`` as an int; ValidationError (naming it ``name``) unless it is an integer (a bool is not)."""
    if isinstance(edit_id, bool) or not isinstance(edit_id, (int, np.integer)):
        raise ValidationError(f"{name} must be an integer, got {edit_id!r}")
    if not -MAX_ID <= int(edit_id) <= MAX_ID:
        raise ValidationError(f"{name} {edit_id} is out of range (at most {MAX_ID})")
    return int(edit_id)

