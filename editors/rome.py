"""``rome``: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

One fact is written into the MLP output projection ``W`` of one layer (``mlp_out`` in :mod:`editors.models`) as a
rank-one change, in closed form (the paper's eq. 2, as its code computes it)::

    k*  = key at the subject's last token, averaged over context prefixes            (editors.keys.mlp_keys)
    u   = C^-1 k* / ||C^-1 k*||          C = E[k k^T] over a text corpus              (editors.stats)
    v*  = v0 + delta                      delta optimised as in editors.values        (editors.values.optimize_value)
    W'  = W + (v* - W k - b) u^T / (u . k)     k: the key in the bare prompt, W k + b: the output there

so that ``W' k + b = v*`` exactly, while any key ``x`` changes by an amount proportional to ``u . x``, i.e. keys that
are frequent on ordinary text (large in ``C``) move least. With ``mom2_adjustment=False``, ``C = I``.

Several requests in one ``apply`` are edited one after another (ROME is a single-fact method, as in EasyEdit): each is
computed against the model with the previous ones' updates substituted (never written), and the deltas add up.

Defaults (:func:`default_settings`):

- ``layer``: :func:`default_layer`; for SmolLM2-135M (30 layers) layer 4. On the first 10 CounterFact cases layers
  2, 4, 6, 8 and 11 all reached reliability 1.0 and generalization 0.3-0.4; locality was 0.97, 1.0, 1.0, 0.97, 0.87
  (notes/rome_memit.md), so an early layer with full locality; GPT-J's ROME layer is 5 of 28 and EasyEdit's
  Llama-2-7B one 5 of 32, about the same depth.
- value optimisation as ROME's GPT-2 XL / GPT-J hyper-parameters: Adam lr 0.5, 20 passes, weight decay 0.5 (ROME's
  ``||delta|| / ||v0||^2`` form), clamp factor 4, KL factor 0.0625, stop below loss 0.05. Its speed-ups
  ``prefix_cache``, ``skip_lower``, ``logits_at_targets`` and ``drop_last_token`` are on; they leave the result
  unchanged up to float rounding (:mod:`editors.values`).
- 5 context prefixes of 10 sampled tokens plus the bare prompt (ROME: ``[(10, 5)]``), seed 0.
- statistics: ``stats_tokens`` 20,000 tokens of ``stats_corpus`` (else ``$EDITMEM_STATS_CORPUS``; with neither, the
  identity fallback of :mod:`editors.stats`). ``editor.stats_source`` says which was used after the first edit.

Compute, then apply: :meth:`ROMEEditor.compute` returns ``{parameter name: delta}`` and writes nothing;
:meth:`ROMEEditor.apply` adds it through :meth:`WeightEditHandle.add_deltas`. Works for ``nn.Linear`` (``W`` is
(out, in)) and GPT-2's ``Conv1D`` (``W`` is (in, out); the delta is transposed to match).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from editors.base import Editor, EditorSettings, EditRequest, WeightEditHandle, check_requests, register_editor
from editors.keys import activations_at, context_prefixes, encode_row, mlp_keys
from editors.models import arch_spec, check_layer, layer_module, num_layers, param_name
from editors.stats import LayerStats, editor_stats
from editors.values import ValueOptions, check_positive, optimize_value
from memory.errors import ValidationError

log = logging.getLogger(__name__)

# Fraction of the depth ROME edits by default (see the module docstring).
DEFAULT_LAYER_FRACTION = 4 / 30


def default_layer(model: torch.nn.Module) -> int:
    """``round(num_layers * 4/30)``, at least 1 (SmolLM2-135M: 4 of 30; a 4-layer test model: 1)."""
    return max(1, round(num_layers(model) * DEFAULT_LAYER_FRACTION))


@dataclass(frozen=True)
class LocateSettings:
    """Value optimisation, context prefix and statistics settings shared by ROME and MEMIT (validated by
    :meth:`_check_shared`)."""

    # Value-optimisation defaults are ValueOptions' own (one source; ``value_options`` maps them back).
    v_lr: float = ValueOptions.lr
    v_steps: int = ValueOptions.steps
    v_weight_decay: float = ValueOptions.weight_decay
    clamp_norm_factor: float = ValueOptions.clamp_norm_factor
    kl_factor: float = ValueOptions.kl_factor
    early_stop_loss: float | None = ValueOptions.early_stop_loss
    n_prefixes: int = 5
    prefix_tokens: int = 10
    seed: int = 0
    mom2_adjustment: bool = True
    stats_corpus: str | None = None
    stats_tokens: int = 20_000
    stats_seq_len: int = 128
    prefix_cache: bool = ValueOptions.prefix_cache
    skip_lower: bool = ValueOptions.skip_lower
    logits_at_targets: bool = ValueOptions.logits_at_targets
    drop_last_token: bool = ValueOptions.drop_last_token

    def _check_shared(self, owner: str) -> None:
        check_positive(owner, "v_lr", self.v_lr)
        check_positive(owner, "v_steps", self.v_steps, integer=True)
        check_positive(owner, "v_weight_decay", self.v_weight_decay, zero_ok=True)
        check_positive(owner, "clamp_norm_factor", self.clamp_norm_factor)
        check_positive(owner, "kl_factor", self.kl_factor, zero_ok=True)
        if self.early_stop_loss is not None:
            check_positive(owner, "early_stop_loss", self.early_stop_loss)
        check_positive(owner, "n_prefixes", self.n_prefixes, integer=True, zero_ok=True)
        check_positive(owner, "prefix_tokens", self.prefix_tokens, integer=True)
        check_positive(owner, "stats_tokens", self.stats_tokens, integer=True)
        check_positive(owner, "stats_seq_len", self.stats_seq_len, integer=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValidationError(f"{owner} setting seed must be an integer, not {self.seed!r}")
        for flag in ("mom2_adjustment", "prefix_cache", "skip_lower", "logits_at_targets", "drop_last_token"):
            if not isinstance(getattr(self, flag), bool):
                raise ValidationError(f"{owner} setting {flag} must be true or false, not {getattr(self, flag)!r}")
        if self.stats_corpus is not None and (not isinstance(self.stats_corpus, str) or not self.stats_corpus):
            raise ValidationError(f"{owner} setting stats_corpus must be a file path or None")

    def value_options(self) -> ValueOptions:
        return ValueOptions(lr=self.v_lr, steps=self.v_steps, weight_decay=self.v_weight_decay,
                            clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
                            early_stop_loss=self.early_stop_loss, prefix_cache=self.prefix_cache,
                            skip_lower=self.skip_lower, logits_at_targets=self.logits_at_targets,
                            drop_last_token=self.drop_last_token)


@dataclass(frozen=True)
class ROMESettings(LocateSettings, EditorSettings):
    """Settings of :class:`ROMEEditor`; see the module docstring for the defaults."""

    layer: int | None = None  # None: default_layer(model)

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValidationError(f"ROME setting layer must be a layer index >= 0 or None, not {self.layer!r}")
        self._check_shared("ROME")


class LocateEditor(Editor):
    """What ROME and MEMIT share: context prefixes (sampled once per editor) and per-layer key statistics."""

    settings: Any

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: EditorSettings | None = None):
        super().__init__(model, tokenizer, settings)
        arch_spec(model)  # an unknown architecture fails here, with the table's message
        self._prefixes: tuple[str, ...] | None = None
        self._stats: dict[int, LayerStats] = {}
        self._inverse: dict[int, torch.Tensor] = {}
        self.stats_source: str | None = None
        self.last_stats: dict[str, Any] = {}

    def prefixes(self) -> tuple[str, ...]:
        if self._prefixes is None:
            s = self.settings
            self._prefixes = context_prefixes(self.model, self.tokenizer, s.n_prefixes, s.prefix_tokens, s.seed)
            log.debug("context prefixes: %s", self._prefixes)
        return self._prefixes

    def check_layer(self, layer: int) -> int:
        return check_layer(self.model, layer, self.name)

    def layer_stats(self, layers: Sequence[int]) -> dict[int, LayerStats]:
        """``E[k k^T]`` at ``layers`` (identity where ``mom2_adjustment`` is off), kept for the editor's lifetime."""
        s = self.settings
        missing = [layer for layer in layers if layer not in self._stats]
        if missing:
            if not s.mom2_adjustment:
                for layer in missing:
                    dim = _in_features(self.model, layer_module(self.model, layer, "mlp_out"))
                    self._stats[layer] = LayerStats(layer, torch.eye(dim), 0, "identity (mom2_adjustment off)")
            else:
                self._stats.update(editor_stats(self.model, self.tokenizer, missing, s.stats_corpus,
                                                n_tokens=s.stats_tokens, seq_len=s.stats_seq_len,
                                                fallback_texts=[p for p in self.prefixes() if p]
                                                or ["The"]))
        self.stats_source = self._stats[layers[0]].source
        return {layer: self._stats[layer] for layer in layers}


def _in_features(model: torch.nn.Module, module: torch.nn.Module) -> int:
    w = module.weight
    return w.shape[0] if arch_spec(model).weight_layout == "in_out" else w.shape[1]


def as_weight_delta(model: torch.nn.Module, update: torch.Tensor) -> torch.Tensor:
    """An (out, in) update in the layout of the model's projection weights (transposed for GPT-2's Conv1D)."""
    return update.T.contiguous() if arch_spec(model).weight_layout == "in_out" else update


@register_editor
class ROMEEditor(LocateEditor):
    """Rank-one editing of one MLP output projection (see the module docstring)."""

    name = "rome"
    Settings = ROMESettings
    settings: ROMESettings

    @classmethod
    def default_settings(cls, model: torch.nn.Module) -> ROMESettings:
        return ROMESettings(layer=default_layer(model))

    def edit_layer(self) -> int:
        layer = self.settings.layer if self.settings.layer is not None else default_layer(self.model)
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
            row = encode_row(tok, "", request.prompt, request.subject)
            now = activations_at(model, tok, [row], {"k": (module, "input"), "v": (module, "output")},
                                 overrides=overrides, stop=module)
            k, v = now["k"][0].double(), now["v"][0].double()
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

    def apply(self, requests: Sequence[EditRequest]) -> WeightEditHandle:
        return WeightEditHandle.add_deltas(self.model, self.compute(requests))
