"""How a (prompt, target) pair becomes tokens: one definition shared by every editor and by the metrics.

The target is completed after the prompt with a space between them (``prompt + " " + target``) unless the target
already starts with whitespace or the prompt ends with it. The target's token ids are the tokens of that full string
that come after the prompt's own tokens, so ``input_ids[:target_start]`` is exactly how the prompt alone tokenizes
(what a model sees when it is asked the prompt). Where a tokenizer merges across the boundary, so that the full
string does not start with the prompt's tokens, the target is tokenized on its own and appended instead.

Special tokens the tokenizer puts in front of a text (a BOS token) are kept in front of the prompt; ones it appends
(an EOS token) are not added.

Teacher forcing: the logits at position ``t - 1`` predict token ``t``; :attr:`EncodedBatch.labels` holds the target
token ids at their own positions and ``-100`` elsewhere, exactly like Hugging Face ``labels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from memory.errors import ValidationError

IGNORE_INDEX = -100


def target_text(prompt: str, target: str) -> str:
    """The text appended to ``prompt``: ``" " + target`` unless either side already has the whitespace."""
    if not target or target[0].isspace() or (prompt and prompt[-1].isspace()):
        return target
    return " " + target


def completed(prompt: str, target: str) -> str:
    """``prompt`` followed by ``target`` as one text, joined by :func:`target_text` (e.g. a new fact as a sentence)."""
    return prompt + target_text(prompt, target)


def _leading_specials(tokenizer: Any, text: str, plain: list[int]) -> list[int]:
    """Special ids the tokenizer puts before ``text`` (e.g. BOS), found by comparing with the plain encoding."""
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not plain:
        return list(full)
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's tokens as :func:`encode_prompt_target` puts them before any target (leading special tokens
    such as BOS included, no trailing EOS): what to feed a model that should continue ``prompt``."""
    if not isinstance(prompt, str):
        raise ValidationError("the prompt must be a string")
    plain = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return _leading_specials(tokenizer, prompt, plain) + plain


def encode_prompt_target(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt followed by target, and where the target starts.

    Returns ``(input_ids, target_start)``: ``input_ids[:target_start]`` are the prompt's tokens (with the
    tokenizer's leading special tokens, if any), ``input_ids[target_start:]`` the target's (at least one).
    """
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise ValidationError("prompt and target must be strings")
    if not target.strip():
        raise ValidationError(f"the target for prompt {prompt!r} is empty")
    tail = target_text(prompt, target)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full_ids = list(tokenizer(prompt + tail, add_special_tokens=False)["input_ids"])
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        target_ids = full_ids[len(prompt_ids):]
    else:
        target_ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise ValidationError(f"the target {target!r} tokenizes to nothing")
    lead = _leading_specials(tokenizer, prompt, prompt_ids)
    ids = lead + prompt_ids + target_ids
    return ids, len(lead) + len(prompt_ids)


@dataclass(frozen=True)
class EncodedBatch:
    """Padded prompt+target sequences for teacher forcing, all tensors (B, T) unless said otherwise.

    ``labels``: target token ids at target positions, ``-100`` elsewhere (prompt and padding).
    ``target_mask``: True at target positions. ``target_start`` and ``target_end`` (B,): the target occupies
    ``input_ids[b, target_start[b]:target_end[b]]``; ``prompt_start`` (B,) is where the prompt begins (after left
    padding, 0 with right padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    target_mask: torch.Tensor
    prompt_start: torch.Tensor
    target_start: torch.Tensor
    target_end: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """What to pass to the model: ``model(**batch.model_inputs())``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                       self.target_mask, self.prompt_start, self.target_start,
                                                       self.target_end)))


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def pad_rows(rows: Sequence[Sequence[int]], pad: int, *, side: Literal["right", "left"] = "right"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one ``(input_ids, attention_mask)`` pair (B, T), padded with ``pad`` on
    ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = width - len(row) if side == "left" else 0
        ids[b, at:at + len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[b, at:at + len(row)] = 1
    return ids, mask


def encode_batch(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
                 padding_side: Literal["right", "left"] = "right",
                 device: torch.device | str | None = None) -> EncodedBatch:
    """:func:`encode_prompt_target` for many pairs, padded into one :class:`EncodedBatch`.

    Right padding (the default) keeps position ids right for models that do not derive them from the attention
    mask; the tokenizer's own ``padding_side`` is neither used nor changed.
    """
    if len(prompts) != len(targets):
        raise ValidationError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValidationError("nothing to encode: no prompts")
    if padding_side not in ("right", "left"):
        raise ValidationError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    encoded = [encode_prompt_target(tokenizer, p, t) for p, t in zip(prompts, targets)]
    width = max(len(ids) for ids, _ in encoded)
    b = len(encoded)
    input_ids = torch.full((b, width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    prompt_start = torch.zeros(b, dtype=torch.long)
    target_start = torch.zeros(b, dtype=torch.long)
    target_end = torch.zeros(b, dtype=torch.long)
    for row, (ids, start) in enumerate(encoded):
        offset = width - len(ids) if padding_side == "left" else 0
        input_ids[row, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, offset:offset + len(ids)] = 1
        labels[row, offset + start:offset + len(ids)] = torch.tensor(ids[start:], dtype=torch.long)
        prompt_start[row], target_start[row], target_end[row] = offset, offset + start, offset + len(ids)
    batch = EncodedBatch(input_ids, attention_mask, labels, labels != IGNORE_INDEX, prompt_start, target_start,
                         target_end)
    return batch.to(device) if device is not None else batch


def target_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token under teacher forcing, (B, T); 0 where ``labels`` is ``-100``.

    ``logits`` (B, T, V) are the model's outputs for the same ``input_ids`` the labels belong to: position ``t - 1``
    predicts ``labels[:, t]``. Computed in float32.
    """
    shifted = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = shifted.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def target_logprob(logits: torch.Tensor, labels: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
    """Per example, the summed (or with ``mean=True`` averaged) log-probability of its target tokens, (B,)."""
    per_token = target_token_logprobs(logits, labels)
    total = per_token.sum(-1)
    if mean:
        total = total / (labels != IGNORE_INDEX).sum(-1).clamp_min(1)
    return total
