"""Alembic environment. :mod:`memory.migrate` passes an open connection, inside the transaction it owns, as
``config.attributes["connection"]``; without one (the ``alembic`` command line, for writing new revisions) an engine
is made from the ``sqlalchemy.url`` option."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from memory.schema import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")
    with engine.begin() as conn:
        _run(conn)
