"""``rome``: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

One fact is written into the MLP output projection ``W`` of one layer (``mlp_out`` in :mod:`editors.lm.architectures`)
as a rank-one change, in closed form (the paper's eq. 2, as its code computes it)::

    k*  = key at the subject's last token, averaged over context prefixes            (editors.locate.keys.mlp_keys)
    u   = C^-1 k* / ||C^-1 k*||          C = E[k k^T] over a text corpus              (editors.locate.stats)
    v*  = v0 + delta                      delta optimised          (editors.locate.values.optimize_value)
    W'  = W + (v* - W k - b) u^T / (u . k)     k: the key in the bare prompt, W k + b: the output there

so that ``W' k + b = v*`` exactly, while any key ``x`` changes by an amount proportional to ``u . x``, i.e. keys that
are frequent on ordinary text (large in ``C``) move least. With ``mom2_adjustment=False``, ``C = I``.

Keys (``key_mode``). ROME's code computes ``u`` from the prefix-averaged key ``k*`` but solves the update at the
bare prompt's key ``k`` (denominator ``u . k``, residual ``v* - W k - b``). Gupta et al. 2024 ("Rebuilding ROME:
Resolving Model Collapse during Sequential Model Editing", r-ROME) show that this mismatch produces the rare
"disabling" edits behind ROME's sequential collapse, and fix it by using ``k*`` throughout: ``key_mode="consistent"``
solves at the prefix-averaged key and output (the output is linear in the key, so the mean output is ``W k* + b``).
With ``n_prefixes=0`` the two keys coincide and so do the two modes. The default is ``consistent`` since
2026-12-06: at 100 sequential CounterFact edits on SmolLM2-135M, measured side by side, it kept 0.797 / 0.253 / 0.803
(reliability / generalization / locality, teacher-forced; generated 0.38 / 0.28 / 0.04) where ``original`` fell to
0.383 / 0.180 / 0.590 (generated 0.10 / 0.08 / 0.00) (BENCHMARKS.md, lifelong round 2). Figures measured before that
date with plain ``rome`` used ``original``.

Several requests in one ``apply`` are edited one after another (ROME is a single-fact method, as in EasyEdit): each is
computed against the model with the previous ones' updates substituted (never written), and the deltas add up.

Defaults (:func:`default_settings`):

- ``layer``: :func:`rome_default_layer`; for SmolLM2-135M (30 layers) layer 4. On the first 10 CounterFact cases layers
  2, 4, 6, 8 and 11 all reached reliability 1.0 and generalization 0.3-0.4; locality was 0.97, 1.0, 1.0, 0.97, 0.87
  (notes/rome_memit.md), so an early layer with full locality; GPT-J's ROME layer is 5 of 28 and EasyEdit's
  Llama-2-7B one 5 of 32, about the same depth.
- value optimisation as ROME's GPT-2 XL / GPT-J hyper-parameters: Adam lr 0.5, 20 passes, weight decay 0.5 (ROME's
  ``||delta|| / ||v0||^2`` form), clamp factor 4, KL factor 0.0625, stop below loss 0.05. Its speed-ups
  ``prefix_cache``, ``skip_lower``, ``logits_at_targets`` and ``drop_last_token`` are on; they leave the result
  unchanged up to float rounding (:mod:`editors.locate.values`).
- 5 context prefixes of 10 sampled tokens plus the bare prompt (ROME: ``[(10, 5)]``), seed 0.
- statistics: ``stats_tokens`` 20,000 tokens of ``stats_corpus`` (else ``$EDITMEM_STATS_CORPUS``; with neither, the
  identity fallback of :mod:`editors.locate.stats`). ``editor.stats_source`` says which was used after the first edit.

Compute, then apply: :meth:`ROMEEditor.compute` returns ``{parameter name: delta}`` and writes nothing;
:meth:`ROMEEditor.apply` adds it through :meth:`WeightEditHandle.add_deltas`. Works for ``nn.Linear`` (``W`` is
(out, in)) and GPT-2's ``Conv1D`` (``W`` is (in, out); the delta is transposed to match).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from editors.base import (
    EditorSettings,
    EditRequest,
    WeightEditHandle,
    check_requests,
    register_editor,
)
from editors.lm.architectures import (
    layer_module,
    num_layers,
    param_name,
)
from editors.locate.base import LocateEditor, LocateSettings, as_weight_delta
from editors.locate.keys import activations_at, encode_row, key_rows, mlp_keys
from editors.locate.values import optimize_value
from memory.errors import ValidationError

log = logging.getLogger(__name__)

# Fraction of the depth ROME edits by default (see the module docstring).
DEFAULT_LAYER_FRACTION = 4 / 30

# Which key the update's denominator and residual use (see the module docstring).
KEY_MODES = ("original", "consistent")


def rome_default_layer(model: torch.nn.Module) -> int:
    """``round(num_layers * 4/30)``, at least 1 (SmolLM2-135M: 4 of 30; a 4-layer test model: 1)."""
    return max(1, round(num_layers(model) * DEFAULT_LAYER_FRACTION))


@dataclass(frozen=True)
class ROMESettings(LocateSettings, EditorSettings):
    """Settings of :class:`ROMEEditor`; see the module docstring for the defaults."""

    layer: int | None = None  # None: rome_default_layer(model)
    key_mode: str = "consistent"  # "consistent" (r-ROME) or "original" (ROME's code); see the module docstring

    def __post_init__(self) -> None:
        if self.key_mode not in KEY_MODES:
            raise ValidationError(f"ROME setting key_mode must be one of {', '.join(KEY_MODES)}, not {self.key_mode!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValidationError(f"ROME setting layer must be a layer index >= 0 or None, not {self.layer!r}")
        self._check_shared("ROME")


@register_editor
class ROMEEditor(LocateEditor):
    """Rank-one editing of one MLP output projection (see the module docstring)."""

    name = "rome"
    Settings = ROMESettings
    settings: ROMESettings

    @classmethod
    def default_settings(cls, model: torch.nn.Module) -> ROMESettings:
        return ROMESettings(layer=rome_default_layer(model))

    def edit_layer(self) -> int:
        layer = self.settings.layer if self.settings.layer is not None else rome_default_layer(self.model)
        return self.check_layer(layer)

    def _c_inverse(self, layer: int) -> torch.Tensor:
        if layer not in self._inverse:
            c = self.layer_stats([layer])[layer].mom2.double()
            self._inverse[layer] = torch.linalg.inv(c)
        return self._inverse[layer]

    def compute(self, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        """``{parameter name: delta}`` for the edit layer's MLP output weight; the model is not changed."""
        requests = check_requests(requests, "ROME", need_subject=True)
        t0 = time.perf_counter()
        model, tok = self.model, self.tokenizer
        layer = self.edit_layer()
        name = param_name(model, layer, "mlp_out")
        module = layer_module(model, layer, "mlp_out")
        weight = dict(model.named_parameters())[name].detach()
        prefixes = self.prefixes()
        c_inv = self._c_inverse(layer).to(weight.device)
        options = self.settings.value_options()
        t_ready = time.perf_counter()

        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        overrides: dict[str, torch.Tensor] = {}
        probs = []
        for request in requests:
            k_avg = mlp_keys(model, tok, layer, [request], prefixes, overrides=overrides)[0].double()
            u = c_inv @ k_avg
            u = u / u.norm()
            value = optimize_value(model, tok, request, prefixes, module, options, overrides=overrides)
            k, v = self._key_and_output(request, prefixes, module, overrides)
            target = (value.v0 + value.delta).double()
            right = (target - v) / (k @ u)
            total += as_weight_delta(model, torch.outer(right, u).float())
            if len(requests) > 1:
                overrides = {name: weight + total.to(weight.dtype)}
            probs.append((value.target_prob_first, value.target_prob_last, value.steps))
        self.last_stats = {"param": name, "layer": layer, "n_requests": len(requests), "stats_source":
                           self.stats_source, "setup_seconds": t_ready - t0,
                           "seconds": time.perf_counter() - t0, "value_steps": [p[2] for p in probs],
                           "target_prob": [(p[0], p[1]) for p in probs]}
        log.info("rome: %d request(s) at %s in %.2f s (value passes %s, target prob %s)", len(requests), name,
                 self.last_stats["seconds"], self.last_stats["value_steps"],
                 ", ".join(f"{a:.3f}->{b:.3f}" for a, b, _ in probs))
        return {name: total.to(weight.dtype)}

    def _key_and_output(self, request: EditRequest, prefixes: Sequence[str], module: torch.nn.Module,
                        overrides: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The key ``k`` and the output ``W k + b`` the update is solved at: the bare prompt's (``original``) or their
        mean over the context prefixes (``consistent``, r-ROME: the same key ``u`` is computed from)."""
        if self.settings.key_mode == "consistent":
            rows = key_rows(self.tokenizer, request.prompt, cast(str, request.subject), prefixes)
        else:
            rows = [encode_row(self.tokenizer, "", request.prompt, cast(str, request.subject))]
        now = activations_at(self.model, self.tokenizer, rows, {"k": (module, "input"), "v": (module, "output")},
                             overrides=overrides, stop=module)
        return now["k"].mean(0).double(), now["v"].mean(0).double()

    def apply(self, requests: Sequence[EditRequest]) -> WeightEditHandle:
        return WeightEditHandle.add_deltas(self.model, self.compute(requests))
