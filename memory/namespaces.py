"""Namespace names: which values ``EditMemory.open(..., namespace=...)`` and ``editmem --namespace`` accept."""

from __future__ import annotations

import re

from memory.errors import ValidationError

NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_namespace(value: object) -> str:
    """``value`` if it is a namespace name (1-64 letters, digits, ``_``, ``.``, ``-``, starting with a letter or
    digit: it names an index file), else ValidationError."""
    if not isinstance(value, str) or not NAMESPACE_RE.fullmatch(value):
        raise ValidationError(f"namespace must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                              f"digit), got {value!r}")
    return value
