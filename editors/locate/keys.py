"""Keys for ROME and MEMIT: where the subject ends in a prompt, context prefixes, and MLP keys at that token.

Following ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", section 3.1) and MEMIT (Meng et
al. 2023, "Mass-Editing Memory in a Transformer", section 4.3), the *key* of an edit at layer ``l`` is the vector
entering that layer's MLP output projection (``mlp_out`` of :mod:`editors.lm.architectures`: the activation after the
MLP's non-linearity, of the intermediate width) at the **last token of the subject**. It is averaged over the prompt
preceded by a few short random text prefixes, so that the edit holds whatever comes before the prompt.

Context prefixes (:func:`context_prefixes`): ``""`` (the bare prompt) plus ``n`` texts of ``length`` tokens that the
model itself samples (top-5 sampling, one continuation each of the start words "The", "Therefore", "Because", "I",
"You", ... as in ROME), drawn with a local :class:`torch.Generator` seeded with ``seed``, so they are deterministic for
a model and never touch the global RNG. Each is stripped, its braces and newlines replaced by spaces, and followed by
``". "``, then the prompt. ROME and MEMIT use 5 (ROME: ``[(10, 5)]``) or 10 prefixes of 10 tokens.

Tokenization is :func:`editors.lm.tokens.encode_prompt_target`'s, so the rows the editors optimise on are exactly the
token sequences the metrics later score; the subject's last token is found from the fast tokenizer's character
offsets (ROME's ``subject_last`` rule), or by tokenizing the text up to the end of the subject for a slow tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import torch

from editors.lm.architectures import layer_module
from editors.lm.hooks import capture, forward, stop_after
from editors.lm.tokens import encode_prompt, encode_prompt_target, pad_id
from memory.errors import ValidationError

START_WORDS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You", "It", "In", "When", "A", "This")


@dataclass(frozen=True)
class Row:
    """One token sequence for the editors: ``ids``, the index of the subject's last token, and (with a target) where
    the target starts (``ids[target_start:]`` is the target)."""

    ids: tuple[int, ...]
    subject_index: int
    target_start: int | None = None


def subject_last_index(tokenizer: Any, text: str, subject: str, start: int = 0) -> int:
    """Index, in ``tokenizer(text, add_special_tokens=False)`` ids, of the last token of the first occurrence of
    ``subject`` in ``text`` at or after character ``start``."""
    at = text.find(subject, start)
    if at < 0 or not subject:
        raise ValidationError(f"subject {subject!r} does not occur in {text!r}")
    end = at + len(subject)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets:
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > a]
        if inside:
            return inside[-1]
    return max(len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1, 0)


def encode_row(tokenizer: Any, prefix: str, prompt: str, subject: str, target: str | None = None) -> Row:
    """The row for ``prefix + prompt`` (followed by ``target`` if given), with the subject's last token located in the
    prompt part (never in the prefix)."""
    text = prefix + prompt
    if target is None:
        ids = encode_prompt(tokenizer, text)
        target_start = None
        lead = len(ids) - len(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids, target_start = encode_prompt_target(tokenizer, text, target)
        lead = target_start - len(tokenizer(text, add_special_tokens=False)["input_ids"])
    index = lead + subject_last_index(tokenizer, text, subject, start=len(prefix))
    return Row(tuple(ids), index, target_start)


def pad_right(rows: Sequence[Row], pad: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the rows, right-padded with ``pad``."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        mask[i, :len(r.ids)] = 1
    return ids.to(device), mask.to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def context_prefixes(model: torch.nn.Module, tokenizer: Any, n: int = 5, length: int = 10,
                     seed: int = 0) -> tuple[str, ...]:
    """``("",)`` plus ``n`` prefixes of ``length`` sampled tokens each, ending in ``". "`` (see the module docstring).

    Sampling is top-5 with a local generator seeded by ``seed``; the global torch RNG is not used.
    """
    if n == 0:
        return ("",)
    device = model_device(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    prefixes = [""]
    for i in range(n):
        ids = torch.tensor([encode_prompt(tokenizer, START_WORDS[i % len(START_WORDS)])], dtype=torch.long)
        past, step_ids = None, ids
        with torch.no_grad():
            for _ in range(length):
                out = model(input_ids=step_ids.to(device), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1].float().cpu()
                top = logits.topk(min(5, logits.numel()))
                step_ids = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=generator)].view(1, 1)
                ids = torch.cat([ids, step_ids], dim=1)
        text = tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        prefixes.append(text + ". ")
    return tuple(prefixes)


def activations_at(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row],
                   sites: Mapping[str, tuple[torch.nn.Module, Literal["input", "output"]]], *,
                   overrides: Mapping[str, torch.Tensor] | None = None,
                   stop: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """For each site ``name -> (module, "input" | "output")``, the activation at each row's subject token, (R, d).

    One forward pass over the right-padded rows, with ``overrides`` substituted for parameters (see
    :func:`editors.lm.hooks.forward`) and ended after ``stop`` if given.
    """
    ids, mask = pad_right(rows, pad_id(tokenizer), model_device(model))
    index = torch.tensor([r.subject_index for r in rows], dtype=torch.long, device=ids.device)
    arange = torch.arange(len(rows), device=ids.device)
    with torch.no_grad(), ExitStack() as stack:
        records = {name: stack.enter_context(capture(module, what)) for name, (module, what) in sites.items()}
        stack.enter_context(stop_after(stop))
        forward(model, overrides, input_ids=ids, attention_mask=mask, use_cache=False)
    return {name: rec.last[arange, index].float() for name, rec in records.items()}


def key_rows(tokenizer: Any, prompt: str, subject: str, prefixes: Sequence[str]) -> list[Row]:
    """One row per prefix: ``prefix + prompt`` (no target), subject located in the prompt."""
    return [encode_row(tokenizer, p, prompt, subject) for p in prefixes]


def mlp_keys(model: torch.nn.Module, tokenizer: Any, layer: int, requests: Sequence[Any], prefixes: Sequence[str], *,
             overrides: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The key of each request at ``layer``, averaged over ``prefixes``: (n_requests, d_in), float32.

    ``requests`` need ``prompt`` and ``subject`` (:class:`editors.base.EditRequest`).
    """
    rows = [row for r in requests for row in key_rows(tokenizer, r.prompt, r.subject, prefixes)]
    module = layer_module(model, layer, "mlp_out")
    keys = activations_at(model, tokenizer, rows, {"k": (module, "input")}, overrides=overrides, stop=module)["k"]
    return keys.view(len(requests), len(prefixes), -1).mean(1)
