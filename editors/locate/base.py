"""What ROME, MEMIT (and the next locate-then-edit methods) share: the value, prefix and statistics settings, the
editor base that samples context prefixes and keeps per-layer key statistics, and the weight-layout helper."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from editors.base import Editor, EditorSettings
from editors.lm.architectures import arch_spec, check_layer, layer_module
from editors.locate.keys import context_prefixes
from editors.locate.stats import LayerStats, editor_stats
from editors.locate.values import ValueOptions
from memory.checks import check_number
from memory.errors import ValidationError

log = logging.getLogger(__name__)


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
    early_stop_argmax: bool = ValueOptions.early_stop_argmax
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
        check_number(owner, "v_lr", self.v_lr)
        check_number(owner, "v_steps", self.v_steps, integer=True)
        check_number(owner, "v_weight_decay", self.v_weight_decay, strict=False)
        check_number(owner, "clamp_norm_factor", self.clamp_norm_factor)
        check_number(owner, "kl_factor", self.kl_factor, strict=False)
        if self.early_stop_loss is not None:
            check_number(owner, "early_stop_loss", self.early_stop_loss)
        check_number(owner, "n_prefixes", self.n_prefixes, integer=True, strict=False)
        check_number(owner, "prefix_tokens", self.prefix_tokens, integer=True)
        check_number(owner, "stats_tokens", self.stats_tokens, integer=True)
        check_number(owner, "stats_seq_len", self.stats_seq_len, integer=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValidationError(f"{owner} setting seed must be an integer, not {self.seed!r}")
        for flag in ("mom2_adjustment", "prefix_cache", "skip_lower", "logits_at_targets", "drop_last_token",
                     "early_stop_argmax"):
            if not isinstance(getattr(self, flag), bool):
                raise ValidationError(f"{owner} setting {flag} must be true or false, not {getattr(self, flag)!r}")
        if self.stats_corpus is not None and (not isinstance(self.stats_corpus, str) or not self.stats_corpus):
            raise ValidationError(f"{owner} setting stats_corpus must be a file path or None")

    def value_options(self) -> ValueOptions:
        return ValueOptions(lr=self.v_lr, steps=self.v_steps, weight_decay=self.v_weight_decay,
                            clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
                            early_stop_loss=self.early_stop_loss, early_stop_argmax=self.early_stop_argmax,
                            prefix_cache=self.prefix_cache,
                            skip_lower=self.skip_lower, logits_at_targets=self.logits_at_targets,
                            drop_last_token=self.drop_last_token)


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
    w = cast(torch.Tensor, module.weight)
    return int(w.shape[0] if arch_spec(model).weight_layout == "in_out" else w.shape[1])


def as_weight_delta(model: torch.nn.Module, update: torch.Tensor) -> torch.Tensor:
    """An (out, in) update in the layout of the model's projection weights (transposed for GPT-2's Conv1D)."""
    return update.T.contiguous() if arch_spec(model).weight_layout == "in_out" else update
