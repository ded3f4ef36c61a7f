"""Validators for settings: one message shape for every setting of every package ("<owner> setting <name> must be
..."). Booleans are never numbers here, and numbers must be finite."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from memory.errors import ValidationError


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(owner: str, name: str, value: Any, *, integer: bool = False, minimum: float | None = 0.0,
                 strict: bool = True, optional: bool = False) -> None:
    """Raise :class:`ValidationError` unless ``value`` is a finite number (an integer with ``integer``) above
    ``minimum`` (at least ``minimum`` when not ``strict``; no bound when ``minimum`` is None). ``optional`` allows
    None."""
    if optional and value is None:
        return
    good = is_int(value) if integer else is_number(value)
    if good and minimum is not None:
        good = value > minimum if strict else value >= minimum
    if not good:
        what = "an integer" if integer else "a number"
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        none = " or None" if optional else ""
        raise ValidationError(f"{owner} setting {name} must be {what}{bound}{none}, not {value!r}")


def check_flag(owner: str, name: str, value: Any) -> None:
    """Raise :class:`ValidationError` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValidationError(f"{owner} setting {name} must be true or false, not {value!r}")


def check_text(owner: str, name: str, value: Any, *, optional: bool = False, what: str = "a non-empty string") -> None:
    """Raise :class:`ValidationError` unless ``value`` is a non-empty string (or None with ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{owner} setting {name} must be {what}{' or None' if optional else ''}, not {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise :class:`ValidationError` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValidationError(f"{owner} setting {name} must be one of {', '.join(choices)}, not {value!r}")
