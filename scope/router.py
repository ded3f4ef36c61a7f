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

Edit-key embeddings for the trained head are re-encoded from the edit's prompt (the store keeps its own in SQL but does
not expose them) and cached per (id, version). Query embeddings are needed twice (the store's search and the head's
features): open the store with a :class:`CachingEncoder` (``Router.open`` does) and the second encode is a lookup.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from memory.encoder import Encoder, get_encoder
from memory.errors import ValidationError
from memory.records import EditRecord
from scope.classifier import CosineScope, ScopeClassifier

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

    @property
    def in_scope(self) -> bool:
        return self.edit is not None

    def describe(self) -> str:
        if self.edit is None:
            best = f" (best candidate score {self.score:.3f} < threshold {self.threshold:.3f})" \
                if self.score is not None else " (no candidates)"
            return "no edit" + best
        return (f"edit {self.edit.id} v{self.edit.version} (score {self.score:.3f} >= {self.threshold:.3f}): "
                f"{self.edit.prompt} -> {self.edit.target_new}")


class CachingEncoder:
    """An encoder that remembers its last ``size`` texts: same name, dimension and vectors as the one it wraps."""

    def __init__(self, inner: Encoder, size: int = 1024):
        self.inner = inner
        self.size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        # The vectors of this call are gathered in `found` first: evicting to make room for the new ones must not
        # drop a hit this same call still needs.
        with self._lock:
            found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
            for text in found:
                self._cache.move_to_end(text)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            vectors = self.inner.encode(missing)
            found.update(zip(missing, vectors))
            with self._lock:
                for text, vec in zip(missing, vectors):
                    self._cache[text] = vec
                    self._cache.move_to_end(text)
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
        out = [found[t] for t in texts]
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(out).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"CachingEncoder({self.inner!r})"


class Router:
    """Retrieval + scope for one store (see the module docstring)."""

    def __init__(self, memory: Any, classifier: ScopeClassifier, *, k: int = 5, key_cache: int = 65536):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValidationError(f"k must be a positive integer, got {k!r}")
        classifier.check_encoder(memory.encoder.name)
        self.memory = memory
        self.classifier = classifier
        self.k = k
        self._keys: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._key_cache = key_cache

    @classmethod
    def open(cls, url: str, classifier: ScopeClassifier, *, encoder: str | Encoder | None = None,
             k: int = 5) -> "Router":
        """Open the store at ``url`` with a caching encoder (the classifier's encoder unless ``encoder`` is given)."""
        from memory.store import EditMemory

        name = encoder if encoder is not None else classifier.encoder
        inner = get_encoder(name) if name is not None else None
        memory = EditMemory.open(url, encoder=CachingEncoder(inner) if inner is not None else None)
        if inner is None and not isinstance(memory.encoder, CachingEncoder):
            memory.close()
            memory = EditMemory.open(url, encoder=CachingEncoder(get_encoder(memory.encoder.name)))
        return cls(memory, classifier, k=k)

    def _key_vectors(self, edits: Sequence[EditRecord]) -> np.ndarray:
        keys = [(e.id, e.version) for e in edits]
        missing = {key: e.prompt for key, e in zip(keys, edits) if key not in self._keys}
        if missing:
            vectors = self.memory.encoder.encode(list(missing.values()))
            for key, vec in zip(missing, vectors):
                self._keys[key] = vec
            while len(self._keys) > self._key_cache:
                self._keys.popitem(last=False)
        for key in keys:
            self._keys.move_to_end(key)
        return np.stack([self._keys[key] for key in keys]) if keys else np.zeros((0, self.memory.encoder.dim),
                                                                                  dtype=np.float32)

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
                views.append(view), owner.append(q)
        hits = self.memory.search_many(views, self.k)
        rows = [(w, h) for w, row in enumerate(hits) for h in row]
        threshold = self.classifier.threshold
        if not rows:
            return [Decision(t, None, None, threshold) for t in texts]
        if isinstance(self.classifier, CosineScope):
            scores = np.asarray([h.score for _, h in rows], dtype=np.float32)
        else:
            u_all = self.memory.encoder.encode(views)
            u = u_all[[w for w, _ in rows]]
            v = self._key_vectors([h.edit for _, h in rows])
            scores = self.classifier.score([views[w] for w, _ in rows], u, [h.edit for _, h in rows], v)
        # per text: each candidate edit once, with its best score over the text's views
        merged: list[dict[int, tuple[Any, float, float]]] = [{} for _ in texts]
        for (w, h), score in zip(rows, scores.tolist()):
            if starts_with_prompt(views[w], h.edit.prompt):
                score = max(score, EXACT_SCORE)
            best = merged[owner[w]].get(h.edit.id)
            if best is None or score > best[2]:
                merged[owner[w]][h.edit.id] = (h.edit, float(h.score), float(score))
        decisions = []
        for q, found in enumerate(merged):
            if not found:
                decisions.append(Decision(texts[q], None, None, threshold))
                continue
            ranked = sorted(found.values(), key=lambda c: -c[2])
            cands = tuple(Candidate(e.id, e.version, sim, score) for e, sim, score in ranked)
            edit, _, top = ranked[0]
            decisions.append(Decision(texts[q], edit if top >= threshold else None, top, threshold, cands))
        return decisions
