"""Editors: model loading and the architecture table, hooks, and every editing method behind one protocol."""

from editors.base import (
    EditHandle,
    Editor,
    EditorSettings,
    EditRequest,
    NullHandle,
    WeightEditHandle,
    available_editors,
    get_editor,
    register_editor,
)

__all__ = [
    "EditHandle", "EditRequest", "Editor", "EditorSettings", "NullHandle", "WeightEditHandle", "available_editors",
    "get_editor", "load_model", "register_editor",
]


def __getattr__(name: str):  # load_model pulls in transformers: import it only when asked for
    if name == "load_model":
        from editors.lm.loading import load_model

        return load_model
    raise AttributeError(name)
