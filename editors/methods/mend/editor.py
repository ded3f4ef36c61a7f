"""``mend``: edits made by a trained gradient hypernetwork (MEND; Mitchell, Lin, Bosselut, Finn, Manning, 2022,
"Fast Model Editing at Scale", ICLR 2022).

The idea, from the paper. For a linear map ``y = W u`` inside a transformer, the fine-tuning gradient of a loss over a
sequence is a sum of rank-one terms, one per token: ``dL/dW = sum_t delta_t u_t^T`` where ``u_t`` is the layer's
input at token ``t`` and ``delta_t = dL/dy_t`` the gradient at its output. MEND passes each pair ``(u_t, delta_t)``
through a small learned network ``g`` and uses ``(u~_t, delta~_t) = g(u_t, delta_t)`` to build the update
``Delta W = -alpha_l * sum_t delta~_t u~_t^T`` with a learned step size ``alpha_l`` per edited layer. ``g`` is trained
so that the edited model gives the new target (on the edit prompt and on rephrases of it) while unrelated prompts keep
their predictions (a KL term against the unedited model); the base model stays frozen throughout.

Here:

- **Edited weights**: the MLP output projection (``mlp_out`` in :mod:`editors.lm.architectures`: ``mlp.down_proj``,
  ``mlp.c_proj``, ``mlp.fc_out``, ``mlp.dense_4h_to_h``) of the top ``num_edit_layers`` blocks (default 3;
  SmolLM2-135M: layers 27, 28, 29), or the layers named in :attr:`MENDTrainSettings.layers`. All of them have one
  shape, so one network serves them, conditioned on the layer (next point).
- **g** (:class:`MENDNet`): the concatenation ``z = [u; delta]`` is normalised per dimension with running statistics
  kept per edited layer (mean and variance, accumulated while training, frozen afterwards), then passed through
  ``n_blocks`` residual blocks ``z <- z + A silu(s_l * (B z) + o_l)`` with a low-rank bottleneck (``B``: dim -> rank,
  ``A``: rank -> dim) and a learned per-layer scale ``s_l`` and shift ``o_l`` (the paper's layer conditioning).
  ``A`` starts at zero, so an untrained ``g`` is the identity on the normalised factors and the first edits are
  (normalised) gradient steps. The step sizes are learned as ``log alpha_l``. The paper's blocks put the non-linearity
  on the residual branch's output and zero-initialise inside it; putting it in the bottleneck (as here) keeps the
  identity start and lets the gradient reach ``A`` from step one.
- **Tokens**: as in the paper, the update is built from every prompt and target token but the last
  (``all_tokens=True``). ``all_tokens=False`` keeps only the positions that predict a target token (the top edited
  layer's output gradient is zero elsewhere); on SmolLM2/CounterFact that generalised worse (validation rephrase
  accuracy 0.32 vs 0.44 after 100 steps, notes/mend.md): the subject's tokens, shared by the prompt and its
  rephrases, carry the edit.
- **Training** (:func:`train_mend`): per step a batch of edits, each with its edit prompt, one rephrase and one
  locality probe. Pass 1 runs the frozen model once over all three kinds of row, with a zero tensor added to every
  edited layer's output so that ``delta`` is the gradient of the edit rows' NLL there; ``u`` is captured by the same
  hooks, and the locality rows' logits are the unedited reference. Pass 2 runs the
  model again with every row's own edit added by a forward hook in its low-rank form
  (``Delta W x = -alpha sum_t delta~_t (u~_t . x)``), so a batch holds independent single edits without ever building
  ``Delta W``; it starts from pass 1's output of the block below the first edited one (the lower blocks are not
  run again: they are swapped, for that call only, for stand-ins returning that output). Loss: ``c_edit *
  NLL(target | edit prompt) + c_rephrase * NLL(target | rephrase) + c_loc *
  KL(base || edited)`` at the locality probe's answer positions (defaults 1, 1, 10). Logits are computed only at
  the positions a loss reads (the forward stops at the final norm; the LM head runs on those positions alone). Only
  ``g`` gets gradients.
  Validation on held-out cases every ``val_every`` steps; the best state by validation loss is kept, and training
  stops after ``patience`` validations without improvement, at ``steps``, or at ``time_limit_s``.
- **Editing** (:class:`MENDEditor`): the same pass 1 on the requests (prompt + target_new), then ``Delta W`` is built
  from all requests' tokens (several requests add up, as in the paper's batched editing) and written with
  :class:`WeightEditHandle`, so ``restore()`` is bit-identical.
- **Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`): a folder with ``mend.pt`` (weights and
  normalisation statistics), ``config.json`` (base model fingerprint, model type, layers, parameter names and shapes,
  training settings, final validation) and ``history.json`` (the validation curve). A name without a path separator
  means ``$EDITMEM_CACHE/mend/NAME``. A checkpoint whose fingerprint is not the model's is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editors.base import (
    Editor,
    EditorSettings,
    EditRequest,
    WeightEditHandle,
    check_requests,
    register_editor,
)
from editors.methods.mend.checkpoint import LoadedMEND, load_checkpoint
from editors.methods.mend.factors import (
    FrozenModel,
    encode_rows,
    transform_factors,
    weight_deltas,
)
from memory.checks import check_number
from memory.errors import ValidationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MENDSettings(EditorSettings):
    """Settings of :class:`MENDEditor`.

    ``checkpoint``: the trained hypernetwork, a name under ``$EDITMEM_CACHE/mend/`` or a folder (required to edit).
    ``edit_scale``: multiplies the learned step sizes at edit time (1.0 = as trained).
    """

    checkpoint: str | None = None
    edit_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint.strip()):
            raise ValidationError(f"MEND setting checkpoint must be a checkpoint name or folder, "
                                  f"not {self.checkpoint!r}")
        check_number("MEND", "edit_scale", self.edit_scale)


@register_editor
class MENDEditor(Editor):
    """Edits with a trained MEND hypernetwork: one gradient pass, one transform, a rank-(tokens) weight update."""

    name = "mend"
    Settings = MENDSettings
    settings: MENDSettings

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: MENDSettings | None = None):
        super().__init__(model, tokenizer, settings)
        self._loaded: LoadedMEND | None = None
        if self.settings.checkpoint is not None:
            self._loaded = load_checkpoint(self.settings.checkpoint, model)

    @property
    def loaded(self) -> LoadedMEND:
        if self._loaded is None:
            raise ValidationError("MEND needs a trained hypernetwork: pass --set mend.checkpoint=NAME (or "
                                  "checkpoint=... to get_editor); train one with `editmem train-mend`")
        return self._loaded

    def compute(self, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        """``{parameter name: Delta W}`` for the requests, all at once; the model is left unchanged."""
        requests = check_requests(requests, "MEND")
        loaded = self.loaded
        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        frozen = FrozenModel(self.model, loaded.layers, loaded.settings.all_tokens)
        rows = encode_rows(self.tokenizer, [(r.prompt, r.target_new) for r in requests], range(len(requests)), device)
        first = frozen.gradient_factors(rows, torch.ones(len(requests), dtype=torch.bool, device=device))
        us = first.us
        with torch.no_grad():
            ut, dt = transform_factors(loaded.net, us, first.deltas)
            out = weight_deltas(loaded.net, frozen, ut, dt, self.settings.edit_scale)
        log.debug("mend: %d request(s), %d tokens, %.3f s", len(requests), us[0].shape[0], time.perf_counter() - t0)
        return out

    def apply(self, requests: Sequence[EditRequest]) -> WeightEditHandle:
        return WeightEditHandle.add_deltas(self.model, self.compute(requests))
