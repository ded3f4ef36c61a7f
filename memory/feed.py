"""The store's change feed, read from the change log (memory/schema.py): the change number a store stands at, the
changes after a number, and how far this process's index is behind. Kept beside ``EditMemory`` rather than inside
it: it only reads the tables the store writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from memory.errors import ValidationError
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
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValidationError(f"{name} must be an integer >= {low}, got {value!r}")
    query = (select(changes.c.seq, changes.c.op, edits.c.edit_id, edits.c.version, edits.c.deleted)
             .join(edits, edits.c.row_id == changes.c.row_id)
             .where(changes.c.seq > since).order_by(changes.c.seq, changes.c.row_id).limit(limit))
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
    with memory._lock:
        memory._sync()
        return int(memory._vector_index().seq)
