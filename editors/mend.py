"""``mend``: edits made by a trained gradient hypernetwork (MEND; Mitchell, Lin, Bosselut, Finn, Manning, 2022,
"Fast Model Editing at Scale", ICLR 2022).

The idea, from the paper. For a linear map ``y = W u`` inside a transformer, the fine-tuning gradient of a loss over a
sequence is a sum of rank-one terms, one per token: ``dL/dW = sum_t delta_t u_t^T`` where ``u_t`` is the layer's
input at token ``t`` and ``delta_t = dL/dy_t`` the gradient at its output. MEND passes each pair ``(u_t, delta_t)``
through a small learned network ``g`` and uses ``(u~_t, delta~_t) = g(u_t, delta_t)`` to build the update
``Delta W = -alpha_l * sum_t delta~_t u~_t^T`` with a learned step size ``alpha_l`` per edited layer. ``g`` is trained
so that the edited model gives the new target (on the edit prompt and on rephrases of it) while unrelated prompts keep
their predictions (a KL term against the unedited model); the base model stays frozen throughout.

Here:

- **Edited weights**: the MLP output projection (``mlp_out`` in :mod:`editors.models`: ``mlp.down_proj``,
  ``mlp.c_proj``, ``mlp.fc_out``, ``mlp.dense_4h_to_h``) of the top ``num_edit_layers`` blocks (default 3;
  SmolLM2-135M: layers 27, 28, 29), or the layers named in :attr:`MENDTrainSettings.layers`. All of them have one
  shape, so one network serves them, conditioned on the layer (next point).
- **g** (:class:`MENDNet`): the concatenation ``z = [u; delta]`` is normalised per dimension with running statistics
  kept per edited layer (mean and variance, accumulated while training, frozen afterwards), then passed through
  ``n_blocks`` residual blocks ``z <- z + A silu(s_l * (B z) + o_l)`` with a low-rank bottleneck (``B``: dim -> rank,
  ``A``: rank -> dim) and a learned per-layer scale ``s_l`` and shift ``o_l`` (the paper's layer conditioning).
  ``A`` starts at zero, so an untrained ``g`` is the identity on the normalised factors and the first edits are
  (normalised) gradient steps. The step sizes are learned as ``log alpha_l``. The paper's blocks put the non-linearity
  on the residual branch's output and zero-initialise inside it; putting it in the bottleneck (as here) keeps the
  identity start and lets the gradient reach ``A`` from step one.
- **Tokens**: as in the paper, the update is built from every prompt and target token but the last
  (``all_tokens=True``). ``all_tokens=False`` keeps only the positions that predict a target token (the top edited
  layer's output gradient is zero elsewhere); on SmolLM2/CounterFact that generalised worse (validation rephrase
  accuracy 0.32 vs 0.44 after 100 steps, notes/mend.md): the subject's tokens, shared by the prompt and its
  rephrases, carry the edit.
- **Training** (:func:`train_mend`): per step a batch of edits, each with its edit prompt, one rephrase and one
  locality probe. Pass 1 runs the frozen model once over all three kinds of row, with a zero tensor added to every
  edited layer's output so that ``delta`` is the gradient of the edit rows' NLL there; ``u`` is captured by the same
  hooks, and the locality rows' logits are the unedited reference. Pass 2 runs the
  model again with every row's own edit added by a forward hook in its low-rank form
  (``Delta W x = -alpha sum_t delta~_t (u~_t . x)``), so a batch holds independent single edits without ever building
  ``Delta W``; it starts from pass 1's output of the block below the first edited one (the lower blocks are not
  run again: they are swapped, for that call only, for stand-ins returning that output). Loss: ``c_edit *
  NLL(target | edit prompt) + c_rephrase * NLL(target | rephrase) + c_loc *
  KL(base || edited)`` at the locality probe's answer positions (defaults 1, 1, 10). Logits are computed only at
  the positions a loss reads (the forward stops at the final norm; the LM head runs on those positions alone). Only
  ``g`` gets gradients.
  Validation on held-out cases every ``val_every`` steps; the best state by validation loss is kept, and training
  stops after ``patience`` validations without improvement, at ``steps``, or at ``time_limit_s``.
- **Editing** (:class:`MENDEditor`): the same pass 1 on the requests (prompt + target_new), then ``Delta W`` is built
  from all requests' tokens (several requests add up, as in the paper's batched editing) and written with
  :class:`WeightEditHandle`, so ``restore()`` is bit-identical.
- **Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`): a folder with ``mend.pt`` (weights and
  normalisation statistics), ``config.json`` (base model fingerprint, model type, layers, parameter names and shapes,
  training settings, final validation) and ``history.json`` (the validation curve). A name without a path separator
  means ``$EDITMEM_CACHE/mend/NAME``. A checkpoint whose fingerprint is not the model's is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from editors.base import Editor, EditorSettings, EditRequest, WeightEditHandle, check_requests, register_editor
from editors.hooks import detach_output, skip_blocks
from editors.models import (arch_spec, cache_dir, check_layer, get_module, layer_module, logits_at, model_fingerprint,
                            num_layers, param_name)
from editors.tokens import IGNORE_INDEX, EncodedBatch, encode_batch
from memory.errors import EditmemError, ValidationError
from memory.records import EditCase

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
WEIGHTS_FILE = "mend.pt"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"


class MendCheckpointError(EditmemError):
    """A MEND checkpoint that is missing, unreadable, or made for another model."""


# ------------------------------------------------------------------------------------------------------ settings


def _check_number(owner: str, name: str, value: Any, *, integer: bool = False, minimum: float = 0.0,
                  strict: bool = True) -> None:
    kind = int if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
    if not bad:
        bad = value <= minimum if strict else value < minimum
    if bad:
        rel = ">" if strict else ">="
        raise ValidationError(f"{owner} setting {name} must be {'an integer' if integer else 'a number'} "
                              f"{rel} {minimum:g}, not {value!r}")


@dataclass(frozen=True)
class MENDTrainSettings:
    """How :func:`train_mend` builds and trains the hypernetwork. Saved with the checkpoint.

    The defaults are the recipe for SmolLM2-135M on a 2-core CPU (BENCHMARKS.md, ``## MEND``).
    """

    layers: tuple[int, ...] | None = None  # None: the top `num_edit_layers` blocks
    num_edit_layers: int = 3
    rank: int = 128  # bottleneck width of g
    n_blocks: int = 2
    init_edit_lr: float = 1e-3  # initial alpha_l
    lr: float = 1e-3  # Adam on g
    lr_edit_lr: float = 1e-2  # Adam on log alpha_l
    c_edit: float = 1.0
    c_rephrase: float = 1.0
    c_loc: float = 10.0
    batch_size: int = 8  # edits per step
    steps: int = 1000  # upper bound on optimisation steps
    val_every: int = 50
    val_cases: int = 64  # held out from the end of the training data unless validation cases are given
    patience: int = 4  # validations without improvement before stopping; 0: never stop early
    time_limit_s: float | None = None  # stop (after a final validation) once training has run this long
    max_tokens: int = 48  # skip cases with a row longer than this many tokens
    all_tokens: bool = True  # build the update from every prompt token (False: only those that predict the target)
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        own = "MEND training"
        if self.layers is not None:
            layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else None
            if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers) \
                    or len(set(layers)) != len(layers):
                raise ValidationError(f"{own} setting layers must be distinct layer indices >= 0, "
                                      f"not {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        for name in ("num_edit_layers", "rank", "n_blocks", "batch_size", "steps", "val_every", "val_cases",
                     "max_tokens"):
            _check_number(own, name, getattr(self, name), integer=True)
        for name in ("init_edit_lr", "lr", "lr_edit_lr", "grad_clip"):
            _check_number(own, name, getattr(self, name))
        for name in ("c_edit", "c_rephrase", "c_loc"):
            _check_number(own, name, getattr(self, name), strict=False)
        _check_number(own, "patience", self.patience, integer=True, strict=False)
        if self.time_limit_s is not None:
            _check_number(own, "time_limit_s", self.time_limit_s)
        if not isinstance(self.all_tokens, bool):
            raise ValidationError(f"{own} setting all_tokens must be true or false, not {self.all_tokens!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValidationError(f"{own} setting seed must be an integer, not {self.seed!r}")

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> "MENDTrainSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValidationError(f"unknown MEND training setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**overrides)


def edit_layers(model: torch.nn.Module, settings: MENDTrainSettings) -> tuple[int, ...]:
    """The blocks whose MLP output projection MEND edits, checked against the model."""
    if settings.layers is not None:
        return tuple(check_layer(model, layer, "MEND") for layer in settings.layers)
    n = num_layers(model)
    k = min(settings.num_edit_layers, n)
    return tuple(range(n - k, n))


# ------------------------------------------------------------------------------------------------- the network


class _RunningNorm(torch.nn.Module):
    """Per-layer running mean and variance of the inputs (Chan et al.'s parallel update), used to standardise them."""

    def __init__(self, n_layers: int, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(n_layers, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_layers, dim))
        self.register_buffer("m2", torch.zeros(n_layers, dim))

    @torch.no_grad()
    def update(self, layer: int, x: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        x = x.float()
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        count = float(self.count[layer])
        total = count + n
        diff = batch_mean - self.mean[layer]
        self.mean[layer] += diff * (n / total)
        self.m2[layer] += batch_m2 + diff ** 2 * (count * n / total)
        self.count[layer] = total

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        count = float(self.count[layer])
        if count < 2:
            return x
        std = (self.m2[layer] / (count - 1)).clamp_min(0).sqrt()
        return (x - self.mean[layer]) / (std + 1e-6)


class _Block(torch.nn.Module):
    """``z + A silu(s_l * (B z) + o_l)``: a low-rank residual MLP block conditioned on the edited layer ``l``."""

    def __init__(self, dim: int, rank: int, n_layers: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank)
        self.up = torch.nn.Linear(rank, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.scale = torch.nn.Parameter(torch.ones(n_layers, rank))
        self.shift = torch.nn.Parameter(torch.zeros(n_layers, rank))

    def forward(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(F.silu(self.down(z) * self.scale[layer] + self.shift[layer]))


class MENDNet(torch.nn.Module):
    """The gradient transform ``g`` for weights with input width ``d_in`` and output width ``d_out``.

    ``forward(i, u, delta)`` maps token factors of the ``i``-th edited layer, ``u`` (N, d_in) and ``delta``
    (N, d_out), to ``(u~, delta~)``; :attr:`edit_lr` holds ``alpha`` per edited layer.
    """

    def __init__(self, d_in: int, d_out: int, n_layers: int, rank: int, n_blocks: int, init_edit_lr: float):
        super().__init__()
        self.d_in, self.d_out, self.n_layers = d_in, d_out, n_layers
        dim = d_in + d_out
        self.norm = _RunningNorm(n_layers, dim)
        self.blocks = torch.nn.ModuleList(_Block(dim, rank, n_layers) for _ in range(n_blocks))
        self.log_edit_lr = torch.nn.Parameter(torch.full((n_layers,), math.log(init_edit_lr)))

    @property
    def edit_lr(self) -> torch.Tensor:
        return self.log_edit_lr.exp()

    def forward(self, layer: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u.float(), delta.float()], dim=-1)
        if self.training:
            self.norm.update(layer, z)
        z = self.norm(layer, z)
        for block in self.blocks:
            z = block(layer, z)
        return z[:, :self.d_in], z[:, self.d_in:]


# ------------------------------------------------------------------------------------- model passes with hooks


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
class _Rows:
    """One padded batch of rows and, per row, which edit (0..E-1) it belongs to and which positions are scored."""

    batch: EncodedBatch
    owner: torch.Tensor  # (R,) edit index of each row

    @property
    def score_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) of every position whose logits predict a label token."""
        rows, pos = (self.batch.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        return rows, pos


def _encode(tokenizer: Any, pairs: Sequence[tuple[str, str]], owner: Sequence[int],
            device: torch.device) -> _Rows:
    batch = encode_batch(tokenizer, [p for p, _ in pairs], [t for _, t in pairs], device=device)
    return _Rows(batch, torch.tensor(list(owner), dtype=torch.long, device=device))


class _Frozen:
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
        self.blocks = get_module(model, spec.layers)
        self.first = min(self.layers)
        lower = tuple(f"{spec.layers}.{i}." for i in range(self.first))
        self.upper_params = {n: p for n, p in self.detached.items() if not n.startswith(lower)} if lower else {}

    def logits_at(self, rows: _Rows, fns: Sequence[Callable] | None, lower: Any = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model over ``rows`` (with ``fns[i]`` rewriting edited layer i's output, if given) and return
        the logits (P, V) at the scored positions and the label (P,) each predicts.

        ``lower``: the output of the block below the first edited one for these same rows, from an earlier pass
        (:attr:`_Pass1.lower`); the blocks below are then not run.
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
        (:func:`editors.hooks.skip_blocks`)."""
        return skip_blocks(self.blocks, self.first, output)

    def gradient_factors(self, rows: _Rows, edit_row: torch.Tensor) -> "_Pass1":
        """Pass 1: the per-token gradient factors of the edit loss at every edited layer.

        ``edit_row`` (R,) bool marks the rows whose target NLL (mean over target tokens, summed over rows) is the edit
        loss. See :class:`_Pass1` for what comes back.
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
        return _Pass1(us=[x[tok_rows, tok_pos] for x in inputs], deltas=[g[tok_rows, tok_pos] for g in grads],
                      owner=rows.owner[tok_rows], logits=logits.detach(), labels=labels,
                      lower=lower[-1] if lower else None)


@dataclass
class _Pass1:
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


def _transform(net: MENDNet, us: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    out_u, out_d = [], []
    for i, (u, d) in enumerate(zip(us, deltas)):
        ut, dt = net(i, u, d)
        out_u.append(ut)
        out_d.append(dt)
    return out_u, out_d


def _edit_hooks(net: MENDNet, us: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
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


def weight_deltas(net: MENDNet, frozen: _Frozen, us: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
                  scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``Delta W`` of every edited parameter from transformed factors, in the parameter's own layout."""
    out = {}
    for i, (name, ut, dt) in enumerate(zip(frozen.params, us, deltas)):
        alpha = net.edit_lr[i] * scale
        delta_w = ut.T @ dt if frozen.conv1d else dt.T @ ut  # Conv1D stores (in, out); Linear (out, in)
        out[name] = -alpha * delta_w
    return out


# ------------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class _Edit:
    prompt: str
    target: str
    rephrase: str
    loc_prompt: str
    loc_answer: str


def _edits_from_cases(cases: Sequence[EditCase], tokenizer: Any, max_tokens: int, rng: random.Random,
                      ) -> list[_Edit]:
    """One training edit per usable case: its first rephrase (else the prompt) and locality probe (else another
    case's prompt with its ground truth). Cases with a row longer than ``max_tokens`` are left out."""
    from editors.tokens import encode_prompt_target

    pool = [(c.prompt, c.ground_truth) for c in cases if c.ground_truth]
    edits = []
    for case in cases:
        rephrase = case.rephrases[0] if case.rephrases else case.prompt
        if case.locality:
            probe = case.locality[0]
            loc = (probe.prompt, probe.answer)
        elif pool:
            loc = pool[rng.randrange(len(pool))]
        else:
            continue
        if loc[0] == case.prompt:
            continue
        try:
            lengths = [len(encode_prompt_target(tokenizer, p, t)[0])
                       for p, t in ((case.prompt, case.target_new), (rephrase, case.target_new), loc)]
        except ValidationError:
            continue
        if max(lengths) <= max_tokens:
            edits.append(_Edit(case.prompt, case.target_new, rephrase, loc[0], loc[1]))
    return edits


def _batch_rows(tokenizer: Any, edits: Sequence[_Edit], device: torch.device) -> tuple[_Rows, torch.Tensor]:
    """The rows of both passes (edits, then rephrases, then locality probes) and pass 1's edit-row mask."""
    n = len(edits)
    rows = _encode(tokenizer, [(e.prompt, e.target) for e in edits] + [(e.rephrase, e.target) for e in edits]
                   + [(e.loc_prompt, e.loc_answer) for e in edits], list(range(n)) * 3, device)
    edit_row = torch.zeros(3 * n, dtype=torch.bool, device=device)
    edit_row[:n] = True
    return rows, edit_row


def _row_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of ``values`` (P,) per row (index ``rows``), (n_rows,)."""
    total = torch.zeros(n_rows, device=values.device).index_add_(0, rows, values.float())
    count = torch.zeros(n_rows, device=values.device).index_add_(0, rows, torch.ones_like(values, dtype=torch.float))
    return total / count.clamp_min(1)


def _step_losses(net: MENDNet, frozen: _Frozen, tokenizer: Any, edits: Sequence[_Edit], device: torch.device
                 ) -> dict[str, torch.Tensor]:
    """The losses of one batch of independent edits (with a graph into ``net``) and detached accuracy figures."""
    n = len(edits)
    rows, edit_row = _batch_rows(tokenizer, edits, device)
    first = frozen.gradient_factors(rows, edit_row)
    ut, dt = _transform(net, first.us, first.deltas)
    logits, labels = frozen.logits_at(rows, _edit_hooks(net, ut, dt, first.owner, rows.owner), lower=first.lower)
    r, _ = rows.score_rows
    kind = r // n  # 0 edit, 1 rephrase, 2 locality
    nll = F.cross_entropy(logits, labels, reduction="none")
    per_row = _row_mean(nll, r, 3 * n)
    base_loc, loc_logits = first.logits[kind == 2], logits[kind == 2]
    kl = (F.softmax(base_loc, -1) * (F.log_softmax(base_loc, -1) - F.log_softmax(loc_logits, -1))).sum(-1)
    correct = (logits.argmax(-1) == labels).float()
    same = (loc_logits.argmax(-1) == base_loc.argmax(-1)).float()
    return {"edit_nll": per_row[:n].mean(), "rephrase_nll": per_row[n:2 * n].mean(),
            "loc_kl": _row_mean(kl, r[kind == 2] - 2 * n, n).mean(),
            "edit_acc": correct[kind == 0].mean().detach(), "rephrase_acc": correct[kind == 1].mean().detach(),
            "loc_same": same.mean().detach()}


def _total(losses: dict[str, torch.Tensor], s: MENDTrainSettings) -> torch.Tensor:
    return s.c_edit * losses["edit_nll"] + s.c_rephrase * losses["rephrase_nll"] + s.c_loc * losses["loc_kl"]


def new_network(model: torch.nn.Module, settings: MENDTrainSettings) -> tuple[MENDNet, tuple[int, ...]]:
    """An untrained hypernetwork for ``model`` (identity transform, step size ``init_edit_lr``) and its layers."""
    layers = edit_layers(model, settings)
    shapes = {tuple(dict(model.named_parameters())[param_name(model, layer, "mlp_out")].shape) for layer in layers}
    if len(shapes) != 1:
        raise ValidationError(f"MEND edits layers {list(layers)} whose MLP output weights differ in shape "
                              f"({sorted(shapes)}); choose layers of one shape")
    shape = shapes.pop()
    d_in, d_out = (shape[0], shape[1]) if arch_spec(model).conv1d else (shape[1], shape[0])
    device = next(model.parameters()).device
    net = MENDNet(d_in, d_out, len(layers), settings.rank, settings.n_blocks, settings.init_edit_lr).to(device)
    return net, layers


@dataclass
class TrainResult:
    """What :func:`train_mend` returns: the trained (best) network, its layers, and the validation history."""

    net: MENDNet
    layers: tuple[int, ...]
    settings: MENDTrainSettings
    history: list[dict[str, float]]
    best: dict[str, float]
    steps: int
    seconds: float
    stopped: str
    n_train: int
    n_val: int


@torch.no_grad()
def _validate(net: MENDNet, frozen: _Frozen, tokenizer: Any, edits: Sequence[_Edit], s: MENDTrainSettings,
              device: torch.device) -> dict[str, float]:
    was_training = net.training
    net.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(edits), s.batch_size):
        chunk = edits[i:i + s.batch_size]
        losses = _step_losses(net, frozen, tokenizer, chunk, device)
        losses["loss"] = _total(losses, s)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
    net.train(was_training)
    return {k: v / len(edits) for k, v in sums.items()}


def train_mend(model: torch.nn.Module, tokenizer: Any, cases: Sequence[EditCase],
               settings: MENDTrainSettings | None = None, *, val_cases: Sequence[EditCase] | None = None,
               progress: bool = False) -> TrainResult:
    """Train a MEND hypernetwork for ``model`` on ``cases`` (zsRE- or CounterFact-like :class:`EditCase`\\ s).

    Validation uses ``val_cases`` if given, else the last ``settings.val_cases`` usable cases (held out). The
    model is never changed (not even its ``requires_grad`` flags); only the new network is trained.
    """
    s = settings or MENDTrainSettings()
    rng = random.Random(s.seed)
    edits = _edits_from_cases(cases, tokenizer, s.max_tokens, rng)
    if val_cases is not None:
        val = _edits_from_cases(val_cases, tokenizer, s.max_tokens, rng)[:s.val_cases]
        train = edits
    else:
        if len(edits) < 2:
            raise ValidationError(f"MEND training needs at least 2 usable cases, got {len(edits)}")
        n_val = min(s.val_cases, max(1, len(edits) // 5))
        train, val = edits[:-n_val], edits[-n_val:]
    if not train or not val:
        raise ValidationError(f"MEND training needs training and validation cases; got {len(train)} and {len(val)} "
                              f"usable ones (cases need a target and rows of at most {s.max_tokens} tokens)")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net, layers = new_network(model, s)
    frozen = _Frozen(model, layers, s.all_tokens)
    groups = [{"params": [p for n, p in net.named_parameters() if n != "log_edit_lr"], "lr": s.lr},
              {"params": [net.log_edit_lr], "lr": s.lr_edit_lr}]
    optimizer = torch.optim.Adam(groups)
    history: list[dict[str, float]] = []
    best_state = copy.deepcopy(net.state_dict())
    best: dict[str, float] = {}
    bad = 0
    stopped = "steps"
    step = 0
    t0 = time.perf_counter()
    order: list[int] = []

    from tqdm.auto import tqdm

    def validate() -> bool:
        """Record a validation point; True when training should stop for lack of progress."""
        nonlocal best, best_state, bad
        point = _validate(net, frozen, tokenizer, val, s, device)
        point.update(step=step, seconds=round(time.perf_counter() - t0, 2),
                     edit_lr=[round(float(x), 6) for x in net.edit_lr.detach()])
        history.append(point)
        log.info("mend validation at step %d: %s", step, {k: round(v, 4) for k, v in point.items()
                                                           if isinstance(v, float)})
        if not best or point["loss"] < best["loss"]:
            best, best_state, bad = point, copy.deepcopy(net.state_dict()), 0
            return False
        bad += 1
        return s.patience > 0 and bad >= s.patience

    net.train()
    validate()
    with tqdm(total=s.steps, desc="training MEND", unit="step", disable=not progress) as bar:
        while step < s.steps:
            if len(order) < s.batch_size:
                more = list(range(len(train)))
                rng.shuffle(more)
                order.extend(more)
            chunk = [train[i] for i in order[:s.batch_size]]
            del order[:s.batch_size]
            losses = _step_losses(net, frozen, tokenizer, chunk, device)
            with torch.enable_grad():
                loss = _total(losses, s)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), s.grad_clip)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", edit=f"{float(losses['edit_acc']):.2f}",
                            loc=f"{float(losses['loc_same']):.2f}",
                            val=f"{best.get('edit_acc', float('nan')):.2f}")
            out_of_time = s.time_limit_s is not None and time.perf_counter() - t0 >= s.time_limit_s
            if step % s.val_every == 0 or step == s.steps or out_of_time:
                if validate():
                    stopped = "early stop"
                    break
            if out_of_time:
                stopped = "time limit"
                break
    net.load_state_dict(best_state)
    net.eval()
    seconds = time.perf_counter() - t0
    log.info("mend: %d steps in %.1f s (%s); best validation at step %d", step, seconds, stopped, best["step"])
    return TrainResult(net, layers, s, history, best, step, seconds, stopped, len(train), len(val))


# --------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_folder(name_or_path: str | Path) -> Path:
    """Where a checkpoint lives: a path (containing a separator, or an existing folder) as given, else
    ``$EDITMEM_CACHE/mend/NAME``."""
    text = str(name_or_path)
    if not text.strip():
        raise ValidationError("a MEND checkpoint needs a name or a folder")
    path = Path(text).expanduser()
    if "/" in text or "\\" in text or path.is_dir():
        return path
    return cache_dir() / "mend" / text


def save_checkpoint(result: TrainResult, model: torch.nn.Module, name_or_path: str | Path) -> Path:
    """Write ``result`` as a checkpoint folder for ``model`` and return the folder."""
    folder = checkpoint_folder(name_or_path)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    names = [param_name(model, layer, "mlp_out") for layer in result.layers]
    config = {
        "format": CHECKPOINT_FORMAT,
        "method": "mend",
        "fingerprint": model_fingerprint(model),
        "model_type": model.config.model_type,
        "layers": list(result.layers),
        "params": {n: list(params[n].shape) for n in names},
        "d_in": result.net.d_in,
        "d_out": result.net.d_out,
        "settings": dataclasses.asdict(result.settings),
        "training": {"steps": result.steps, "seconds": round(result.seconds, 1), "stopped": result.stopped,
                     "train_edits": result.n_train, "val_edits": result.n_val},
        "best_validation": result.best,
    }
    torch.save({"format": CHECKPOINT_FORMAT, "fingerprint": config["fingerprint"],
                "state": {k: v.detach().cpu() for k, v in result.net.state_dict().items()}}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (folder / HISTORY_FILE).write_text(json.dumps(result.history, indent=1))
    return folder


@dataclass
class LoadedMEND:
    net: MENDNet
    layers: tuple[int, ...]
    settings: MENDTrainSettings
    config: dict[str, Any]
    folder: Path


def load_checkpoint(name_or_path: str | Path, model: torch.nn.Module) -> LoadedMEND:
    """The hypernetwork saved at ``name_or_path`` for ``model``; :class:`MendCheckpointError` if it is missing,
    unreadable, or was trained for another model (its base model fingerprint differs)."""
    folder = checkpoint_folder(name_or_path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise MendCheckpointError(f"no MEND checkpoint at {folder} (expected {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                  "train one with `editmem train-mend --model MODEL --data FILE --out NAME`")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        blob = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise MendCheckpointError(f"cannot read the MEND checkpoint at {folder}: {err}") from err
    if config.get("format") != CHECKPOINT_FORMAT or blob.get("format") != CHECKPOINT_FORMAT:
        raise MendCheckpointError(f"{folder}: unsupported MEND checkpoint format {config.get('format')!r} "
                                  f"(this editmem reads format {CHECKPOINT_FORMAT})")
    mine = model_fingerprint(model)
    if config.get("fingerprint") != mine or blob.get("fingerprint") != mine:
        raise MendCheckpointError(
            f"the MEND checkpoint at {folder} was trained for another model (fingerprint {config.get('fingerprint')},"
            f" {config.get('model_type')}); this model's fingerprint is {mine}. Train one for this model with "
            "`editmem train-mend`")
    params = dict(model.named_parameters())
    layers = tuple(config["layers"])
    for layer, (name, shape) in zip(layers, config["params"].items()):
        if name not in params or list(params[name].shape) != shape:
            raise MendCheckpointError(f"{folder}: the checkpoint edits {name} {shape}, which this model does not "
                                      "have in that shape")
    settings = MENDTrainSettings(**{**config["settings"], "layers": tuple(layers)})
    with torch.random.fork_rng(devices=[]):
        net, _ = new_network(model, settings)
    try:
        net.load_state_dict(blob["state"])
    except RuntimeError as err:
        raise MendCheckpointError(f"{folder}: the saved hypernetwork does not match its config: {err}") from err
    net.eval()
    return LoadedMEND(net, layers, settings, config, folder)


# ------------------------------------------------------------------------------------------------------ the editor


@dataclass(frozen=True)
class MENDSettings(EditorSettings):
    """Settings of :class:`MENDEditor`.

    ``checkpoint``: the trained hypernetwork, a name under ``$EDITMEM_CACHE/mend/`` or a folder (required to edit).
    ``edit_scale``: multiplies the learned step sizes at edit time (1.0 = as trained).
    """

    checkpoint: str | None = None
    edit_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint.strip()):
            raise ValidationError(f"MEND setting checkpoint must be a checkpoint name or folder, "
                                  f"not {self.checkpoint!r}")
        _check_number("MEND", "edit_scale", self.edit_scale)


@register_editor
class MENDEditor(Editor):
    """Edits with a trained MEND hypernetwork: one gradient pass, one transform, a rank-(tokens) weight update."""

    name = "mend"
    Settings = MENDSettings
    settings: MENDSettings

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: MENDSettings | None = None):
        super().__init__(model, tokenizer, settings)
        self._loaded: LoadedMEND | None = None
        if self.settings.checkpoint is not None:
            self._loaded = load_checkpoint(self.settings.checkpoint, model)

    @property
    def loaded(self) -> LoadedMEND:
        if self._loaded is None:
            raise ValidationError("MEND needs a trained hypernetwork: pass --set mend.checkpoint=NAME (or "
                                  "checkpoint=... to get_editor); train one with `editmem train-mend`")
        return self._loaded

    def compute(self, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        """``{parameter name: Delta W}`` for the requests, all at once; the model is left unchanged."""
        requests = check_requests(requests, "MEND")
        loaded = self.loaded
        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        frozen = _Frozen(self.model, loaded.layers, loaded.settings.all_tokens)
        rows = _encode(self.tokenizer, [(r.prompt, r.target_new) for r in requests], range(len(requests)), device)
        first = frozen.gradient_factors(rows, torch.ones(len(requests), dtype=torch.bool, device=device))
        us = first.us
        with torch.no_grad():
            ut, dt = _transform(loaded.net, us, first.deltas)
            out = weight_deltas(loaded.net, frozen, ut, dt, self.settings.edit_scale)
        log.debug("mend: %d request(s), %d tokens, %.3f s", len(requests), us[0].shape[0], time.perf_counter() - t0)
        return out

    def apply(self, requests: Sequence[EditRequest]) -> WeightEditHandle:
        return WeightEditHandle.add_deltas(self.model, self.compute(requests))
