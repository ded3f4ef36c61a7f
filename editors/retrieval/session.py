"""Open a memory editor (SERAC, IKE) on an existing store, to answer questions: what ``editmem ask`` and the HTTP
service both do, so neither front end knows any method by name."""

from __future__ import annotations

from typing import Any

from editors.base import editor_class, get_editor
from editors.retrieval.setup import DEFAULT_SCOPE, MemoryEditor
from memory.checks import check_number
from memory.errors import ValidationError


def open_memory_editor(method: str, store: str, model: Any, tokenizer: Any, *, scope: str = DEFAULT_SCOPE,
                       threshold: float | None = None, k: int = 5, **options: Any) -> MemoryEditor:
    """The memory editor ``method`` over ``model`` on the existing store at ``store``, with the store's own encoder.
    ``options`` are the method's own (say ``counterfactual`` for SERAC, ``mode``/``demos``/``demo_file`` for IKE;
    None means its default). Close it with ``editor.memory.close()``."""
    cls = editor_class(method)
    if not issubclass(cls, MemoryEditor):
        raise ValidationError(f"{method!r} is not a memory editor; answering from a store needs one of "
                              f"{', '.join(memory_editors())}")
    check_number("ask", "k", k, integer=True)
    from memory.store import EditMemory

    with EditMemory.open(store, create=False) as probe:
        encoder_name = probe.encoder.name
    settings = cls.query_settings(store=store, encoder=encoder_name, scope=scope, threshold=threshold, k=k,
                                  **options)
    editor = get_editor(method, model, tokenizer, **settings)
    assert isinstance(editor, MemoryEditor)
    return editor


def memory_editors() -> list[str]:
    """The registered editors whose edits live in a store."""
    from editors.base import available_editors

    return [name for name in available_editors() if issubclass(editor_class(name), MemoryEditor)]
