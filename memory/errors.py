"""Errors a user can cause. The CLI prints ``str(err)`` as one line and exits non-zero; nothing else is caught."""

from __future__ import annotations


class EditmemError(Exception):
    """Base class for every error that is the user's to fix (bad input, bad URL, unknown id)."""


class StoreError(EditmemError):
    """The store cannot be opened or used (malformed or unreachable URL, encoder mismatch, corrupt index)."""


class NotFoundError(EditmemError):
    """An unknown edit id or version."""


class ValidationError(EditmemError):
    """A bad value passed to the API (empty prompt, wrong type)."""


class FormatError(EditmemError):
    """A data file that cannot be read: names the file, the record and the field."""

    def __init__(self, path: str, message: str, *, record: int | None = None, field: str | None = None):
        self.path = str(path)
        self.record = record
        self.field = field
        where = self.path
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
