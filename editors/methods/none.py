"""The ``none`` baseline: an editor that changes nothing (every locality score against it is exactly 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from editors.base import (
    EditHandle,
    Editor,
    EditorSettings,
    EditRequest,
    NullHandle,
    register_editor,
)
from memory.errors import ValidationError


@dataclass(frozen=True)
class NoneSettings(EditorSettings):
    """No settings."""


@register_editor
class NoneEditor(Editor):
    """Accepts edit requests and leaves the model untouched."""

    name = "none"
    Settings = NoneSettings

    def apply(self, requests: Sequence[EditRequest]) -> EditHandle:
        for request in requests:
            if not isinstance(request, EditRequest):
                raise ValidationError(f"expected EditRequest objects, got {type(request).__name__}")
        return NullHandle()
