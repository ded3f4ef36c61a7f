"""``alphaedit``: null-space constrained MEMIT (Fang et al. ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge
Editing for Language Models").

MEMIT's batch editing over MEMIT's layer window (:mod:`editors.methods.memit`: the same values, keys, residual spread
and window), with one step changed: at each window layer the update is projected onto the null space of the
preserved knowledge, so that the layer's output on preserved keys does not move, and earlier edits' keys are kept
as a constraint (the paper's eq. 11 as its code computes it)::

    Delta = R K_1^T P (K_p K_p^T P + K_1 K_1^T P + l2 I)^-1          (float64)

- ``P``: the projection onto the eigenvectors of ``C = E[k k^T]`` (the same statistics as ROME and MEMIT,
  :mod:`editors.locate.stats`) with eigenvalue below ``nullspace_threshold`` (:mod:`editors.locate.nullspace`),
  computed once per model, layer and threshold and cached beside the statistics;
- ``K_1``: this batch's keys at the layer, ``R`` its residuals (as MEMIT);
- ``K_p``: the keys of the earlier edits made through this editor that are still applied (kept in the editor and in
  each edit's :class:`AlphaEditHandle`; restoring an edit drops its keys, re-applying adds them again);
- ``l2``: the ridge weight (the paper's ``L2``).

``mom2_update_weight`` is MEMIT's and is not used. Since ``P`` is on the right, ``Delta k_0 = 0`` for every
``k_0`` with ``P k_0 = 0``: the preserved keys' outputs are unchanged up to float rounding (tested on a tiny model).

Defaults: MEMIT's window, values and prefixes (:meth:`MEMITEditor.default_settings`); ``nullspace_threshold``
2e-2 and ``l2`` 10 (the paper's Llama3-8B values, not tuned here: on another model's key scale the number of kept
directions differs; ``editor.last_stats["null_dims"]`` reports it per layer).

Compute, then apply: :meth:`AlphaEditEditor.compute` writes nothing; :meth:`AlphaEditEditor.apply` adds the deltas
through :meth:`AlphaEditHandle.add_deltas` and records the batch's keys.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editors.base import EditRequest, WeightEditHandle, check_requests, register_editor
from editors.locate.nullspace import Projection, null_space_projection
from editors.locate.stats import LayerStats
from editors.methods.memit import MEMITEditor, MEMITSettings, default_layers, default_mom2_update_weight
from memory.checks import check_number

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlphaEditSettings(MEMITSettings):
    """MEMIT's settings plus the null space's threshold and the ridge weight (see the module docstring)."""

    nullspace_threshold: float = 2e-2
    l2: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("AlphaEdit", "nullspace_threshold", self.nullspace_threshold)
        check_number("AlphaEdit", "l2", self.l2)


class KeyBlock:
    """One batch's keys at each window layer, (d_in, n) float32 on the CPU."""

    _serial = itertools.count()

    def __init__(self, keys: Mapping[int, torch.Tensor]):
        self.keys = {int(layer): k.detach().float().cpu() for layer, k in keys.items()}
        self.serial = next(KeyBlock._serial)  # identifies the block in the editor's running sum


def joined_keys(blocks: Sequence[KeyBlock]) -> dict[str, torch.Tensor]:
    """The keys of ``blocks`` side by side at each layer, ``{"layer.L": (d_in, n)}``: what a weight record keeps of
    the edits it wrote (the sum of ``k k^T`` over the blocks is ``K K^T`` of the joined keys)."""
    layers = sorted({layer for b in blocks for layer in b.keys})
    return {f"layer.{layer}": torch.cat([b.keys[layer] for b in blocks if layer in b.keys], dim=1)
            for layer in layers}


def block_of(tensors: Mapping[str, torch.Tensor]) -> KeyBlock:
    """The :class:`KeyBlock` of :func:`joined_keys`' output."""
    return KeyBlock({int(name.removeprefix("layer.")): k for name, k in tensors.items()})


class AlphaEditHandle(WeightEditHandle):
    """A weight edit's undo plus the keys it wrote (its :class:`KeyBlock` s), which the editor counts among the
    earlier edits' keys while the edit is applied."""

    def __init__(self, model: torch.nn.Module, originals: Mapping[str, torch.Tensor],
                 edited: Mapping[str, torch.Tensor], blocks: Sequence[KeyBlock] = ()):
        super().__init__(model, originals, edited)
        self.blocks = list(blocks)
        self.editor: AlphaEditEditor | None = None

    def reapply(self) -> None:
        super().reapply()
        if self.editor is not None:
            self.editor.remember(self.blocks)

    def restore(self) -> None:
        if self.applied and self.editor is not None:
            self.editor.forget(self.blocks)
        super().restore()

    def absorb(self, later: WeightEditHandle) -> None:
        super().absorb(later)
        if isinstance(later, AlphaEditHandle):
            self.blocks.extend(later.blocks)
            if self.editor is None:
                self.editor = later.editor

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["keys"] = [{str(layer): k for layer, k in block.keys.items()} for block in self.blocks]
        return state

    @classmethod
    def _from_state(cls, model: torch.nn.Module, state: Mapping[str, Any]) -> AlphaEditHandle:
        blocks = [KeyBlock({int(layer): k for layer, k in b.items()}) for b in state.get("keys", [])]
        return cls(model, state["originals"], state["edited"], blocks)


@register_editor
class AlphaEditEditor(MEMITEditor):
    """MEMIT with null-space projected updates and earlier edits' keys as a constraint (see the module docstring)."""

    name = "alphaedit"
    Settings = AlphaEditSettings
    settings: AlphaEditSettings

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: AlphaEditSettings | None = None):
        super().__init__(model, tokenizer, settings)
        self._projections: dict[int, Projection] = {}
        self._blocks: list[KeyBlock] = []  # keys of the applied edits, in order
        self._kept: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}  # layer -> (block ids summed, K_p K_p^T)
        self._batch_keys: dict[int, torch.Tensor] = {}

    @classmethod
    def default_settings(cls, model: torch.nn.Module) -> AlphaEditSettings:
        return AlphaEditSettings(layers=default_layers(model), mom2_update_weight=default_mom2_update_weight(model))

    # --- earlier edits' keys ------------------------------------------------------------------------------------
    def remember(self, blocks: Sequence[KeyBlock]) -> None:
        known = {b.serial for b in self._blocks}
        self._blocks.extend(b for b in blocks if b.serial not in known)

    def keep(self, requests: Sequence[EditRequest]) -> KeyBlock | None:
        """Count ``requests``, edits the weights already hold (written by an earlier process, whose key blocks are
        gone), among the earlier edits: their keys at every window layer, computed at the current weights, become one
        remembered :class:`KeyBlock`. (In the process that wrote them the keys were taken as each layer was updated,
        so these differ from those by the window's own updates.)"""
        if not requests:
            return None
        requests = check_requests(requests, "AlphaEdit", need_subject=True)
        prefixes = self.prefixes()
        t0 = time.perf_counter()
        block = KeyBlock({layer: self._keys(layer, requests, prefixes, {}).double().T for layer in self.edit_layers()})
        self.remember([block])
        log.info("alphaedit: keys of %d edit(s) already in the weights computed in %.1f s", len(requests),
                 time.perf_counter() - t0)
        return block

    def forget(self, blocks: Sequence[KeyBlock]) -> None:
        gone = {b.serial for b in blocks}
        self._blocks = [b for b in self._blocks if b.serial not in gone]

    def previous_keys(self, layer: int, dim: int) -> torch.Tensor:
        """``K_p K_p^T`` at ``layer`` (float64) over the applied edits' keys; extended, not re-summed, when edits
        were only added since the last call."""
        ids = tuple(b.serial for b in self._blocks if layer in b.keys)
        cached = self._kept.get(layer)
        if cached is not None and ids[:len(cached[0])] == cached[0]:
            total = cached[1]
            start = len(cached[0])
        else:
            total, start = torch.zeros((dim, dim), dtype=torch.float64), 0
        blocks = [b for b in self._blocks if layer in b.keys]
        for block in blocks[start:]:
            k = block.keys[layer].double()
            total = total + k @ k.T
        self._kept[layer] = (ids, total)
        return total

    def projection(self, layer: int, stats: LayerStats) -> Projection:
        if layer not in self._projections:
            self._projections[layer] = null_space_projection(stats, self.settings.nullspace_threshold)
        return self._projections[layer]

    # --- the one step that differs from MEMIT ---------------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        self._batch_keys = {}
        t0 = time.perf_counter()
        for layer, stats in self.layer_stats(self.edit_layers()).items():
            self.projection(layer, stats)
        t_projection = time.perf_counter() - t0
        deltas = super().compute(requests)
        self.last_stats.update({"projection_seconds": t_projection,
                                "null_dims": {layer: p.kept for layer, p in self._projections.items()}})
        return deltas

    def layer_update(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        p = self.projection(layer, stats).matrix.to(keys.device)
        dim = keys.shape[0]
        kept = self.previous_keys(layer, dim).to(keys.device)
        lhs = p @ (keys @ keys.T + kept) + self.settings.l2 * torch.eye(dim, dtype=torch.float64, device=keys.device)
        solved = torch.linalg.solve(lhs, p @ keys @ resid.T)  # (d_in, d_out)
        self._batch_keys[layer] = keys
        return solved.T

    def apply(self, requests: Sequence[EditRequest]) -> AlphaEditHandle:
        deltas = self.compute(requests)
        block = KeyBlock(self._batch_keys)
        handle = AlphaEditHandle.add_deltas(self.model, deltas)
        assert isinstance(handle, AlphaEditHandle)
        handle.blocks = [block]
        handle.editor = self
        self.remember(handle.blocks)
        return handle
