"""The editor contract, one shared tester for every registered editor (PEFT-style): for an editor built on a tiny
model,

- ``compute`` (where an editor has it) leaves the model's weights, ``requires_grad`` flags and grads untouched;
- ``apply`` raises each request's target log-probability through ``editor.model`` (the ``none`` baseline, whose
  contract is to change nothing, instead leaves every log-probability equal). A memory editor's edit is in context,
  and a random tiny model does not copy from context, so for those the contract is that each request's prompt is
  routed to its own stored edit and what ``editor.model`` answers changes, while the weights never do;
- ``restore`` is bit-identical (weights, and for memory editors the wrapped model's logits), and a second restore is
  a no-op;
- a saved handle loads again: a weight handle re-applies the same weights, a memory handle names the same edits.

What each editor needs to run on a tiny model (short optimisation, an untrained scope, a small demonstration pool,
a quickly trained MEND network) is given by :data:`SETUPS` in ``tests/test_contract.py``; a registered editor that
has no entry runs with its defaults, so a new editor is covered the moment it registers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from editors import EditRequest, NullHandle, WeightEditHandle, get_editor
from editors.retrieval.setup import MemoryEditHandle, MemoryEditor
from tests.tiny import same_weights, snapshot, target_logprobs

REQUESTS = (EditRequest("The mother tongue of Danielle Darrieux", "English", subject="Danielle Darrieux"),
            EditRequest("The capital city of France", "Rome", subject="France"))


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def check_editor_contract(name: str, model: torch.nn.Module, tok: Any, tmp_path: Path,
                          overrides: dict[str, Any] | None = None,
                          requests: Sequence[EditRequest] = REQUESTS) -> Any:
    """Run the whole contract for editor ``name`` on ``model``; returns the editor (for method-specific checks)."""
    requests = list(requests)
    original, flags = snapshot(model), _flags(model)
    before = target_logprobs(model, tok, requests)
    editor = get_editor(name, model, tok, **(overrides or {}))

    if hasattr(editor, "compute"):
        deltas = editor.compute(requests)
        assert same_weights(model, original), "compute wrote to the model"
        assert _flags(model) == flags and all(p.grad is None for p in model.parameters())
        assert deltas and all(d.abs().max() > 0 for d in deltas.values())

    handle = editor.apply(requests)
    after = target_logprobs(editor.model, tok, requests)
    edited = snapshot(model)
    if isinstance(handle, NullHandle):
        assert same_weights(model, original) and torch.equal(before, after)
    elif isinstance(editor, MemoryEditor):
        assert isinstance(handle, MemoryEditHandle) and same_weights(model, original)
        routed = [d.edit.id if d.in_scope else None for d in editor.model.route([r.prompt for r in requests])]
        assert routed == handle.ids, f"{name}: the requests are not routed to their own edits ({routed})"
        assert not torch.equal(after, before)
    else:
        assert (after > before).all(), f"{name}: the edit did not raise every target ({before} -> {after})"

    path = tmp_path / f"{name}-handle.pt"
    handle.save(path)
    handle.restore()
    assert same_weights(model, original), f"{name}: restore is not bit-identical"
    assert _flags(model) == flags
    if isinstance(editor, MemoryEditor):  # the store no longer answers for them: the wrapper is the base model again
        assert torch.equal(target_logprobs(editor.model, tok, requests), before)
    handle.restore()  # a second restore is a no-op
    assert same_weights(model, original)

    if isinstance(handle, WeightEditHandle):
        loaded = type(handle).load(path, model)
        assert same_weights(model, edited), f"{name}: a reloaded handle does not re-apply the same weights"
        loaded.restore()
        assert same_weights(model, original)
    elif isinstance(handle, MemoryEditHandle):
        loaded_memory = type(handle).load(path, editor.memory)
        assert loaded_memory.edits == handle.edits
    else:
        assert path.is_file()
    return editor
