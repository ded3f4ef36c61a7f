"""Values for ROME and MEMIT: the vector to add at the subject's last token so that the model says the new target.

ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", eq. 4) optimises a vector ``delta`` added
to the output of the edit layer's MLP at the subject's last token; MEMIT (Meng et al. 2023, "Mass-Editing Memory in
a Transformer", eq. 16) adds it to the residual stream (the output of the last layer of its window) instead. Both
minimise, with Adam, over the prompt behind each context prefix (see :mod:`editors.keys`)::

    mean NLL(target | prefix + prompt)                                      (per target token, mean over prefixes)
  + kl_factor * KL( P_delta(. | "{subject} is a") || P_0(. | "{subject} is a") )     (the subject's "essence")
  + weight_decay * ||delta|| / ||v_0||^2

where ``v_0`` is the unedited output of the hooked module at the subject's last token in the bare prompt (the first
prefix must be ``""``), and after each step ``delta`` is scaled back into the ball ``||delta|| <= clamp_norm_factor *
||v_0||``. It stops when the loss falls below ``early_stop_loss`` or after ``steps`` forward passes (ROME's loop: the
last pass only measures). The KL term is taken at the last token of ``"{subject} is a"`` (the next-word distribution
the paper describes); ROME's code takes it at the subject's last token instead.

Speed (``prefix_cache=True``): ``delta`` only changes the subject's last token and what follows, so the tokens before
it are run once, without gradients, into a key/value cache (left-padded, explicit position ids), and each step runs
only the tail of every row. The result equals the plain forward pass up to float rounding (tests check it); set
``prefix_cache=False`` for the plain pass.

Nothing in the model is written: parameters are passed detached through :func:`editors.hooks.forward`, so no
gradient reaches them (not even ``.grad``), and ``overrides`` lets a caller optimise against not-yet-applied edits.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from editors.hooks import add_at, capture, forward
from editors.keys import Row, encode_row, model_device, pad_right
from editors.tokens import pad_id
from memory.errors import ValidationError

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"


def check_positive(owner: str, name: str, value: Any, *, integer: bool = False, zero_ok: bool = False) -> None:
    """Raise :class:`ValidationError` unless ``value`` is a finite positive number (or integer; ``>= 0`` with
    ``zero_ok``)."""
    kind = int if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
    if bad or value < 0 or (value == 0 and not zero_ok):
        what = "an integer" if integer else "a number"
        raise ValidationError(f"{owner} setting {name} must be {what} {'>= 0' if zero_ok else '> 0'}, not {value!r}")


@dataclass(frozen=True)
class ValueOptions:
    """How :func:`optimize_value` runs; see the module docstring."""

    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float | None = 0.05
    prefix_cache: bool = True


@dataclass(frozen=True)
class ValueResult:
    """``delta`` (d,) to add at the subject's last token; ``v0`` (d,) the unedited output there (bare prompt)."""

    delta: torch.Tensor
    v0: torch.Tensor
    steps: int
    loss_first: float
    loss_last: float
    target_prob_first: float
    target_prob_last: float


@dataclass
class _Plan:
    """Where things sit in the tensors of one call: delta sites, NLL predictions, the KL prediction."""

    delta_rows: torch.Tensor
    delta_pos: torch.Tensor
    nll_rows: torch.Tensor
    nll_pos: torch.Tensor
    nll_labels: torch.Tensor
    nll_weight: torch.Tensor  # 1 / (number of target tokens of the row) / (number of rewrite rows)
    kl_row: int
    kl_pos: int


def _plan(rows: Sequence[Row], starts: Sequence[int]) -> _Plan:
    """``starts[i]``: where row i begins in the call's token axis (0 for the plain pass, -p_i for the tail pass)."""
    d_rows, d_pos, n_rows, n_pos, labels, weights = [], [], [], [], [], []
    rewrite = rows[:-1]
    for i, (row, s) in enumerate(zip(rows, starts)):
        d_rows.append(i)
        d_pos.append(row.subject_index + s)
        if row.target_start is not None:
            n_target = len(row.ids) - row.target_start
            for t in range(row.target_start, len(row.ids)):
                n_rows.append(i)
                n_pos.append(t - 1 + s)
                labels.append(row.ids[t])
                weights.append(1.0 / n_target / len(rewrite))
    kl = rows[-1]
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return _Plan(as_long(d_rows), as_long(d_pos), as_long(n_rows), as_long(n_pos), as_long(labels),
                 torch.tensor(weights, dtype=torch.float32), len(rows) - 1, len(kl.ids) - 1 + starts[-1])


class _Runner:
    """Runs the rows with a given ``delta``: the plain way, or the prefix once into a cache and then the tails."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], params: Mapping[str, torch.Tensor],
                 use_cache: bool):
        self.model, self.params = model, params
        self.device = model_device(model)
        pad = pad_id(tokenizer)
        cut = [r.subject_index for r in rows]
        self.width = max(cut)
        self.cache = None
        if not use_cache or self.width == 0:
            self.ids, self.mask = pad_right(rows, pad, self.device)
            self.position_ids = None
            self.plan = _plan(rows, [0] * len(rows))
            return
        p = self.width
        prefix = torch.full((len(rows), p), pad, dtype=torch.long)
        prefix_mask = torch.zeros((len(rows), p), dtype=torch.long)
        prefix_pos = torch.zeros((len(rows), p), dtype=torch.long)
        tails = [Row(r.ids[c:], 0, None) for r, c in zip(rows, cut)]
        tail_ids, tail_mask = pad_right(tails, pad)
        tail_pos = torch.zeros_like(tail_ids)
        for i, (r, c) in enumerate(zip(rows, cut)):
            if c:
                prefix[i, p - c:] = torch.tensor(r.ids[:c], dtype=torch.long)
                prefix_mask[i, p - c:] = 1
                prefix_pos[i, p - c:] = torch.arange(c)
            tail_pos[i] = c + torch.arange(tail_ids.shape[1])
        self.plan = _plan(rows, [-c for c in cut])
        with torch.no_grad():
            out = forward(model, params, input_ids=prefix.to(self.device), attention_mask=prefix_mask.to(self.device),
                          position_ids=prefix_pos.to(self.device), use_cache=True)
        self.cache = out.past_key_values
        self.ids = tail_ids.to(self.device)
        self.mask = torch.cat([prefix_mask, tail_mask], dim=1).to(self.device)
        self.position_ids = tail_pos.to(self.device)

    def logits(self, module: torch.nn.Module, delta: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, T, V) of the call with ``delta`` added at every row's subject token (None: nothing added)."""
        kwargs: dict[str, Any] = {"input_ids": self.ids, "attention_mask": self.mask,
                                  "use_cache": self.cache is not None}
        if self.cache is not None:
            # a fresh copy each call: the model appends the tail to the cache it is given
            kwargs.update(position_ids=self.position_ids, past_key_values=copy.deepcopy(self.cache))
        if delta is None:
            return forward(self.model, self.params, **kwargs).logits
        with add_at(module, delta, self.plan.delta_rows, self.plan.delta_pos):
            return forward(self.model, self.params, **kwargs).logits


def value_rows(tokenizer: Any, request: Any, prefixes: Sequence[str]) -> list[Row]:
    """The rewrite rows (each prefix + prompt + target) and, last, the KL row ``"{subject} is a"``."""
    if not prefixes or prefixes[0] != "":
        raise ValueError("the first context prefix must be '' (the bare prompt)")
    rows = [encode_row(tokenizer, p, request.prompt, request.subject, request.target_new) for p in prefixes]
    rows.append(encode_row(tokenizer, "", KL_PROMPT.format(request.subject), request.subject))
    return rows


def optimize_value(model: torch.nn.Module, tokenizer: Any, request: Any, prefixes: Sequence[str],
                   module: torch.nn.Module, options: ValueOptions, *,
                   overrides: Mapping[str, torch.Tensor] | None = None) -> ValueResult:
    """Optimise the vector added to ``module``'s output at the subject's last token (see the module docstring).

    ``request`` needs ``prompt``, ``subject`` and ``target_new``; ``module`` is an MLP output projection (ROME) or a
    transformer block (MEMIT). The model is not changed.
    """
    if not request.subject:
        raise ValidationError(f"optimising a value needs the subject of {request.prompt!r}")
    rows = value_rows(tokenizer, request, prefixes)
    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update({n: v.detach() for n, v in (overrides or {}).items()})
    runner = _Runner(model, tokenizer, rows, params, options.prefix_cache)
    plan = runner.plan

    with torch.no_grad(), capture(module, "output") as seen:
        logits = runner.logits(module, None)
    v0 = seen.last[plan.delta_rows[0], plan.delta_pos[0]].float().clone()
    kl_init = logits[plan.kl_row, plan.kl_pos].float().log_softmax(-1)

    delta = torch.zeros_like(v0, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=options.lr)
    max_norm = options.clamp_norm_factor * v0.norm()
    weights = plan.nll_weight.to(v0.device)
    loss_first = prob_first = loss_last = prob_last = float("nan")
    steps = 0
    with torch.enable_grad():
        for step in range(options.steps):
            optimizer.zero_grad(set_to_none=True)
            logits = runner.logits(module, delta)
            picked = logits[plan.nll_rows, plan.nll_pos].float().log_softmax(-1)
            token_logp = picked.gather(-1, plan.nll_labels.to(picked.device).unsqueeze(-1)).squeeze(-1)
            nll = -(token_logp * weights).sum()
            kl_now = logits[plan.kl_row, plan.kl_pos].float().log_softmax(-1)
            kl = torch.nn.functional.kl_div(kl_init.unsqueeze(0), kl_now.unsqueeze(0), log_target=True,
                                            reduction="batchmean")
            loss = nll + options.kl_factor * kl + options.weight_decay * delta.norm() / v0.norm() ** 2
            loss_last, prob_last = loss.item(), math.exp(-nll.item())
            steps = step + 1
            if step == 0:
                loss_first, prob_first = loss_last, prob_last
            if options.early_stop_loss is not None and loss_last < options.early_stop_loss:
                break
            if step == options.steps - 1:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    log.debug("value for %r -> %r: %d passes, loss %.3f -> %.3f, target prob %.3f -> %.3f, |delta| %.2f "
              "(|v0| %.2f)", request.prompt, request.target_new, steps, loss_first, loss_last, prob_first,
              prob_last, delta.norm().item(), v0.norm().item())
    return ValueResult(delta.detach().clone(), v0, steps, loss_first, loss_last, prob_first, prob_last)
