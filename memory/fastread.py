"""The two reads on every search, done on the DBAPI connection instead of through SQLAlchemy Core.

A search reads the change counter (to catch the index up) and the version rows of its hits. Through SQLAlchemy Core
(a ``Connection``, statement caching, result processing) the two cost about 1.7 ms right after the encoder has run on
this project's CPU box, while the queries themselves take about 0.3 ms; on the raw DBAPI cursor they cost about 0.35 ms
(notes/scale.md, "Where the search overhead goes"). Only these two reads take this path; every write and every other
read stays on SQLAlchemy.

The SQL is written once from the table definitions (identifiers quoted by the dialect); row ids are inlined as
integers (they come from the index, never from a user), so no parameter style is needed and the same text runs on
SQLite and PostgreSQL. Column values go through the result processors SQLAlchemy would apply (SQLite's timestamps and
booleans), so a row reads the same as through Core. A database error is raised as SQLAlchemy raises it
(:class:`sqlalchemy.exc.DBAPIError`), so :func:`memory.schema.db_errors` describes it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, Table
from sqlalchemy.exc import DBAPIError

from memory.errors import StoreError
from memory.schema import chunks, edits, meta


class FastReads:
    """The change counter and version rows by row id, read on a pooled DBAPI connection."""

    def __init__(self, engine: Engine, table: Table = edits):
        self._engine = engine
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
        with self._cursor() as cur:
            self._execute(cur, self._select_seq)
            row = cur.fetchone()
        if row is None:
            raise StoreError("the store has no meta row (not an editmem store, or damaged)")
        return int(row[0])

    def rows(self, row_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The version rows with these row ids (any that exist, in no particular order), as column -> value."""
        out: list[dict[str, Any]] = []
        if not row_ids:
            return out
        with self._cursor() as cur:
            for chunk in chunks(row_ids):
                self._execute(cur, self._select_rows + "(" + ",".join(str(int(i)) for i in chunk) + ")")
                for raw in cur.fetchall():
                    values = list(raw)
                    for i, process in self._processors:
                        values[i] = process(values[i])
                    out.append(dict(zip(self._columns, values)))
        return out

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        conn = self._engine.raw_connection()
        try:
            cur = conn.cursor()
            try:
                yield cur
            finally:
                cur.close()
        finally:
            conn.close()  # back to the pool (which rolls back whatever the driver began)

    def _execute(self, cur: Any, sql: str) -> None:
        try:
            cur.execute(sql)
        except self._dbapi_error as err:
            raise DBAPIError.instance(sql, None, err, self._dbapi_error) from None
