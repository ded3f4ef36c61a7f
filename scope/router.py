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

On an HNSW index the router searches deeper than a plain search (``ef_search``, default :data:`ROUTE_EF_SEARCH`):
a query whose own edit the graph misses cannot be routed to it whatever the scoring does.

An optional reranker (:class:`scope.rerank.RelationReranker`) rescales each candidate's score by how well what the
query asks agrees with what the edit asks, from the same vectors; the exact-prompt rule still applies after it.

An optional cross-encoder (``cross=``, :class:`scope.cross_rerank.CrossReranker`) then reads the query and the edit
prompt together, for the gated candidates only (at or above the threshold, and with a margin the best one just below
it: :meth:`~scope.cross_rerank.CrossReranker.gate`): the gated candidate with the best combined score (scope score x
cross score, :meth:`~scope.cross_rerank.CrossReranker.combine`) is chosen if that reaches the cross-encoder's
threshold, else none. A query with no gated candidate, or one that begins with an edit's own prompt, is decided
without it. This is the one place the router reads text again.

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

from memory.checks import check_number
from memory.encoder import Encoder
from memory.errors import ValidationError
from memory.feed import change_number
from memory.records import EditRecord
from scope.classifier import ScopeClassifier

log = logging.getLogger(__name__)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
MIN_VIEW_WORDS = 3
EXACT_SCORE = 1.0
# The HNSW search depth routing uses, deeper than a plain search's (memory.index.HNSW_EF_SEARCH, 224): CounterFact's
# keys are many near-ties, and at 256 the graph misses a rephrase's own edit often enough to cost routing a point of
# recall at 21,919 edits (0.979 -> 0.988 at 1,024; 2,048 equals exact search). At 750,000 edits 1,024 adds about 8 ms
# over the encoder, 2,048 about 17 (BENCHMARKS.md "Store at scale" round 12); at 1,000,000 a whole routing with the
# shipped head and relation reranker, encoding included, took 20-22 ms at the median (round 13, quiet). A flat index
# is exact either way.
ROUTE_EF_SEARCH: int | None = 1024


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
    cross: float | None = None  # the cross-encoder's score, for a candidate it read


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
        score = self.score if self.score is not None else float("nan")
        how = f">= {self.threshold:.3f}" if score >= self.threshold else \
            f"< {self.threshold:.3f}, chosen by the cross-encoder"
        return f"edit {self.edit.id} v{self.edit.version} (score {score:.3f} {how}): {self.edit.prompt} -> " \
               f"{self.edit.target_new}"


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
    hold (:class:`HeldEdits`), not gated; settable after construction. ``cross``: the cross-encoder reranker.
    ``ef_search``: the HNSW search depth of the router's searches (None: the index's own)."""

    def __init__(self, memory: Any, classifier: ScopeClassifier, *, k: int = 5, reranker: Any = None,
                 held: HeldEdits | None = None, cross: Any = None, ef_search: int | None = ROUTE_EF_SEARCH):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValidationError(f"k must be a positive integer, got {k!r}")
        check_number("router", "ef_search", ef_search, integer=True, minimum=1, strict=False, optional=True)
        self.ef_search = ef_search  # the search depth on an HNSW index (None: the index's own)
        classifier.check_encoder(memory.encoder.name)
        self.memory = memory
        self.classifier = classifier
        self.k = k
        if reranker is not None and reranker.encoder != memory.encoder.name:
            raise ValidationError(f"reranker was trained on {reranker.encoder} embeddings, the store's encoder is "
                                  f"{memory.encoder.name}")
        self.reranker = reranker
        self.held = held
        self.cross = cross  # a scope.cross_rerank.CrossReranker, or anything with .gate, .score and .threshold

    @classmethod
    def open(cls, url: str, classifier: ScopeClassifier, *, encoder: str | Encoder | None = None,
             k: int = 5, reranker: Any = None, cross: Any = None) -> Router:
        """Open the store at ``url`` with ``encoder``, else the classifier's encoder, else the store's own."""
        from memory.store import EditMemory

        return cls(EditMemory.open(url, encoder=encoder if encoder is not None else classifier.encoder), classifier,
                   k=k, reranker=reranker, cross=cross)

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
            hits, queries, keys = self.memory.search_many(views, self.k, return_vectors=True, ef_search=self.ef_search)
        else:
            hits = self.memory.search_many(views, self.k, ef_search=self.ef_search)
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
        # per text: each candidate edit once, with its best score over the text's views (and whether a view begins
        # with its prompt)
        merged: list[dict[int, tuple[Any, float, float, bool]]] = [{} for _ in texts]
        for (w, h), score in zip(rows, scores.tolist()):
            exact = starts_with_prompt(views[w], h.edit.prompt)
            if exact:
                score = max(score, EXACT_SCORE)
            best = merged[owner[w]].get(h.edit.id)
            if best is None or score > best[2]:
                merged[owner[w]][h.edit.id] = (h.edit, float(h.score), float(score), exact or bool(best and best[3]))
            elif exact:
                merged[owner[w]][h.edit.id] = (*best[:3], True)
        ranked_all = [sorted(found.values(), key=lambda c: -c[2]) for found in merged]
        held = self.held.versions() if self.held is not None else frozenset()
        if self.cross is not None:
            return self._decide_cross(texts, ranked_all, threshold, held)
        decisions = []
        for q, ranked in enumerate(ranked_all):
            if not ranked:
                decisions.append(Decision(texts[q], None, None, threshold))
                continue
            cands = tuple(Candidate(e.id, e.version, sim, score) for e, sim, score, _ in ranked)
            edit, _, top, _ = ranked[0]
            decisions.append(self._decision(texts[q], edit if top >= threshold else None, top, threshold, cands,
                                            held))
        return decisions

    @staticmethod
    def _decision(text: str, edit: EditRecord | None, score: float, threshold: float,
                  cands: tuple[Candidate, ...], held: frozenset[tuple[int, int]]) -> Decision:
        """The decision for a chosen edit (or none), left to the weights when they hold its current version."""
        if edit is not None and (edit.id, edit.version) in held:
            return Decision(text, None, score, threshold, cands, weights=edit)
        return Decision(text, edit, score, threshold, cands)

    def _decide_cross(self, texts: list[str], ranked_all: list[list[tuple[Any, float, float, bool]]],
                      threshold: float, held: frozenset[tuple[int, int]]) -> list[Decision]:
        """Decisions with the cross-encoder over each text's gated candidates (one batched call for all texts)."""
        pairs: list[tuple[int, int]] = []  # (text, candidate index) read by the cross-encoder
        exact_pick: dict[int, int] = {}
        for q, ranked in enumerate(ranked_all):
            exact = [i for i, c in enumerate(ranked) if c[3]]
            if exact:  # in the scope of its own prompt's edit by definition
                exact_pick[q] = exact[0]
                continue
            pairs.extend((q, i) for i in self.cross.gate([c[2] for c in ranked], threshold))
        cross_scores = self.cross.score([texts[q] for q, _ in pairs], [ranked_all[q][i][0].prompt for q, i in pairs]) \
            if pairs else []
        combined = self.cross.combine([ranked_all[q][i][2] for q, i in pairs], cross_scores) if pairs else []
        by_text: dict[int, dict[int, float]] = {}  # text -> candidate -> combined score
        raw: dict[tuple[int, int], float] = {}
        for (q, i), c, x in zip(pairs, list(combined), list(cross_scores)):
            by_text.setdefault(q, {})[i] = float(c)
            raw[q, i] = float(x)
        decisions = []
        for q, ranked in enumerate(ranked_all):
            if not ranked:
                decisions.append(Decision(texts[q], None, None, threshold))
                continue
            read = by_text.get(q, {})
            cands = tuple(Candidate(e.id, e.version, sim, score, raw.get((q, i))) for i, (e, sim, score, _) in
                          enumerate(ranked))
            if q in exact_pick:
                pick: int | None = exact_pick[q]
            else:
                best = max(read, key=lambda i: read[i], default=None)
                pick = best if best is not None and read[best] >= self.cross.threshold else None
            if pick is None:
                decisions.append(Decision(texts[q], None, ranked[0][2], threshold, cands))
            else:
                decisions.append(self._decision(texts[q], ranked[pick][0], ranked[pick][2], threshold, cands, held))
        return decisions
