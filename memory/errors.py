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
    """A data file that cannot be read: names the file, the record and the field.

    The record is given as a JSONL ``line`` (1-based), a ``label`` (such as ``K_F[3]`` in a file of named lists) or a
    ``record`` index (0-based, said so in the message), in that order of preference.
    """

    def __init__(self, path: str, message: str, *, record: int | None = None, line: int | None = None,
                 label: str | None = None, field: str | None = None):
        self.path = str(path)
        self.record = record
        self.line = line
        self.field = field
        where = self.path
        if line is not None:
            where += f", line {line}"
        elif label is not None:
            where += f", record {label}"
        elif record is not None:
            where += f", record {record} (0-based)"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
