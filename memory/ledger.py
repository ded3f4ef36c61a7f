"""The weight-record ledger: the edited models a store keeps weight edits for, and every weight edit applied to them.

The store keeps weight edits as opaque blobs with their metadata (tables ``editmem_weight_*``, see memory/schema.py);
``editors.weights`` does the torch side. A :class:`WeightLedger` belongs to one :class:`memory.store.EditMemory` and
writes through the store's transactions, so a weight write bumps the change counter like any other write and a
record can only name edit versions that are current when it is written. ``EditMemory`` exposes every method here
under the same name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import CursorResult, Row

from memory.errors import NotFoundError, StoreError, ValidationError
from memory.schema import CURRENT, aware, chunks, edits, weight_bases, weight_links, weight_models, weight_records
from memory.validate import check_id

if TYPE_CHECKING:
    from memory.store import EditMemory


@dataclass(frozen=True)
class WeightModel:
    """An edited model the store keeps weight records for: its base model's fingerprint, the base model as the user
    named it (an alias or a folder), and the folder the edited model is saved in (None if it is kept nowhere)."""

    id: int
    fingerprint: str
    base: str
    folder: str | None
    created_at: datetime | None = None


@dataclass(frozen=True)
class WeightRecord:
    """One weight edit applied to a :class:`WeightModel`: which edit versions it wrote, by which method and settings,
    and which parameters it touched. ``applied`` is false once it has been removed (``note`` says why). The deltas
    themselves are an opaque blob (:meth:`WeightLedger.weight_deltas`)."""

    id: int
    model_id: int
    method: str
    edits: tuple[tuple[int, int], ...]  # (edit id, version)
    params: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    applied: bool = True
    created_at: datetime | None = None
    removed_at: datetime | None = None
    note: str | None = None

    @property
    def edit_ids(self) -> tuple[int, ...]:
        return tuple(e for e, _ in self.edits)


def _new_id(result: CursorResult) -> int:
    """The primary key of the row an INSERT just wrote."""
    key = result.inserted_primary_key
    if key is None:
        raise StoreError("the database returned no id for the inserted row")
    return int(key[0])


def _weight_model(row: Row) -> WeightModel:
    m = row._mapping
    return WeightModel(id=int(m["model_id"]), fingerprint=m["fingerprint"], base=m["base"], folder=m["folder"],
                       created_at=aware(m["created_at"]))


def _weight_record(row: Row, links: Sequence[tuple[int, int]]) -> WeightRecord:
    m = row._mapping
    return WeightRecord(id=int(m["record_id"]), model_id=int(m["model_id"]), method=m["method"],
                        edits=tuple(links), params=tuple(json.loads(m["params"])),
                        settings=json.loads(m["settings"]), applied=bool(m["applied"]),
                        created_at=aware(m["created_at"]), removed_at=aware(m["removed_at"]), note=m["note"])


_RECORD_COLUMNS = [c for c in weight_records.c if c.name not in ("deltas", "editor_state")]


class WeightLedger:
    """The weight records of one store (see the module docstring)."""

    def __init__(self, store: EditMemory):
        self._store = store

    def add_weight_model(self, fingerprint: str, base: str, folder: str | None = None) -> WeightModel:
        """Register an edited model (see :class:`WeightModel`). A folder can belong to one model only."""
        for name, value in (("fingerprint", fingerprint), ("base", base)):
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(f"{name} must be a non-empty string, got {value!r}")
        if folder is not None and (not isinstance(folder, str) or not folder.strip()):
            raise ValidationError(f"folder must be a non-empty string or None, got {folder!r}")
        with self._store._write() as tx:
            if folder is not None and tx.conn.execute(
                    select(weight_models.c.model_id).where(weight_models.c.folder == folder)).first() is not None:
                raise ValidationError(f"folder {folder} already holds a model with weight edits in this store")
            model_id = _new_id(tx.conn.execute(insert(weight_models).values(
                fingerprint=fingerprint, base=base, folder=folder, created_at=tx.now)))
        return WeightModel(int(model_id), fingerprint, base, folder, tx.now)

    def weight_models(self, *, folder: str | None = None) -> list[WeightModel]:
        """The registered edited models (the one saved in ``folder``, if given), oldest first."""
        query = select(weight_models).order_by(weight_models.c.model_id)
        if folder is not None:
            query = query.where(weight_models.c.folder == folder)
        with self._store._read() as conn:
            return [_weight_model(r) for r in conn.execute(query)]

    def get_weight_model(self, model_id: int) -> WeightModel:
        model_id = check_id(model_id, "model id")
        with self._store._read() as conn:
            row = conn.execute(select(weight_models).where(weight_models.c.model_id == model_id)).first()
        if row is None:
            raise NotFoundError(f"no model with weight edits has id {model_id}")
        return _weight_model(row)

    def attach_weights(self, model_id: int, method: str, edits_: Sequence[tuple[int, int]], params: Sequence[str],
                       deltas: bytes, *, bases: Mapping[str, bytes] | None = None,
                       settings: Mapping[str, Any] | None = None, editor_state: bytes | None = None) -> WeightRecord:
        """Record a weight edit of model ``model_id`` that wrote the edit versions ``edits_`` ((id, version) pairs,
        each the current version of a live edit): the touched ``params``, an opaque ``deltas`` blob, and the base
        value blob of each touched parameter the model has no base value for yet (``bases``; ones already stored are
        kept); ``editor_state``, an opaque blob the editor reads back later (:meth:`weight_editor_state`). One
        transaction: all or nothing."""
        model = self.get_weight_model(model_id)
        if not isinstance(method, str) or not method.strip():
            raise ValidationError(f"method must be a non-empty string, got {method!r}")
        pairs = [(check_id(e, "edit id"), check_id(v, "version")) for e, v in edits_]
        if not pairs or len({e for e, _ in pairs}) != len(pairs):
            raise ValidationError("a weight record needs at least one edit, each at most once")
        params = [str(p) for p in params]
        if len(set(params)) != len(params):  # none: a record that changes no parameter (a GRACE adaptor insert)
            raise ValidationError("a weight record names each parameter at most once")
        for name, blob in (("deltas", deltas), ("editor_state", b"" if editor_state is None else editor_state)):
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                raise ValidationError(f"{name} must be bytes, got {type(blob).__name__}")
        try:
            settings_json = json.dumps(dict(settings or {}), sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ValidationError(f"settings must be JSON-serialisable: {err}") from None
        with self._store._write() as tx:
            for edit_id, version in pairs:
                current = self._store._live_row(edit_id, tx.conn)
                if current.version != version:
                    raise ValidationError(f"edit {edit_id} is at version {current.version}, not {version}")
            have = set(tx.conn.execute(select(weight_bases.c.param).where(
                weight_bases.c.model_id == model.id, weight_bases.c.param.in_(params))).scalars())
            missing = [p for p in params if p not in have]
            given = bases or {}
            lacking = [p for p in missing if p not in given]
            if lacking:
                raise ValidationError(f"no base value given for parameter(s) {lacking} of model {model.id}")
            if missing:
                tx.conn.execute(insert(weight_bases), [{"model_id": model.id, "param": p, "value": bytes(given[p])}
                                                       for p in missing])
            record_id = _new_id(tx.conn.execute(insert(weight_records).values(
                model_id=model.id, method=method, settings=settings_json, params=json.dumps(params),
                deltas=bytes(deltas), applied=True, created_at=tx.now, removed_at=None, note=None,
                editor_state=None if editor_state is None else bytes(editor_state))))
            tx.conn.execute(insert(weight_links), [{"record_id": record_id, "edit_id": e, "version": v}
                                                   for e, v in pairs])
        return WeightRecord(record_id, model.id, method, tuple(pairs), tuple(params), json.loads(settings_json),
                            True, tx.now)

    def weight_records(self, *, model_id: int | None = None, edit_id: int | None = None,
                       applied: bool | None = True) -> list[WeightRecord]:
        """Weight records in the order they were applied: of one model, linked to one edit, applied (default),
        removed (``applied=False``) or both (``None``)."""
        query = select(*_RECORD_COLUMNS).order_by(weight_records.c.record_id)
        if model_id is not None:
            query = query.where(weight_records.c.model_id == check_id(model_id, "model id"))
        if applied is not None:
            query = query.where(weight_records.c.applied.is_(bool(applied)))
        if edit_id is not None:
            query = query.where(weight_records.c.record_id.in_(
                select(weight_links.c.record_id).where(weight_links.c.edit_id == check_id(edit_id))))
        with self._store._read() as conn:
            rows = conn.execute(query).all()
            links: dict[int, list[tuple[int, int]]] = {}
            for chunk in chunks([int(r.record_id) for r in rows]):
                for rid, e, v in conn.execute(select(weight_links.c.record_id, weight_links.c.edit_id,
                                                     weight_links.c.version).where(
                        weight_links.c.record_id.in_(chunk)).order_by(weight_links.c.edit_id)):
                    links.setdefault(int(rid), []).append((int(e), int(v)))
        return [_weight_record(r, links.get(int(r.record_id), [])) for r in rows]

    def held_versions(self, model_id: int) -> set[tuple[int, int]]:
        """The ``(edit id, version)`` pairs that model ``model_id``'s applied weight records wrote: what its weights
        hold (an edit whose current version is among them answers from the weights)."""
        query = (select(weight_links.c.edit_id, weight_links.c.version)
                 .join(weight_records, weight_records.c.record_id == weight_links.c.record_id)
                 .where(weight_records.c.model_id == check_id(model_id, "model id"),
                        weight_records.c.applied.is_(True)))
        with self._store._read() as conn:
            return {(int(e), int(v)) for e, v in conn.execute(query)}

    def weight_deltas(self, record_id: int) -> bytes:
        """The deltas blob of a weight record."""
        blob = self._blob(record_id, weight_records.c.deltas)
        if blob is None:  # the column is NOT NULL: only a damaged store gets here
            raise StoreError(f"weight record {record_id} has no deltas")
        return blob

    def weight_editor_state(self, record_id: int) -> bytes | None:
        """The editor state blob of a weight record (None when its editor kept none)."""
        return self._blob(record_id, weight_records.c.editor_state)

    def _blob(self, record_id: int, column: Any) -> bytes | None:
        """One blob column of a weight record; NotFoundError if there is no such record."""
        record_id = check_id(record_id, "record id")
        with self._store._read() as conn:
            row = conn.execute(select(column).where(weight_records.c.record_id == record_id)).first()
        if row is None:
            raise NotFoundError(f"no weight record {record_id}")
        return None if row[0] is None else bytes(row[0])

    def weight_bases(self, model_id: int, params: Sequence[str] | None = None) -> dict[str, bytes]:
        """The stored base value blobs of a model's touched parameters (those in ``params``, if given)."""
        query = select(weight_bases.c.param, weight_bases.c.value).where(
            weight_bases.c.model_id == check_id(model_id, "model id"))
        out: dict[str, bytes] = {}
        with self._store._read() as conn:
            if params is None:
                out.update((p, bytes(v)) for p, v in conn.execute(query))
            else:
                for chunk in chunks(list(params)):
                    out.update((p, bytes(v)) for p, v in conn.execute(query.where(weight_bases.c.param.in_(chunk))))
        return out

    def weight_base_params(self, model_id: int) -> list[str]:
        """The names of a model's touched parameters (those with a stored base value), sorted; no blobs are read."""
        query = select(weight_bases.c.param).where(weight_bases.c.model_id == check_id(model_id, "model id"))
        with self._store._read() as conn:
            return sorted(conn.execute(query).scalars())

    def detach_weights(self, record_id: int, note: str | None = None) -> WeightRecord:
        """Mark a weight record as removed (it stays in the table with ``note``); the caller restores the weights."""
        record_id = check_id(record_id, "record id")
        with self._store._write() as tx:
            done = tx.conn.execute(update(weight_records).where(
                weight_records.c.record_id == record_id, weight_records.c.applied.is_(True)).values(
                applied=False, removed_at=tx.now, note=note))
            if done.rowcount != 1:
                exists = tx.conn.execute(select(weight_records.c.record_id).where(
                    weight_records.c.record_id == record_id)).first()
                raise NotFoundError(f"weight record {record_id} is already removed" if exists
                                    else f"no weight record {record_id}")
        return self.weight_record(record_id)

    def weight_record(self, record_id: int) -> WeightRecord:
        """One weight record by id, applied or removed."""
        record_id = check_id(record_id, "record id")
        with self._store._read() as conn:
            row = conn.execute(select(*_RECORD_COLUMNS).where(weight_records.c.record_id == record_id)).first()
            if row is None:
                raise NotFoundError(f"no weight record {record_id}")
            links = [(int(e), int(v)) for e, v in conn.execute(select(weight_links.c.edit_id, weight_links.c.version)
                     .where(weight_links.c.record_id == record_id).order_by(weight_links.c.edit_id))]
        return _weight_record(row, links)

    def consolidated(self) -> dict[int, list[WeightRecord]]:
        """Edit id -> the applied weight records that wrote its current version (edits with none are left out)."""
        with self._store._read() as conn:
            current = {int(e): int(v) for e, v in conn.execute(select(edits.c.edit_id, edits.c.version).where(
                CURRENT, edits.c.edit_id.in_(select(weight_links.c.edit_id))))}
        out: dict[int, list[WeightRecord]] = {}
        for record in self.weight_records(applied=True):
            for edit_id, version in record.edits:
                if current.get(edit_id) == version:
                    out.setdefault(edit_id, []).append(record)
        return out
