"""SERAC's trained counterfactual model: a copy of the base model fine-tuned to answer from an edit in its context.

The memory wrapper (:class:`editors.retrieval.augmented.AugmentedModel`) sends an in-scope query to a counterfactual
model with the retrieved edit's context put in front of it. By default that model is the base model itself, which
copies the new target when the query is the edit's own prompt but often follows its prior on a rephrase
(notes/memory_editing.md). SERAC (Mitchell et al. 2022, "Memory-Based Model Editing at Scale") trains the
counterfactual model instead; this module does that on CPU by fine-tuning only the top ``train_layers`` blocks of a
copy, with everything below frozen.

Training examples are built from edit cases (any format :func:`eval.datasets.load_cases` reads) exactly as the wrapper
builds its inputs (:func:`editors.retrieval.augmented.insert_context` with the same context template), in three kinds:

- ``copy``: the edit's own prompt -> its ``target_new``;
- ``update``: a rephrase of the edit's prompt -> ``target_new`` (this is what generalization measures);
- ``retain``: a locality prompt (another subject) with this edit in context -> that prompt's own answer, so a query
  the scope classifier wrongly lets in is not forced onto the edit's target.

The loss is the cross-entropy of the answer tokens only (logits computed only at those positions). Held-out cases are
scored every ``val_every`` steps with the harness's teacher-forced token accuracy (argmax == answer token), and the
best state by held-out ``update`` accuracy is kept; training stops early after ``patience`` validations without
improvement (a tie keeps the later state).

A trained model is saved under ``$EDITMEM_CACHE/counterfactual/NAME`` (or a folder): the trained blocks' tensors
(``weights.safetensors``) and ``meta.json`` (base model fingerprint, trained parameter names, context template,
settings, validation curve). :func:`load_counterfactual` rebuilds it from the base model and refuses a checkpoint
trained for another model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from editors.lm.architectures import (
    logits_at,
    model_fingerprint,
    module_path,
    num_layers,
)
from editors.lm.tokens import encode_prompt_target, pad_id, pad_rows
from editors.retrieval.augmented import (
    context_template,
    edit_context,
    insert_context,
    lead_tokens,
)
from memory.errors import EditmemError, NotFoundError, ValidationError
from memory.paths import cache_dir
from memory.records import EditCase, EditRecord

log = logging.getLogger(__name__)

KINDS = ("copy", "update", "retain")


def check_mix(owner: str, mix: Any) -> None:
    """Raise :class:`ValidationError` unless ``mix`` is three non-negative sampling weights of :data:`KINDS` with a
    positive sum."""
    weights = tuple(mix) if isinstance(mix, (tuple, list)) else ()
    if (len(weights) != 3 or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0
                                 for w in weights) or not sum(weights) > 0):
        raise ValidationError(f"{owner} setting mix must be three non-negative weights (copy, update, retain) with a "
                              f"positive sum, got {mix!r}")
# Both measured on SmolLM2-135M (notes/memory_editing.md): with the `answer` format (whose "(answer: X)" hint has the
# base model at 1.000 copy accuracy already), 150 steps reach held-out rephrase accuracy 0.975; `new-fact-prompt` peaked
# at 0.965 after 100 of 300 steps.
DEFAULT_CF_CONTEXT = "answer"


@dataclass(frozen=True)
class CounterfactualSettings:
    """How the counterfactual copy is trained.

    ``context``: the context format the copy learns to read (a name of
    :data:`editors.retrieval.augmented.CONTEXT_FORMATS` or a template); the wrapper must use the same one, so it is
    saved with the weights. ``train_layers``: how many top blocks are fine-tuned. ``mix``: sampling weights of the
    ``copy``/``update``/``retain`` kinds. ``val_cases``: held-out cases (the last ones of the file). ``lr`` peaks
    after ``warmup`` steps and decays to zero (cosine).
    """

    context: str = DEFAULT_CF_CONTEXT
    train_layers: int = 8
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.0
    mix: tuple[float, float, float] = (0.25, 0.5, 0.25)
    val_cases: int = 100
    val_every: int = 50
    patience: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        context_template(self.context)
        for name in ("train_layers", "steps", "batch_size", "val_cases", "val_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(f"counterfactual setting {name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValidationError(f"counterfactual setting warmup must be >= 0, got {self.warmup!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValidationError(f"counterfactual setting {name} must be a non-negative number, got {value!r}")
        if self.lr <= 0:
            raise ValidationError(f"counterfactual setting lr must be > 0, got {self.lr!r}")
        check_mix("counterfactual", self.mix)


@dataclass(frozen=True)
class Example:
    """One training or validation row: ``edit`` in context, then ``query`` answered by ``answer``."""

    kind: str
    edit: EditRecord
    query: str
    answer: str


def _edit_of(case: EditCase) -> EditRecord:
    return EditRecord(id=0, version=1, prompt=case.prompt, target_new=case.target_new, subject=case.subject,
                      ground_truth=case.ground_truth)


def build_examples(cases: Sequence[EditCase]) -> dict[str, list[Example]]:
    """The ``copy``, ``update`` and ``retain`` examples of ``cases`` (see the module docstring)."""
    out: dict[str, list[Example]] = {k: [] for k in KINDS}
    for case in cases:
        edit = _edit_of(case)
        out["copy"].append(Example("copy", edit, case.prompt, case.target_new))
        for rephrase in case.rephrases:
            out["update"].append(Example("update", edit, rephrase, case.target_new))
        for probe in case.locality:
            if probe.answer and probe.answer.strip():
                out["retain"].append(Example("retain", edit, probe.prompt, probe.answer))
    return out


class _Encoder:
    """Token rows exactly as the wrapper feeds them: context inserted after the lead, answer at the end."""

    def __init__(self, tokenizer: Any, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.lead = lead_tokens(tokenizer)
        self._ctx: dict[tuple[str, str], list[int]] = {}

    def row(self, ex: Example) -> tuple[list[int], int]:
        key = (ex.edit.prompt, ex.edit.target_new)
        ctx = self._ctx.get(key)
        if ctx is None:
            ctx = list(self.tokenizer(edit_context(ex.edit, self.template), add_special_tokens=False)["input_ids"])
            self._ctx[key] = ctx
        ids, start = encode_prompt_target(self.tokenizer, ex.query, ex.answer)
        seq, at = insert_context(ids, ctx, self.lead)
        return seq, start + (len(seq) - len(ids) if start >= at else 0)

    def batch(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        rows = [self.row(ex) for ex in examples]
        ids, mask = pad_rows([r for r, _ in rows], pad_id(self.tokenizer))
        return ids, mask, [(start, len(r)) for r, start in rows]


def answer_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                   spans: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict the answer tokens (only there: the vocabulary projection is the costly
    part, see :func:`editors.lm.architectures.logits_at`), and those answer tokens."""
    rows = torch.cat([torch.full((end - start,), b, dtype=torch.long) for b, (start, end) in enumerate(spans)])
    cols = torch.cat([torch.arange(start, end, dtype=torch.long) for start, end in spans])
    logits = logits_at(model, rows, cols - 1, input_ids=ids, attention_mask=mask, use_cache=False)
    return logits, ids[rows, cols]


def warmup_cosine(step: int, peak: float, warmup: int, total: int) -> float:
    """The learning rate at 0-based ``step``: a linear warm-up to ``peak`` over ``warmup`` steps, then a cosine decay
    to zero at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def answer_step(model: torch.nn.Module, optim: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
                batch: tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]], lr: float) -> float:
    """One optimiser step at learning rate ``lr`` on the cross-entropy of a batch's answer tokens (``batch``: ids,
    mask and answer spans, as the row encoders give them), gradients clipped to norm 1; returns the loss."""
    ids, mask, spans = batch
    for group in optim.param_groups:
        group["lr"] = lr
    logits, answers = answer_logits(model, ids, mask, spans)
    loss = torch.nn.functional.cross_entropy(logits.float(), answers)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    return float(loss.item())


def trainable_names(model: torch.nn.Module, train_layers: int) -> list[str]:
    """Parameter names of the top ``train_layers`` blocks."""
    n = num_layers(model)
    if train_layers > n:
        raise ValidationError(f"train_layers={train_layers} but the model has {n} layers")
    prefixes = tuple(module_path(model, i, "block") + "." for i in range(n - train_layers, n))
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, encoder: _Encoder, examples: dict[str, list[Example]], *,
             batch_size: int = 32) -> dict[str, float]:
    """Per kind, the mean teacher-forced token accuracy (the harness's reliability/generalization measure) of the
    model reading each example's edit in context."""
    out: dict[str, float] = {}
    for kind, items in examples.items():
        if not items:
            continue
        scores: list[float] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            ids, mask, spans = encoder.batch(chunk)
            logits, answers = answer_logits(model, ids, mask, spans)
            hits = (logits.argmax(-1) == answers).float()
            at = 0
            for start, end in spans:
                scores.append(hits[at:at + end - start].mean().item())
                at += end - start
        out[kind] = sum(scores) / len(scores)
    return out


def counterfactual_dir(name: str | Path) -> Path:
    """Where a counterfactual model named ``name`` lives (``name`` may also be a folder path)."""
    path = Path(name)
    if path.is_absolute() or len(path.parts) > 1 or name in (".", ".."):
        return path
    if not str(name).strip():
        raise ValidationError("a counterfactual model needs a non-empty name")
    return cache_dir() / "counterfactual" / str(name)


def train_counterfactual(model: torch.nn.Module, tokenizer: Any, cases: Sequence[EditCase],
                         settings: CounterfactualSettings | None = None, *, progress: bool = True,
                         data_name: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune a copy of ``model`` (the base model is not touched) and return ``(copy, meta)``.

    ``meta`` holds everything :func:`save_counterfactual` writes besides the weights, including the validation curve.
    """
    s = settings or CounterfactualSettings()
    cases = list(cases)
    if len(cases) <= s.val_cases:
        raise ValidationError(f"{len(cases)} cases given: need more than val_cases={s.val_cases} (the last "
                              f"{s.val_cases} are held out for validation)")
    train_cases, val_cases = cases[:-s.val_cases], cases[-s.val_cases:]
    pools = build_examples(train_cases)
    val = build_examples(val_cases)
    weights = [w if pools[k] else 0.0 for k, w in zip(KINDS, s.mix)]
    if not sum(weights) > 0:
        raise ValidationError("the training cases give no examples of any kind the mix asks for")
    if s.mix[1] > 0 and not pools["update"]:
        log.warning("the training cases have no rephrases: no 'update' examples")
    template = context_template(s.context)
    encoder = _Encoder(tokenizer, template)

    base_fp = model_fingerprint(model)
    cf = copy.deepcopy(model)
    cf.eval()  # no dropout: the copy is trained as it will be used
    names = set(trainable_names(cf, s.train_layers))
    params = []
    for name, p in cf.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    optim = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    curve: list[dict[str, Any]] = []
    best_score, best_state, best_step, stale = -1.0, None, 0, 0
    started = time.perf_counter()

    def validate(step: int, loss: float | None) -> bool:
        nonlocal best_score, best_state, best_step, stale
        scores = evaluate(cf, encoder, val)
        point = {"step": step, "train_loss": loss, "seconds": round(time.perf_counter() - started, 1), **scores}
        curve.append(point)
        log.info("counterfactual step %d: %s", step, point)
        score = scores.get("update", scores.get("copy", 0.0))
        if score >= best_score:  # a tie goes to the later, longer-trained state
            best_score, best_step, stale = score, step, 0
            best_state = {n: p.detach().clone() for n, p in cf.named_parameters() if n in names}
            return False
        stale += 1
        return stale >= s.patience

    from tqdm.auto import tqdm

    validate(0, None)
    losses: list[float] = []
    with tqdm(total=s.steps, desc="training counterfactual model", unit="step", disable=not progress) as bar:
        for step in range(1, s.steps + 1):
            kinds = rng.choices(KINDS, weights=weights, k=s.batch_size)
            batch = [rng.choice(pools[k]) for k in kinds]
            losses.append(answer_step(cf, optim, params, encoder.batch(batch),
                                      warmup_cosine(step - 1, s.lr, s.warmup, s.steps)))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if step % s.val_every == 0 or step == s.steps:
                recent = losses[-s.val_every:]
                if validate(step, sum(recent) / len(recent)):
                    log.info("counterfactual: no improvement in %d validations, stopping at step %d",
                             s.patience, step)
                    break
            if not math.isfinite(losses[-1]):
                raise EditmemError(f"counterfactual training diverged at step {step} (loss {losses[-1]}); "
                                   "lower the learning rate")
    with torch.no_grad():
        live = dict(cf.named_parameters())
        for n, value in (best_state or {}).items():
            live[n].copy_(value)
    for p in cf.parameters():
        p.requires_grad_(False)
    meta = {"format": 1, "base_fingerprint": base_fp, "model_type": cast(Any, cf).config.model_type,
            "trained_parameters": sorted(names), "template": template, "settings": asdict(s),
            "best_step": best_step, "best_val": curve[[c["step"] for c in curve].index(best_step)] if curve else None,
            "curve": curve, "train_seconds": round(time.perf_counter() - started, 1),
            "n_train_cases": len(train_cases), "n_val_cases": len(val_cases), "data": data_name}
    return cf, meta


def save_counterfactual(cf: torch.nn.Module, meta: dict[str, Any], name: str | Path) -> Path:
    """Write the trained blocks and ``meta`` to :func:`counterfactual_dir` (``name``); returns the folder. The folder
    is replaced only once both files are written."""
    from safetensors.torch import save_file

    folder = counterfactual_dir(name)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    params = dict(cf.named_parameters())
    tensors = {n: params[n].detach().contiguous().cpu() for n in meta["trained_parameters"]}
    save_file(tensors, str(tmp / "weights.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
    tmp.rename(folder)
    return folder


def read_meta(name: str | Path) -> dict[str, Any]:
    folder = counterfactual_dir(name)
    path = folder / "meta.json"
    if not path.is_file():
        raise NotFoundError(f"no trained counterfactual model at {folder} (train one with `editmem "
                            "train-counterfactual --data FILE --name NAME`)")
    return json.loads(path.read_text())


def load_counterfactual(name: str | Path, model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The counterfactual copy named ``name`` rebuilt on ``model`` (which is not changed), and its context template.

    :class:`ValidationError` if it was trained for another base model (fingerprint mismatch)."""
    from safetensors.torch import load_file

    meta = read_meta(name)
    fingerprint = model_fingerprint(model)
    if meta.get("base_fingerprint") != fingerprint:
        raise ValidationError(f"counterfactual model {name!r} was trained for base model "
                              f"{meta.get('base_fingerprint')}, not this one ({fingerprint})")
    tensors = load_file(str(counterfactual_dir(name) / "weights.safetensors"))
    cf = copy.deepcopy(model)
    cf.eval()
    live = dict(cf.named_parameters())
    missing = [n for n in tensors if n not in live]
    if missing or sorted(tensors) != sorted(meta["trained_parameters"]):
        raise EditmemError(f"counterfactual model {name!r} is damaged: its tensors do not match its meta.json")
    with torch.no_grad():
        for n, value in tensors.items():
            if live[n].shape != value.shape:
                raise ValidationError(f"counterfactual model {name!r}: {n} has shape {tuple(value.shape)}, the "
                                      f"model's is {tuple(live[n].shape)}")
            live[n].copy_(value.to(live[n].dtype))
    for p in cf.parameters():
        p.requires_grad_(False)
    return cf, meta["template"]
