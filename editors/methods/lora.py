"""``lora`` and ``adalora``: editing by training a low-rank adapter with ``peft`` (KnowEdit's AdaLoRA row).

An adapter (LoRA, Hu et al. 2022; AdaLoRA, Zhang et al. 2023, which reallocates the rank budget while training) is
put on the attention output and MLP output projections of every layer (``attn_out`` and ``mlp_out`` of
:mod:`editors.lm.architectures`; EasyEdit puts it on ``q_proj``/``v_proj``, which not every architecture here has
as separate modules) and trained on the requests' target tokens only (the prompt is masked out of the loss, as
EasyEdit's ``lora_main``). Defaults from EasyEdit ``hparams/LoRA/llama-7b.yaml``: rank 8, alpha 32, lr 5e-3, 70
steps; dropout 0 (EasyEdit: 0.1) so an edit is deterministic and the model stays in eval mode; training stops early
once the mean loss is below ``early_stop_loss`` (1e-2, as ``ft``).

Exactness. The adapter is injected into the model only while it trains (``peft.get_peft_model``), then its merged
update ``delta W = B A * alpha / r`` of each adapted weight is read and the adapter is removed again
(``unload()``, which puts the original modules and tensors back; the parameters' ``requires_grad`` flags are put
back too). The edit is then written as deltas through :class:`AdapterEditHandle`, a
:class:`~editors.base.WeightEditHandle`: ``editor.model`` is the plain model answering with the edit, and
``restore()`` copies the original weights back bit for bit. The handle also keeps the trained adapter's tensors
(``handle.adapter``), saved with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from editors.base import Editor, EditorSettings, EditRequest, WeightEditHandle, check_requests, register_editor
from editors.lm.architectures import Which, arch_spec, module_path, num_layers
from editors.lm.tokens import encode_batch
from memory.checks import check_number

log = logging.getLogger(__name__)


class AdapterEditHandle(WeightEditHandle):
    """A :class:`WeightEditHandle` that also keeps the trained adapter's tensors (``adapter``), saved and loaded with
    it (the merged deltas are what restore and reapply use)."""

    adapter: dict[str, torch.Tensor]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "adapter": {k: v.cpu() for k, v in self.adapter.items()}}

    @classmethod
    def _from_state(cls, model: torch.nn.Module, state: Mapping[str, Any]) -> AdapterEditHandle:
        handle = cls(model, state["originals"], state["edited"])
        handle.adapter = dict(state.get("adapter", {}))
        return handle


@dataclass(frozen=True)
class LoRASettings(EditorSettings):
    """Settings of :class:`LoRAEditor` / :class:`AdaLoRAEditor`; see the module docstring."""

    rank: int = 8
    alpha: int = 32
    lr: float = 5e-3
    steps: int = 70
    early_stop_loss: float | None = 1e-2
    layers: tuple[int, ...] | None = None  # None: every layer
    modules: tuple[str, ...] = ("attn_out", "mlp_out")
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("LoRA", "rank", self.rank, integer=True)
        check_number("LoRA", "alpha", self.alpha)
        check_number("LoRA", "lr", self.lr)
        check_number("LoRA", "steps", self.steps, integer=True)
        check_number("LoRA", "early_stop_loss", self.early_stop_loss, optional=True)


def _peft_config(kind: str, s: LoRASettings, targets: list[str], conv1d: bool) -> Any:
    import peft

    if kind == "adalora":
        return peft.AdaLoraConfig(init_r=s.rank + 4, target_r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0,
                                  target_modules=targets, total_step=s.steps, tinit=0, tfinal=0,
                                  deltaT=max(1, s.steps // 10), fan_in_fan_out=conv1d)
    return peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=targets,
                           fan_in_fan_out=conv1d)


@register_editor
class LoRAEditor(Editor):
    """Train a LoRA adapter on the edit requests' target tokens and write its merged update."""

    name = "lora"
    kind = "lora"
    Settings = LoRASettings
    settings: LoRASettings

    def targets(self) -> list[str]:
        """Full module paths the adapter goes on."""
        layers = self.settings.layers if self.settings.layers is not None else range(num_layers(self.model))
        return [module_path(self.model, int(layer), cast(Which, which)) for layer in layers
                for which in self.settings.modules]

    def train_adapter(self, requests: Sequence[EditRequest]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Train the adapter with the model temporarily wrapped; returns ``(weight deltas, adapter tensors)``. The
        model's modules and ``requires_grad`` flags are as before when this returns (or raises)."""
        import peft

        requests = check_requests(requests, self.name)
        s = self.settings
        model = self.model
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        targets = self.targets()
        batch = encode_batch(self.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                             device=next(model.parameters()).device)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            wrapped = peft.get_peft_model(model, _peft_config(self.kind, s, targets, arch_spec(model).conv1d))
        losses: list[float] = []
        try:
            trainable = [p for p in wrapped.parameters() if p.requires_grad]
            optimizer = torch.optim.Adam(trainable, lr=s.lr)
            with torch.enable_grad():
                for step in range(s.steps):
                    optimizer.zero_grad(set_to_none=True)
                    out = wrapped(**batch.model_inputs(), labels=batch.labels, use_cache=False)
                    losses.append(out.loss.item())
                    if s.early_stop_loss is not None and losses[-1] < s.early_stop_loss:
                        break
                    out.loss.backward()
                    optimizer.step()
                    if self.kind == "adalora":
                        wrapped.base_model.update_and_allocate(step)
            deltas, adapter = {}, {}
            with torch.no_grad():
                for path in targets:
                    layer = wrapped.base_model.model.get_submodule(path)
                    deltas[f"{path}.weight"] = layer.get_delta_weight("default").detach().float().clone()
                adapter = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(wrapped).items()}
        finally:
            wrapped.unload()
            for name, param in model.named_parameters():
                param.requires_grad_(flags[name])
                param.grad = None
            if hasattr(model, "peft_config"):
                del model.peft_config
        self.last_stats = {"steps": len(losses), "loss_first": losses[0] if losses else None,
                           "loss_last": losses[-1] if losses else None, "seconds": time.perf_counter() - t0}
        log.info("%s: %d request(s), %d steps, loss %.3f -> %.3f, %.1f s", self.name, len(requests), len(losses),
                 losses[0], losses[-1], self.last_stats["seconds"])
        return deltas, adapter

    def apply(self, requests: Sequence[EditRequest]) -> AdapterEditHandle:
        deltas, adapter = self.train_adapter(requests)
        plain = WeightEditHandle.add_deltas(self.model, deltas)
        handle = AdapterEditHandle(self.model, plain.originals, plain.edited)
        handle.applied = True
        handle.adapter = adapter
        return handle


@register_editor
class AdaLoRAEditor(LoRAEditor):
    """The same with AdaLoRA (adaptive rank allocation), KnowEdit's AdaLoRA row."""

    name = "adalora"
    kind = "adalora"
