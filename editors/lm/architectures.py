"""The architecture table, and what editors read from it: modules by role, parameter names, logits, fingerprints.

:data:`ARCHITECTURES` holds, per ``config.model_type``, where the blocks, MLP projections, embeddings, final norm and
LM head live. Editors ask :func:`arch_spec`, :func:`layer_module` and :func:`param_name` instead of guessing module
names; an unknown ``model_type`` raises :class:`UnsupportedArchitectureError`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

import torch

from memory.errors import EditmemError, ValidationError

log = logging.getLogger(__name__)

# A Hugging Face causal LM (``*ForCausalLM``). They are duck-typed (``config``, ``base_model``,
# ``get_output_embeddings()``, ... differ per class and are not declared on ``torch.nn.Module``), so signatures that
# use those name the model with this alias rather than pretend ``torch.nn.Module`` has them.
CausalLM: TypeAlias = Any

class UnsupportedArchitectureError(EditmemError):
    """A model whose ``config.model_type`` is not in :data:`ARCHITECTURES`."""


# --------------------------------------------------------------------------------------------------- architecture


Which = Literal["block", "mlp", "mlp_in", "mlp_gate", "mlp_out", "attn_out"]


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one architecture. Paths are dotted module paths.

    ``layers``, ``embeddings``, ``lm_head`` and ``final_norm`` are relative to the model (the ``*ForCausalLM``);
    ``mlp``, ``mlp_in``, ``mlp_gate``, ``mlp_out`` and ``attn_out`` are relative to one block. ``mlp_in`` is the up
    projection (hidden -> intermediate); gated MLPs also name ``mlp_gate``. ``mlp_in_fused`` marks a fused
    gate+up projection (phi3's ``gate_up_proj``: output is [gate; up]).

    ``conv1d`` is True where the projections are GPT-2 ``Conv1D`` modules, whose ``weight`` is stored as
    (in_features, out_features) and applied as ``x @ W``; otherwise ``nn.Linear`` with (out_features, in_features),
    applied as ``x @ W.T``. See :attr:`weight_layout`.
    """

    layers: str
    mlp_in: str
    mlp_out: str
    embeddings: str
    lm_head: str
    final_norm: str
    attn_out: str
    mlp: str = "mlp"
    mlp_gate: str | None = None
    mlp_in_fused: bool = False
    conv1d: bool = False

    @property
    def weight_layout(self) -> Literal["in_out", "out_in"]:
        """Layout of the projection weights: ``"in_out"`` for Conv1D (gpt2), ``"out_in"`` for ``nn.Linear``."""
        return "in_out" if self.conv1d else "out_in"


_LLAMA_LIKE = ArchSpec(layers="model.layers", mlp_in="mlp.up_proj", mlp_gate="mlp.gate_proj", mlp_out="mlp.down_proj",
                       attn_out="self_attn.o_proj", embeddings="model.embed_tokens", lm_head="lm_head",
                       final_norm="model.norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(layers="transformer.h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", attn_out="attn.c_proj",
                     embeddings="transformer.wte", lm_head="lm_head", final_norm="transformer.ln_f", conv1d=True),
    "gpt_neo": ArchSpec(layers="transformer.h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj",
                        attn_out="attn.attention.out_proj", embeddings="transformer.wte", lm_head="lm_head",
                        final_norm="transformer.ln_f"),
    "gptj": ArchSpec(layers="transformer.h", mlp_in="mlp.fc_in", mlp_out="mlp.fc_out", attn_out="attn.out_proj",
                     embeddings="transformer.wte", lm_head="lm_head", final_norm="transformer.ln_f"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h",
                         attn_out="attention.dense", embeddings="gpt_neox.embed_in", lm_head="lm_head",
                         final_norm="gpt_neox.final_layer_norm"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ArchSpec(layers="model.layers", mlp_in="mlp.gate_up_proj", mlp_in_fused=True, mlp_out="mlp.down_proj",
                     attn_out="self_attn.o_proj", embeddings="model.embed_tokens", lm_head="lm_head",
                     final_norm="model.norm"),
}


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; editmem needs a Hugging Face causal LM")
    return model_type


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` for ``model.config.model_type``; :class:`UnsupportedArchitectureError` if unknown."""
    model_type = _model_type(model)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; supported model types: "
            f"{', '.join(sorted(ARCHITECTURES))}") from None


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted ``path`` (e.g. ``"model.layers.3.mlp"``); a clear error if it does not exist."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) has no module {path!r}; "
            f"the architecture table does not match this model ({err})") from None


def num_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks."""
    return len(cast(torch.nn.ModuleList, get_module(model, arch_spec(model).layers)))


def check_layer(model: torch.nn.Module, layer: int, who: str) -> int:
    """``layer`` if the model has it, else :class:`ValidationError` naming ``who`` (an editor) and the valid range."""
    n = num_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValidationError(f"{who} layer {layer!r} does not exist: the model has {n} layers (0..{n - 1})")
    return layer

def _relative(spec: ArchSpec, which: str) -> str | None:
    if which == "block":
        return None
    if which not in ("mlp", "mlp_in", "mlp_gate", "mlp_out", "attn_out"):
        raise ValueError(f"unknown module kind {which!r}; use block, mlp, mlp_in, mlp_gate, mlp_out or attn_out")
    rel = getattr(spec, which)
    if rel is None:
        raise UnsupportedArchitectureError(f"this architecture has no {which} module (its MLP is not gated)")
    return rel


def module_path(model: torch.nn.Module, layer: int, which: Which = "mlp_out") -> str:
    """Dotted path of ``which`` in block ``layer``, e.g. ``"model.layers.3.mlp.down_proj"``."""
    spec = arch_spec(model)
    n = num_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise IndexError(f"layer {layer!r} is out of range: the model has {n} layers (0..{n - 1})")
    rel = _relative(spec, which)
    return f"{spec.layers}.{layer}" + (f".{rel}" if rel else "")


def layer_module(model: torch.nn.Module, layer: int, which: Which = "block") -> torch.nn.Module:
    """The module ``which`` of block ``layer`` (``"block"`` is the block itself)."""
    return get_module(model, module_path(model, layer, which))


def param_name(model: torch.nn.Module, layer: int, which: Which = "mlp_out", kind: str = "weight") -> str:
    """Full parameter name, e.g. ``"model.layers.3.mlp.down_proj.weight"`` or ``"transformer.h.3.mlp.c_proj.weight"``.

    Its layout is :attr:`ArchSpec.weight_layout` of :func:`arch_spec`.
    """
    if which == "block":
        raise ValueError("a block has many parameters; name a projection (mlp_in, mlp_gate, mlp_out, attn_out)")
    name = f"{module_path(model, layer, which)}.{kind}"
    if getattr(layer_module(model, layer, which), kind, None) is None:
        raise UnsupportedArchitectureError(f"{name} does not exist in this model")
    return name


def output_logits(model: CausalLM, hidden: torch.Tensor,
                  params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The model's output head applied to final hidden states ``hidden`` (..., d): the output embeddings (with their
    bias, if any), then the final logit soft cap where the config has one (gemma2).

    ``params``: tensors to use instead of the model's own head weight and bias, by the name
    ``model.named_parameters()`` gives them (a tied head weight under its embedding's name); others are the model's.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no output embeddings (not a causal LM)")
    weight, bias = head.weight, getattr(head, "bias", None)
    if params:
        names = {id(p): n for n, p in model.named_parameters()}
        weight = params.get(names.get(id(weight), ""), weight)
        if bias is not None:
            bias = params.get(names.get(id(bias), ""), bias)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logits_at(model: CausalLM, rows: torch.Tensor, positions: torch.Tensor, *,
              params: Mapping[str, torch.Tensor] | None = None, **inputs: Any) -> torch.Tensor:
    """Logits (P, V) only at ``(rows[i], positions[i])``: the backbone (``model.base_model``) runs on ``inputs`` and
    the output head (:func:`output_logits`) is applied at those positions alone, which saves the vocabulary projection
    everywhere else (on a small model with a large vocabulary, a large share of a forward pass).

    ``params``: tensors substituted for the model's parameters (full names, as ``model.named_parameters()`` gives
    them) through :func:`torch.func.functional_call`; nothing in the model is written. Names of the backbone that no
    longer exist as modules (e.g. blocks stood in for by :func:`editors.lm.hooks.skip_blocks`) must be left out.
    """
    base = model.base_model
    if params is None:
        hidden = base(**inputs).last_hidden_state
    else:
        prefix = f"{model.base_model_prefix}."
        inner = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
        hidden = torch.func.functional_call(base, inner, args=(), kwargs=inputs, strict=False).last_hidden_state
    return output_logits(model, hidden[rows, positions], params)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short id of the base model: ``"<model_type>-<16 hex>"``.

    It hashes the model type, every parameter's name and shape, and slices of the parameters that no editor changes
    (input embeddings, final norm, the first block's attention output), rounded to bfloat16 so that loading the same
    model in float32 or bfloat16 gives the same fingerprint. Weight edits to MLPs do not change it.
    """
    spec = arch_spec(model)
    h = hashlib.sha256()
    h.update(_model_type(model).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    sampled = [cast(torch.Tensor, m.weight) for m in (get_module(model, spec.embeddings),
                                                      get_module(model, spec.final_norm),
                                                      layer_module(model, 0, "attn_out"))]
    with torch.no_grad():
        for w in sampled:
            flat = w.detach().reshape(-1)
            k = min(256, flat.numel())
            idx = torch.arange(k, dtype=torch.long, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            values = torch.cat([flat[:64], flat[idx]]).to(torch.bfloat16).view(torch.int16).cpu()
            h.update(values.numpy().tobytes())
    return f"{_model_type(model)}-{h.hexdigest()[:16]}"


