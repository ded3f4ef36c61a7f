"""The reading machinery the format parsers share: loading a file (JSON or JSON Lines), locating each record for error
messages, checking fields, and running a parser over every record. Every problem is a FormatError naming the file, the
record and the field. The names keep their leading underscore: they are internal to :mod:`memory.formats`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory.errors import FormatError
from memory.records import EditCase, Probe

log = logging.getLogger(__name__)

_MISSING = object()



# --------------------------------------------------------------------------------------------------------------------
# Errors and the loaded file


def _error(path: str, message: str, *, index: int | None = None, line: int | None = None, label: str | None = None,
           field: str | None = None) -> FormatError:
    """A FormatError whose location reads "file, line 7" (JSONL) or "file, record 6 (0-based)" (JSON)."""
    return FormatError(path, message, record=index, line=line, label=label, field=field)


_SKIP_HINT = " (--skip-incomplete, or skip_incomplete=True in the API, leaves such records out)"


class _Skip(Exception):
    """A record with an empty prompt or target, left out when skip_incomplete is set."""

    def __init__(self, err: FormatError):
        super().__init__(str(err))
        self.err = err


@dataclass
class _Source:
    """One loaded file: the parsed top-level value and, for JSONL, the line each record came from."""

    path: str
    data: Any
    lines: list[int] | None = None
    skip_incomplete: bool = False
    dropped_answers: int = 0

    def records(self) -> list[Any]:
        if isinstance(self.data, list):
            return self.data
        raise _error(self.path, f"expected a JSON array of records (or JSON Lines), found a JSON "
                                f"{_typename(self.data)}")

    def rec(self, index: int, label: str | None = None) -> _Rec:
        return _Rec(self, index, None if self.lines is None else self.lines[index], label)


class _Rec:
    """Where one record is, for error messages."""

    __slots__ = ("index", "label", "line", "src")

    def __init__(self, src: _Source, index: int | None, line: int | None, label: str | None):
        self.src, self.index, self.line, self.label = src, index, line, label

    def fail(self, field: str | None, message: str) -> FormatError:
        return _error(self.src.path, message, index=self.index, line=self.line, label=self.label, field=field)


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


def _load(path: str | os.PathLike, skip_incomplete: bool = False) -> _Source:
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise _error(name, "no such file")
    if not p.is_file():
        raise _error(name, "not a regular file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise _error(name, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _error(name, f"not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        return _Source(name, [], [], skip_incomplete)
    start = text.lstrip()[0]
    if start not in "[{":
        raise _error(name, f"not a JSON or JSON Lines file (the text starts with {start!r}, not '[' or '{{')")
    if p.suffix.lower() != ".jsonl":
        try:
            return _Source(name, json.loads(text), None, skip_incomplete)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise _error(name, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
            # one complete value followed by more: JSON Lines
    return _load_jsonl(name, text, skip_incomplete)


def _load_jsonl(name: str, text: str, skip_incomplete: bool) -> _Source:
    records: list[Any] = []
    lines: list[int] = []
    # split on "\n" only: json.dumps(ensure_ascii=False) writes U+2028 and friends raw; str.splitlines cuts there
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise _error(name, f"invalid JSON (column {e.colno}): {e.msg}", line=lineno) from None
        lines.append(lineno)
    return _Source(name, records, lines, skip_incomplete)


# --------------------------------------------------------------------------------------------------------------------
# Field readers: each takes the record's location, the containing object, the key and the dotted field name to report


def _obj(rec: _Rec, value: Any, field: str | None) -> dict:
    if not isinstance(value, dict):
        raise rec.fail(field, f"expected a JSON object, got {_typename(value)}")
    return value


def _text(rec: _Rec, value: Any, field: str, *, target: bool = False) -> str:
    """A non-empty string. ``target`` marks a prompt/target that skip_incomplete may skip when empty."""
    if not isinstance(value, str):
        raise rec.fail(field, f"expected a string, got {_typename(value)}")
    if not value.strip():
        err = rec.fail(field, "empty string" + (_SKIP_HINT if target else ""))
        if target and rec.src.skip_incomplete:
            raise _Skip(err)
        raise err
    return value


def _req(rec: _Rec, obj: dict, key: str, field: str | None = None, *, target: bool = False) -> str:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise rec.fail(field or key, "missing required field")
    return _text(rec, value, field or key, target=target)


def _opt(rec: _Rec, obj: dict, key: str, field: str | None = None) -> str | None:
    value = obj.get(key)
    return None if value is None else _text(rec, value, field or key)


def _texts(rec: _Rec, obj: dict, key: str, field: str | None = None, *, required: bool = False) -> list[str]:
    field = field or key
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise rec.fail(field, "missing required field")
        return []
    if not isinstance(value, list):
        raise rec.fail(field, f"expected an array of strings, got {_typename(value)}")
    return [_text(rec, v, f"{field}[{i}]") for i, v in enumerate(value)]


def _answers(rec: _Rec, value: Any, field: str) -> list[str]:
    """KnowEdit answers: a string, a list of strings, or a list of alias lists. Returns the non-empty strings."""
    out: list[str] = []
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise rec.fail(field, f"expected a string or an array of strings, got {_typename(value)}")
    for i, item in enumerate(items):
        group = item if isinstance(item, list) else [item]
        for j, alias in enumerate(group):
            if not isinstance(alias, str):
                where = f"{field}[{i}]" if group is not item else f"{field}[{i}][{j}]"
                raise rec.fail(where, f"expected a string, got {_typename(alias)}")
            if alias.strip() and alias not in out:
                out.append(alias)
    return out


def _case_id(rec: _Rec, obj: dict, key: str = "case_id") -> str:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        return str(rec.index)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise rec.fail(key, f"expected a number or a non-empty string, got {_typename(value)}")
    return str(value)


def _one_hop(rec: _Rec, r: dict, meta: dict) -> list[Probe]:
    """EasyEdit's "One Hop" portability block, shared by zsRE and ROME CounterFact."""
    block = r.get("portability")
    if block is None:
        return []
    block = _obj(rec, block, "portability")
    if not block:
        return []
    probe = Probe(_req(rec, block, "New Question", "portability.New Question"),
                  _req(rec, block, "New Answer", "portability.New Answer"), "one_hop")
    relation = _opt(rec, block, "Recalled Relation", "portability.Recalled Relation")
    if relation is not None:
        meta["recalled_relation"] = relation
    return [probe]


def _fill(rec: _Rec, template: str, subject: str, field: str) -> str:
    if "{}" not in template:
        raise rec.fail(field, f"template {template!r} has no '{{}}' for the subject")
    return template.replace("{}", subject)


# --------------------------------------------------------------------------------------------------------------------
# Running a parser over every record


def _each(src: _Source, parse_one: Callable[[_Rec, dict], list[EditCase]]) -> list[EditCase]:
    out: list[EditCase] = []
    skipped: list[FormatError] = []
    for i, r in enumerate(src.records()):
        rec = src.rec(i)
        try:
            out.extend(parse_one(rec, _obj(rec, r, None)))
        except _Skip as s:
            skipped.append(s.err)
    _report(src, skipped)
    return out


def _report(src: _Source, skipped: list[FormatError]) -> None:
    if skipped:
        log.warning("%s: skipped %d record(s) with an empty prompt or target: %s", src.path, len(skipped),
                    "; ".join(str(e).removeprefix(src.path + ", ").removesuffix(_SKIP_HINT) for e in skipped))
    if src.dropped_answers:
        log.warning("%s: %d answer(s) given as empty in the file were treated as absent (probes without an answer "
                    "dropped, an empty ground_truth read as none)", src.path, src.dropped_answers)
