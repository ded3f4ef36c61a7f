"""Training the scope head from edit data, and choosing its threshold on held-out pairs.

Pairs are mined the way the router meets them. Each case contributes queries: its rephrases and (for a share of the
cases) its own prompt, which should route to it, and its locality prompts (neighbourhood prompts: same relation, other
subjects), which should route nowhere. Every query is scored against its ``k`` nearest edit keys among all the cases'
prompts, as the store's search would return them: the pair with the query's own edit is positive, every other pair
negative. The query's own edit (for a rephrase) and its anchor edit (for a locality prompt) are always paired, even when
retrieval misses them, and each query also gets ``easy_negatives`` random edits.

A locality prompt is about another subject than its anchor edit, but in a large file that other subject often has an
edit of its own, sometimes with the same relation ("Margherita Buy was native to" is a neighbourhood prompt of one
edit and a rephrase of another's "Margherita Buy originated from"). Its pairs with edits whose subject it names
(other than its anchor) are therefore left out as ambiguous rather than labelled negative; ``stats["ambiguous"]``
counts them.

Teacher-forced evaluation routes on prompt + answer (see :mod:`editors.retrieval.augmented`), so a share
``answer_augment`` of the queries get an answer appended (the new target or the old one for rephrases and prompts,
the probe's answer for locality prompts), which teaches the head to ignore a trailing answer.

Held-out: a share ``holdout`` of the cases (by case, so no query text or edit of theirs is trained on). Held-out pairs
are those whose query belongs to a held-out case; training pairs have both query and edit outside them. The threshold
is chosen on the held-out queries the way the router decides them (:func:`query_decisions`: each query's best-scoring
candidate; right only if it is the query's own edit): the one with the highest recall at ``target_precision``
(:mod:`scope.calibrate`). Calibrating on single pairs instead is much stricter than routing: CounterFact has many edits
about the same subject, a rephrase of one scores high against the others, and no pair threshold then reaches 0.98
precision at a useful recall. The cosine baseline is calibrated on the same queries so the two levels compare directly;
pair-level figures are reported beside them.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from memory.checks import is_int, is_number
from memory.encoder import Encoder, encode_chunked
from memory.errors import ValidationError
from memory.records import EditCase
from scope.calibrate import calibrate_threshold, precision_recall
from scope.classifier import CosineScope, HeadScope, ScopeHead
from scope.features import lexical_many, names_subject, pair_features

log = logging.getLogger(__name__)

POSITIVE_KINDS = ("rephrase", "prompt")
NEGATIVE_KINDS = ("locality", "retrieved", "random")


def _check_fraction(name: str, value: Any, *, open_right: bool = False) -> None:
    if not is_number(value) or value < 0 or value > 1 or (open_right and value >= 1):
        raise ValidationError(f"scope training setting {name} must be in [0, 1{')' if open_right else ']'}, "
                              f"got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise ValidationError(f"scope training setting {name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class TrainSettings:
    """How the head is trained and calibrated. Defaults are the ones measured in notes/memory_editing.md."""

    hidden: int = 128  # 0: logistic regression
    epochs: int = 8
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    k: int = 5  # candidates per query when mining pairs (as the router's k)
    holdout: float = 0.1
    target_precision: float = 0.98
    answer_augment: float = 0.5
    prompt_share: float = 0.3  # share of cases whose own prompt is also a positive query
    easy_negatives: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("hidden", self.hidden, 0)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("k", self.k, 1)
        _check_int("easy_negatives", self.easy_negatives, 0)
        _check_int("seed", self.seed, 0)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not is_number(value) or value < 0 or (name == "lr" and value == 0):
                kind = "positive" if name == "lr" else "non-negative"
                raise ValidationError(f"scope training setting {name} must be a {kind} number, got {value!r}")
        _check_fraction("holdout", self.holdout, open_right=True)
        if self.holdout <= 0:
            raise ValidationError("scope training setting holdout must be > 0: the threshold is chosen on held-out "
                                  "pairs")
        _check_fraction("answer_augment", self.answer_augment)
        _check_fraction("prompt_share", self.prompt_share)
        if not 0 < self.target_precision <= 1:
            raise ValidationError(f"target precision must be in (0, 1], got {self.target_precision!r}")


@dataclass
class PairSet:
    """Mined pairs over encoded queries and edit keys (indices into ``query_vecs`` / ``key_vecs``)."""

    query_texts: list[str]
    query_vecs: np.ndarray
    key_vecs: np.ndarray
    q: np.ndarray
    e: np.ndarray
    label: np.ndarray
    kind: np.ndarray  # kind of each pair (POSITIVE_KINDS / NEGATIVE_KINDS)
    heldout: np.ndarray  # bool per pair
    lex: np.ndarray
    query_positive: np.ndarray  # bool per query: should it route to its own edit (else to none)?
    stats: dict[str, Any] = field(default_factory=dict)

    def subset(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        return {"q": self.q[mask], "e": self.e[mask], "label": self.label[mask], "kind": self.kind[mask],
                "lex": self.lex[mask]}


def _with_answer(text: str, answer: str | None) -> str:
    if not answer:
        return text
    return text + answer if text.endswith((" ", "\n")) else f"{text} {answer}"


def _sample_heldout(rng: random.Random, n: int, holdout: float) -> list[int]:
    return rng.sample(range(n), max(1, round(n * holdout)))


def heldout_cases(n: int, settings: TrainSettings = TrainSettings()) -> list[int]:
    """The indices of the cases :func:`build_pairs` holds out of training when given ``n`` cases with ``settings``
    (the head never saw their queries: calibration material)."""
    return sorted(_sample_heldout(random.Random(settings.seed), n, settings.holdout))


def build_pairs(cases: Sequence[EditCase], encoder: Encoder, settings: TrainSettings = TrainSettings(), *,
                progress: bool = False) -> PairSet:
    """Mine labelled (query, edit) pairs from ``cases`` (see the module docstring)."""
    cases = list(cases)
    if len(cases) < 4:
        raise ValidationError(f"scope training needs at least 4 cases, got {len(cases)}")
    rng = random.Random(settings.seed)
    n = len(cases)
    held_cases = set(_sample_heldout(rng, n, settings.holdout))
    n_held = len(held_cases)
    keys = [c.prompt for c in cases]

    texts: list[str] = []
    owner: list[int] = []  # the case the query belongs to
    positive_of: list[bool] = []  # True: the query should route to its owner; False: to no edit
    qkind: list[str] = []
    for i, c in enumerate(cases):
        answers = [a for a in (c.target_new, c.ground_truth) if a]
        pos_queries = [(r, "rephrase") for r in c.rephrases]
        if rng.random() < settings.prompt_share:
            pos_queries.append((c.prompt, "prompt"))
        for text, kind in pos_queries:
            if answers and rng.random() < settings.answer_augment:
                text = _with_answer(text, rng.choice(answers))
            texts.append(text)
            owner.append(i)
            positive_of.append(True)
            qkind.append(kind)
        for probe in c.locality:
            text = probe.prompt
            if rng.random() < settings.answer_augment:
                text = _with_answer(text, probe.answer)
            texts.append(text)
            owner.append(i)
            positive_of.append(False)
            qkind.append("locality")
    if not any(positive_of):
        raise ValidationError("the cases have no rephrases (nor prompts sampled as positives): nothing is in scope")
    if all(positive_of):
        log.warning("the cases have no locality prompts: the only negatives are other edits' prompts")

    key_vecs = encode_chunked(encoder, keys, progress=progress, desc="encoding edit keys")
    query_vecs = encode_chunked(encoder, texts, progress=progress, desc="encoding queries")
    k = min(settings.k, n)
    q_idx: list[int] = []
    e_idx: list[int] = []
    labels: list[int] = []
    kinds: list[str] = []
    ambiguous = 0
    same_key: dict[str, set[int]] = {}  # key text -> cases with that prompt (duplicates count as the query's own edit)
    for i, key in enumerate(keys):
        same_key.setdefault(key, set()).add(i)
    for start in range(0, len(texts), 2048):
        sims = query_vecs[start:start + 2048] @ key_vecs.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(sims), 1))
        for row, cands in enumerate(top):
            qi = start + row
            own, pos = owner[qi], positive_of[qi]
            own_keys = same_key[keys[own]] if pos else set()
            paired = set()
            for ei in cands.tolist():
                if not pos and ei != own and names_subject(texts[qi], cases[ei].subject):
                    ambiguous += 1
                    continue
                is_pos = ei in own_keys
                q_idx.append(qi)
                e_idx.append(int(ei))
                labels.append(int(is_pos))
                kinds.append(qkind[qi] if is_pos else ("locality" if ei == own else "retrieved"))
                paired.add(int(ei))
            if own not in paired:  # always pair a query with its own / anchor edit
                q_idx.append(qi)
                e_idx.append(own)
                labels.append(int(pos))
                kinds.append(qkind[qi] if pos else "locality")
                paired.add(own)
            for _ in range(settings.easy_negatives):
                ei = rng.randrange(n)
                if ei not in paired and ei not in own_keys and not names_subject(texts[qi], cases[ei].subject):
                    q_idx.append(qi)
                    e_idx.append(ei)
                    labels.append(0)
                    kinds.append("random")
                    paired.add(ei)
    q_arr, e_arr = np.asarray(q_idx), np.asarray(e_idx)
    held_q = np.asarray([owner[q] in held_cases for q in q_idx])
    held_e = np.asarray([e in held_cases for e in e_idx])
    keep = held_q | ~held_e  # drop pairs of a training query with a held-out edit
    lex = lexical_many([texts[q] for q in q_idx], [keys[e] for e in e_idx], [cases[e].subject for e in e_idx])
    pairs = PairSet(texts, query_vecs, key_vecs, q_arr[keep], e_arr[keep], np.asarray(labels)[keep],
                    np.asarray(kinds)[keep], held_q[keep], lex[keep], np.asarray(positive_of, dtype=bool))
    pairs.stats = {"cases": n, "heldout_cases": n_held, "queries": len(texts), "pairs": int(keep.sum()),
                   "train_pairs": int((~pairs.heldout).sum()), "heldout_pairs": int(pairs.heldout.sum()),
                   "positives": int(pairs.label.sum()), "ambiguous": ambiguous,
                   "by_kind": {str(kd): int((pairs.kind == kd).sum()) for kd in (*POSITIVE_KINDS, *NEGATIVE_KINDS)}}
    log.info("scope pairs: %s", pairs.stats)
    return pairs


def _pair_level_report(scores: np.ndarray, labels: np.ndarray, kinds: np.ndarray, threshold: float) -> dict:
    p, r = precision_recall(scores, labels, threshold)
    out: dict[str, Any] = {"precision": p, "recall": r}
    for kind in (*POSITIVE_KINDS, *NEGATIVE_KINDS):
        m = kinds == kind
        if m.any():
            key = "recall" if kind in POSITIVE_KINDS else "false_positive_rate"
            out[f"{kind}_{key}"] = float((scores[m] >= threshold).mean())
    return out


def query_decisions(scores: np.ndarray, q: np.ndarray, label: np.ndarray, query_positive: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair scores turned into the router's per-query decisions: for each query among ``q``, its best-scoring
    candidate's score, whether that candidate is right (the query's own edit; never, for a query that belongs to no
    edit), and whether the query should be in scope at all. Ties go to the first pair."""
    order = np.lexsort((-scores, q))  # by query, best score first
    first = np.r_[True, q[order][1:] != q[order][:-1]]
    best = order[first]
    return scores[best], label[best].astype(bool), query_positive[q[best]]


def heldout_calibration(clf: HeadScope, pairs: PairSet, target_precision: float,
                        reranker: Any = None) -> dict[str, Any]:
    """Query-level calibration of ``clf`` on the held-out pairs of ``pairs`` (:func:`build_pairs` with the settings
    the head was trained with, so the held-out cases are the same), its scores rescored by ``reranker`` (a
    :class:`scope.rerank.RelationReranker`) when one is given: the threshold for a router that reranks, which the
    head's own calibration (made without the reranker) is not."""
    ho = pairs.subset(pairs.heldout)
    u, v = pairs.query_vecs[ho["q"]], pairs.key_vecs[ho["e"]]
    scores = clf.score_arrays(u, v, ho["lex"])
    if reranker is not None:
        scores = reranker.rerank(scores, u, v)
    return _query_level(scores, ho["q"], ho["label"], pairs.query_positive, target_precision)


def _query_level(scores: np.ndarray, q: np.ndarray, label: np.ndarray, query_positive: np.ndarray,
                 target_precision: float) -> dict[str, Any]:
    """Threshold and report at the level the router decides (see :func:`query_decisions`), the issue's measure:
    a positive query routed to its own edit is a true positive, routed to another edit a false positive, and a
    query of no edit (a locality prompt) routed anywhere a false positive. Recall is over every positive query."""
    best, right, positive = query_decisions(scores, q, label, query_positive)
    cal = calibrate_threshold(best, right, target_precision)
    inside = best >= cal.threshold
    tp = int((inside & right).sum())
    n_pos = int(positive.sum())
    return {"calibration": cal.to_json(), "precision": tp / int(inside.sum()) if inside.any() else 1.0,
            "recall": tp / n_pos if n_pos else 0.0, "queries": int(best.size), "positive_queries": n_pos,
            "wrong_edit_rate": float((inside & ~right & positive).sum() / n_pos) if n_pos else 0.0,
            "locality_false_positive_rate": float((inside & ~positive).sum() / max(1, int((~positive).sum())))}


def train_scope(cases: Sequence[EditCase], encoder: Encoder, settings: TrainSettings = TrainSettings(), *,
                progress: bool = False, source: str | None = None) -> tuple[HeadScope, CosineScope, dict[str, Any]]:
    """Train the head on ``cases``; returns the calibrated head, the cosine baseline calibrated on the same held-out
    pairs, and a report (pair statistics, held-out precision/recall of both, training time)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    pairs = build_pairs(cases, encoder, settings, progress=progress)
    t_pairs = time.perf_counter() - t0
    train_mask = ~pairs.heldout
    tr = pairs.subset(train_mask)
    if tr["label"].sum() == 0 or tr["label"].sum() == len(tr["label"]):
        raise ValidationError("the training pairs are all of one class; give more cases")
    Q = torch.as_tensor(pairs.query_vecs)
    E = torch.as_tensor(pairs.key_vecs)
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = ScopeHead(encoder.dim, settings.hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    q_t, e_t = torch.as_tensor(tr["q"]), torch.as_tensor(tr["e"])
    y_t = torch.as_tensor(tr["label"], dtype=torch.float32)
    lex_t = torch.as_tensor(tr["lex"])
    n = len(y_t)
    steps = settings.epochs * math.ceil(n / settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps)
    head.train()
    losses = []
    with torch.enable_grad(), tqdm(total=steps, desc="training scope head", unit="step", disable=not progress,
                                   leave=False) as bar:
        for epoch in range(settings.epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, settings.batch_size):
                idx = order[start:start + settings.batch_size]
                feats = pair_features(Q[q_t[idx]], E[e_t[idx]], lex_t[idx])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats), y_t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                bar.update(1)
            losses.append(total / n)
            bar.set_postfix_str(f"epoch {epoch + 1} loss {losses[-1]:.4f}")
    head.eval()
    t_train = time.perf_counter() - t0 - t_pairs

    ho = pairs.subset(pairs.heldout)
    clf = HeadScope(head, encoder.dim, settings.hidden, 0.5, encoder.name)
    head_scores = clf.score_arrays(pairs.query_vecs[ho["q"]], pairs.key_vecs[ho["e"]], ho["lex"])
    cos_scores = np.einsum("nd,nd->n", pairs.query_vecs[ho["q"]], pairs.key_vecs[ho["e"]])
    heldout: dict[str, Any] = {}
    for label, scores in (("head", head_scores), ("cosine", cos_scores)):
        queries = _query_level(scores, ho["q"], ho["label"], pairs.query_positive, settings.target_precision)
        threshold = queries["calibration"]["threshold"]
        heldout[label] = {"calibration": queries["calibration"], "queries": queries,
                          "pairs": _pair_level_report(scores, ho["label"], ho["kind"], threshold)}
    clf.threshold = heldout["head"]["calibration"]["threshold"]
    report: dict[str, Any] = {
        "source": source, "encoder": encoder.name, "settings": asdict(settings), "pairs": pairs.stats,
        "train_loss": losses, "heldout": heldout,
        "seconds": {"pairs": round(t_pairs, 2), "train": round(t_train, 2)},
    }
    clf.info.update(calibration=heldout["head"]["calibration"], metrics=heldout["head"],
                    training={"source": source, "settings": asdict(settings), "pairs": pairs.stats})
    cosine = CosineScope(heldout["cosine"]["calibration"]["threshold"], encoder.name,
                         {"calibration": heldout["cosine"]["calibration"], "metrics": heldout["cosine"],
                          "training": {"source": source, "pairs": pairs.stats}})
    log.info("scope head: held-out %s; cosine baseline %s", report["heldout"]["head"], report["heldout"]["cosine"])
    return clf, cosine, report
