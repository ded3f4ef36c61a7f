"""The store's change feed, read from the change log (memory/schema.py): the change number a store stands at, the
changes after a number, the edits live at an earlier change number or time, and how far this process's index is
behind. Kept beside ``EditMemory`` rather than inside
it: it only reads the tables the store writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from memory.checks import is_int
from memory.errors import ValidationError
from memory.records import EditRecord
from memory.schema import OP_ADD, changes, edits, meta


@dataclass(frozen=True)
class Change:
    """One change-log entry: after change ``seq``, version ``version`` of edit ``edit_id`` became searchable (``add``)
    or stopped being so (``del``)."""

    seq: int
    op: str
    edit_id: int
    version: int
    deleted: bool

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "op": "add" if self.op == OP_ADD else "del", "edit_id": self.edit_id,
                "version": self.version, "deleted": self.deleted}


def change_number(memory: Any) -> int:
    """The store's change counter: bumped by every write transaction, by any process."""
    with memory._read() as conn:
        return int(conn.execute(select(meta.c.change_seq).where(meta.c.id == 1)).scalar_one())


def changes_since(memory: Any, since: int = 0, limit: int = 1000) -> list[Change]:
    """The change-log entries with a change number above ``since``, oldest first, at most ``limit``."""
    for name, value, low in (("since", since, 0), ("limit", limit, 1)):
        if not is_int(value) or value < low:
            raise ValidationError(f"{name} must be an integer >= {low}, got {value!r}")
    query = (select(changes.c.seq, changes.c.op, edits.c.edit_id, edits.c.version, edits.c.deleted)
             .join(edits, edits.c.row_id == changes.c.row_id)
             .where(changes.c.seq > since, changes.c.namespace == memory.namespace)
             .order_by(changes.c.seq, changes.c.row_id).limit(limit))
    with memory._read() as conn:
        return [Change(int(s), str(op), int(e), int(v), bool(d)) for s, op, e, v, d in conn.execute(query)]


def index_lag(memory: Any) -> int:
    """How many changes this process's vector index is behind the store (0 once it has caught up; the index catches
    up by itself before every search)."""
    index = memory._index
    seq = change_number(memory)
    return seq if index is None else max(0, seq - int(index.seq))


def catch_up(memory: Any) -> int:
    """Bring this process's index up to the store's change counter now (rather than before the next search) and
    return the change number it reflects."""
    sync = memory._index_sync
    with sync.lock:
        sync.catch_up()
        return int(sync.index.seq)


def records_at(memory: Any, change: int | None = None, when: datetime | None = None) -> list[EditRecord]:
    """The edits that were live (searchable) when the store stood at change number ``change``, or at time ``when``
    (timezone-aware), ordered by id: nothing is overwritten, so any earlier state can be read back."""
    from memory.store import _record

    if (change is None) == (when is None):
        raise ValidationError("give one of change or when")
    if change is not None:
        if isinstance(change, bool) or not isinstance(change, int) or change < 0:
            raise ValidationError(f"as_of must be a change number >= 0 or an ISO time, got {change!r}")
        added = select(changes.c.row_id).where(changes.c.op == OP_ADD, changes.c.seq <= change)
        removed = select(changes.c.row_id).where(changes.c.op != OP_ADD, changes.c.seq <= change)
        query = select(edits).where(edits.c.row_id.in_(added), edits.c.row_id.not_in(removed),
                                    edits.c.namespace == memory.namespace)
    else:
        assert when is not None
        if when.tzinfo is None:
            raise ValidationError("as_of times need a timezone (e.g. 2026-01-01T12:00:00Z)")
        query = select(edits).where(edits.c.namespace == memory.namespace, edits.c.valid_from <= when,
                                    edits.c.deleted.is_(False),
                                    (edits.c.valid_to.is_(None)) | (edits.c.valid_to > when))
    with memory._read() as conn:
        return [_record(r) for r in conn.execute(query.order_by(edits.c.edit_id))]


def parse_as_of(value: int | str) -> tuple[int | None, datetime | None]:
    """An ``as_of`` value as (change number, None) or (None, time): an integer, or an ISO 8601 time with a zone."""
    if isinstance(value, bool):
        raise ValidationError(f"as_of must be a change number or an ISO time, got {value!r}")
    if isinstance(value, int):
        return value, None
    text = str(value).strip()
    if text.isdigit():
        return int(text), None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"as_of must be a change number or an ISO time, got {value!r}") from None
    if when.tzinfo is None:
        raise ValidationError("as_of times need a timezone (e.g. 2026-01-01T12:00:00Z)")
    return None, when
