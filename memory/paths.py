"""Where editmem keeps files of its own: the cache directory and its subfolders.

The cache directory is ``$EDITMEM_CACHE`` or, when that is unset or empty, ``~/.cache/editmem`` (``~`` expanded in
either). Nothing here creates a folder: callers make the ones they write to.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache directory: ``$EDITMEM_CACHE``, default ``~/.cache/editmem``."""
    return Path(os.environ.get("EDITMEM_CACHE") or Path.home() / ".cache" / "editmem").expanduser()


def cache_subdir(name: str) -> Path:
    """A named subfolder of the cache directory (``scope``, ``ike``, ``stats``, ...)."""
    return cache_dir() / name


def pg_index_file(store_uid: str) -> Path:
    """The FAISS index file of a PostgreSQL store: ``pg-<store uid>.faiss`` in the cache directory."""
    return cache_dir() / f"pg-{store_uid}.faiss"
