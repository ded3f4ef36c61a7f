"""Command-line values shared by several commands."""

from __future__ import annotations

import json
from typing import Any

from memory.errors import ValidationError


def key_values(items: list[str], *, example: str, form: str = "KEY=VALUE", dotted: bool = False) -> dict[str, Any]:
    """Repeated ``--set KEY=VALUE`` items as a dict. A value is read as JSON when it parses (``3``, ``null``,
    ``[3,4]``) and kept as the text otherwise. ``dotted``: every key must be ``PART.NAME`` (e.g. ``ft.lr``). A
    malformed item is a :class:`ValidationError` naming ``form`` and ``example``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        head, dot, name = key.partition(".")
        if not sep or not key.strip() or (dotted and (not dot or not head or not name)):
            raise ValidationError(f"--set takes {form} (e.g. {example}), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out
