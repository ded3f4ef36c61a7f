"""Creating a store's schema and migrating an older one in place, with Alembic (scripts in ``memory/migrations``).

The Alembic configuration is made in code (:func:`alembic_config`); no ``alembic.ini`` is needed. On open:

- a database without the store's tables gets them (``metadata.create_all``), its meta row, and the stamp of the newest
  revision, all in one transaction;
- a store made before Alembic (no ``alembic_version`` table: editmem up to commit bf5447c, schema version 1) is
  stamped with the baseline revision ``0001`` and upgraded;
- a store at an older revision is upgraded to the newest, in one transaction, with a warning naming both revisions;
- a store at a revision this code does not know (made by a newer editmem) is refused with StoreError.

The migration holds the store's write lock for its whole transaction (SQLite: ``BEGIN IMMEDIATE`` on a connection of
its own; PostgreSQL: a transaction-level advisory lock), so two processes opening an old store at once migrate it
once; the second finds it up to date.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, event, insert, inspect, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from memory.errors import StoreError
from memory.schema import SCHEMA_VERSION, WEIGHT_TABLES, is_memory_sqlite, meta, metadata

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"  # the schema before Alembic (schema_version 1)
PG_LOCK_KEY = 0x65646D6D  # "edmm": the advisory lock a migration holds on PostgreSQL


def alembic_config(connection: Connection | None = None):  # -> alembic.config.Config
    """An Alembic Config for the package's migration scripts (``connection``: the one env.py runs on)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def known_revisions() -> tuple[frozenset[str], str]:
    """(every revision in the scripts, the newest); read once per process (the scripts do not change)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None
    return frozenset(r.revision for r in script.walk_revisions()), head


def current_revision(conn: Connection) -> str | None:
    """The store's Alembic revision (None before Alembic)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def prepare_schema(engine: Engine, url: URL, encoder_name: str) -> None:
    """Create, stamp or migrate the store at ``url`` (see the module docstring)."""
    known, head = known_revisions()
    where = url.render_as_string(hide_password=True)
    with engine.connect() as conn:  # the common case, read-only: the store is up to date
        if inspect(conn).has_table(meta.name):
            rev = current_revision(conn)
            _check_known(rev, known, head, where)
            if rev == head:
                return
    from alembic import command

    with _locked(engine, url) as conn:
        names = set(inspect(conn).get_table_names())
        rev = current_revision(conn)
        _check_known(rev, known, head, where)
        cfg = alembic_config(conn)
        if meta.name not in names:
            metadata.create_all(conn)
            conn.execute(insert(meta).values(id=1, schema_version=SCHEMA_VERSION, store_uid=str(uuid.uuid4()),
                                             encoder=encoder_name, change_seq=0, next_edit_id=1, next_row_id=1,
                                             created_at=datetime.now(UTC)))
            command.stamp(cfg, head)
            log.info("created store %s at schema revision %s", where, head)
            return
        if rev == head:
            return  # another process migrated it meanwhile
        if rev is None:
            metadata.create_all(conn, tables=list(WEIGHT_TABLES), checkfirst=True)  # stores older than those tables
            command.stamp(cfg, BASELINE)
            rev = BASELINE
        log.warning("migrating store %s from schema revision %s to %s (one transaction)", where, rev, head)
        command.upgrade(cfg, head)
    log.warning("store %s migrated to schema revision %s", where, head)


def _check_known(rev: str | None, known: frozenset[str], head: str, where: str) -> None:
    if rev is not None and rev not in known:
        raise StoreError(f"store {where} has schema revision {rev!r}, which this editmem does not know (newest known: "
                         f"{head}); it was written by a newer editmem: upgrade editmem")


@contextmanager
def _locked(engine: Engine, url: URL) -> Iterator[Connection]:
    """A connection in a transaction that holds the store's write lock; commits at the end, rolls back on error."""
    if url.get_backend_name() == "sqlite" and not is_memory_sqlite(url):
        lock_engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30, "isolation_level": None})
        # pysqlite would not open a transaction before DDL: emit BEGIN ourselves (SQLAlchemy's documented recipe)
        event.listen(lock_engine, "begin", lambda c: c.exec_driver_sql("BEGIN IMMEDIATE"))
        try:
            with lock_engine.begin() as conn:
                yield conn
        finally:
            lock_engine.dispose()
        return
    with engine.begin() as conn:
        if url.get_backend_name() == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
        yield conn
