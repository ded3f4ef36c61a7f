"""Gradient factors from model passes with hooks: the frozen model, the rank-one factors of each edited layer's
gradient, and the weight deltas the network makes of them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from editors.lm.architectures import (
    arch_spec,
    get_module,
    layer_module,
    logits_at,
    param_name,
)
from editors.lm.hooks import detach_output, skip_blocks
from editors.lm.tokens import IGNORE_INDEX, EncodedBatch, encode_batch
from editors.methods.mend.network import MENDNet

log = logging.getLogger(__name__)


@contextmanager
def _rewrite_output(module: torch.nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> Iterator[None]:
    """Inside the block, ``module``'s (tensor) output ``y`` for input ``x`` becomes ``fn(x, y)``."""

    def hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return fn(args[0], output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Rows:
    """One padded batch of rows and, per row, which edit (0..E-1) it belongs to and which positions are scored."""

    batch: EncodedBatch
    owner: torch.Tensor  # (R,) edit index of each row

    @property
    def score_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) of every position whose logits predict a label token."""
        rows, pos = (self.batch.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        return rows, pos


def encode_rows(tokenizer: Any, pairs: Sequence[tuple[str, str]], owner: Sequence[int],
            device: torch.device) -> Rows:
    batch = encode_batch(tokenizer, [p for p, _ in pairs], [t for _, t in pairs], device=device)
    return Rows(batch, torch.tensor(list(owner), dtype=torch.long, device=device))


class FrozenModel:
    """The pieces of the frozen base model that MEND's passes need."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], all_tokens: bool = True):
        spec = arch_spec(model)
        self.model = model
        self.all_tokens = all_tokens
        self.layers = tuple(layers)
        self.modules = [layer_module(model, layer, "mlp_out") for layer in self.layers]
        self.params = [param_name(model, layer, "mlp_out") for layer in self.layers]
        self.conv1d = spec.conv1d
        # Every pass runs on detached parameters, so no gradient ever reaches the model (its requires_grad flags
        # are not touched) and autograd records only what depends on the hooks' tensors.
        self.detached = {n: p.detach() for n, p in model.named_parameters()}
        # Pass 2 of training can skip the blocks below the first edited one (their output is pass 1's): the blocks
        # are swapped for stand-ins that return it, and only the other blocks' parameters are passed in.
        self.blocks = cast(torch.nn.ModuleList, get_module(model, spec.layers))
        self.first = min(self.layers)
        lower = tuple(f"{spec.layers}.{i}." for i in range(self.first))
        self.upper_params = {n: p for n, p in self.detached.items() if not n.startswith(lower)} if lower else {}

    def logits_at(self, rows: Rows, fns: Sequence[Callable] | None, lower: Any = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model over ``rows`` (with ``fns[i]`` rewriting edited layer i's output, if given) and return
        the logits (P, V) at the scored positions and the label (P,) each predicts.

        ``lower``: the output of the block below the first edited one for these same rows, from an earlier pass
        (:attr:`FirstPass.lower`); the blocks below are then not run.
        """
        batch = rows.batch
        params = self.detached
        with ExitStack() as stack:
            if lower is not None and self.first > 0:
                stack.enter_context(self._skip_lower(lower))
                params = self.upper_params
            if fns is not None:
                for module, fn in zip(self.modules, fns):
                    stack.enter_context(_rewrite_output(module, fn))
            r, p = rows.score_rows
            logits = logits_at(self.model, r, p, params=params, **batch.model_inputs(), use_cache=False).float()
        return logits, batch.labels[r, p + 1]

    def _skip_lower(self, output: Any) -> Any:
        """The blocks below the edited ones, stood in for by pass 1's recorded output
        (:func:`editors.lm.hooks.skip_blocks`)."""
        return skip_blocks(self.blocks, self.first, output)

    def gradient_factors(self, rows: Rows, edit_row: torch.Tensor) -> FirstPass:
        """Pass 1: the per-token gradient factors of the edit loss at every edited layer.

        ``edit_row`` (R,) bool marks the rows whose target NLL (mean over target tokens, summed over rows) is the edit
        loss. See :class:`FirstPass` for what comes back.
        """
        batch = rows.batch
        inputs: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
        lower: list[Any] = []

        def tap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            inputs.append(x.detach())
            z = torch.zeros_like(y, requires_grad=True)
            zeros.append(z)
            return y + z

        def keep_lower(_module: torch.nn.Module, _args: tuple, output: Any) -> None:
            lower.append(detach_output(output))

        handle = self.blocks[self.first - 1].register_forward_hook(keep_lower) if self.first > 0 else None
        try:
            with torch.enable_grad():
                logits, labels = self.logits_at(rows, [tap] * len(self.modules))
                r, _ = rows.score_rows
                nll = F.cross_entropy(logits, labels, reduction="none")
                in_edit = edit_row[r]
                n_target = torch.zeros(len(edit_row), device=nll.device).index_add_(0, r, torch.ones_like(nll))
                loss = (nll * in_edit / n_target[r]).sum()
                grads = torch.autograd.grad(loss, zeros)
        finally:
            if handle is not None:
                handle.remove()
        # the tokens whose rank-one terms make the update: the positions that predict a target token, or (with
        # all_tokens) every non-padding position before each row's last token (all that can affect the loss)
        t = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
        start = batch.prompt_start if self.all_tokens else batch.target_start - 1
        keep = (edit_row[:, None] & (t[None, :] >= start[:, None]) & (t[None, :] < batch.target_end[:, None] - 1))
        tok_rows, tok_pos = keep.nonzero(as_tuple=True)
        return FirstPass(us=[x[tok_rows, tok_pos] for x in inputs], deltas=[g[tok_rows, tok_pos] for g in grads],
                      owner=rows.owner[tok_rows], logits=logits.detach(), labels=labels,
                      lower=lower[-1] if lower else None)


@dataclass
class FirstPass:
    """What pass 1 gives: per edited layer the gradient factors ``us`` and ``deltas`` ((N, d) each, the N tokens
    of the edit rows that influence the loss), the edit each token belongs to (``owner``, (N,)), the unedited
    model's logits (P, V) and labels (P,) at every scored position of every row, and ``lower``, the output of the
    block below the first edited one (None when that is block 0)."""

    us: list[torch.Tensor]
    deltas: list[torch.Tensor]
    owner: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    lower: Any


def transform_factors(net: MENDNet, us: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    out_u, out_d = [], []
    for i, (u, d) in enumerate(zip(us, deltas)):
        ut, dt = net(i, u, d)
        out_u.append(ut)
        out_d.append(dt)
    return out_u, out_d


def edit_hooks(net: MENDNet, us: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
                token_owner: torch.Tensor, row_owner: torch.Tensor, scale: float = 1.0) -> list[Callable]:
    """Forward-hook functions adding to each row the edit of its own owner, in low-rank form:
    ``y += -alpha * sum_t [owner_t == owner_row] (u~_t . x) delta~_t``."""
    same = (row_owner[:, None] == token_owner[None, :]).float()  # (R, N)
    fns = []
    for i, (ut, dt) in enumerate(zip(us, deltas)):
        alpha = net.edit_lr[i] * scale

        def fn(x: torch.Tensor, y: torch.Tensor, ut: torch.Tensor = ut, dt: torch.Tensor = dt,
               alpha: torch.Tensor = alpha) -> torch.Tensor:
            coeff = torch.einsum("rti,ni->rtn", x.float(), ut) * same[:, None, :]
            return y + (-alpha * coeff @ dt).to(y.dtype)

        fns.append(fn)
    return fns


def weight_deltas(net: MENDNet, frozen: FrozenModel, us: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
                  scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``Delta W`` of every edited parameter from transformed factors, in the parameter's own layout."""
    out = {}
    for i, (name, ut, dt) in enumerate(zip(frozen.params, us, deltas)):
        alpha = net.edit_lr[i] * scale
        delta_w = ut.T @ dt if frozen.conv1d else dt.T @ ut  # Conv1D stores (in, out); Linear (out, in)
        out[name] = -alpha * delta_w
    return out
