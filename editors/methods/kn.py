"""``kn``: Knowledge Neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers"), as EasyEdit's KN.

1. **Attribution** (integrated gradients). For each prompt and each layer in ``layers`` (default: every layer), take
   the MLP's intermediate activation ``a`` (the input of the output projection, ``mlp_out``) at the last prompt
   token; scale it by ``alpha = k / steps`` for ``k = 1..steps`` (all steps in one batch) and take the gradient of the
   probability of the answer's first token with respect to the scaled activation. A neuron's attribution is
   ``a_i * mean_k grad_i`` (the Riemann sum of the integral from 0 to ``a``). The answer attributed is the fact's old
   answer: the request's ``ground_truth`` when it has one, else the model's own greedy next token (what the model
   says now), as EasyEdit attributes ``ground_truth``.
2. **Selection**. Per prompt, the neurons whose attribution exceeds ``threshold`` (0.2, EasyEdit's
   ``adaptive_threshold``) times that prompt's largest attribution; across a request's prompts (its prompt and
   ``extra_prompts`` context variants), the neurons found for at least a share ``share`` (0.5, EasyEdit's ``p``) of
   them. If none is left, the neuron with the largest summed attribution is taken.
3. **Edit** (EasyEdit's ``mode="edit"``). Each selected neuron's value vector (its column of the MLP output
   projection; a row for GPT-2's Conv1D) gets ``update_scale * E[new] - erase_scale * E[old]``, where ``E`` are the
   *output* embeddings of the first target token and the first old-answer token. Two deviations from EasyEdit, both
   for the edit to raise the target on any architecture: the output rather than the input embeddings (they differ
   for untied models such as Llama-2), and the direction multiplied by the sign of the neuron's activation at the
   prompt (SiLU/GELU activations can be negative, which would turn an addition into an erasure).

Compute, then apply: :meth:`KNEditor.compute` returns the deltas (the model is untouched: gradients are taken with
:func:`torch.autograd.grad` and never land in ``.grad``); :meth:`KNEditor.apply` adds them through
:meth:`WeightEditHandle.add_deltas`, so restore is bit-identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from editors.base import Editor, EditorSettings, EditRequest, WeightEditHandle, check_requests, register_editor
from editors.lm.architectures import CausalLM, arch_spec, check_layer, layer_module, num_layers, param_name
from editors.lm.tokens import encode_prompt, encode_prompt_target
from memory.checks import check_number

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KNSettings(EditorSettings):
    """Settings of :class:`KNEditor`; see the module docstring (defaults: EasyEdit ``hparams/KN``)."""

    layers: tuple[int, ...] | None = None  # None: every layer
    steps: int = 20
    threshold: float = 0.2
    share: float = 0.5
    update_scale: float = 1.0
    erase_scale: float = 1.0
    max_neurons: int = 32  # per request, the most attributed ones kept

    def __post_init__(self) -> None:
        check_number("KN", "steps", self.steps, integer=True)
        check_number("KN", "threshold", self.threshold, strict=False)
        check_number("KN", "share", self.share, strict=False)
        check_number("KN", "update_scale", self.update_scale, strict=False)
        check_number("KN", "erase_scale", self.erase_scale, strict=False)
        check_number("KN", "max_neurons", self.max_neurons, integer=True)


@contextmanager
def _replace_input_at(module: torch.nn.Module, position: int, values: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``module``'s first input gets ``values`` (B, d) at ``position`` in every row."""

    def hook(_module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[:, position] = values.to(x.dtype)
        return (x, *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def neuron_attributions(model: torch.nn.Module, ids: Sequence[int], answer_id: int, layer: int,
                        steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated-gradients attribution of every intermediate neuron of ``layer`` at the last token of ``ids`` for
    the next token ``answer_id``; returns ``(attributions, activations)``, both (intermediate,)."""
    module = layer_module(model, layer, "mlp_out")
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(ids)], device=device)
    pos = len(ids) - 1
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    activation = seen[-1][0, pos].float()
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    scaled = (alphas[:, None] * activation[None]).requires_grad_(True)
    with torch.enable_grad(), _replace_input_at(module, pos, scaled):
        logits = model(input_ids=input_ids.expand(steps, -1), use_cache=False).logits[:, pos].float()
        prob = logits.softmax(-1)[:, answer_id].sum()
        (grad,) = torch.autograd.grad(prob, scaled)
    return activation * grad.mean(0), activation


def select_neurons(per_prompt: Sequence[torch.Tensor], threshold: float, share: float) -> list[int]:
    """Flat neuron indices attributed above ``threshold`` x max in at least ``share`` of the prompts (see module)."""
    counts = torch.zeros_like(per_prompt[0])
    for attr in per_prompt:
        top = attr.max()
        if top > 0:
            counts += (attr > threshold * top).float()
    chosen = torch.nonzero(counts >= max(share * len(per_prompt), 1e-9) * (counts > 0)).flatten().tolist()
    if not chosen:
        chosen = [int(torch.stack(list(per_prompt)).sum(0).argmax())]
    return chosen


@register_editor
class KNEditor(Editor):
    """Knowledge Neurons: rewrite the value vectors of the neurons attributed to the fact."""

    name = "kn"
    Settings = KNSettings
    settings: KNSettings

    def _layers(self) -> list[int]:
        layers = self.settings.layers if self.settings.layers is not None else range(num_layers(self.model))
        return [check_layer(self.model, int(layer), "KN") for layer in layers]

    def _old_answer_id(self, prompt_ids: list[int], request: EditRequest) -> int:
        if request.ground_truth:
            ids, start = encode_prompt_target(self.tokenizer, request.prompt, request.ground_truth)
            return ids[start]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=False).logits
        return int(logits[0, -1].argmax())

    def compute(self, requests: Sequence[EditRequest], extra_prompts: Sequence[Sequence[str]] | None = None
                ) -> dict[str, torch.Tensor]:
        """The deltas of the edited output projections, ``{parameter name: delta}``; the model is left unchanged.

        ``extra_prompts[i]``: more prompts of request ``i`` (rephrases) that its neurons must be shared by."""
        requests = check_requests(requests, "KN")
        s = self.settings
        model, tok = self.model, self.tokenizer
        t0 = time.perf_counter()
        layers = self._layers()
        head = torch.as_tensor(cast(CausalLM, model).get_output_embeddings().weight).detach().float()
        in_out = arch_spec(model).weight_layout == "in_out"
        deltas: dict[str, torch.Tensor] = {}
        n_neurons = 0
        for index, request in enumerate(requests):
            prompts = [request.prompt, *((extra_prompts or [[]] * len(requests))[index])]
            ids_new, start_new = encode_prompt_target(tok, request.prompt, request.target_new)
            new_id = ids_new[start_new]
            per_prompt, activations = [], []
            old_id = -1
            for prompt in prompts:
                ids = encode_prompt(tok, prompt)
                if prompt == request.prompt:
                    old_id = self._old_answer_id(ids, request)
                attrs, acts = zip(*(neuron_attributions(model, ids, old_id, layer, s.steps) for layer in layers))
                per_prompt.append(torch.cat(attrs))
                if prompt == request.prompt:
                    activations = list(acts)
            chosen = select_neurons(per_prompt, s.threshold, s.share)
            total = torch.stack(per_prompt).sum(0)
            chosen = sorted(chosen, key=lambda i: -float(total[i]))[:s.max_neurons]
            n_neurons += len(chosen)
            direction = s.update_scale * head[new_id] - (s.erase_scale * head[old_id] if old_id != new_id else 0.0)
            per_layer = activations[0].numel()
            for flat in chosen:
                layer, neuron = layers[flat // per_layer], flat % per_layer
                name = param_name(model, layer, "mlp_out")
                weight = torch.as_tensor(layer_module(model, layer, "mlp_out").weight)
                delta = deltas.setdefault(name, torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
                sign = 1.0 if float(activations[flat // per_layer][neuron]) >= 0 else -1.0
                if in_out:
                    delta[neuron] += sign * direction
                else:
                    delta[:, neuron] += sign * direction
        self.last_stats: dict[str, Any] = {"neurons": n_neurons, "params": sorted(deltas),
                                           "seconds": time.perf_counter() - t0}
        log.info("kn: %d request(s), %d neuron(s) in %d layer(s), %.1f s", len(requests), n_neurons, len(deltas),
                 self.last_stats["seconds"])
        return deltas

    def apply(self, requests: Sequence[EditRequest]) -> WeightEditHandle:
        return WeightEditHandle.add_deltas(self.model, self.compute(requests))
