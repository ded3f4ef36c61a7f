"""A LoRA adapter (``peft``) that teaches a chat model to answer from an edit put in its conversation.

With the base model as SERAC's counterfactual model, a chat-framed question in an edit's scope gets the edit as
messages before it (:data:`editors.retrieval.augmented.CHAT_CONTEXTS`). SmolLM2-135M-Instruct then gives the new
target on most edit prompts but follows its prior on many rephrases (notes/answers.md). This module trains a small
adapter on exactly those conversations so that the answer follows the edit, and merges it into a copy of the base
model that the wrapper uses as the counterfactual model (the base model itself is never changed, so out-of-scope
answers stay bit-identical).

Training rows are built as the wrapper builds an in-scope chat row for generation
(:meth:`editors.lm.chat.ChatFrame.prefix_for` over :func:`~editors.retrieval.augmented.chat_messages`, then the
question in the chat frame), followed by the reply the generation protocol reads and the end-of-turn token. Three
kinds, as for the full counterfactual model (:mod:`editors.retrieval.counterfactual`):

- ``copy``: the edit's own prompt -> the new target;
- ``update``: a rephrase of the edit's prompt -> the new target;
- ``retain``: another subject's prompt with this edit in context -> that prompt's own answer.

The reply is the target alone after a question, and the completed sentence after a cloze prompt, as in the example
exchange of the chat context. The loss is the cross-entropy over the reply and end-of-turn tokens. Held-out cases (the
last ``val_cases``) are scored every ``val_every`` steps: the fraction of rows whose every reply token is the argmax
(what greedy decoding would give); the best state by held-out ``update`` rows is kept.

A trained adapter lives in a folder (``$EDITMEM_CACHE/counterfactual/NAME``, or any path): ``adapter.safetensors``
(the peft adapter tensors) and ``meta.json`` (``"kind": "chat-lora"``, the base model's fingerprint, the chat context,
settings, the LoRA target modules, the data files with their sha256, the validation curve).
:func:`load_chat_adapter` merges it into a copy of the base model and refuses an adapter trained for another model.
The package ships one for SmolLM2-135M-Instruct (``editors/retrieval/default_adapter``, its README says how it was
made), which SERAC uses when no counterfactual model named ``default`` was trained on the machine.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast, get_args

import torch

from editors.lm.architectures import Which, model_fingerprint, module_path, num_layers
from editors.lm.chat import ChatFrame, chat_frame, is_question, last_sentence
from editors.lm.tokens import completed, pad_id, pad_rows
from editors.retrieval.augmented import DEFAULT_CHAT_CONTEXT, chat_messages, check_chat_context, split_lead
from editors.retrieval.counterfactual import (
    KINDS,
    Example,
    answer_logits,
    answer_step,
    build_examples,
    check_mix,
    warmup_cosine,
)
from memory.checks import check_number
from memory.errors import EditmemError, ValidationError
from memory.files import file_sha256
from memory.records import EditCase

log = logging.getLogger(__name__)

KIND = "chat-lora"
SHIPPED_DIR = Path(__file__).with_name("default_adapter")
_MODULES: tuple[str, ...] = get_args(Which)


@dataclass(frozen=True)
class ChatAdapterSettings:
    """How the adapter is trained.

    ``chat_context``: the conversation the edit is put in (a name of
    :data:`editors.retrieval.augmented.CHAT_CONTEXTS`; saved with the adapter, the wrapper uses the same one).
    ``rank``/``alpha``: LoRA's rank and scale. ``layers``: how many top blocks get adapters, on ``modules`` (module
    kinds of :func:`editors.lm.architectures.module_path`). ``mix``: sampling weights of the copy/update/retain kinds.
    ``lr`` peaks after ``warmup`` steps and decays to zero (cosine).
    """

    chat_context: str = DEFAULT_CHAT_CONTEXT
    rank: int = 8
    alpha: int = 16
    layers: int = 12
    modules: tuple[str, ...] = ("attn_out", "mlp_out")
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 10
    mix: tuple[float, float, float] = (0.25, 0.5, 0.25)
    val_cases: int = 50
    val_every: int = 50
    patience: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_chat_context(self.chat_context)
        for name in ("rank", "alpha", "layers", "steps", "batch_size", "val_cases", "val_every", "patience"):
            check_number("chat adapter", name, getattr(self, name), integer=True)
        check_number("chat adapter", "warmup", self.warmup, integer=True, strict=False)
        check_number("chat adapter", "lr", self.lr)
        if not self.modules or any(m not in _MODULES for m in self.modules):
            raise ValidationError(f"chat adapter setting modules must name some of {', '.join(_MODULES)}, got "
                                  f"{self.modules!r}")
        check_mix("chat adapter", self.mix)


def reply_text(query: str, answer: str) -> str:
    """The reply a chat model should give: the answer alone after a question, the completed last sentence after a
    cloze prompt (CounterFact's rephrases often start with an unrelated sentence, which the reply must not repeat: the
    generation protocol reads the first sentence); ending in a full stop."""
    text = answer.strip() if is_question(query) else completed(last_sentence(query), answer).strip()
    return text if text.endswith((".", "!", "?")) else text + "."


class ChatRows:
    """Token rows of examples as the wrapper conditions an in-scope chat row, with the reply and end of turn after."""

    def __init__(self, tokenizer: Any, frame: ChatFrame, chat_context: str):
        self.tokenizer, self.frame, self.chat_context = tokenizer, frame, chat_context
        eot = tokenizer.eos_token_id
        if eot is None:
            raise ValidationError("the tokenizer has no end-of-turn (eos) token to train the reply's end on")
        self.eot = int(eot)
        self._prefix: dict[tuple[str, str], list[int]] = {}

    def prefix(self, ex: Example) -> list[int]:
        key = (ex.edit.prompt, ex.edit.target_new)
        ids = self._prefix.get(key)
        if ids is None:
            ids = self.frame.prefix_for(*split_lead(chat_messages(ex.edit, self.chat_context)))
            self._prefix[key] = ids
        return ids

    def row(self, ex: Example) -> tuple[list[int], int]:
        """The row's tokens and where its reply starts."""
        head = self.prefix(ex) + self.frame.encode(ex.query)[len(self.frame.prefix):]
        reply = list(self.tokenizer(reply_text(ex.query, ex.answer), add_special_tokens=False)["input_ids"])
        return head + reply + [self.eot], len(head)

    def batch(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        rows = [self.row(ex) for ex in examples]
        ids, mask = pad_rows([r for r, _ in rows], pad_id(self.tokenizer))
        return ids, mask, [(start, len(r)) for r, start in rows]


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: ChatRows, examples: dict[str, list[Example]], *,
             batch_size: int = 16) -> dict[str, float]:
    """Per kind, the fraction of examples whose every reply token (end of turn included) is the model's argmax."""
    out: dict[str, float] = {}
    for kind, items in examples.items():
        if not items:
            continue
        exact = 0
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            ids, mask, spans = rows.batch(chunk)
            logits, answers = answer_logits(model, ids, mask, spans)
            hits = logits.argmax(-1) == answers
            at = 0
            for start, end in spans:
                exact += int(hits[at:at + end - start].all().item())
                at += end - start
        out[kind] = exact / len(items)
    return out


def target_modules(model: torch.nn.Module, settings: ChatAdapterSettings) -> list[str]:
    """Full module paths the adapter goes on: ``settings.modules`` in the top ``settings.layers`` blocks."""
    n = num_layers(model)
    if settings.layers > n:
        raise ValidationError(f"chat adapter setting layers={settings.layers} but the model has {n} layers")
    return [module_path(model, i, cast(Which, which)) for i in range(n - settings.layers, n)
            for which in settings.modules]


def _lora_config(rank: int, alpha: int, targets: Sequence[str]) -> Any:
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")


def train_chat_adapter(model: torch.nn.Module, tokenizer: Any, cases: Sequence[EditCase],
                       settings: ChatAdapterSettings | None = None, *, progress: bool = True,
                       data: Sequence[str | Path] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the adapter on a copy of ``model`` (``model`` is not touched); returns ``(adapter tensors, meta)``."""
    import peft

    s = settings or ChatAdapterSettings()
    frame = chat_frame(tokenizer)
    if frame is None:
        raise ValidationError("the tokenizer has no chat template: a chat adapter is for chat models (use "
                              "`editmem train-counterfactual` for a plain one)")
    cases = list(cases)
    if len(cases) <= s.val_cases:
        raise ValidationError(f"{len(cases)} cases given: need more than val_cases={s.val_cases} (the last "
                              f"{s.val_cases} are held out for validation)")
    random.Random(s.seed).shuffle(cases)  # several data files: held-out cases from each
    train_cases, val_cases = cases[:-s.val_cases], cases[-s.val_cases:]
    pools, val = build_examples(train_cases), build_examples(val_cases)
    weights = [w if pools[k] else 0.0 for k, w in zip(KINDS, s.mix)]
    if not sum(weights) > 0:
        raise ValidationError("the training cases give no examples of any kind the mix asks for")
    rows = ChatRows(tokenizer, frame, s.chat_context)
    targets = target_modules(model, s)

    base_fp = model_fingerprint(model)
    work = copy.deepcopy(model)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    torch.manual_seed(s.seed)
    wrapped = peft.get_peft_model(work, _lora_config(s.rank, s.alpha, targets))
    net = wrapped.get_base_model()  # the model with the adapter's layers in it (logits_at needs its base_model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)

    def state() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in peft.get_peft_model_state_dict(wrapped).items()}

    rng = random.Random(s.seed)
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": -1.0, "state": None, "step": 0, "stale": 0}
    started = time.perf_counter()

    def validate(step: int, loss: float | None) -> bool:
        scores = evaluate(net, rows, val)
        point = {"step": step, "train_loss": loss, "seconds": round(time.perf_counter() - started, 1), **scores}
        curve.append(point)
        log.info("chat adapter step %d: %s", step, point)
        score = scores.get("update", scores.get("copy", 0.0))
        if score >= best["score"]:  # a tie goes to the later, longer-trained state
            best.update(score=score, state=state(), step=step, stale=0)
            return False
        best["stale"] += 1
        return bool(best["stale"] >= s.patience)

    from tqdm.auto import tqdm

    validate(0, None)
    losses: list[float] = []
    with torch.enable_grad(), tqdm(total=s.steps, desc="training chat adapter", unit="step",
                                   disable=not progress) as bar:
        for step in range(1, s.steps + 1):
            kinds = rng.choices(KINDS, weights=weights, k=s.batch_size)
            batch = [rng.choice(pools[k]) for k in kinds]
            losses.append(answer_step(net, optim, params, rows.batch(batch),
                                      warmup_cosine(step - 1, s.lr, s.warmup, s.steps)))
            if not math.isfinite(losses[-1]):
                raise EditmemError(f"chat adapter training diverged at step {step} (loss {losses[-1]}); lower "
                                   "the learning rate")
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if step % s.val_every == 0 or step == s.steps:
                recent = losses[-s.val_every:]
                if validate(step, sum(recent) / len(recent)):
                    log.info("chat adapter: no improvement in %d validations, stopping at step %d", s.patience, step)
                    break
    tensors = cast(dict[str, torch.Tensor], best["state"])
    at = [c["step"] for c in curve].index(best["step"])
    meta = {"kind": KIND, "format": 1, "base_fingerprint": base_fp, "model_type": cast(Any, model).config.model_type,
            "chat_context": s.chat_context, "targets": targets, "settings": asdict(s), "best_step": best["step"],
            "best_val": curve[at], "curve": curve, "train_seconds": round(time.perf_counter() - started, 1),
            "n_train_cases": len(train_cases), "n_val_cases": len(val_cases),
            "data": [{"path": str(p), "sha256": file_sha256(p)} for p in data]}
    return tensors, meta


def save_chat_adapter(tensors: dict[str, torch.Tensor], meta: dict[str, Any], folder: str | Path) -> Path:
    """Write ``adapter.safetensors`` and ``meta.json`` to ``folder``, replacing it only once both are written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "adapter.safetensors"))
    meta = {**meta, "adapter_sha256": file_sha256(tmp / "adapter.safetensors")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
    tmp.rename(folder)
    return folder


def is_chat_adapter(folder: str | Path) -> bool:
    """Whether ``folder`` holds a chat adapter (as opposed to a full counterfactual model)."""
    path = Path(folder) / "meta.json"
    return path.is_file() and json.loads(path.read_text()).get("kind") == KIND


def shipped_adapter_fits(model: torch.nn.Module) -> bool:
    """Whether the package's adapter was trained for ``model`` (SmolLM2-135M-Instruct as converted by editmem)."""
    path = SHIPPED_DIR / "meta.json"
    return path.is_file() and json.loads(path.read_text()).get("base_fingerprint") == model_fingerprint(model)


# One merged copy per (base model, adapter folder): several editors over one model (the service opens one per
# namespace and method) share it instead of each holding a copy of the weights.
_MERGED: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, tuple[torch.nn.Module, str]]] = \
    weakref.WeakKeyDictionary()


def load_chat_adapter(folder: str | Path, model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """A copy of ``model`` with the adapter in ``folder`` merged into it, and the adapter's chat context.

    :class:`ValidationError` if the adapter was trained for another base model (fingerprint mismatch);
    :class:`EditmemError` if its files do not match its meta.json."""
    import peft
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    fingerprint = model_fingerprint(model)
    if meta.get("base_fingerprint") != fingerprint:
        raise ValidationError(f"chat adapter {str(folder)!r} was trained for base model "
                              f"{meta.get('base_fingerprint')}, not this one ({fingerprint})")
    key = str(folder.resolve())
    cached = _MERGED.get(model, {}).get(key)
    if cached is not None:
        return cached
    path = folder / "adapter.safetensors"
    if meta.get("adapter_sha256") and file_sha256(path) != meta["adapter_sha256"]:
        raise EditmemError(f"chat adapter {str(folder)!r} is damaged: adapter.safetensors does not match meta.json")
    tensors = load_file(str(path))
    work = copy.deepcopy(model)
    work.eval()
    s = meta["settings"]
    wrapped = peft.get_peft_model(work, _lora_config(int(s["rank"]), int(s["alpha"]), meta["targets"]))
    unexpected = list(getattr(peft.set_peft_model_state_dict(wrapped, tensors), "unexpected_keys", None) or [])
    if unexpected:
        raise EditmemError(f"chat adapter {str(folder)!r} is damaged: unexpected tensors {unexpected[:3]}")
    merged = wrapped.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    out = (merged, str(meta["chat_context"]))
    _MERGED.setdefault(model, {})[key] = out
    return out
