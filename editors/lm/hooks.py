"""Forward hooks as context managers that always remove themselves, and a forward pass with substituted weights.

Every hook here is registered on entering a ``with`` block and removed in ``finally``, so an exception inside the
block (or inside the model) never leaves a hook behind:

- :func:`capture` records a module's input (the first positional argument, e.g. the key entering an MLP output
  projection) or its output on each forward call.
- :func:`add_at` adds vectors to a module's output at given (row, position) pairs; gradients flow into them.
- :func:`stop_after` ends the forward pass once a module has run (the rest of the model is skipped, no error
  escapes the block), for when only early activations are wanted.
- :func:`skip_blocks` stands recorded outputs in for the lower blocks of a model, so a forward pass runs only the
  blocks above them (for repeated passes whose lower blocks' output cannot change).
- :func:`forward` runs the model with some parameters replaced by other tensors through
  :func:`torch.func.functional_call`: nothing in the model is written, not even temporarily visible to other
  callers after it returns.

Module outputs may be tensors or tuples whose first element is the hidden state (older transformer blocks); both are
handled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch


def _first(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    return type(value)((new, *value[1:])) if isinstance(value, tuple) else [new, *value[1:]]


@dataclass
class Captured:
    """What :func:`capture` recorded: one tensor per forward call, in call order (``last`` is the latest)."""

    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def last(self) -> torch.Tensor:
        if not self.values:
            raise RuntimeError("the hooked module did not run")
        return self.values[-1]


@contextmanager
def capture(module: torch.nn.Module, what: Literal["input", "output"] = "output", *,
            detach: bool = True, whole: bool = False) -> Iterator[Captured]:
    """Record ``module``'s first input (``what="input"``) or its output on every call inside the block.

    ``whole``: record the output as the module returned it (a tuple stays a tuple), not just its first tensor.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', not {what!r}")
    if whole and what != "output":
        raise ValueError("whole=True records outputs only")
    record = Captured()

    def keep(t: torch.Tensor) -> None:
        record.values.append(t.detach() if detach else t)

    if what == "input":
        def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            keep(_first(args) if args else _first(next(iter(kwargs.values()))))

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(_module: torch.nn.Module, _args: tuple, output: Any) -> None:
            if whole:
                record.values.append(detach_output(output) if detach else output)
            else:
                keep(_first(output))

        handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@contextmanager
def add_at(module: torch.nn.Module, vectors: torch.Tensor, rows: torch.Tensor,
           positions: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``module``'s output (B, T, d) gets ``vectors[i]`` added at ``[rows[i], positions[i]]``.

    ``vectors`` is (m, d) or (d,) (the same vector everywhere); out of place, so gradients reach ``vectors``.
    """
    rows = torch.as_tensor(rows, dtype=torch.long)
    positions = torch.as_tensor(positions, dtype=torch.long)
    if rows.shape != positions.shape or rows.dim() != 1:
        raise ValueError("rows and positions must be 1-d and of the same length")

    def hook(_module: torch.nn.Module, _args: tuple, output: Any) -> Any:
        hidden = _first(output)
        vec = vectors if vectors.dim() == 2 else vectors.unsqueeze(0).expand(len(rows), -1)
        extra = torch.zeros_like(hidden)
        extra = extra.index_put((rows.to(hidden.device), positions.to(hidden.device)), vec.to(hidden.dtype))
        return _replace_first(output, hidden + extra)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by :func:`stop_after`'s hook to end a forward pass early; never escapes the block."""


@contextmanager
def stop_after(module: torch.nn.Module | None) -> Iterator[None]:
    """End any forward pass inside the block right after ``module`` runs (``None``: a no-op).

    The model call then returns nothing (its result variable stays unset); read activations from :func:`capture`.
    Hooks entered before this one (outer ``with`` items) still see the module, so list ``capture`` first.
    """
    if module is None:
        yield
        return

    def hook(*_: Any) -> None:
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


def detach_output(output: Any) -> Any:
    """A module output (a tensor, or a tuple/list that may hold tensors) with every tensor in it detached."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(detach_output(x) for x in output)
    return output


class _Replay(torch.nn.Module):
    """Stands in for a block: returns a fixed output, whatever it is given."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self.output


@contextmanager
def skip_blocks(blocks: torch.nn.ModuleList, count: int, output: Any) -> Iterator[None]:
    """Inside the ``with`` block, ``blocks[0..count-1]`` do not run: each is replaced by a stand-in that returns
    ``output``, so block ``count`` receives it as its input and the pass runs only the blocks from ``count`` up.

    ``output`` must be what ``blocks[count - 1]`` returned for the very same inputs (recorded with
    :func:`capture` and ``whole=True``); everything outside the blocks (embeddings, position embeddings, attention
    masks) still runs as usual. The original blocks are put back in ``finally``. A forward pass with substituted
    parameters (:func:`forward`) inside the block must leave out the skipped blocks' parameter names, since their
    modules are not in the model while it runs.
    """
    if not 0 <= count <= len(blocks):
        raise ValueError(f"cannot skip {count} of {len(blocks)} blocks")
    originals = [blocks[i] for i in range(count)]
    stand_in = _Replay(output)
    try:
        for i in range(count):
            blocks[i] = stand_in
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def forward(model: torch.nn.Module, overrides: Mapping[str, torch.Tensor] | None = None, **inputs: Any) -> Any:
    """``model(**inputs)``, with the parameters named in ``overrides`` replaced by the given tensors.

    The model's own parameters are never written: :func:`torch.func.functional_call` swaps them only for the call.
    """
    if not overrides:
        return model(**inputs)
    return torch.func.functional_call(model, dict(overrides), args=(), kwargs=inputs, strict=False)
