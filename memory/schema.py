"""The store's SQL schema (SQLAlchemy Core, SQLite and PostgreSQL), how an engine is made from a URL, creating a
store's tables, and the small SQL helpers the store's modules share (``CURRENT``, ``chunks``, ``db_errors``, ...).

Tables, all prefixed ``editmem_`` so a store can share a PostgreSQL database with other applications:

- ``editmem_meta``: one row (id=1): schema version, store uid, default encoder, the change counter ``change_seq`` and
  the next free edit id / version-row id. Every write transaction first bumps ``change_seq`` with an UPDATE, which
  locks the row until commit: writers are serialised, and a reader that sees counter N knows every change <= N is
  committed. Edit ids and row ids are allocated from the same row under the same lock.
- ``editmem_edits``: one row per version of an edit (``row_id`` is the FAISS id). A version is closed by setting
  ``valid_to``; nothing else is ever changed in place. A delete writes a tombstone version (``deleted`` true).
  The current version of an edit is its row with ``valid_to IS NULL``.
- ``editmem_embeddings``: the key embedding (float32 bytes) of a version row per encoder name.
- ``editmem_changes``: the change log (seq, row_id, op): op ``add`` when a row becomes searchable, ``del`` when it
  stops being so. An index that reflects counter N catches up by applying the entries with seq > N.

Weight edits (written by ``editors.weights``; the store keeps them as opaque blobs, see ``EditMemory.attach_weights``):

- ``editmem_weight_models``: one row per edited model the store keeps records for: the base model's fingerprint, the
  base model as the user named it, and the folder the edited model is saved in (if any).
- ``editmem_weight_records``: one row per weight edit applied to such a model (one editor call, possibly a batch),
  in the order applied (``record_id``): method, editor settings, the touched parameter names and a blob of their
  deltas, and optionally a blob of editor state (AlphaEdit keeps the keys the record was written at, so a later
  process counts them without recomputing them; Alembic revision 0003). ``applied`` turns false when it is removed;
  rows are never deleted.
- ``editmem_weight_links``: which edit versions a record wrote into the weights.
- ``editmem_weight_bases``: the base value (blob) of every parameter a record of a model touched, written the first
  time one does, so the edited weights can be recomputed as base + the applied records in order.

These tables were added after schema version 1 without changing it: a store made before them gets them when it is
next opened (:func:`ensure_weight_tables`).

Namespaces (schema version 2, Alembic revision 0002): every version row and change-log entry has a ``namespace``
(default ``"default"``). Edit and row ids stay global (allocated from the meta row), so an id names one edit in one
namespace. Schema changes are Alembic revisions in ``memory/migrations``; :mod:`memory.migrate` creates, stamps and
upgrades stores.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import URL, Connection, Engine, Row, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError

from memory.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
DEFAULT_NAMESPACE = "default"
CONNECT_TIMEOUT_S = 5

metadata = MetaData()

meta = Table(
    "editmem_meta", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("schema_version", Integer, nullable=False),
    Column("store_uid", String(36), nullable=False),
    Column("encoder", String(200), nullable=False),
    Column("change_seq", BigInteger, nullable=False),
    Column("next_edit_id", BigInteger, nullable=False),
    Column("next_row_id", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

edits = Table(
    "editmem_edits", metadata,
    Column("row_id", BigInteger, primary_key=True, autoincrement=False),
    Column("edit_id", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("target_new", Text, nullable=False),
    Column("subject", Text, nullable=True),
    Column("ground_truth", Text, nullable=True),
    Column("rephrases", Text, nullable=False),  # JSON list of strings
    Column("metadata", Text, nullable=False),  # JSON object
    Column("deleted", Boolean, nullable=False),
    Column("valid_from", DateTime(timezone=True), nullable=False),
    Column("valid_to", DateTime(timezone=True), nullable=True),
    Column("content_key", String(64), nullable=False),
    Column("namespace", String(64), nullable=False, server_default=DEFAULT_NAMESPACE),
    UniqueConstraint("edit_id", "version", name="uq_editmem_edits_version"),
    Index("ix_editmem_edits_content_key", "content_key"),
)
# Current versions (valid_to IS NULL) by edit id: len, list and rebuild read only these. A partial index, so that a
# query on content_key is not planned through it.
Index("ix_editmem_edits_current", edits.c.edit_id, sqlite_where=edits.c.valid_to.is_(None),
      postgresql_where=edits.c.valid_to.is_(None))
Index("ix_editmem_edits_ns_current", edits.c.namespace, edits.c.edit_id, sqlite_where=edits.c.valid_to.is_(None),
      postgresql_where=edits.c.valid_to.is_(None))

embeddings = Table(
    "editmem_embeddings", metadata,
    Column("row_id", BigInteger, nullable=False),
    Column("encoder", String(200), nullable=False),
    Column("dim", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32, little-endian, dim * 4 bytes
    PrimaryKeyConstraint("row_id", "encoder", name="pk_editmem_embeddings"),
)

changes = Table(
    "editmem_changes", metadata,
    Column("seq", BigInteger, nullable=False),
    Column("row_id", BigInteger, nullable=False),
    Column("op", String(8), nullable=False),
    Column("namespace", String(64), nullable=False, server_default=DEFAULT_NAMESPACE),
    PrimaryKeyConstraint("seq", "row_id", name="pk_editmem_changes"),
    Index("ix_editmem_changes_ns", "namespace", "seq"),
)

weight_models = Table(
    "editmem_weight_models", metadata,
    Column("model_id", Integer, primary_key=True, autoincrement=True),
    Column("fingerprint", String(200), nullable=False),
    Column("base", Text, nullable=False),
    Column("folder", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("folder", name="uq_editmem_weight_models_folder"),
)

weight_records = Table(
    "editmem_weight_records", metadata,
    Column("record_id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Integer, nullable=False),
    Column("method", String(64), nullable=False),
    Column("settings", Text, nullable=False),  # JSON object: the editor overrides used
    Column("params", Text, nullable=False),  # JSON list of parameter names
    Column("deltas", LargeBinary, nullable=False),  # opaque to the store
    Column("applied", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("removed_at", DateTime(timezone=True), nullable=True),
    Column("note", Text, nullable=True),  # why it was removed
    Column("editor_state", LargeBinary, nullable=True),  # opaque: what the editor keeps for later calls (0003)
    Index("ix_editmem_weight_records_model", "model_id", "record_id"),
)

weight_links = Table(
    "editmem_weight_links", metadata,
    Column("record_id", Integer, nullable=False),
    Column("edit_id", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    PrimaryKeyConstraint("record_id", "edit_id", name="pk_editmem_weight_links"),
    Index("ix_editmem_weight_links_edit", "edit_id"),
)

weight_bases = Table(
    "editmem_weight_bases", metadata,
    Column("model_id", Integer, nullable=False),
    Column("param", String(500), nullable=False),
    Column("value", LargeBinary, nullable=False),  # opaque to the store
    PrimaryKeyConstraint("model_id", "param", name="pk_editmem_weight_bases"),
)

WEIGHT_TABLES = (weight_models, weight_records, weight_links, weight_bases)

OP_ADD = "add"
OP_DEL = "del"


def parse_url(url: str) -> URL:
    """A SQLAlchemy URL for SQLite or PostgreSQL (psycopg 3), or StoreError with one line saying what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"store URL must be a non-empty string, got {url!r}")
    if "://" not in url:
        raise StoreError(f"malformed store URL {url!r}: expected sqlite:///path.db or "
                         f"postgresql+psycopg://user@host/db (did you mean sqlite:///{url}?)")
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as err:
        raise StoreError(f"malformed store URL {url!r}: {err}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    raise StoreError(f"unsupported store URL scheme {parsed.drivername!r}: use sqlite:/// or postgresql+psycopg://")


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def make_engine(url: URL) -> Engine:
    """An engine for ``url``: SQLite in WAL mode with a busy timeout; PostgreSQL with a connect timeout."""
    kwargs: dict[str, Any] = {"future": True}
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 30}
        if is_memory_sqlite(url):
            from sqlalchemy.pool import StaticPool

            kwargs["connect_args"]["check_same_thread"] = False
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if "connect_timeout" not in url.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    kwargs["pool_pre_ping"] = True
    return create_engine(url, **kwargs)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def describe_db_error(err: SQLAlchemyError, url: URL) -> str:
    """One line for a database error: the driver's first line, without SQL or a traceback."""
    where = url.render_as_string(hide_password=True)
    orig = getattr(err, "orig", None) if isinstance(err, DBAPIError) else None
    text = str(orig if orig is not None else err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return f"store {where}: {first}"


def tables_exist(engine: Engine) -> bool:
    return inspect(engine).has_table(meta.name)


def ensure_weight_tables(engine: Engine) -> None:
    """Create the weight-edit tables if the store predates them (another process may do it at the same moment)."""
    names = set(inspect(engine).get_table_names())
    if all(t.name in names for t in WEIGHT_TABLES):
        return
    try:
        metadata.create_all(engine, tables=list(WEIGHT_TABLES))
    except SQLAlchemyError:
        names = set(inspect(engine).get_table_names())
        if not all(t.name in names for t in WEIGHT_TABLES):
            raise


# --- reading and writing helpers shared by the store's modules --------------------------------------------------------
CURRENT = and_(edits.c.valid_to.is_(None), edits.c.deleted.is_(False))  # the searchable version of each live edit
SQL_CHUNK = 5000  # most values in one IN (...) list


def chunks(items: Sequence[Any], size: int = SQL_CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def aware(value: datetime | None) -> datetime | None:
    """A timestamp read back from SQL, as UTC if the database dropped its zone (SQLite does)."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def insert_ignore(conn: Connection, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()


@contextmanager
def db_errors(url: URL) -> Iterator[None]:
    """Turn a database error into StoreError with one line."""
    try:
        yield
    except SQLAlchemyError as err:
        raise StoreError(describe_db_error(err, url)) from None


def ensure_schema(engine: Engine, url: URL, encoder_name: str, create: bool) -> tuple[str, str]:
    """Create the store (tables, meta row, Alembic stamp) or bring an older one up to date (:mod:`memory.migrate`);
    return (store uid, stored encoder name). StoreError for a schema newer than this code knows."""
    from memory.migrate import prepare_schema

    if not create and not tables_exist(engine):
        raise StoreError(f"no editmem store at {url.render_as_string(hide_password=True)} "
                         "(run `editmem init` to create one)")
    prepare_schema(engine, url, encoder_name)
    ensure_weight_tables(engine)  # a store whose weight tables were lost or never made
    with engine.connect() as conn:
        row = conn.execute(select(meta).where(meta.c.id == 1)).first()
    if row is None:
        row = _insert_meta(engine, encoder_name)
    if row.schema_version > SCHEMA_VERSION:
        raise StoreError(f"store schema version {row.schema_version} is newer than this editmem supports "
                         f"({SCHEMA_VERSION}); upgrade editmem")
    return row.store_uid, row.encoder


def _insert_meta(engine: Engine, encoder_name: str) -> Row:
    try:
        with engine.begin() as conn:
            conn.execute(insert(meta).values(id=1, schema_version=SCHEMA_VERSION, store_uid=str(uuid.uuid4()),
                                             encoder=encoder_name, change_seq=0, next_edit_id=1, next_row_id=1,
                                             created_at=datetime.now(UTC)))
    except IntegrityError:
        pass  # created concurrently
    with engine.connect() as conn:
        return conn.execute(select(meta).where(meta.c.id == 1)).one()
