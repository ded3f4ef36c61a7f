"""MEND training: the settings, edit batches from cases, the losses, and the training loop with validation."""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from editors.lm.architectures import (
    arch_spec,
    check_layer,
    num_layers,
    param_name,
)
from editors.methods.mend.factors import (
    FrozenModel,
    Rows,
    edit_hooks,
    encode_rows,
    transform_factors,
)
from editors.methods.mend.network import MENDNet
from memory.checks import check_number
from memory.errors import ValidationError
from memory.records import EditCase

log = logging.getLogger(__name__)


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
            check_number(own, name, getattr(self, name), integer=True)
        for name in ("init_edit_lr", "lr", "lr_edit_lr", "grad_clip"):
            check_number(own, name, getattr(self, name))
        for name in ("c_edit", "c_rephrase", "c_loc"):
            check_number(own, name, getattr(self, name), strict=False)
        check_number(own, "patience", self.patience, integer=True, strict=False)
        if self.time_limit_s is not None:
            check_number(own, "time_limit_s", self.time_limit_s)
        if not isinstance(self.all_tokens, bool):
            raise ValidationError(f"{own} setting all_tokens must be true or false, not {self.all_tokens!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValidationError(f"{own} setting seed must be an integer, not {self.seed!r}")

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> MENDTrainSettings:
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
    from editors.lm.tokens import encode_prompt_target

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


def _batch_rows(tokenizer: Any, edits: Sequence[_Edit], device: torch.device) -> tuple[Rows, torch.Tensor]:
    """The rows of both passes (edits, then rephrases, then locality probes) and pass 1's edit-row mask."""
    n = len(edits)
    rows = encode_rows(tokenizer, [(e.prompt, e.target) for e in edits] + [(e.rephrase, e.target) for e in edits]
                   + [(e.loc_prompt, e.loc_answer) for e in edits], list(range(n)) * 3, device)
    edit_row = torch.zeros(3 * n, dtype=torch.bool, device=device)
    edit_row[:n] = True
    return rows, edit_row


def _row_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of ``values`` (P,) per row (index ``rows``), (n_rows,)."""
    total = torch.zeros(n_rows, device=values.device).index_add_(0, rows, values.float())
    count = torch.zeros(n_rows, device=values.device).index_add_(0, rows, torch.ones_like(values, dtype=torch.float))
    return total / count.clamp_min(1)


def _step_losses(net: MENDNet, frozen: FrozenModel, tokenizer: Any, edits: Sequence[_Edit], device: torch.device
                 ) -> dict[str, torch.Tensor]:
    """The losses of one batch of independent edits (with a graph into ``net``) and detached accuracy figures."""
    n = len(edits)
    rows, edit_row = _batch_rows(tokenizer, edits, device)
    first = frozen.gradient_factors(rows, edit_row)
    ut, dt = transform_factors(net, first.us, first.deltas)
    logits, labels = frozen.logits_at(rows, edit_hooks(net, ut, dt, first.owner, rows.owner), lower=first.lower)
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
    history: list[dict[str, Any]]  # validation metrics (floats) plus step, seconds and edit_lr (a list)
    best: dict[str, Any]
    steps: int
    seconds: float
    stopped: str
    n_train: int
    n_val: int


@torch.no_grad()
def _validate(net: MENDNet, frozen: FrozenModel, tokenizer: Any, edits: Sequence[_Edit], s: MENDTrainSettings,
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
    frozen = FrozenModel(model, layers, s.all_tokens)
    groups = [{"params": [p for n, p in net.named_parameters() if n != "log_edit_lr"], "lr": s.lr},
              {"params": [net.log_edit_lr], "lr": s.lr_edit_lr}]
    optimizer = torch.optim.Adam(groups)
    history: list[dict[str, Any]] = []
    best_state = copy.deepcopy(net.state_dict())
    best: dict[str, Any] = {}
    bad = 0
    stopped = "steps"
    step = 0
    t0 = time.perf_counter()
    order: list[int] = []

    from tqdm.auto import tqdm

    def validate() -> bool:
        """Record a validation point; True when training should stop for lack of progress."""
        nonlocal best, best_state, bad
        point: dict[str, Any] = _validate(net, frozen, tokenizer, val, s, device)
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
            if (step % s.val_every == 0 or step == s.steps or out_of_time) and validate():
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
