"""Second-moment statistics of MLP keys, ``C = E[k k^T]``, computed once per model and layer and cached on disk.

ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", eq. 2) and MEMIT (Meng et al. 2023,
"Mass-Editing Memory in a Transformer", eq. 14) weigh their updates by the uncentred covariance of the keys that a
layer's MLP output projection sees on ordinary text, so that an edit disturbs the keys the model meets often as little
as possible. ROME and MEMIT estimate it on 100,000 Wikipedia samples; here it is estimated on ``n_tokens`` tokens of a
plain-text corpus file (the benchmarks use WikiText-2's raw test split).

Sampling: the corpus file (its first 64 MiB) is split into lines; lines of at least 40 characters (paragraphs, not
WikiText's ``= Heading =`` lines) are taken in a fixed shuffled order (``random.Random(0)``), each tokenized on its
own, truncated to ``seq_len`` tokens and preceded by the tokenizer's leading special tokens (BOS) if it adds any; every
non-special token's key counts once, until ``n_tokens`` keys are counted (the last line is cut to fit). Several
layers are measured in one pass, which ends after the deepest of them.

Cache: one file per layer, ``$EDITMEM_CACHE/stats/<model fingerprint>/<corpus sha256[:16]>-n<n_tokens>-len<seq_len>-
<dtype>/layer<L>.pt`` (``$EDITMEM_CACHE`` defaults to ``~/.cache/editmem``), written atomically. The corpus is
identified by its content, the model by :func:`editors.lm.architectures.model_fingerprint` (which weight edits to MLPs
do not change), so a different corpus, sample count, layer or model means another file.

Without a corpus (:func:`identity_stats`), ``C`` is taken as ``s * I`` with ``s`` the mean of ``||k||^2 / d`` over the
keys of some text the caller supplies (the editors pass the context prefixes the model sampled itself): ROME then makes
the smallest (Frobenius) rank-one change, and MEMIT's ``lambda * C`` keeps a sensible scale. ``LayerStats.source``
says which was used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editors.lm.architectures import layer_module, model_fingerprint, num_layers
from editors.lm.hooks import capture, forward, stop_after
from editors.lm.tokens import encode_prompt, pad_id
from editors.locate.keys import model_device
from memory.errors import EditmemError, ValidationError
from memory.paths import cache_dir

log = logging.getLogger(__name__)

STATS_FORMAT = 1
MAX_CORPUS_BYTES = 64 * 2**20
MIN_LINE_CHARS = 40


@dataclass(frozen=True)
class LayerStats:
    """``mom2``: E[k k^T] of the keys entering ``layer``'s MLP output projection, (d, d) float32."""

    layer: int
    mom2: torch.Tensor
    n_tokens: int
    source: str
    path: Path | None = None
    from_cache: bool = False


def stats_dir() -> Path:
    """Where statistics are cached: ``$EDITMEM_CACHE/stats`` (default ``~/.cache/editmem/stats``)."""
    return cache_dir() / "stats"


def corpus_identity(corpus: str | Path) -> str:
    """First 16 hex digits of the sha256 of the corpus file's first 64 MiB (what the statistics read)."""
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise ValidationError(f"statistics corpus {path} is not a file")
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(MAX_CORPUS_BYTES))
    return h.hexdigest()[:16]


def stats_path(model: torch.nn.Module, layer: int, corpus: str | Path, n_tokens: int, seq_len: int) -> Path:
    """The cache file for these statistics (see the module docstring)."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    folder = f"{corpus_identity(corpus)}-n{n_tokens}-len{seq_len}-{dtype}"
    return stats_dir() / model_fingerprint(model) / folder / f"layer{layer:02d}.pt"


def _corpus_lines(corpus: Path) -> list[str]:
    with corpus.open("rb") as f:
        text = f.read(MAX_CORPUS_BYTES).decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if len(line) >= MIN_LINE_CHARS]
    if not lines:
        raise ValidationError(f"statistics corpus {corpus} has no line of {MIN_LINE_CHARS}+ characters")
    random.Random(0).shuffle(lines)
    return lines


def _load(path: Path, layer: int) -> LayerStats | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as err:
        log.warning("ignoring unreadable statistics cache %s (%s)", path, err)
        return None
    if blob.get("format") != STATS_FORMAT:
        return None
    return LayerStats(layer, blob["mom2"], int(blob["n_tokens"]), blob["source"], path, from_cache=True)


def _save(path: Path, stats: LayerStats, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": STATS_FORMAT, "mom2": stats.mom2, "n_tokens": stats.n_tokens, "source": stats.source,
                    **meta}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def mlp_key_stats(model: torch.nn.Module, tokenizer: Any, layers: Sequence[int], corpus: str | Path, *,
                  n_tokens: int = 20_000, seq_len: int = 128, batch_size: int = 8,
                  progress: bool = True) -> dict[int, LayerStats]:
    """``E[k k^T]`` at each of ``layers`` from ``corpus``, read from the cache or computed (then cached).

    Layers missing from the cache are computed together in one pass over the corpus, with a progress bar.
    """
    corpus = Path(corpus).expanduser()
    if n_tokens < 1 or seq_len < 1 or batch_size < 1:
        raise ValidationError("n_tokens, seq_len and batch_size must be >= 1")
    n = num_layers(model)
    layers = sorted(set(layers))
    for layer in layers:
        if not 0 <= layer < n:
            raise ValidationError(f"layer {layer} does not exist: the model has {n} layers (0..{n - 1})")
    paths = {layer: stats_path(model, layer, corpus, n_tokens, seq_len) for layer in layers}
    result: dict[int, LayerStats] = {}
    for layer in layers:
        cached = _load(paths[layer], layer)
        if cached is not None:
            result[layer] = cached
    missing = [layer for layer in layers if layer not in result]
    if not missing:
        return result

    t0 = time.perf_counter()
    lines = _corpus_lines(corpus)
    lead = encode_prompt(tokenizer, "")
    device = model_device(model)
    modules = {layer: layer_module(model, layer, "mlp_out") for layer in missing}
    sums: dict[int, torch.Tensor] = {}
    counted = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=n_tokens, desc=f"MLP key statistics, layer(s) {missing}", unit="tok", disable=not progress,
               leave=False)
    line_iter = iter(lines)
    try:
        while counted < n_tokens:
            batch: list[list[int]] = []
            budget = n_tokens - counted
            for line in line_iter:
                ids = list(tokenizer(line, add_special_tokens=False)["input_ids"])[:seq_len]
                ids = ids[:budget]
                if ids:
                    batch.append(ids)
                    budget -= len(ids)
                if len(batch) == batch_size or budget == 0:
                    break
            if not batch:
                break
            width = len(lead) + max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):
                input_ids[i, :len(lead) + len(ids)] = torch.tensor(lead + ids, dtype=torch.long)
                mask[i, :len(lead) + len(ids)] = 1
            counts = mask.clone()
            counts[:, :len(lead)] = 0  # BOS keys are not text keys
            keep = counts.bool().view(-1).to(device)
            with torch.no_grad(), ExitStack() as stack:
                caps = {layer: stack.enter_context(capture(modules[layer], "input")) for layer in missing}
                stack.enter_context(stop_after(modules[missing[-1]]))
                forward(model, None, input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        use_cache=False)
            with torch.no_grad():
                for layer in missing:
                    k = caps[layer].last.reshape(-1, caps[layer].last.shape[-1])[keep].float()
                    s = (k.T @ k).double()
                    sums[layer] = s if layer not in sums else sums[layer] + s
            got = int(keep.sum())
            counted += got
            bar.update(got)
    finally:
        bar.close()
    if counted == 0:
        raise EditmemError(f"statistics corpus {corpus} gave no tokens")
    if counted < n_tokens:
        log.warning("statistics corpus %s has only %d tokens in usable lines (asked for %d)", corpus, counted,
                    n_tokens)
    seconds = time.perf_counter() - t0
    fingerprint = model_fingerprint(model)
    for layer in missing:
        mom2 = (sums[layer] / counted).float().cpu()
        source = f"corpus {corpus.name} ({counted} tokens, seq_len {seq_len})"
        stats = LayerStats(layer, mom2, counted, source, paths[layer], from_cache=False)
        _save(paths[layer], stats, {"model": fingerprint, "layer": layer, "corpus": str(corpus),
                                    "corpus_id": corpus_identity(corpus), "seq_len": seq_len,
                                    "seconds": seconds})
        result[layer] = stats
    log.info("MLP key statistics for layer(s) %s from %s: %d tokens in %.1f s, cached under %s", missing,
             corpus.name, counted, seconds, paths[missing[0]].parent)
    return result


def identity_stats(model: torch.nn.Module, tokenizer: Any, layer: int, texts: Sequence[str]) -> LayerStats:
    """The no-corpus fallback: ``s * I`` with ``s`` the mean ``||k||^2 / d`` of the keys of ``texts`` at ``layer``."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValidationError("identity statistics need at least one non-empty text")
    module = layer_module(model, layer, "mlp_out")
    device = model_device(model)
    total, count, dim = 0.0, 0, 0
    for text in texts:
        ids = torch.tensor([encode_prompt(tokenizer, text)], dtype=torch.long, device=device)
        with torch.no_grad(), capture(module, "input") as seen, stop_after(module):
            forward(model, None, input_ids=ids, use_cache=False)
        k = seen.last[0].float()
        total += float((k * k).sum())
        count += k.shape[0]
        dim = k.shape[-1]
    scale = total / count / dim
    source = (f"identity (no corpus): E[kk^T] ~ {scale:.3g} * I, the mean squared key norm / d over {count} tokens "
              f"of {len(texts)} text(s) the model sampled")
    return LayerStats(layer, torch.eye(dim) * scale, count, source)


CORPUS_ENV = "EDITMEM_STATS_CORPUS"


def resolve_corpus(corpus: str | Path | None) -> Path | None:
    """The statistics corpus an editor uses: ``corpus`` if given, else ``$EDITMEM_STATS_CORPUS``, else None."""
    chosen = corpus if corpus not in (None, "") else os.environ.get(CORPUS_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise ValidationError(f"statistics corpus {path} is not a file")
    return path


def editor_stats(model: torch.nn.Module, tokenizer: Any, layers: Sequence[int], corpus: str | Path | None, *,
                 n_tokens: int, seq_len: int, fallback_texts: Sequence[str],
                 progress: bool = True) -> dict[int, LayerStats]:
    """What ROME and MEMIT use: :func:`mlp_key_stats` from the corpus (see :func:`resolve_corpus`), or, with no
    corpus, :func:`identity_stats` over ``fallback_texts`` (logged once per call)."""
    path = resolve_corpus(corpus)
    if path is not None:
        return mlp_key_stats(model, tokenizer, layers, path, n_tokens=n_tokens, seq_len=seq_len, progress=progress)
    result = {layer: identity_stats(model, tokenizer, layer, fallback_texts) for layer in layers}
    log.warning("no statistics corpus given (setting stats_corpus or $%s): using %s", CORPUS_ENV,
                next(iter(result.values())).source)
    return result
