"""The metrics of KnowEdit's WikiBio, ConvSent and Sanitation tasks, as EasyEdit (and MEND/SERAC for ConvSent)
define them; the code is our own. Pure functions on log-probabilities and texts, plus the two model calls they need
(:func:`response_logprobs`, :func:`response_distributions`).

- **WikiBio perplexity** (GRACE/WISE's form): ``exp(mean NLL of the target's tokens | prompt)``
  (:func:`perplexity`).
- **ConvSent edit success** (SERAC's sentiment score): ``sigmoid(lp_target - lp_opposite) * min(1, exp(gain))`` where
  ``lp_target`` / ``lp_opposite`` are the mean (over responses) of each response's mean per-token log-probability
  given the topic prompt, for the target sentiment's and the opposite sentiment's responses, and ``gain`` is
  ``lp_target`` after the edit minus before it (:func:`convsent_success`).
- **ConvSent locality**: the KL divergence ``KL(before || after)`` of the next-token distributions at the response
  positions of other topics' responses, averaged over positions; **lower is better**, 0 for an unchanged model
  (:func:`kl_divergence`).
- **Sanitation success** (erasure): 1 if the normalised greedy output contains the normalised refusal target and
  does not contain the normalised (forgotten) answer, both as whole words, else 0 (:func:`sanitation_success`;
  normalisation is :func:`eval.metrics.normalize_answer`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from editors.lm.tokens import encode_batch, target_token_logprobs
from eval.metrics import model_device, normalize_answer


def perplexity(mean_nll: float) -> float:
    """``exp(mean negative log-likelihood)`` of a target (nats per token)."""
    return math.exp(mean_nll)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def convsent_success(lp_target: float, lp_opposite: float, gain: float) -> float:
    """``sigmoid(lp_target - lp_opposite) * min(1, exp(gain))`` (see the module docstring)."""
    return sigmoid(lp_target - lp_opposite) * min(1.0, math.exp(gain))


def kl_divergence(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over positions of ``KL(before || after)`` between two (N, V) tensors of log-probabilities."""
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: {tuple(before.shape)} vs {tuple(after.shape)}")
    p = before.float()
    return float((p.exp() * (p - after.float())).sum(-1).mean())


def sanitation_success(generated: str, target: str, answer: str | None) -> float:
    """1.0 if the normalised ``generated`` contains the normalised refusal ``target`` and not the normalised
    ``answer`` (when one is given), else 0.0."""
    text = f" {normalize_answer(generated)} "
    refusal = normalize_answer(target)
    if not refusal or f" {refusal} " not in text:
        return 0.0
    gone = normalize_answer(answer) if answer else ""
    return 0.0 if gone and f" {gone} " in text else 1.0


def response_logprobs(model: Any, tokenizer: Any, prompt: str, responses: Sequence[str]) -> list[float]:
    """Each response's mean per-token log-probability after ``prompt`` (teacher-forced), in one forward pass."""
    batch = encode_batch(tokenizer, [prompt] * len(responses), list(responses), device=model_device(model))
    with torch.no_grad():
        per_token = target_token_logprobs(model(**batch.model_inputs()).logits, batch.labels)
    counts = batch.target_mask.sum(-1).clamp_min(1)
    return (per_token.sum(-1) / counts).tolist()


def response_distributions(model: Any, tokenizer: Any, prompt: str, responses: Sequence[str]) -> torch.Tensor:
    """Next-token log-distributions (N, V) at every response position (the positions that predict response
    tokens), all responses after ``prompt`` concatenated in order."""
    batch = encode_batch(tokenizer, [prompt] * len(responses), list(responses), device=model_device(model))
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits.float().log_softmax(-1)
    predicting = torch.zeros_like(batch.target_mask)
    predicting[:, :-1] = batch.target_mask[:, 1:]
    return logits[predicting.bool()]
