"""`EditMemory`: the versioned edit store. SQL (SQLite or PostgreSQL) is the source of truth; a FAISS index over the
prompt embeddings is a cache of it that each process keeps current through the change log (see memory/schema.py).

Writes: every write transaction first bumps the change counter (locking the meta row), then inserts version rows,
their embeddings and change-log entries. After commit the writer applies its own changes to its index; any other
process catches up before its next search by reading the change-log entries after the counter its index reflects.

Index file: beside a SQLite database (``path.db.faiss``); for PostgreSQL in ``$EDITMEM_CACHE`` (default
``~/.cache/editmem``) as ``pg-<store uid>.faiss``, where the uid is a random id written into the store when it is
created; an in-memory SQLite store keeps its index in memory only. The file is written at ``close()``, after a
rebuild, and by ``save_index()``; a file that is behind is caught up from the change log, one that does not match
the store (uid, encoder, dimension) is rebuilt from the embeddings in SQL.

Namespaces: a handle belongs to one namespace (``EditMemory.open(url, namespace=...)``, default ``"default"``). Every
verb reads and writes that namespace only: an id of another namespace's edit is NotFoundError, search never returns
another namespace's edits (each namespace has its own index; other namespaces' files are named
``path.db.ns-<namespace>.faiss``), import skips only what this namespace holds, export writes this namespace.

An ``EditMemory`` may be shared between threads (a lock guards the index) but is meant for one process; several
processes share a store by each opening it.

This module holds the verbs (open, get/list/history, search, add/update/delete/rollback, import/export) and the write
transaction; the rest of the store is split by job: field checks in :mod:`memory.validate`, embeddings and the index's
catch-up in :mod:`memory.sync` (:class:`~memory.sync.IndexSync`), weight records in :mod:`memory.ledger` (whose
methods ``EditMemory`` exposes under the same names), tables and SQL helpers in :mod:`memory.schema`.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import URL, Connection, Engine, Row

from memory import schema
from memory.checks import check_number
from memory.encoder import DEFAULT_ENCODER, Encoder, get_encoder
from memory.errors import FormatError, NotFoundError, StoreError, ValidationError
from memory.fastread import FastReads
from memory.index import KINDS, VectorIndex
from memory.ledger import WeightLedger, WeightModel, WeightRecord
from memory.namespaces import check_namespace
from memory.paths import pg_index_file
from memory.readonly import read_only_engine, refuse_write, wants_read_only
from memory.records import EditCase, EditRecord, Hit
from memory.schema import (
    CURRENT,
    OP_ADD,
    OP_DEL,
    aware,
    changes,
    chunks,
    db_errors,
    edits,
    meta,
)
from memory.sync import IndexSync, encode, insert_vectors, load_vectors
from memory.validate import UPDATABLE, EditFields, InvalidField, check_id, edit_fields, fields_of, text_problem

DEFAULT_NAMESPACE = schema.DEFAULT_NAMESPACE

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///editmem.db"
_PAGE = 1000  # rows per read of __iter__


# --- rows -------------------------------------------------------------------------------------------------------------
def _record(row: Row) -> EditRecord:
    return _record_of(row._mapping)


def _record_of(m: Mapping[Any, Any]) -> EditRecord:
    """The record of one version row given as column -> value."""
    return EditRecord(id=int(m["edit_id"]), version=int(m["version"]), prompt=m["prompt"],
                      target_new=m["target_new"], subject=m["subject"], ground_truth=m["ground_truth"],
                      rephrases=tuple(json.loads(m["rephrases"])), metadata=json.loads(m["metadata"]),
                      deleted=bool(m["deleted"]), valid_from=aware(m["valid_from"]), valid_to=aware(m["valid_to"]))


def _fields_of_row(row: Row) -> EditFields:
    rec = _record(row)
    return EditFields(rec.prompt, rec.target_new, rec.subject, rec.ground_truth, rec.rephrases, rec.metadata)


# --- transactions -----------------------------------------------------------------------------------------------------
@dataclass
class _Tx:
    """One write transaction: its change number, timestamp, and what it changed (applied to the index after commit)."""

    conn: Connection
    seq: int
    now: datetime
    changed: list[tuple[int, str]] = field(default_factory=list)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    # the rows of one bulk add and their vectors as one array, so the index gets them without another copy
    block: tuple[np.ndarray, np.ndarray] | None = None

    def added_vectors(self, row_ids: Sequence[int]) -> np.ndarray:
        """The vectors of the added rows ``row_ids``, in that order: the bulk block itself when it is exactly them."""
        if self.block is not None and not self.vectors and np.array_equal(self.block[0], row_ids):
            return self.block[1]
        found = dict(self.vectors)
        if self.block is not None:
            found.update(zip((int(r) for r in self.block[0]), self.block[1]))
        return np.stack([found[r] for r in row_ids])

    def allocate(self, column: str, n: int) -> int:
        """Reserve ``n`` consecutive values of meta's ``next_edit_id`` / ``next_row_id``; returns the first."""
        col = meta.c[column]
        self.conn.execute(update(meta).where(meta.c.id == 1).values({column: col + n}))
        return int(self.conn.execute(select(col).where(meta.c.id == 1)).scalar_one()) - n


# --- the store --------------------------------------------------------------------------------------------------------
class EditMemory:
    """A versioned store of edits with similarity search. Open with ``EditMemory.open(url)``."""

    def __init__(self, engine: Engine, url: URL, encoder: Encoder, store_uid: str, index_kind: str,
                 index_path: Path | None, namespace: str = DEFAULT_NAMESPACE, *, read_only: bool = False):
        self._read_only = read_only
        self._engine = engine
        self._fast = FastReads(engine)  # the change counter and hit rows on every search
        self._url = url
        self._encoder = encoder
        self._namespace = check_namespace(namespace)
        self._ns = edits.c.namespace == self._namespace  # every query of this handle's rows carries it
        self._index_sync = IndexSync(self, store_uid, index_kind, index_path, self._namespace)
        self._closed = False
        self._ledger = WeightLedger(self)

    # --- opening and closing ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str = DEFAULT_URL, *, encoder: str | Encoder | None = None, index: str = "auto",
             create: bool = True, namespace: str = DEFAULT_NAMESPACE, read_only: bool | None = None) -> EditMemory:
        """Open the store at ``url`` (``sqlite:///path.db``, ``sqlite://`` in memory, ``postgresql+psycopg://...``),
        creating it unless ``create`` is false.

        ``encoder``: a name (``"all-MiniLM-L6-v2"``, ``"hashing-256"``) or an Encoder. None uses the encoder the store
        was created with (the default one for a new store). A different encoder than the store's is recorded as the
        store's encoder; embeddings for it are computed and stored as needed and the index is rebuilt.
        ``index``: ``"flat"`` (exact), ``"hnsw"`` (approximate, for large stores) or ``"auto"`` (HNSW from 20k
        edits, by measurement: :data:`memory.sync.HNSW_AUTO_THRESHOLD`; a flat index that grows past it is rebuilt
        as HNSW in the background, see :meth:`wait_for_index`).
        ``namespace``: the namespace this handle reads and writes (letters, digits, ``_.-``; see the module docstring).
        A store made by an older editmem is migrated in place first (:mod:`memory.migrate`).
        ``read_only``: open a SQLite store without writing anything (writes raise StoreError; the index stays in
        memory); None (default) does so when the store's file or folder cannot be written (:mod:`memory.readonly`).
        """
        namespace = check_namespace(namespace)
        if index not in ("auto", *KINDS):
            raise ValidationError(f"index must be one of auto, flat, hnsw; got {index!r}")
        parsed = schema.parse_url(url)
        ro = wants_read_only(parsed, read_only)
        _check_sqlite_path(parsed, create and not ro)
        enc = get_encoder(encoder) if encoder is not None else None
        if enc is not None:
            _ = enc.dim  # a model folder loads here: a bad encoder fails before anything is written
        engine = read_only_engine(parsed) if ro else schema.make_engine(parsed)
        try:
            with db_errors(parsed):
                uid, stored_encoder = _stored_meta(engine, parsed) if ro else schema.ensure_schema(
                    engine, parsed, enc.name if enc else DEFAULT_ENCODER, create)
                if enc is None:
                    enc = _stored_encoder(stored_encoder)
                elif enc.name != stored_encoder and ro:
                    raise refuse_write(parsed.render_as_string(hide_password=True))
                elif enc.name != stored_encoder:
                    log.warning("store encoder changes from %s to %s: embeddings are recomputed as needed",
                                stored_encoder, enc.name)
                    with engine.begin() as conn:
                        conn.execute(update(meta).where(meta.c.id == 1).values(encoder=enc.name))
            mem = cls(engine, parsed, enc, uid, index, _index_path(parsed, uid, namespace), namespace, read_only=ro)
            mem._index_sync.load()
        except BaseException:
            engine.dispose()
            raise
        return mem

    def close(self) -> None:
        """Save the index if it changed and release the database connections. Idempotent."""
        if self._closed:
            return
        self._index_sync.stop_compaction()
        try:
            if not self._read_only:
                self.save_index()
        except OSError as err:
            log.warning("could not save index %s: %s", self.index_path, err)
        finally:
            self._closed = True
            self._fast.close()
            self._engine.dispose()

    def __enter__(self) -> EditMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EditMemory({self.url!r}, encoder={self._encoder.name!r})"

    @property
    def url(self) -> str:
        return self._url.render_as_string(hide_password=True)

    @property
    def read_only(self) -> bool:
        """Whether the store was opened read-only (every write raises StoreError)."""
        return self._read_only

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    @property
    def namespace(self) -> str:
        return self._namespace

    def namespaces(self) -> list[str]:
        """Every namespace that holds at least one edit version, sorted (this handle's own included)."""
        with self._read() as conn:
            found = set(conn.execute(select(edits.c.namespace).distinct()).scalars())
        return sorted(found | {self._namespace})

    def changes(self, since: int = 0, limit: int | None = None) -> list[tuple[int, int, str]]:
        """This namespace's change feed: ``(seq, row_id, op)`` for each change-log entry after counter ``since``, in
        order; op is ``add`` (a version became searchable) or ``del`` (it stopped being so)."""
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise ValidationError(f"since must be a non-negative integer, got {since!r}")
        query = select(changes.c.seq, changes.c.row_id, changes.c.op).where(
            changes.c.namespace == self._namespace, changes.c.seq > since).order_by(changes.c.seq, changes.c.row_id)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [(int(a), int(b), str(c)) for a, b, c in conn.execute(query)]

    @property
    def index_path(self) -> Path | None:
        return self._index_sync.path

    @property
    def index_kind(self) -> str:
        return self._index_sync.index.kind

    @property
    def _index(self) -> VectorIndex | None:
        """This process's FAISS index (None before it is loaded)."""
        return self._index_sync.loaded

    # --- reading ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(edits).where(CURRENT, self._ns)).scalar_one())

    def __iter__(self) -> Iterator[EditRecord]:
        """The current edits by id, read a page at a time. Pages continue after the last id seen, not at an offset
        (an offset makes SQLite step over every earlier row again: quadratic in the store's size)."""
        after = 0
        while True:
            with self._read() as conn:
                page = [_record(r) for r in conn.execute(
                    select(edits).where(CURRENT, self._ns, edits.c.edit_id > after)
                    .order_by(edits.c.edit_id).limit(_PAGE))]
            yield from page
            if len(page) < _PAGE:
                return
            after = page[-1].id

    def get(self, id: int, version: int | None = None) -> EditRecord:
        """The current version of edit ``id`` (a tombstone if it is deleted), or the given version."""
        edit_id = check_id(id)
        with self._read() as conn:
            if version is None:
                row = self._current_row(conn, edit_id)
                if row is None:
                    raise NotFoundError(f"no edit with id {edit_id}")
                return _record(row)
            version = check_id(version, "version")
            row = conn.execute(select(edits).where(edits.c.edit_id == edit_id, edits.c.version == version,
                                                   self._ns)).first()
            if row is None:
                latest = self._current_row(conn, edit_id)
                if latest is None:
                    raise NotFoundError(f"no edit with id {edit_id}")
                raise NotFoundError(f"edit {edit_id} has no version {version} (versions 1..{latest.version})")
            return _record(row)

    def list(self, limit: int | None = None, offset: int = 0, include_deleted: bool = False, *,
             subject: str | None = None, contains: str | None = None) -> list[EditRecord]:
        """Current versions ordered by id; with ``include_deleted`` also the tombstones of deleted edits. Filters:
        ``subject`` (the exact subject), ``contains`` (text found in the prompt or the target, any case)."""
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValidationError(f"limit must be a non-negative integer, got {limit!r}")
        if not isinstance(offset, int) or offset < 0:
            raise ValidationError(f"offset must be a non-negative integer, got {offset!r}")
        where = self._list_where(include_deleted, subject, contains)
        query = select(edits).where(*where).order_by(edits.c.edit_id).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [_record(r) for r in conn.execute(query)]

    def count(self, include_deleted: bool = False, *, subject: str | None = None,
              contains: str | None = None) -> int:
        """How many edits :meth:`list` with the same filters gives, without limit or offset."""
        where = self._list_where(include_deleted, subject, contains)
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(edits).where(*where)).scalar_one())

    def _list_where(self, include_deleted: bool, subject: str | None, contains: str | None) -> builtins.list[Any]:
        where = [edits.c.valid_to.is_(None) if include_deleted else CURRENT, self._ns]
        if subject is not None:
            where.append(edits.c.subject == _filter_text("subject", subject))
        if contains is not None:
            needle = "%" + _like_escaped(_filter_text("contains", contains).lower()) + "%"
            where.append(func.lower(edits.c.prompt).like(needle, escape="\\")
                         | func.lower(edits.c.target_new).like(needle, escape="\\"))
        return where

    def history(self, id: int) -> builtins.list[EditRecord]:
        """Every version of edit ``id``, oldest first."""
        edit_id = check_id(id)
        with self._read() as conn:
            rows = conn.execute(select(edits).where(edits.c.edit_id == edit_id, self._ns)
                                .order_by(edits.c.version)).all()
        if not rows:
            raise NotFoundError(f"no edit with id {edit_id}")
        return [_record(r) for r in rows]

    def search(self, text: str, k: int = 5, *, ef_search: int | None = None) -> builtins.list[Hit]:
        """The ``k`` current edits whose prompts are closest to ``text`` (cosine), best first (``ef_search``: as
        :meth:`search_many`)."""
        if not isinstance(text, str) or not text.strip():
            raise ValidationError("the query text must not be empty")
        return self.search_many([text], k, ef_search=ef_search)[0]

    @overload
    def search_many(self, texts: Sequence[str], k: int = 5, *, return_vectors: Literal[False] = False,
                    ef_search: int | None = None) -> builtins.list[builtins.list[Hit]]: ...

    @overload
    def search_many(self, texts: Sequence[str], k: int = 5, *, return_vectors: Literal[True],
                    ef_search: int | None = None,
                    ) -> tuple[builtins.list[builtins.list[Hit]], np.ndarray, builtins.list[np.ndarray]]: ...

    def search_many(self, texts: Sequence[str], k: int = 5, *, return_vectors: bool = False,
                    ef_search: int | None = None) -> Any:
        """``search`` for many texts at once: one batched encode, one index search, one SQL fetch.

        With ``return_vectors``, also the vectors the search used, so a caller need not encode again: returns
        ``(hits, queries, keys)`` where ``queries`` (len(texts), dim) are the texts' embeddings and ``keys[i]``
        (len(hits[i]), dim) the stored key embeddings of the versions in ``hits[i]``, row for row. ``ef_search``:
        this search's HNSW depth (more exact, slower; :data:`memory.index.HNSW_EF_SEARCH` unless given; a flat index
        is exact anyway)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValidationError("texts must be a list of strings")
        for i, t in enumerate(texts):
            problem = text_problem(t)
            if problem:
                raise ValidationError(f"query text {i} {problem}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValidationError(f"k must be a positive integer, got {k!r}")
        check_number("search", "ef_search", ef_search, integer=True, minimum=1, strict=False, optional=True)
        if not texts:
            return ([], np.zeros((0, self._encoder.dim), dtype=np.float32), []) if return_vectors else []
        queries = self._encode(list(texts))
        for attempt in range(2):  # a second pass if another process removed a hit between catch-up and fetch
            with self._index_sync.lock:
                self._index_sync.catch_up()
                index = self._index_sync.index
                scores, ids = index.search(queries, max(1, min(k, len(index))), ef_search=ef_search)
            wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
            records = self._current_records(wanted)
            if attempt == 0 and len(records) < len(wanted):
                continue
            kept = [[(int(i), float(s)) for s, i in zip(srow, irow) if int(i) in records]
                    for srow, irow in zip(scores, ids)]
            hits = [[Hit(records[i], s) for i, s in row] for row in kept]
            if not return_vectors:
                return hits
            found = dict(zip(records, self._index_sync.vectors_for(list(records))))
            empty = np.zeros((0, self._encoder.dim), dtype=np.float32)
            keys = [np.stack([found[i] for i, _ in row]) if row else empty for row in kept]
            return hits, queries, keys
        raise AssertionError("unreachable")

    def find(self, prompt: str, target_new: str, subject: str | None = None) -> EditRecord | None:
        """The current edit with this content (the key ``import_file`` skips by), or None."""
        try:
            key = edit_fields(prompt, target_new, subject).content_key
        except InvalidField as err:
            raise ValidationError(str(err)) from None
        with self._read() as conn:
            row = conn.execute(select(edits).where(edits.c.content_key == key, CURRENT)
                               .order_by(edits.c.edit_id)).first()
        return None if row is None else _record(row)

    # --- writing ------------------------------------------------------------------------------------------------------
    def add(self, prompt: str, target_new: str, *, subject: str | None = None, ground_truth: str | None = None,
            rephrases: Iterable[str] = (), metadata: Mapping[str, Any] | None = None) -> EditRecord:
        """Store a new edit (version 1)."""
        try:
            fields = edit_fields(prompt, target_new, subject, ground_truth, rephrases, metadata)
        except InvalidField as err:
            raise ValidationError(str(err)) from None
        return self._add_fields([fields])[1][0]

    def add_many(self, items: Iterable[EditCase | Mapping[str, Any]], *,
                 progress: bool = False) -> builtins.list[EditRecord]:
        """Store many edits in one transaction (all or none). Items are EditCase objects or dicts with the keyword
        arguments of ``add``; an EditCase's probes, case_id and source go into metadata."""
        fields = []
        for i, item in enumerate(items):
            try:
                fields.append(fields_of(item))
            except InvalidField as err:
                raise ValidationError(f"item {i}: {err}") from None
        return self._add_fields(fields, progress=progress)[1]

    def update(self, id: int, **changes_: Any) -> EditRecord:
        """Write a new version of edit ``id`` with the given fields changed (prompt, target_new, subject, ground_truth,
        rephrases, metadata) and close the current one. If nothing changes, the current version is returned."""
        edit_id = check_id(id)
        unknown = set(changes_) - set(UPDATABLE)
        if unknown:
            raise ValidationError(f"cannot update {', '.join(sorted(unknown))}: updatable fields are "
                                  f"{', '.join(UPDATABLE)}")
        before = self._live_row(edit_id)
        merged = self._merge(before, changes_)
        if merged.same_as(_fields_of_row(before)):
            return _record(before)
        precomputed = {merged.prompt: self._encode([merged.prompt])[0]} if merged.prompt != before.prompt else {}
        with self._write() as tx:
            current = self._live_row(edit_id, tx.conn)
            merged = self._merge(current, changes_)
            vector = precomputed.get(merged.prompt)
            if vector is None:
                vector = self._stored_vector(tx.conn, current.row_id, merged.prompt)
            self._close_row(tx, current)
            record = self._insert_version(tx, edit_id, current.version + 1, merged, vector)
        return record

    def delete(self, id: int) -> EditRecord:
        """Retract edit ``id``: close its current version and write a tombstone version. Returns the tombstone."""
        edit_id = check_id(id)
        with self._write() as tx:
            current = self._live_row(edit_id, tx.conn)
            self._close_row(tx, current)
            return self._insert_version(tx, edit_id, current.version + 1, _fields_of_row(current), None,
                                        deleted=True)

    def delete_many(self, ids: Iterable[int], *, progress: bool = False) -> builtins.list[EditRecord]:
        """Retract many edits in one transaction (all or none): each gets a tombstone version as with ``delete``.
        An id that is unknown, already deleted or given twice fails the whole call before anything is written.
        Returns the tombstones in the order of ``ids``."""
        from tqdm.auto import tqdm

        edit_ids = [check_id(i) for i in ids]
        twice = sorted(i for i, n in Counter(edit_ids).items() if n > 1)
        if twice:
            raise ValidationError(f"edit ids given more than once: {', '.join(map(str, twice[:10]))}")
        out = []
        with self._write() as tx:
            current: dict[int, Row] = {}
            for chunk in chunks(edit_ids):
                for row in tx.conn.execute(select(edits).where(edits.c.edit_id.in_(chunk),
                                                               edits.c.valid_to.is_(None))):
                    if row.namespace == self._namespace:  # checked here, as in _current_records
                        current[int(row.edit_id)] = row
            rows = [_require_live(edit_id, current.get(edit_id)) for edit_id in edit_ids]
            for edit_id, row in tqdm(zip(edit_ids, rows), total=len(rows), desc="deleting", unit="edit",
                                     disable=not progress, leave=False):
                self._close_row(tx, row)
                out.append(self._insert_version(tx, edit_id, row.version + 1, _fields_of_row(row), None,
                                                deleted=True))
        return out

    def rollback(self, id: int, version: int) -> EditRecord:
        """Write a new version of edit ``id`` equal in content to ``version``; on a deleted edit this undeletes it.
        If the edit is live and already has that content, the current version is returned unchanged."""
        target = self.get(id, version)
        if target.deleted:
            raise ValidationError(f"version {target.version} of edit {target.id} is a deletion; use delete")
        content = EditFields(target.prompt, target.target_new, target.subject, target.ground_truth, target.rephrases,
                          target.metadata)
        with self._read() as conn:
            target_row_id = conn.execute(select(edits.c.row_id).where(
                edits.c.edit_id == target.id, edits.c.version == target.version, self._ns)).scalar_one()
        vector = self._vector_outside_tx(target_row_id, target.prompt)
        with self._write() as tx:
            current = self._current_row(tx.conn, target.id)
            if current is None:  # every edit keeps a current row (a tombstone once deleted)
                raise NotFoundError(f"no edit with id {target.id}")
            if not current.deleted and _fields_of_row(current).same_as(content):
                return _record(current)
            self._close_row(tx, current)
            return self._insert_version(tx, target.id, current.version + 1, content, vector)

    # --- import / export ----------------------------------------------------------------------------------------------
    def import_file(self, path: str | os.PathLike[str], format: str = "auto", *, skip_incomplete: bool = False,
                    progress: bool = False) -> int:
        """Add the edits in a data file (zsRE, CounterFact, KnowEdit, MQuAKE or the store's JSONL); returns how many
        were added. Edits already in the store (same prompt, target_new, subject) are skipped. The whole file is
        parsed and validated first and written in one transaction: a bad file raises FormatError and changes nothing.
        An EditCase's case_id, source, locality and portability go into metadata (``formats.case_to_metadata``).
        ``skip_incomplete`` leaves out records with an empty prompt or target instead of failing (see formats)."""
        from memory.formats import read_cases

        try:
            cases = read_cases(path, format=format, skip_incomplete=skip_incomplete)
        except OSError as err:
            raise FormatError(str(path), f"cannot read file: {err.strerror or err}") from None
        fields = []
        for number, case in enumerate(cases):
            try:
                fields.append(fields_of(case))
            except InvalidField as err:
                raise FormatError(str(path), err.message, record=number, field=err.field) from None
        n_fields = len(fields)
        del cases
        added, _ = self._add_fields(fields, skip_existing=True, progress=progress, keep_records=False)
        log.info("imported %d of %d edits from %s", added, n_fields, path)
        return added

    def export(self, path: str | os.PathLike[str], *, include_history: bool = False) -> int:
        """Write the current edits (every version with ``include_history``) as the store's JSONL; returns the count."""
        from memory.formats import write_jsonl

        if include_history:
            with self._read() as conn:
                records = [_record(r) for r in conn.execute(
                    select(edits).where(self._ns).order_by(edits.c.edit_id, edits.c.version))]
        else:
            records = self.list()
        try:
            write_jsonl(records, path)
        except OSError as err:
            raise FormatError(str(path), f"cannot write file: {err.strerror or err}") from None
        return len(records)

    # --- weight edits: the ledger (memory/ledger.py), under the same names ------------------------------------------
    def add_weight_model(self, fingerprint: str, base: str, folder: str | None = None) -> WeightModel:
        """Register an edited model: :meth:`WeightLedger.add_weight_model`."""
        return self._ledger.add_weight_model(fingerprint, base, folder)

    def weight_models(self, *, folder: str | None = None) -> builtins.list[WeightModel]:
        """The registered edited models: :meth:`WeightLedger.weight_models`."""
        return self._ledger.weight_models(folder=folder)

    def get_weight_model(self, model_id: int) -> WeightModel:
        """One registered edited model by id: :meth:`WeightLedger.get_weight_model`."""
        return self._ledger.get_weight_model(model_id)

    def attach_weights(self, model_id: int, method: str, edits_: Sequence[tuple[int, int]], params: Sequence[str],
                       deltas: bytes, *, bases: Mapping[str, bytes] | None = None,
                       settings: Mapping[str, Any] | None = None, editor_state: bytes | None = None) -> WeightRecord:
        """Record a weight edit: :meth:`WeightLedger.attach_weights`."""
        return self._ledger.attach_weights(model_id, method, edits_, params, deltas, bases=bases, settings=settings,
                                           editor_state=editor_state)

    def weight_records(self, *, model_id: int | None = None, edit_id: int | None = None,
                       applied: bool | None = True) -> builtins.list[WeightRecord]:
        """Weight records in the order applied: :meth:`WeightLedger.weight_records`."""
        return self._ledger.weight_records(model_id=model_id, edit_id=edit_id, applied=applied)

    def held_versions(self, model_id: int) -> set[tuple[int, int]]:
        """The edit versions a model's applied weight records wrote: :meth:`WeightLedger.held_versions`."""
        return self._ledger.held_versions(model_id)

    def weight_deltas(self, record_id: int) -> bytes:
        """The deltas blob of a weight record: :meth:`WeightLedger.weight_deltas`."""
        return self._ledger.weight_deltas(record_id)

    def weight_editor_state(self, record_id: int) -> bytes | None:
        """A weight record's editor state blob: :meth:`WeightLedger.weight_editor_state`."""
        return self._ledger.weight_editor_state(record_id)

    def weight_bases(self, model_id: int, params: Sequence[str] | None = None) -> dict[str, bytes]:
        """A model's stored base value blobs: :meth:`WeightLedger.weight_bases`."""
        return self._ledger.weight_bases(model_id, params)

    def weight_base_params(self, model_id: int) -> builtins.list[str]:
        """The names of a model's touched parameters: :meth:`WeightLedger.weight_base_params`."""
        return self._ledger.weight_base_params(model_id)

    def detach_weights(self, record_id: int, note: str | None = None) -> WeightRecord:
        """Mark a weight record as removed: :meth:`WeightLedger.detach_weights`."""
        return self._ledger.detach_weights(record_id, note)

    def weight_record(self, record_id: int) -> WeightRecord:
        """One weight record by id: :meth:`WeightLedger.weight_record`."""
        return self._ledger.weight_record(record_id)

    def consolidated(self) -> dict[int, builtins.list[WeightRecord]]:
        """Edit id -> the applied weight records that wrote its current version: :meth:`WeightLedger.consolidated`."""
        return self._ledger.consolidated()

    # --- consistency --------------------------------------------------------------------------------------------------
    def index_ids(self) -> set[int]:
        """The version row ids a search can return (after catching up). Diagnostic."""
        with self._index_sync.lock:
            self._index_sync.catch_up()
            return self._index_sync.index.ids()

    def current_row_ids(self) -> set[int]:
        """The version row ids of the current, non-deleted versions in SQL. Diagnostic."""
        with self._read() as conn:
            return {int(r) for r in conn.execute(select(edits.c.row_id).where(CURRENT, self._ns)).scalars()}

    def verify(self) -> None:
        """Raise StoreError if the index and SQL disagree on which versions are searchable."""
        in_index, in_sql = self.index_ids(), self.current_row_ids()
        if in_index != in_sql:
            raise StoreError(f"index out of step with SQL: {len(in_index - in_sql)} extra, "
                             f"{len(in_sql - in_index)} missing ids")

    def rebuild_index(self, index: str | None = None) -> None:
        """Rebuild the index from SQL (``index`` chooses flat / hnsw / auto; default: as opened) and save it."""
        if index is not None:
            if index not in ("auto", *KINDS):
                raise ValidationError(f"index must be one of auto, flat, hnsw; got {index!r}")
            self._index_sync.kind = index
        self._index_sync.rebuild()

    def wait_for_index(self, timeout: float | None = None) -> bool:
        """Wait for a background compaction of the index (tombstones, or flat growing into HNSW) to be swapped in;
        False if ``timeout`` seconds passed first. Searches and writes need not wait: they use the old index until
        then."""
        return self._index_sync.wait_compaction(timeout)

    @property
    def index_compacting(self) -> bool:
        """Whether the index is being rebuilt in the background right now."""
        return self._index_sync.compacting

    def save_index(self) -> None:
        """Write the index file now if it changed (a no-op for in-memory stores)."""
        self._index_sync.save()

    # --- internals: SQL -----------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        self._check_open()
        with db_errors(self._url), self._engine.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[_Tx]:
        """A write transaction: bumps the change counter first (serialising writers), logs the changes, commits, then
        applies them to this process's index."""
        self._check_open()
        if self._read_only:
            raise refuse_write(self.url)
        with db_errors(self._url), self._engine.begin() as conn:
            conn.execute(update(meta).where(meta.c.id == 1).values(change_seq=meta.c.change_seq + 1))
            seq = int(conn.execute(select(meta.c.change_seq).where(meta.c.id == 1)).scalar_one())
            tx = _Tx(conn, seq, datetime.now(UTC))
            yield tx
            if tx.changed:
                conn.execute(insert(changes), [{"seq": seq, "row_id": r, "op": op, "namespace": self._namespace}
                                               for r, op in tx.changed])
        self._index_sync.after_write(tx)

    def _current_row(self, conn: Connection, edit_id: int) -> Row | None:
        return conn.execute(select(edits).where(edits.c.edit_id == edit_id, edits.c.valid_to.is_(None),
                                                self._ns)).first()

    def _live_row(self, edit_id: int, conn: Connection | None = None) -> Row:
        """The current version of a non-deleted edit, or NotFoundError."""
        if conn is None:
            with self._read() as c:
                row = self._current_row(c, edit_id)
        else:
            row = self._current_row(conn, edit_id)
        return _require_live(edit_id, row)

    @staticmethod
    def _merge(row: Row, changes_: Mapping[str, Any]) -> EditFields:
        base = _fields_of_row(row)
        values = {name: changes_.get(name, getattr(base, name)) for name in UPDATABLE}
        try:
            return edit_fields(**values)
        except InvalidField as err:
            raise ValidationError(str(err)) from None

    def _current_records(self, row_ids: Sequence[int]) -> dict[int, EditRecord]:
        """The current versions among these row ids, in this namespace (the rows of a search's hits: read on the
        DBAPI connection, :mod:`memory.fastread`)."""
        self._check_open()
        with db_errors(self._url):
            rows = self._fast.rows(row_ids)
        # current-ness and the namespace are checked here, not in SQL: with the namespace in the WHERE clause SQLite
        # plans the query through the namespace index and scans the whole namespace instead of looking up the row ids
        return {int(m["row_id"]): _record_of(m) for m in rows
                if m["valid_to"] is None and not m["deleted"] and m["namespace"] == self._namespace}

    def _change_seq(self) -> int:
        """The store's change counter (read before every search)."""
        self._check_open()
        with db_errors(self._url):
            return self._fast.change_seq()

    def _existing_keys(self, conn: Connection, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in chunks(sorted(set(keys))):
            found.update(key for key, ns in conn.execute(select(edits.c.content_key, edits.c.namespace).where(
                edits.c.content_key.in_(chunk), CURRENT)) if ns == self._namespace)  # as in _current_records
        return found

    def _new_only(self, fields: builtins.list[EditFields], conn: Connection) -> builtins.list[EditFields]:
        """Drop fields whose content key is already current in the store, or repeats an earlier item."""
        existing = self._existing_keys(conn, [f.content_key for f in fields])
        out = []
        for f in fields:
            if f.content_key not in existing:
                existing.add(f.content_key)
                out.append(f)
        return out

    def _add_fields(self, fields: builtins.list[EditFields], *, skip_existing: bool = False, progress: bool = False,
                    keep_records: bool = True) -> tuple[int, builtins.list[EditRecord]]:
        """Add version-1 rows for ``fields`` in one transaction: (how many were added, their records, or [] without
        ``keep_records``). Memory: the vectors exist once (the index gets that array), and the row dicts and records
        are made a chunk at a time (records only when asked for), so an import of n edits peaks at a few KB per edit
        above what it keeps (bench_million)."""
        if skip_existing:
            with self._read() as conn:
                fields = self._new_only(fields, conn)
        if not fields:
            return 0, []
        vectors = self._encode([f.prompt for f in fields], progress=progress)
        with self._write() as tx:
            if skip_existing:  # again, under the write lock: another process may have imported meanwhile
                kept = self._new_only(fields, tx.conn)
                if len(kept) < len(fields):
                    position = {f.content_key: i for i, f in enumerate(fields)}
                    vectors = vectors[[position[f.content_key] for f in kept]]
                    fields = kept
            n = len(fields)
            first_edit = tx.allocate("next_edit_id", n)
            first_row = tx.allocate("next_row_id", n)
            records = self._insert_rows(tx, fields, first_edit, first_row, vectors, progress=progress,
                                        keep_records=keep_records)
            row_ids = np.arange(first_row, first_row + n, dtype=np.int64)
            tx.changed.extend((int(r), OP_ADD) for r in row_ids)
            tx.block = (row_ids, vectors)
        return n, records

    def _insert_rows(self, tx: _Tx, fields: builtins.list[EditFields], first_edit: int, first_row: int,
                     vectors: np.ndarray, *, progress: bool, keep_records: bool) -> builtins.list[EditRecord]:
        """Insert version-1 rows (edit ids and row ids counting up from the first ones) and their embeddings in
        chunks, with a progress bar for a large write; their records if ``keep_records``."""
        from tqdm.auto import tqdm

        size = schema.SQL_CHUNK
        out: builtins.list[EditRecord] = []
        with tqdm(total=len(fields), desc="writing", unit="edit", disable=not progress or len(fields) <= size,
                  leave=False) as bar:
            for start in range(0, len(fields), size):
                part = [self._version_row(tx, first_row + i, first_edit + i, 1, f, self._namespace)
                        for i, f in enumerate(fields[start:start + size], start)]
                tx.conn.execute(insert(edits), part)
                insert_vectors(tx.conn, self._encoder, [r["row_id"] for r in part], vectors[start:start + size])
                if keep_records:
                    out.extend(_record_from_values(r) for r in part)
                bar.update(len(part))
        return out

    @staticmethod
    def _version_row(tx: _Tx, row_id: int, edit_id: int, version: int, f: EditFields, namespace: str, *,
                     deleted: bool = False) -> dict[str, Any]:
        return {"row_id": row_id, "edit_id": edit_id, "version": version, "prompt": f.prompt,
                "target_new": f.target_new, "subject": f.subject, "ground_truth": f.ground_truth,
                "rephrases": json.dumps(list(f.rephrases), ensure_ascii=False),
                "metadata": json.dumps(dict(f.metadata), ensure_ascii=False, sort_keys=True), "deleted": deleted,
                "valid_from": tx.now, "valid_to": None, "content_key": f.content_key, "namespace": namespace}

    def _insert_version(self, tx: _Tx, edit_id: int, version: int, f: EditFields, vector: np.ndarray | None, *,
                        deleted: bool = False) -> EditRecord:
        row_id = tx.allocate("next_row_id", 1)
        values = self._version_row(tx, row_id, edit_id, version, f, self._namespace, deleted=deleted)
        tx.conn.execute(insert(edits), [values])
        if not deleted:
            assert vector is not None
            insert_vectors(tx.conn, self._encoder, [row_id], vector[None, :])
            tx.changed.append((row_id, OP_ADD))
            tx.vectors[row_id] = vector
        return _record_from_values(values)

    @staticmethod
    def _close_row(tx: _Tx, row: Row) -> None:
        done = tx.conn.execute(update(edits).where(edits.c.row_id == row.row_id, edits.c.valid_to.is_(None))
                               .values(valid_to=tx.now))
        if done.rowcount != 1:
            raise StoreError(f"edit {row.edit_id} changed while it was being written; try again")
        if not row.deleted:
            tx.changed.append((int(row.row_id), OP_DEL))

    # --- internals: embeddings ----------------------------------------------------------------------------------------
    @contextmanager
    def _embeddings_tx(self) -> Iterator[Connection]:
        """A transaction that only stores embeddings: no change-counter bump (what is searchable stays the same)."""
        if self._read_only:
            raise refuse_write(self.url)
        with db_errors(self._url), self._engine.begin() as conn:
            yield conn

    def _encode(self, texts: builtins.list[str], *, progress: bool = False) -> np.ndarray:
        return encode(self._encoder, texts, progress=progress)

    def _stored_vector(self, conn: Connection, row_id: int, prompt: str) -> np.ndarray:
        found = load_vectors(conn, self._encoder, [row_id])
        return found[row_id] if row_id in found else self._encode([prompt])[0]

    def _vector_outside_tx(self, row_id: int, prompt: str) -> np.ndarray:
        with self._read() as conn:
            return self._stored_vector(conn, row_id, prompt)


# --- module helpers ---------------------------------------------------------------------------------------------------
def _require_live(edit_id: int, row: Row | None) -> Row:
    """``row``, the current version of ``edit_id``, if it exists and is not a deletion; else NotFoundError."""
    if row is None:
        raise NotFoundError(f"no edit with id {edit_id}")
    if row.deleted:
        raise NotFoundError(f"edit {edit_id} is deleted (rollback restores it)")
    return row


def _record_from_values(values: Mapping[str, Any]) -> EditRecord:
    return EditRecord(id=values["edit_id"], version=values["version"], prompt=values["prompt"],
                      target_new=values["target_new"], subject=values["subject"],
                      ground_truth=values["ground_truth"], rephrases=tuple(json.loads(values["rephrases"])),
                      metadata=json.loads(values["metadata"]), deleted=values["deleted"],
                      valid_from=values["valid_from"], valid_to=None)


def _stored_encoder(name: str) -> Encoder:
    """The encoder a store records, or StoreError saying how to switch it when it is not available here."""
    try:
        return get_encoder(name)
    except ValidationError as err:
        raise StoreError(f"the store's encoder is not available here: {err}; switch the store to one that is with "
                         "`editmem init --encoder NAME` (embeddings are recomputed)") from None


def _stored_meta(engine: Engine, url: URL) -> tuple[str, str]:
    """(store uid, encoder name) of an existing store, read without writing anything."""
    if not schema.tables_exist(engine):
        raise StoreError(f"no editmem store at {url.render_as_string(hide_password=True)}")
    with engine.connect() as conn:
        row = conn.execute(select(meta.c.store_uid, meta.c.encoder).where(meta.c.id == 1)).first()
    if row is None:
        raise StoreError(f"store {url.render_as_string(hide_password=True)} is not initialised")
    return row.store_uid, row.encoder


def _check_sqlite_path(url: URL, create: bool) -> None:
    if url.get_backend_name() != "sqlite" or schema.is_memory_sqlite(url):
        return
    path = Path(url.database or "")  # not a memory URL, so the database is a path
    if not path.parent.is_dir():
        raise StoreError(f"cannot create store {path}: folder {path.parent} does not exist")
    if not create and not path.is_file():
        raise StoreError(f"no store at {path} (run `editmem init` to create one)")


def _index_path(url: URL, store_uid: str, namespace: str = DEFAULT_NAMESPACE) -> Path | None:
    """The index file of a namespace: the default one's keeps its name from before namespaces."""
    suffix = ".faiss" if namespace == DEFAULT_NAMESPACE else f".ns-{namespace}.faiss"
    if url.get_backend_name() == "sqlite":
        return None if schema.is_memory_sqlite(url) else Path(str(url.database) + suffix)
    path = pg_index_file(store_uid)
    return path if namespace == DEFAULT_NAMESPACE else path.with_name(path.name.removesuffix(".faiss") + suffix)


def _filter_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"the list filter {name} must be a non-empty string, got {value!r}")
    return value


def _like_escaped(text: str) -> str:
    """``text`` with LIKE's wildcards taken literally (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
