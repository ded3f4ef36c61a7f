"""``ft``: constrained fine-tuning of one MLP output projection (FT-L, the baseline of ROME and EasyEdit).

The weight of one layer's MLP output projection (``mlp.down_proj`` / ``mlp.c_proj`` / ``mlp.fc_out`` /
``mlp.dense_4h_to_h``, from :mod:`editors.lm.architectures`) is trained with Adam to make every request's target likely
after its prompt; after each step the total change is clamped element-wise to ``[-norm_constraint, +norm_constraint]``
around the original weight (an L-infinity ball). Nothing else changes.

Defaults, following ROME's FT-L baseline (``hparams/FT/*_constr.json``: lr 5e-4, 25 steps, norm constraint 5e-4,
weight decay 0, stop early when the loss falls below 1e-2) and EasyEdit's ``FT`` hyper-parameters (one MLP
down-projection layer, lr 5e-4, 25 steps):

- ``layer``: see :func:`ft_default_layer` — about a third of the way up the stack (SmolLM2-135M, 30 layers: layer 10).
- ``lr`` 5e-4, ``steps`` 25, ``norm_constraint`` 5e-4, ``weight_decay`` 0, ``early_stop_loss`` 1e-2.
- Loss (``objective``): ``"target_new"`` (the default) is, for each request, the mean negative log-likelihood of its
  target tokens given the prompt, teacher-forced (only target positions count; tokenization from
  :func:`editors.lm.tokens.encode_prompt_target`); the requests' losses are summed. This is EasyEdit's
  ``objective_optimization: target_new`` loss. ``"prompt_last"`` is ROME's original FT-L loss, which scores every
  target token with the logits of the last prompt position (EasyEdit's FT-L in the KnowEdit table).
- ``ft_m`` (:mod:`editors.methods.ft_m`) is the same editor with ``target_new`` and no norm constraint, KnowEdit's
  FT-M.
- ``batch_size`` only splits the requests into chunks whose gradients are accumulated before each step, so it
  changes memory use, not the result.

Compute, then apply: :meth:`FTEditor.compute` trains a float32 copy of the one weight through
:func:`torch.func.functional_call` with every other parameter detached, so the model is not touched (not even its
``requires_grad`` flags); :meth:`FTEditor.apply` writes the result with :class:`WeightEditHandle`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editors.base import (
    Editor,
    EditorSettings,
    EditRequest,
    WeightEditHandle,
    check_requests,
    register_editor,
)
from editors.lm.architectures import check_layer, num_layers, param_name
from editors.lm.tokens import EncodedBatch, encode_batch, target_logprob
from memory.checks import check_number
from memory.errors import ValidationError

log = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("target_new", "prompt_last")


def prompt_last_logprob(logits: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    """Per row, the mean log-probability of the target tokens, each scored by the logits of the last prompt position
    (ROME's FT-L objective), (B,)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, batch.target_start - 1].float().log_softmax(-1)  # (B, V)
    picked = last.gather(-1, batch.labels.clamp_min(0)) * batch.target_mask  # (B, T)
    return picked.sum(-1) / batch.target_mask.sum(-1).clamp_min(1)


def ft_default_layer(model: torch.nn.Module) -> int:
    """The layer FT edits by default: ``num_layers // 3`` (SmolLM2-135M: 10 of 30; a 4-layer test model: 1)."""
    return num_layers(model) // 3


@dataclass(frozen=True)
class FTSettings(EditorSettings):
    """Settings of :class:`FTEditor`; see the module docstring for where the defaults come from."""

    layer: int | None = None  # None: ft_default_layer(model), resolved when editing
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float | None = 5e-4  # L-inf bound on the total change; None: unconstrained
    weight_decay: float = 0.0
    early_stop_loss: float | None = 1e-2  # stop once the mean per-request loss is below this; None: never
    batch_size: int = 16
    objective: str = "target_new"  # or "prompt_last" (ROME's FT-L loss); see the module docstring

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValidationError(f"FT objective must be one of {list(OBJECTIVES)}, not {self.objective!r}")
        check_number("FT", "layer", self.layer, integer=True, strict=False, optional=True)
        check_number("FT", "lr", self.lr)
        check_number("FT", "steps", self.steps, integer=True)
        check_number("FT", "batch_size", self.batch_size, integer=True)
        check_number("FT", "norm_constraint", self.norm_constraint, optional=True)
        check_number("FT", "early_stop_loss", self.early_stop_loss, optional=True)
        check_number("FT", "weight_decay", self.weight_decay, strict=False)


@register_editor
class FTEditor(Editor):
    """Constrained fine-tuning of one MLP output projection (FT-L)."""

    name = "ft"
    Settings = FTSettings
    settings: FTSettings

    @classmethod
    def default_settings(cls, model: torch.nn.Module) -> FTSettings:
        return FTSettings(layer=ft_default_layer(model))

    def target_param(self) -> str:
        """Name of the parameter this editor trains, e.g. ``"model.layers.10.mlp.down_proj.weight"``."""
        layer = self.settings.layer if self.settings.layer is not None else ft_default_layer(self.model)
        return param_name(self.model, check_layer(self.model, layer, "FT"), "mlp_out")

    def compute(self, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        """The new value of the edited weight, ``{parameter name: tensor}``; the model is left unchanged."""
        requests = check_requests(requests, "FT")
        s = self.settings
        model = self.model
        name = self.target_param()
        params = {n: p.detach() for n, p in model.named_parameters()}
        original = params[name]
        device = original.device
        batches = [encode_batch(self.tokenizer, [r.prompt for r in requests[i:i + s.batch_size]],
                                [r.target_new for r in requests[i:i + s.batch_size]], device=device)
                   for i in range(0, len(requests), s.batch_size)]

        base = original.float()
        weight = base.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight], lr=s.lr, weight_decay=s.weight_decay)
        low = high = None
        if s.norm_constraint is not None:
            low, high = base - s.norm_constraint, base + s.norm_constraint

        t0 = time.perf_counter()
        first_loss = last_loss = float("nan")
        steps_taken = 0
        with torch.enable_grad():
            for step in range(s.steps):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for batch in batches:
                    call_params = dict(params)
                    call_params[name] = weight.to(original.dtype)
                    out = torch.func.functional_call(model, call_params, args=(),
                                                     kwargs={**batch.model_inputs(), "use_cache": False})
                    if s.objective == "prompt_last":
                        loss = -prompt_last_logprob(out.logits, batch).sum()
                    else:
                        loss = -target_logprob(out.logits, batch.labels, mean=True).sum()
                    loss.backward()
                    total += loss.item()
                mean_loss = total / len(requests)
                if step == 0:
                    first_loss = mean_loss
                last_loss = mean_loss
                if s.early_stop_loss is not None and mean_loss < s.early_stop_loss:
                    break
                optimizer.step()
                steps_taken += 1
                if low is not None:
                    with torch.no_grad():
                        weight.copy_(torch.clamp(weight, low, high))
        new = weight.detach().to(original.dtype)
        self.last_stats = {"param": name, "steps": steps_taken, "loss_before": first_loss,
                           "loss_last": last_loss, "max_abs_change": (new.float() - base).abs().max().item(),
                           "seconds": time.perf_counter() - t0}
        log.info("%s: %d request(s), %s, %d steps, loss %.3f -> %.3f (before the last step), max |change| %.2e, "
                 "%.1f s", self.name, len(requests), name, steps_taken, first_loss, last_loss,
                 self.last_stats["max_abs_change"], self.last_stats["seconds"])
        return {name: new}

    def apply(self, requests: Sequence[EditRequest]) -> WeightEditHandle:
        return WeightEditHandle.write(self.model, self.compute(requests))
