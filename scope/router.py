"""Routing: for each query, the stored edit whose scope it falls in, if any.

``Router(memory, classifier, k)`` searches the store for the ``k`` nearest edit keys of each query (one batched
search), scores every (query, candidate) pair with the scope classifier, and picks the best-scoring candidate at or
above the classifier's threshold. Every route reads the store's current state, so an update, delete or rollback takes
effect on the next query.

Two views of a query. A query of several sentences is also searched and scored by its last sentence, and each
candidate keeps its better score of the two: CounterFact's rephrases (and real questions) often open with unrelated
text ("One person killed. Heath Brothers plays"), which dilutes a sentence embedding of the whole. And a query that
begins with an edit's own prompt (word for word, case and spacing aside; a teacher-forced row is the prompt followed
by its answer) is in that edit's scope by definition: the pair scores the classifier's maximum (1.0).

A classifier that scores from embeddings (:attr:`ScopeClassifier.needs_vectors`, the trained head) gets the vectors
the store's search already has: the queries' embeddings it encoded and the hits' key embeddings stored in SQL
(``search_many(..., return_vectors=True)``), so each query view is encoded once and edit prompts never are. The cosine
scope scores from the hits' similarities alone.

An optional reranker (:class:`scope.rerank.RelationReranker`) rescales each candidate's score by how well what the
query asks agrees with what the edit asks, from the same vectors; the exact-prompt rule still applies after it.

Edits the weights hold. When the wrapped model is an edited model the store keeps weight records for (a folder
written by ``editmem consolidate``), the router takes ``held`` (:class:`HeldEdits`): the edit versions those weights
answer. Routing is unchanged up to the choice; a query whose chosen edit's *current* version is held is not gated
(``Decision.edit`` is None, ``Decision.weights`` names the edit): the model answers it from its weights. The choice is
made over every live edit first, so a held edit still wins against a weaker neighbour that memory would have answered
wrongly. An update, rollback or delete gives the edit a new version (or none), so it routes from memory again at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memory.encoder import Encoder
from memory.errors import ValidationError
from memory.feed import change_number
from memory.records import EditRecord
from scope.classifier import ScopeClassifier

log = logging.getLogger(__name__)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
MIN_VIEW_WORDS = 3
EXACT_SCORE = 1.0


def query_views(text: str) -> list[str]:
    """The texts a query is searched and scored by: itself, and its last sentence when it has several (and that
    sentence has at least :data:`MIN_VIEW_WORDS` words)."""
    parts = [p for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    if len(parts) > 1 and len(parts[-1].split()) >= MIN_VIEW_WORDS:
        return [text, parts[-1].strip()]
    return [text]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def starts_with_prompt(query: str, prompt: str) -> bool:
    """Whether ``query`` begins with ``prompt`` word for word (case and spacing aside)."""
    q, p = _norm(query), _norm(prompt)
    return bool(p) and (q == p or q.startswith(p + " ") or (q.startswith(p) and not p[-1].isalnum()))


@dataclass(frozen=True)
class Candidate:
    """One retrieved edit and how the classifier scored it for the query."""

    id: int
    version: int
    similarity: float  # cosine of query and edit key, from the store
    score: float  # the classifier's score


@dataclass(frozen=True)
class Decision:
    """The routing of one query: ``edit`` is the edit it falls in the scope of, or None (the base model answers)."""

    query: str
    edit: EditRecord | None
    score: float | None  # the classifier's score of the chosen edit (of the best candidate when none is chosen)
    threshold: float
    candidates: tuple[Candidate, ...] = ()
    weights: EditRecord | None = None  # the chosen edit, when the served weights hold it (then ``edit`` is None)

    @property
    def in_scope(self) -> bool:
        return self.edit is not None

    @property
    def chosen(self) -> EditRecord:
        """The edit an in-scope query falls in (ValueError for an out-of-scope one)."""
        if self.edit is None:
            raise ValueError(f"query {self.query!r} is not in the scope of any edit")
        return self.edit

    def describe(self) -> str:
        if self.weights is not None:
            return (f"edit {self.weights.id} v{self.weights.version} (score {self.score:.3f}), held by the weights: "
                    "the model answers")
        if self.edit is None:
            best = f" (best candidate score {self.score:.3f} < threshold {self.threshold:.3f})" \
                if self.score is not None else " (no candidates)"
            return "no edit" + best
        return (f"edit {self.edit.id} v{self.edit.version} (score {self.score:.3f} >= {self.threshold:.3f}): "
                f"{self.edit.prompt} -> {self.edit.target_new}")


class HeldEdits:
    """The edit versions the weights of the served edited model ``model_id`` hold, which the router leaves to them.

    The store's applied weight records of the model decide, re-read whenever the store's change counter moves (so a
    record removed by this or another process counts at once). ``loaded``, when given, must hold a version too: the
    versions the model object in this process holds (a model loaded from the folder and not written here: the
    store's at load time, :func:`editors.consolidation.held_edits`; a process that writes the loaded weights moves it
    after writing them, :class:`editors.consolidation.LiveWeights`). A version the store records but the loaded
    weights lack (another process consolidated into the folder since) keeps answering from memory. None: the
    store's records alone (the model is the one a :class:`editors.weights.StoredWeights` in this process writes)."""

    def __init__(self, memory: Any, model_id: int, loaded: Any = None):
        self.memory = memory
        self.model_id = int(model_id)
        self._seq: int | None = None
        self._stored: frozenset[tuple[int, int]] = frozenset()
        self.loaded: frozenset[tuple[int, int]] | None = None if loaded is None else frozenset(loaded)

    def versions(self) -> frozenset[tuple[int, int]]:
        """The ``(edit id, version)`` pairs held now."""
        seq = change_number(self.memory)
        if seq != self._seq:
            self._stored, self._seq = frozenset(self.memory.held_versions(self.model_id)), seq
        return self._stored if self.loaded is None else self._stored & self.loaded


class Router:
    """Retrieval + scope for one store (see the module docstring). ``held``: the edits the wrapped model's weights
    hold (:class:`HeldEdits`), not gated; settable after construction."""

    def __init__(self, memory: Any, classifier: ScopeClassifier, *, k: int = 5, reranker: Any = None,
                 held: HeldEdits | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValidationError(f"k must be a positive integer, got {k!r}")
        classifier.check_encoder(memory.encoder.name)
        self.memory = memory
        self.classifier = classifier
        self.k = k
        if reranker is not None and reranker.encoder != memory.encoder.name:
            raise ValidationError(f"reranker was trained on {reranker.encoder} embeddings, the store's encoder is "
                                  f"{memory.encoder.name}")
        self.reranker = reranker
        self.held = held

    @classmethod
    def open(cls, url: str, classifier: ScopeClassifier, *, encoder: str | Encoder | None = None,
             k: int = 5) -> Router:
        """Open the store at ``url`` with ``encoder``, else the classifier's encoder, else the store's own."""
        from memory.store import EditMemory

        return cls(EditMemory.open(url, encoder=encoder if encoder is not None else classifier.encoder), classifier,
                   k=k)

    def route(self, texts: Sequence[str]) -> list[Decision]:
        """One :class:`Decision` per text."""
        if isinstance(texts, str):
            raise ValidationError("route takes a list of texts")
        texts = list(texts)
        if not texts:
            return []
        views: list[str] = []
        owner: list[int] = []  # the text each view belongs to
        for q, text in enumerate(texts):
            for view in query_views(text):
                views.append(view)
                owner.append(q)
        u = v = None
        wants_vectors = self.classifier.needs_vectors or self.reranker is not None
        if wants_vectors:  # the vectors the search encoded and the hits' stored keys, not re-encoded
            hits, queries, keys = self.memory.search_many(views, self.k, return_vectors=True)
        else:
            hits = self.memory.search_many(views, self.k)
        rows = [(w, h) for w, row in enumerate(hits) for h in row]
        threshold = self.classifier.threshold
        if not rows:
            return [Decision(t, None, None, threshold) for t in texts]
        if wants_vectors:
            u = queries[[w for w, _ in rows]]
            v = np.concatenate(keys)
        scores = self.classifier.score_hits([views[w] for w, _ in rows], [h for _, h in rows], u, v)
        if self.reranker is not None:
            scores = self.reranker.rerank(scores, u, v)
        # per text: each candidate edit once, with its best score over the text's views
        merged: list[dict[int, tuple[Any, float, float]]] = [{} for _ in texts]
        for (w, h), score in zip(rows, scores.tolist()):
            if starts_with_prompt(views[w], h.edit.prompt):
                score = max(score, EXACT_SCORE)
            best = merged[owner[w]].get(h.edit.id)
            if best is None or score > best[2]:
                merged[owner[w]][h.edit.id] = (h.edit, float(h.score), float(score))
        held = self.held.versions() if self.held is not None else frozenset()
        decisions = []
        for q, found in enumerate(merged):
            if not found:
                decisions.append(Decision(texts[q], None, None, threshold))
                continue
            ranked = sorted(found.values(), key=lambda c: -c[2])
            cands = tuple(Candidate(e.id, e.version, sim, score) for e, sim, score in ranked)
            edit, _, top = ranked[0]
            if top >= threshold and (edit.id, edit.version) in held:
                decisions.append(Decision(texts[q], None, top, threshold, cands, weights=edit))
            else:
                decisions.append(Decision(texts[q], edit if top >= threshold else None, top, threshold, cands))
        return decisions
