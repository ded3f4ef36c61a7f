"""Command-line values shared by several commands."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
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


def none_or_text(text: str) -> str | None:
    """An argparse ``type`` for a value that ``none`` turns off (e.g. ``--reranker none``)."""
    return None if text.strip().lower() == "none" else text


def bounded_int(minimum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for an integer at least ``minimum`` that SQL can hold (|value| <= 2**63 - 1); a bad value
    is a one-line usage error rather than an OverflowError deep in a query."""
    from memory.validate import MAX_ID

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if abs(value) > MAX_ID:
            raise argparse.ArgumentTypeError(f"{text} is out of range (at most {MAX_ID})")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def check_output_folder(folder: str | os.PathLike[str], flag: str) -> None:
    """ValidationError (naming ``flag``) unless ``folder`` is, or can be created as, a folder this process may write:
    checked before a long job, so that it does not fail only when saving its result."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ValidationError(f"{flag}: {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValidationError(f"{flag}: cannot create {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK):
        raise ValidationError(f"{flag}: cannot write {path}: {probe} is not writable")


def method_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set METHOD.KEY=VALUE`` items as {method: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in key_values(items, form="METHOD.KEY=VALUE", example="ft.lr=1e-3", dotted=True).items():
        method, _, name = key.partition(".")
        out.setdefault(method.strip(), {})[name.strip()] = value
    return out
