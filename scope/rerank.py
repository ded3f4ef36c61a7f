"""A relation-aware reranker over the router's top-k candidates, from the vectors the store already has.

Most of the router's wrong-edit and named-subject false positives are another edit about the same subject with a
different relation ("Tom Fletcher is incredible at" finding "Tom Fletcher, the ..." instead of "Tom Fletcher plays
the instrument"): a bi-encoder's cosine is dominated by the subject's name. :class:`RelationReranker` reads the query
and the edit together through what each *asks*: a softmax classifier over relations, trained on prompts labelled
with their relation (CounterFact's cases: prompt, rephrases and neighbourhood prompts all ask the case's relation,
see :mod:`scope.relations`), gives a relation distribution for the query embedding ``u`` and for the edit's stored key
embedding ``v``; their agreement (the cosine of the two distributions, in [0, 1]) multiplies the scope score:

    score' = score * agreement ** power

so a candidate that asks another relation falls below the scope threshold and behind the candidate that asks the
query's relation. No text is encoded twice: ``u`` is the search's query embedding, ``v`` the stored key.

Not a cross-encoder: sentence-transformers' ``CrossEncoder`` needs a pretrained cross-encoder checkpoint, and none is
available offline here (notes/scale.md says what was and was not measured).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memory.encoder import Encoder, encode_chunked
from memory.errors import ValidationError

log = logging.getLogger(__name__)

# The relation reranker shipped inside the package (scope/default_relations/README.md says how it was made): trained on
# CounterFact-train and calibrated behind the shipped scope head (``load_scope("default")``). A setting or flag that
# names ``"default"`` gets it where it fits (:func:`default_reranker_for`), and routes without one elsewhere.
DEFAULT_RERANKER = "default"
PACKAGED_RERANKER = Path(__file__).resolve().parent / "default_relations" / "relations.npz"


@dataclass(frozen=True)
class RerankSettings:
    epochs: int = 30
    lr: float = 0.05
    weight_decay: float = 1e-5
    batch_size: int = 1024
    power: float = 0.5  # BENCHMARKS.md "Store at scale": 0.5 kept more recall than 1.0 for about the same precision
    seed: int = 0


class RelationReranker:
    """Relation classifier ``softmax(W x + b)`` over unit embeddings of ``encoder``; see the module docstring."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, relations: Sequence[str], encoder: str, *,
                 power: float = 1.0, info: dict[str, Any] | None = None):
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        if weight.ndim != 2 or weight.shape[0] != len(relations) or bias.shape != (len(relations),):
            raise ValidationError("reranker weight must be (relations, dim) and bias (relations,)")
        self.weight, self.bias = weight, np.asarray(bias, dtype=np.float32)
        self.relations = list(relations)
        self.encoder = encoder
        self.power = float(power)
        self.info: dict[str, Any] = dict(info or {})  # how it was made (command, data, accuracy), saved with it

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def relation_probs(self, x: np.ndarray) -> np.ndarray:
        """(n, relations) probabilities for unit embeddings ``x`` (n, dim)."""
        logits = np.asarray(x, dtype=np.float32) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> list[str]:
        return [self.relations[i] for i in self.relation_probs(x).argmax(axis=1)]

    def agreement(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(n,) cosine of the relation distributions of the rows of ``u`` and ``v``."""
        pu, pv = self.relation_probs(u), self.relation_probs(v)
        num = (pu * pv).sum(axis=1)
        return num / np.maximum(np.linalg.norm(pu, axis=1) * np.linalg.norm(pv, axis=1), 1e-12)

    def rerank(self, scores: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``scores * agreement(u, v) ** power``."""
        return np.asarray(scores, dtype=np.float32) * self.agreement(u, v).astype(np.float32) ** self.power

    def threshold_for(self, classifier: Any) -> float | None:
        """The scope threshold calibrated behind this reranker for ``classifier`` (``editmem train-relation-rerank
        --scope``), or None when it was calibrated behind no classifier or another one (another name, version or
        training time)."""
        behind = self.info.get("behind")
        if not isinstance(behind, dict) or "threshold" not in behind:
            return None
        info = getattr(classifier, "info", {})
        if any(behind.get(key) != info.get(key) for key in ("name", "version", "created")):
            return None
        return float(behind["threshold"])

    # --- training ---------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Sequence[str], labels: Sequence[str], encoder: Encoder,
              settings: RerankSettings = RerankSettings(), *, vectors: np.ndarray | None = None,
              progress: bool = False) -> RelationReranker:
        """Fit the relation classifier on ``texts`` labelled ``labels`` (``vectors``: their embeddings, if known)."""
        import torch

        if len(texts) != len(labels) or not texts:
            raise ValidationError("train needs one label per text and at least one text")
        relations = sorted(set(labels))
        if len(relations) < 2:
            raise ValidationError("train needs at least two relations")
        x = vectors if vectors is not None else encode_chunked(encoder, list(texts), progress=progress)
        index = {r: i for i, r in enumerate(relations)}
        y = torch.tensor([index[label] for label in labels])
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        gen = torch.Generator().manual_seed(settings.seed)
        model = torch.nn.Linear(xt.shape[1], len(relations))
        opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        for _ in range(settings.epochs):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), settings.batch_size):
                idx = order[start:start + settings.batch_size]
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == y).float().mean())
        log.info("relation reranker: %d relations, training accuracy %.3f", len(relations), acc)
        return cls(model.weight.detach().numpy(), model.bias.detach().numpy(), relations, encoder.name,
                   power=settings.power, info={"train_texts": len(texts), "train_accuracy": round(acc, 4)})

    # --- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"relations": self.relations, "encoder": self.encoder, "power": self.power,
                           "info": self.info})
        with path.open("wb") as f:
            np.savez(f, weight=self.weight, bias=self.bias, meta=np.asarray(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RelationReranker:
        """A reranker :meth:`save` wrote (``editmem train-relation-rerank``); :class:`scope.classifier.ScopeError`
        when ``path`` is missing or is not one."""
        from scope.classifier import ScopeError

        try:
            with np.load(Path(path), allow_pickle=False) as data:
                meta: dict[str, Any] = json.loads(str(data["meta"]))
                return cls(data["weight"], data["bias"], meta["relations"], meta["encoder"], power=meta["power"],
                           info=meta.get("info"))
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as err:
            raise ScopeError(f"{path}: not a relation reranker (editmem train-relation-rerank writes one): "
                             f"{err}") from None


def relation_texts(cases: Sequence[Any], relations: Sequence[str | None]) -> tuple[list[str], list[str]]:
    """Training texts and their relation labels from edit cases: each case's prompt, rephrases and locality prompts
    all ask the case's relation (:mod:`scope.relations`); cases whose relation is unknown (None) are left out."""
    if len(cases) != len(relations):
        raise ValidationError("relation_texts needs one relation per case")
    texts: list[str] = []
    labels: list[str] = []
    for case, rel in zip(cases, relations):
        if rel is None:
            continue
        for text in (case.prompt, *case.rephrases, *(p.prompt for p in case.locality)):
            texts.append(text)
            labels.append(rel)
    return texts, labels


def default_reranker_for(classifier: Any) -> RelationReranker | None:
    """The shipped relation reranker when it fits ``classifier`` (the very head it was calibrated behind, on its
    encoder), else None: a trained head of another name or version, a cosine scope or another encoder routes as
    before, without a reranker."""
    reranker = RelationReranker.load(PACKAGED_RERANKER)
    if getattr(classifier, "encoder", None) != reranker.encoder or reranker.threshold_for(classifier) is None:
        log.info("the shipped relation reranker was calibrated behind the shipped scope head on %s; scope %r routes "
                 "without it", reranker.encoder, getattr(classifier, "info", {}).get("name", classifier.kind))
        return None
    return reranker
