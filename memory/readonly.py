"""Opening a SQLite store read-only: for a store on read-only media (a CD, a read-only mount, a folder the user may not
write), or when the caller asks for it (``EditMemory.open(url, read_only=True)``).

A store in WAL mode normally needs its ``-wal`` and ``-shm`` files, which SQLite creates beside the database even to
read it; in a folder that cannot be written it then fails with "unable to open database file". Here the database is
opened through a SQLite URI with ``mode=ro``, and with ``immutable=1`` as well when the folder cannot be written (no
other process can be writing there, so SQLite may skip the locking files). The store's own writes are refused
before they reach SQL (:func:`refuse_write`), and the index is kept in memory only.

PostgreSQL stores are never read-only here (the server decides what a user may write).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from memory.errors import StoreError


def sqlite_file(url: URL) -> Path | None:
    """The database file of a file-backed SQLite URL, None for PostgreSQL or an in-memory SQLite store."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def location_writable(path: Path) -> bool:
    """Whether this process may write the database file and its folder (where SQLite keeps its journal files).
    ``os.access`` answers for the real user: a read-only file system is read-only for root too (EROFS), while mode
    bits are not (root may write a chmod 0555 folder, and this says so)."""
    folder = path.parent if str(path.parent) else Path(".")
    return os.access(folder, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def wants_read_only(url: URL, read_only: bool | None) -> bool:
    """``read_only`` as asked, or (None) true for an existing SQLite file in a location this process cannot write."""
    path = sqlite_file(url)
    if path is None:
        if read_only:
            raise StoreError("only a SQLite file store can be opened read-only")
        return False
    if read_only is not None:
        return bool(read_only)
    return path.is_file() and not location_writable(path)


def read_only_engine(url: URL) -> Engine:
    """An engine that reads ``url``'s SQLite file without writing anything beside it."""
    path = sqlite_file(url)
    assert path is not None
    if not path.is_file():
        raise StoreError(f"no store at {path} (a read-only store must exist)")
    immutable = "&immutable=1" if not location_writable(path) else ""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro{immutable}"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)

    return create_engine("sqlite://", creator=connect, poolclass=NullPool, future=True)


def refuse_write(url: str) -> StoreError:
    """The error for a write to a store opened read-only."""
    return StoreError(f"store {url} is read-only (opened read-only: its location cannot be written, or "
                      "read_only=True); copy it somewhere writable to change it")
