"""Open a memory editor (SERAC, IKE) on an existing store, to answer questions: what ``editmem ask`` and the HTTP
service both do, so neither front end knows any method by name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from editors.base import editor_class, get_editor
from editors.retrieval.setup import DEFAULT_SCOPE, MemoryEditor
from memory.checks import check_number
from memory.errors import ValidationError


def memory_editor_settings(method: str, store: str, *, scope: str = DEFAULT_SCOPE, threshold: float | None = None,
                           k: int = 5, **options: Any) -> dict[str, Any]:
    """The settings :func:`open_memory_editor` uses, checked without a model: the method is a memory editor, the
    store exists, the settings are valid and the scope classifier they name is saved. Call it before loading a
    model, so a missing piece is reported in a second rather than after the model loads."""
    cls = _memory_editor_class(method)
    check_number("ask", "k", k, integer=True)
    from memory.store import EditMemory

    with EditMemory.open(store, create=False) as probe:
        encoder_name = probe.encoder.name
    settings = cls.query_settings(store=store, encoder=encoder_name, scope=scope, threshold=threshold, k=k,
                                  **options)
    cls.check_ready(settings)
    return settings


def _memory_editor_class(method: str) -> type[MemoryEditor]:
    cls = editor_class(method)
    if not issubclass(cls, MemoryEditor):
        raise ValidationError(f"{method!r} is not a memory editor; answering from a store needs one of "
                              f"{', '.join(memory_editors())}")
    return cls


def open_memory_editor(method: str, store: str, model: Any, tokenizer: Any, *, scope: str = DEFAULT_SCOPE,
                       threshold: float | None = None, k: int = 5, namespace: str = "default",
                       **options: Any) -> MemoryEditor:
    """The memory editor ``method`` over ``model`` on the existing store at ``store`` (its ``namespace``: the edits
    it routes to and writes), with the store's own encoder. ``options`` are the method's own (say ``counterfactual``
    for SERAC, ``mode``/``demos``/``demo_file`` for IKE; None means its default). Close it with
    ``editor.memory.close()``."""
    settings = memory_editor_settings(method, store, scope=scope, threshold=threshold, k=k, namespace=namespace,
                                      **options)
    editor = get_editor(method, model, tokenizer, **settings)
    assert isinstance(editor, MemoryEditor)
    return editor


def memory_editors() -> list[str]:
    """The registered editors whose edits live in a store."""
    from editors.base import available_editors

    return [name for name in available_editors() if issubclass(editor_class(name), MemoryEditor)]


def check_memory_editors(methods: Sequence[str], overrides: Mapping[str, Mapping[str, Any]]) -> None:
    """Before a model loads: each name in ``methods`` is a registered editor, and each memory editor among them has
    valid settings (``overrides[name]``) and the scope classifier they route with (:meth:`MemoryEditor.check_ready`)."""
    for name in methods:
        cls = editor_class(name)
        if issubclass(cls, MemoryEditor):
            cls.check_ready(overrides.get(name, {}))
