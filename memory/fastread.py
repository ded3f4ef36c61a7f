"""The two reads on every search, done on the DBAPI connection instead of through SQLAlchemy Core.

A search reads the change counter (to catch the index up) and the version rows of its hits. Through SQLAlchemy Core
(a ``Connection``, statement caching, result processing) the two cost about 1.7 ms right after the encoder has run on
this project's CPU box, while the queries themselves take about 0.3 ms; on the raw DBAPI cursor they cost about 0.35 ms
(notes/scale.md, "Where the search overhead goes"). Only these two reads take this path; every write and every other
read stays on SQLAlchemy.

They run on a connection of their own, taken from the engine's pool once and detached from it, in autocommit mode (each
SELECT sees what is committed, and no transaction is left open), shared by the store's threads under a lock. Checking
a pooled connection out and back in (the pool's bookkeeping and its reset, a rollback) cost about 0.1 ms of each read
right after the encoder, about a third of them (bench_search_stages, 750,000 edits). A read that fails drops the
connection and is tried once more on a new one (a server restart; the pool's pre-ping did this before). An in-memory
SQLite store keeps using its pool: its one connection is the database.

The SQL is written once from the table definitions (identifiers quoted by the dialect); row ids are inlined as
integers (they come from the index, never from a user), so no parameter style is needed and the same text runs on
SQLite and PostgreSQL. Column values go through the result processors SQLAlchemy would apply (SQLite's timestamps and
booleans), so a row reads the same as through Core. A database error is raised as SQLAlchemy raises it
(:class:`sqlalchemy.exc.DBAPIError`), so :func:`memory.schema.db_errors` describes it the same way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from memory.errors import StoreError
from memory.schema import chunks, edits, meta


class FastReads:
    """The change counter and version rows by row id, read on a DBAPI connection of its own. ``close`` closes it."""

    def __init__(self, engine: Engine, table: Table = edits):
        self._engine = engine
        self._lock = threading.Lock()
        self._conn: Any = None  # the detached pool connection, made on the first read
        self._pooled = isinstance(engine.pool, StaticPool)  # in-memory SQLite: read on the pool's one connection
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        quote = engine.dialect.identifier_preparer.quote
        self._columns = [c.name for c in table.columns]
        # each column's type as the dialect implements it (SQLite's DATETIME), whose processor parses what the
        # driver returns
        dialect = engine.dialect
        processors = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in table.columns]
        self._processors: list[tuple[int, Callable[[Any], Any]]] = [
            (i, p) for i, p in enumerate(processors) if p is not None]
        self._select_rows = (f"SELECT {', '.join(quote(c) for c in self._columns)} FROM {quote(table.name)} "
                             f"WHERE {quote(table.c.row_id.name)} IN ")
        self._select_seq = (f"SELECT {quote(meta.c.change_seq.name)} FROM {quote(meta.name)} "
                            f"WHERE {quote(meta.c.id.name)} = 1")

    def change_seq(self) -> int:
        """The store's change counter."""
        rows = self._fetch(self._select_seq)
        if not rows:
            raise StoreError("the store has no meta row (not an editmem store, or damaged)")
        return int(rows[0][0])

    def rows(self, row_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The version rows with these row ids (any that exist, in no particular order), as column -> value."""
        out: list[dict[str, Any]] = []
        for chunk in chunks(row_ids) if row_ids else ():
            for raw in self._fetch(self._select_rows + "(" + ",".join(str(int(i)) for i in chunk) + ")"):
                values = list(raw)
                for i, process in self._processors:
                    values[i] = process(values[i])
                out.append(dict(zip(self._columns, values)))
        return out

    def close(self) -> None:
        """Close the connection (a later read opens a new one)."""
        with self._lock:
            self._drop()

    def _fetch(self, sql: str) -> list[Any]:
        """All rows of ``sql``; a DBAPI error is raised as SQLAlchemy's DBAPIError, after one more try on a new
        connection if the one that failed had served reads before."""
        if self._pooled:
            conn = self._engine.raw_connection()
            try:
                return self._run(conn, sql)
            finally:
                conn.close()  # back to the pool (which rolls back whatever the driver began)
        with self._lock:
            for attempt in range(2):
                fresh = self._conn is None
                if fresh:
                    self._conn = self._connect()
                try:
                    return self._run(self._conn, sql)
                except DBAPIError:
                    self._drop()
                    if fresh or attempt:
                        raise
        raise AssertionError("unreachable")

    def _run(self, conn: Any, sql: str) -> list[Any]:
        try:
            cur = conn.cursor()
            try:
                cur.execute(sql)
                return list(cur.fetchall())
            finally:
                cur.close()
        except self._dbapi_error as err:
            raise DBAPIError.instance(sql, None, err, self._dbapi_error) from None

    def _connect(self) -> Any:
        """A connection from the pool, detached from it (``close`` closes it), in autocommit mode."""
        fairy = self._engine.raw_connection()
        try:
            driver = fairy.driver_connection  # (None once detached)
            fairy.detach()
            assert driver is not None
            if self._engine.dialect.name == "sqlite":
                driver.isolation_level = None  # the sqlite3 module's autocommit: no BEGIN before anything
            else:
                driver.rollback()
                driver.autocommit = True
        except BaseException:
            fairy.close()
            raise
        return fairy

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close: it is gone either way
                conn.close()
