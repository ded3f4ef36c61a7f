"""The store's own JSONL: EditRecord lines out (:func:`write_jsonl`) and back in (:func:`read_records`, and the
``editmem`` parser), and the EditCase <-> record metadata mapping (:func:`case_to_metadata`, :func:`case_from_record`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from memory.errors import FormatError, ValidationError
from memory.formats.reading import _MISSING, _error, _load, _obj, _opt, _Rec, _req, _Source, _texts, _typename
from memory.records import EditCase, EditRecord, Probe

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# The store's own JSONL


_CASE_KEYS = ("case_id", "source", "locality", "portability")  # metadata keys that hold EditCase fields


def _probe_to_json(probe: Probe) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": probe.prompt, "answer": probe.answer}
    if probe.kind:
        out["kind"] = probe.kind
    if probe.aliases:
        out["aliases"] = list(probe.aliases)
    return out


def case_to_metadata(case: EditCase) -> dict[str, Any]:
    """The metadata a stored edit should carry so that exporting and importing it gives ``case`` back.

    ``case.metadata`` plus the case's case_id, source, locality and portability (the latter as lists of
    {prompt, answer, kind?, aliases?}); empty or None fields are left out.
    """
    clash = [k for k in _CASE_KEYS if k in case.metadata]
    if clash:
        raise ValidationError(f"metadata key(s) {clash} are reserved for the EditCase fields of the same name")
    meta = dict(case.metadata)
    if case.case_id is not None:
        meta["case_id"] = case.case_id
    if case.source is not None:
        meta["source"] = case.source
    if case.locality:
        meta["locality"] = [_probe_to_json(p) for p in case.locality]
    if case.portability:
        meta["portability"] = [_probe_to_json(p) for p in case.portability]
    return meta


def _probes_from_json(rec: _Rec, value: Any, field: str) -> tuple[Probe, ...]:
    if not isinstance(value, list):
        raise rec.fail(field, f"expected an array of probes, got {_typename(value)}")
    out = []
    for i, item in enumerate(value):
        f = f"{field}[{i}]"
        item = _obj(rec, item, f)
        kind = item.get("kind", "")
        if not isinstance(kind, str):
            raise rec.fail(f"{f}.kind", f"expected a string, got {_typename(kind)}")
        out.append(Probe(_req(rec, item, "prompt", f"{f}.prompt"), _req(rec, item, "answer", f"{f}.answer"), kind,
                         tuple(_texts(rec, item, "aliases", f"{f}.aliases"))))
    return tuple(out)


def _case_from_record(record: EditRecord, rec: _Rec) -> EditCase:
    meta = dict(record.metadata)
    case_id = meta.pop("case_id", None)
    source = meta.pop("source", None)
    if case_id is not None and (isinstance(case_id, bool) or not isinstance(case_id, (str, int))):
        raise rec.fail("metadata.case_id", f"expected a string, got {_typename(case_id)}")
    if source is not None and not isinstance(source, str):
        raise rec.fail("metadata.source", f"expected a string, got {_typename(source)}")
    locality = _probes_from_json(rec, meta.pop("locality", []), "metadata.locality")
    portability = _probes_from_json(rec, meta.pop("portability", []), "metadata.portability")
    return EditCase(record.prompt, record.target_new, record.subject, record.ground_truth, record.rephrases, locality,
                    portability, str(record.id) if case_id is None else str(case_id), source or "editmem", meta)


def case_from_record(record: EditRecord) -> EditCase:
    """The EditCase a stored edit stands for: the inverse of :func:`case_to_metadata` (ValidationError if its
    metadata holds malformed locality/portability)."""
    src = _Source(f"edit {record.id} version {record.version}", None)
    try:
        return _case_from_record(record, _Rec(src, None, None, None))
    except FormatError as e:
        raise ValidationError(str(e)) from None


def _datetime(rec: _Rec, r: dict, key: str) -> datetime | None:
    value = r.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise rec.fail(key, f"expected an ISO 8601 string or null, got {_typename(value)}")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise rec.fail(key, f"not an ISO 8601 date-time: {value!r}") from None


def _int(rec: _Rec, r: dict, key: str, minimum: int) -> int:
    value = r.get(key, _MISSING)
    if value is _MISSING:
        raise rec.fail(key, "missing required field")
    if isinstance(value, bool) or not isinstance(value, int):
        raise rec.fail(key, f"expected an integer, got {_typename(value)}")
    if value < minimum:
        raise rec.fail(key, f"must be at least {minimum}, got {value}")
    return value


def _record(rec: _Rec, r: dict) -> EditRecord:
    deleted = r.get("deleted", False)
    if not isinstance(deleted, bool):
        raise rec.fail("deleted", f"expected true or false, got {_typename(deleted)}")
    metadata = r.get("metadata")
    metadata = {} if metadata is None else _obj(rec, metadata, "metadata")
    return EditRecord(
        id=_int(rec, r, "id", 0), version=_int(rec, r, "version", 1),
        prompt=_req(rec, r, "prompt", target=True), target_new=_req(rec, r, "target_new", target=True),
        subject=_opt(rec, r, "subject"), ground_truth=_opt(rec, r, "ground_truth"),
        rephrases=tuple(_texts(rec, r, "rephrases")), metadata=metadata, deleted=deleted,
        valid_from=_datetime(rec, r, "valid_from"), valid_to=_datetime(rec, r, "valid_to"))


def _records(src: _Source) -> list[EditRecord]:
    out: list[EditRecord] = []
    seen: dict[tuple[int, int], _Rec] = {}
    current: dict[int, _Rec] = {}
    for i, r in enumerate(src.records()):
        rec = src.rec(i)
        record = _record(rec, _obj(rec, r, None))  # no skipping: an export is the store's own and must be whole
        key = (record.id, record.version)
        if key in seen:
            raise rec.fail("version", f"id {record.id} version {record.version} appears twice (first at "
                                      f"{_where(seen[key])})")
        seen[key] = rec
        if record.is_current:
            if record.id in current:
                raise rec.fail("valid_to", f"id {record.id} has two current versions (the other at "
                                           f"{_where(current[record.id])})")
            current[record.id] = rec
        out.append(record)
    return out


def _where(rec: _Rec) -> str:
    return f"line {rec.line}" if rec.line is not None else f"record {rec.index}"


def _parse_editmem(src: _Source) -> list[EditCase]:
    if src.skip_incomplete:
        log.info("%s: skip_incomplete does not apply to the store's own export; every record must be whole", src.path)
        src.skip_incomplete = False
    records = _records(src)
    out = []
    for i, record in enumerate(records):
        if record.is_current:
            out.append(_case_from_record(record, src.rec(i)))
    if len(out) < len(records):
        log.info("%s: imported the %d current version(s); %d superseded or deleted version(s) left out", src.path,
                 len(out), len(records) - len(out))
    return out


def read_records(path: str | os.PathLike) -> list[EditRecord]:
    """Every line of a store export (:func:`write_jsonl`) as an EditRecord, history and tombstones included."""
    return _records(_load(path))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def record_to_json(record: EditRecord) -> dict[str, Any]:
    """One export line: the EditRecord's fields, tuples as lists and datetimes as ISO 8601 strings."""
    return {
        "id": record.id, "version": record.version, "prompt": record.prompt, "target_new": record.target_new,
        "subject": record.subject, "ground_truth": record.ground_truth, "rephrases": list(record.rephrases),
        "metadata": dict(record.metadata), "deleted": record.deleted, "valid_from": _iso(record.valid_from),
        "valid_to": _iso(record.valid_to),
    }


def write_jsonl(records: Iterable[EditRecord], path: str | os.PathLike) -> int:
    """Write records as JSON Lines, atomically: a temporary file beside ``path``, then os.replace. Returns the count.

    If anything fails (a record whose metadata is not JSON, a full disk) the temporary file is removed and ``path``
    is left as it was.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise _error(str(path), "the directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                try:
                    line = json.dumps(record_to_json(record), ensure_ascii=False, allow_nan=False)
                except (TypeError, ValueError) as e:
                    raise _error(str(path), f"edit {record.id} version {record.version} cannot be written as JSON: "
                                            f"{e}", field="metadata") from None
                f.write(line)
                f.write("\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return count
