"""Values for ROME and MEMIT: the vector to add at the subject's last token so that the model says the new target.

ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", eq. 4) optimises a vector ``delta`` added
to the output of the edit layer's MLP at the subject's last token; MEMIT (Meng et al. 2023, "Mass-Editing Memory in
a Transformer", eq. 16) adds it to the residual stream (the output of the last layer of its window) instead. Both
minimise, with Adam, over the prompt behind each context prefix (see :mod:`editors.locate.keys`)::

    mean NLL(target | prefix + prompt)                                      (per target token, mean over prefixes)
  + kl_factor * KL( P_delta(. | "{subject} is a") || P_0(. | "{subject} is a") )     (the subject's "essence")
  + weight_decay * ||delta|| / ||v_0||^2

where ``v_0`` is the unedited output of the hooked module at the subject's last token in the bare prompt (the first
prefix must be ``""``), and after each step ``delta`` is scaled back into the ball ``||delta|| <= clamp_norm_factor *
||v_0||``. It stops when the loss falls below ``early_stop_loss``, with ``early_stop_argmax`` as soon as every
target token is the most probable next token behind every prefix (Gupta et al. 2025's "most-probable early
stopping": a smaller ``delta`` that still makes the edit, which they find keeps sequential editing from degrading the
model), or after ``steps`` forward passes (ROME's loop: the last pass only measures). The KL term is taken at the
last token of ``"{subject} is a"`` (the next-word distribution the paper describes); ROME's code takes it at the
subject's last token instead.

Speed. Each step is a forward and a backward pass; four things keep them small, each equal to the plain pass up to
float rounding (tests check it on every tiny architecture) and each with a switch to turn it off:

- ``prefix_cache``: ``delta`` only changes the subject's last token and what follows, so the tokens before it are run
  once, without gradients, into a key/value cache (left-padded, explicit position ids), and each step runs only the
  tail of every row.
- ``skip_lower``: the blocks below the one holding the hooked module do not depend on ``delta``, so the first pass
  records what the last of them returns (for the tail tokens) and later passes stand that in for them
  (:func:`editors.lm.hooks.skip_blocks`), running only the blocks from the edit layer up. Position embeddings, rotary
  tables and attention masks are still made by the model itself, so this works for every architecture in the table.
- ``logits_at_targets``: the output head (the vocabulary projection) is applied only at the positions the loss reads
  (each target token's predecessor, and the KL position; :func:`editors.lm.architectures.logits_at`), not at
  every position.
- ``drop_last_token``: a rewrite row's last token (the target's last) is only a label: no logit is read at its
  position, and in a causal model it changes nothing before it, so it is not run. With the prefix cache, that is one
  of the 4-8 tail tokens of every row.

The first step's forward pass also gives ``v0`` and the unedited KL distribution (``delta`` is zero then), so there is
no separate pass for them.

On SmolLM2-135M on a 2-core CPU, matrix products were 64% of the time of a ROME edit in torch's profiler (1.85 of
2.87 s, 2 threads), and the rest is many small element-wise operations. Running fewer tokens helps only a little:
``drop_last_token`` made ROME edits 1.04x faster (median of 16 interleaved pairs, 1 thread), and optimising 8 MEMIT
values in one pass (:func:`optimize_values`) 1.19x faster than one at a time (notes/rome_memit.md).

Nothing in the model is written: parameters are passed detached through :func:`editors.lm.hooks.forward`, so no
gradient reaches them (not even ``.grad``), and ``overrides`` lets a caller optimise against not-yet-applied edits.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, cast

import torch

from editors.lm.architectures import arch_spec, get_module, logits_at
from editors.lm.hooks import add_at, capture, forward, skip_blocks
from editors.lm.tokens import pad_id
from editors.locate.keys import Row, encode_row, model_device, pad_right
from memory.checks import check_number
from memory.errors import ValidationError

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"


@dataclass(frozen=True)
class ValueOptions:
    """How :func:`optimize_value` runs; see the module docstring."""

    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float | None = 0.05
    # also stop once every target token is the most probable next token in every row (Gupta et al. 2025, "Lifelong
    # Sequential Knowledge Editing without Model Degradation": most-probable early stopping, MPES)
    early_stop_argmax: bool = False
    prefix_cache: bool = True
    skip_lower: bool = True
    logits_at_targets: bool = True
    drop_last_token: bool = True


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
    """Where things sit in the tensors of one call of B requests' rows: delta sites (and whose delta goes there), NLL
    predictions (and whose loss they count for), each request's KL prediction and its bare-prompt row."""

    delta_rows: torch.Tensor
    delta_pos: torch.Tensor
    delta_owner: torch.Tensor
    nll_rows: torch.Tensor
    nll_pos: torch.Tensor
    nll_labels: torch.Tensor
    nll_weight: torch.Tensor  # 1 / (number of target tokens of the row) / (number of rewrite rows of its request)
    nll_owner: torch.Tensor
    kl_rows: torch.Tensor  # (B,)
    kl_pos: torch.Tensor  # (B,)
    bare_rows: torch.Tensor  # (B,) each request's first row: the bare prompt (prefix "")


def _plan(rows: Sequence[Row], starts: Sequence[int], owners: Sequence[int]) -> _Plan:
    """``starts[i]``: where row i begins in the call's token axis (0 for the plain pass, -p_i for the tail pass);
    ``owners[i]``: the request row i belongs to (0..B-1, each request's rows together: rewrite rows, then its KL row,
    as :func:`value_rows` makes them)."""
    d_rows, d_pos, n_rows, n_pos, labels, weights, n_owner, kl_rows, kl_pos = [], [], [], [], [], [], [], [], []
    bare: dict[int, int] = {}
    rewrites: dict[int, int] = {}
    for row, owner in zip(rows, owners):
        rewrites[owner] = rewrites.get(owner, 0) + (row.target_start is not None)
    for i, (row, s, owner) in enumerate(zip(rows, starts, owners)):
        bare.setdefault(owner, i)
        d_rows.append(i)
        d_pos.append(row.subject_index + s)
        if row.target_start is None:  # the KL row
            kl_rows.append(i)
            kl_pos.append(len(row.ids) - 1 + s)
            continue
        n_target = len(row.ids) - row.target_start
        for t in range(row.target_start, len(row.ids)):
            n_rows.append(i)
            n_pos.append(t - 1 + s)
            labels.append(row.ids[t])
            weights.append(1.0 / n_target / rewrites[owner])
            n_owner.append(owner)

    def as_long(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.long)

    return _Plan(as_long(d_rows), as_long(d_pos), as_long(list(owners)), as_long(n_rows), as_long(n_pos),
                 as_long(labels), torch.tensor(weights, dtype=torch.float32), as_long(n_owner), as_long(kl_rows),
                 as_long(kl_pos), as_long([bare[o] for o in sorted(bare)]))


def _block_of(blocks: torch.nn.ModuleList, module: torch.nn.Module) -> int:
    """Index of the block that is or contains ``module``."""
    for i, block in enumerate(blocks):
        if block is module or any(m is module for m in block.modules()):
            return i
    raise ValueError(f"{type(module).__name__} is not inside any transformer block of the model")


class _Runner:
    """Runs the rows with a given ``delta`` added at ``module``'s output: the plain way, or the prefix once into a cache
    and then the tails; with ``skip_lower``, calls after the first run only the blocks from ``module``'s up; with
    ``at_targets``, the output head runs only where the loss reads."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], params: Mapping[str, torch.Tensor],
                 use_cache: bool, module: torch.nn.Module, *, skip_lower: bool = False, at_targets: bool = False,
                 drop_last: bool = False, owners: Sequence[int] | None = None):
        owners = [0] * len(rows) if owners is None else list(owners)
        self.model, self.params, self.module = model, params, module
        self.at_targets = at_targets
        spec = arch_spec(model)
        self.blocks = cast(torch.nn.ModuleList, get_module(model, spec.layers))
        self.skip = _block_of(self.blocks, module) if skip_lower else 0
        self.lower: Any = None  # what block skip - 1 returned on the first call (the same on every call)
        skipped = tuple(f"{spec.layers}.{i}." for i in range(self.skip))
        self.upper_params = {n: p for n, p in params.items() if not n.startswith(skipped)} if skipped else params
        self.device = model_device(model)
        pad = pad_id(tokenizer)
        plan_rows = rows  # the plan's positions and labels come from the whole rows
        if drop_last:  # a target's last token is only a label (see the module docstring)
            rows = [Row(r.ids[:-1], r.subject_index, r.target_start) if r.target_start is not None else r
                    for r in rows]
        cut = [r.subject_index for r in rows]
        self.width = max(cut)
        self.cache = None
        if not use_cache or self.width == 0:
            self.ids, self.mask = pad_right(rows, pad, self.device)
            self.position_ids = None
            self.plan = _plan(plan_rows, [0] * len(rows), owners)
            self._read_positions()
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
        self.plan = _plan(plan_rows, [-c for c in cut], owners)
        with torch.no_grad():
            out = forward(model, params, input_ids=prefix.to(self.device), attention_mask=prefix_mask.to(self.device),
                          position_ids=prefix_pos.to(self.device), use_cache=True)
        self.cache = out.past_key_values
        self.ids = tail_ids.to(self.device)
        self.mask = torch.cat([prefix_mask, tail_mask], dim=1).to(self.device)
        self.position_ids = tail_pos.to(self.device)
        self._read_positions()

    def _read_positions(self) -> None:
        plan = self.plan
        self.read_rows = torch.cat([plan.nll_rows, plan.kl_rows]).to(self.device)
        self.read_pos = torch.cat([plan.nll_pos, plan.kl_pos]).to(self.device)

    def logits(self, delta: torch.Tensor | None) -> torch.Tensor:
        """Logits (P + B, V) where the loss reads them: at every NLL position of the plan, in its order, then at each
        request's KL position; with ``delta`` ((B, d), or (d,) for one request) added at the subject token of each
        request's rows (None: nothing added)."""
        kwargs: dict[str, Any] = {"input_ids": self.ids, "attention_mask": self.mask,
                                  "use_cache": self.cache is not None}
        if self.cache is not None:
            # a fresh copy each call: the model appends the tail to the cache it is given
            kwargs.update(position_ids=self.position_ids, past_key_values=copy.deepcopy(self.cache))
        params = self.params
        with ExitStack() as stack:
            if self.skip and self.lower is not None:
                stack.enter_context(skip_blocks(self.blocks, self.skip, self.lower))
                params = self.upper_params
            elif self.skip:
                lower = stack.enter_context(capture(self.blocks[self.skip - 1], "output", whole=True))
            if delta is not None:
                vectors = (delta if delta.dim() == 2 else delta.unsqueeze(0))[self.plan.delta_owner.to(delta.device)]
                stack.enter_context(add_at(self.module, vectors, self.plan.delta_rows, self.plan.delta_pos))
            if self.at_targets:
                out = logits_at(self.model, self.read_rows, self.read_pos, params=params, **kwargs)
            else:
                out = forward(self.model, params, **kwargs).logits[self.read_rows, self.read_pos]
        if self.skip and self.lower is None:
            self.lower = lower.last
        return out


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
    return optimize_values(model, tokenizer, [request], prefixes, module, options, overrides=overrides)[0]


def optimize_values(model: torch.nn.Module, tokenizer: Any, requests: Sequence[Any], prefixes: Sequence[str],
                    module: torch.nn.Module, options: ValueOptions, *,
                    overrides: Mapping[str, torch.Tensor] | None = None, batch: int = 1) -> list[ValueResult]:
    """:func:`optimize_value` for each request, ``batch`` requests per forward pass.

    The requests' rows run together, but each request keeps its own ``delta``, its own Adam state, its own loss, norm
    clamp and early stop (a request that has stopped is still run with its final ``delta``, which changes nothing for
    the others: rows do not attend to each other). So the result is each request's :func:`optimize_value` result up
    to float rounding; what batching saves is passes through the model (MEMIT values many requests against the same
    weights; ROME's requests each see the previous ones' updates, so it optimises one at a time).
    """
    check_number("value optimisation", "batch", batch, integer=True)
    for request in requests:
        if not request.subject:
            raise ValidationError(f"optimising a value needs the subject of {request.prompt!r}")
    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update({n: v.detach() for n, v in (overrides or {}).items()})
    results: list[ValueResult] = []
    for start in range(0, len(requests), batch):
        results.extend(_optimize_chunk(model, tokenizer, requests[start:start + batch], prefixes, module, options,
                                       params))
    return results


def _optimize_chunk(model: torch.nn.Module, tokenizer: Any, requests: Sequence[Any], prefixes: Sequence[str],
                    module: torch.nn.Module, options: ValueOptions,
                    params: Mapping[str, torch.Tensor]) -> list[ValueResult]:
    rows: list[Row] = []
    owners: list[int] = []
    for i, request in enumerate(requests):
        mine = value_rows(tokenizer, request, prefixes)
        rows += mine
        owners += [i] * len(mine)
    runner = _Runner(model, tokenizer, rows, params, options.prefix_cache, module, skip_lower=options.skip_lower,
                     at_targets=options.logits_at_targets, drop_last=options.drop_last_token, owners=owners)
    plan = runner.plan
    n = len(requests)
    n_nll = len(plan.nll_rows)

    # the residual stream's width: what an MLP output projection and a block both return
    hidden = int(cast(Any, model).config.hidden_size)
    deltas = [torch.zeros(hidden, device=runner.device, requires_grad=True) for _ in requests]
    optimizers = [torch.optim.Adam([d], lr=options.lr) for d in deltas]
    weights = plan.nll_weight.to(runner.device)
    labels = plan.nll_labels.to(runner.device)
    nll_owner = plan.nll_owner.to(runner.device)
    active = [True] * n
    steps = [0] * n
    loss_first, prob_first, loss_last, prob_last = ([float("nan")] * n for _ in range(4))
    with torch.enable_grad():
        for step in range(options.steps):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            stacked = torch.stack(deltas)
            if step == 0:
                # delta is zero: this pass is also the unedited one (capture's hook runs before add_at's, so it sees
                # the module's own output)
                with capture(module, "output") as seen:
                    logits = runner.logits(stacked)
                bare = plan.bare_rows
                v0 = seen.last[bare, plan.delta_pos[bare]].float().clone()  # (n, d)
                kl_init = logits[n_nll:].detach().float().log_softmax(-1)
                max_norm = options.clamp_norm_factor * v0.norm(dim=1)
            else:
                logits = runner.logits(stacked)
            picked = logits[:n_nll].float().log_softmax(-1)
            token_logp = picked.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            nll = torch.zeros(n, device=runner.device).index_add(0, nll_owner, -(token_logp * weights))
            if options.early_stop_argmax:  # per request: how many target tokens are not the most probable one
                missed = torch.zeros(n, device=runner.device).index_add(
                    0, nll_owner, (picked.argmax(-1) != labels).float()).tolist()
            kl_now = logits[n_nll:].float().log_softmax(-1)
            kl = (kl_now.exp() * (kl_now - kl_init)).sum(-1)  # KL(P_delta || P_0) per request
            loss = nll + options.kl_factor * kl + options.weight_decay * stacked.norm(dim=1) / v0.norm(dim=1) ** 2
            for i in range(n):
                if not active[i]:
                    continue
                loss_last[i], prob_last[i] = loss[i].item(), math.exp(-nll[i].item())
                steps[i] = step + 1
                if step == 0:
                    loss_first[i], prob_first[i] = loss_last[i], prob_last[i]
                if options.early_stop_loss is not None and loss_last[i] < options.early_stop_loss:
                    active[i] = False
                if options.early_stop_argmax and missed[i] == 0:
                    active[i] = False
            if step == options.steps - 1 or not any(active):
                break
            loss[[i for i in range(n) if active[i]]].sum().backward()
            for i in range(n):
                if active[i]:
                    optimizers[i].step()
                    with torch.no_grad():
                        norm = deltas[i].norm()
                        if norm > max_norm[i]:
                            deltas[i].mul_(max_norm[i] / norm)
    out = []
    for i, request in enumerate(requests):
        log.debug("value for %r -> %r: %d passes, loss %.3f -> %.3f, target prob %.3f -> %.3f, |delta| %.2f "
                  "(|v0| %.2f)", request.prompt, request.target_new, steps[i], loss_first[i], loss_last[i],
                  prob_first[i], prob_last[i], deltas[i].norm().item(), v0[i].norm().item())
        out.append(ValueResult(deltas[i].detach().clone(), v0[i].clone(), steps[i], loss_first[i], loss_last[i],
                               prob_first[i], prob_last[i]))
    return out
