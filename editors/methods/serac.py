"""``serac``: SERAC-style memory editing (Mitchell et al. 2022) on the editmem store.

Memory: an :class:`memory.store.EditMemory` (default ``sqlite://``, a fresh in-memory store per editor, so the harness
can use it as is; give ``store`` to attach a persistent one). Scope: a saved scope classifier (:mod:`scope`, default
the one named ``default``; train it with ``editmem train-scope``), or ``scope="cosine"`` for the untrained cosine
threshold. Counterfactual model: the model that answers an in-scope query with the retrieved edit in its context
(:mod:`editors.retrieval.augmented`; the context format is a setting). By default a chat adapter trained here under
the name ``default`` or shipped for the model (``editmem train-chat-adapter``, :mod:`editors.retrieval.chat_adapter`),
else the base model itself; ``counterfactual=NAME`` names another adapter or a copy trained to use edits (``editmem
train-counterfactual``, :mod:`editors.retrieval.counterfactual`, which brings its own context format), and
``counterfactual=None`` the base model. ``editor.model`` is the :class:`AugmentedModel` wrapper.

``apply(requests)`` inserts the edits into the store (no training) and returns a :class:`MemoryEditHandle` holding
their store ids; ``restore()`` deletes exactly those edits (tombstones, so the store's history keeps them). The base
model's weights are never touched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from editors.base import EditorSettings, register_editor
from editors.retrieval.augmented import CLOZE_REPLIES, DEFAULT_CLOZE_REPLY, AugmentedModel, context_template
from editors.retrieval.setup import (
    DEFAULT_COUNTERFACTUAL,
    DEFAULT_SCOPE,
    MemoryEditor,
    counterfactual_options,
    load_classifier,
    load_rerankers,
)
from memory.checks import check_choice
from memory.errors import ValidationError
from memory.namespaces import check_namespace
from scope.rerank import DEFAULT_RERANKER

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SeracSettings(EditorSettings):
    """Settings of :class:`SeracEditor`.

    ``store``: store URL (default an in-memory SQLite store of the editor's own). ``scope``: a saved scope classifier
    (name or folder) or ``"cosine"``. ``threshold``: replaces the classifier's calibrated threshold (for ``cosine``
    without a saved calibration: default 0.8). ``encoder``: the store's encoder (default: the classifier's; MiniLM for
    an uncalibrated cosine). ``k``: candidates retrieved per query. ``counterfactual``: the name (or folder) of a
    trained counterfactual model or chat adapter; the default, ``"default"``, is the one trained here under that name,
    else the chat adapter shipped for the model (SmolLM2-135M-Instruct), else the base model; None uses the base
    model (:func:`editors.retrieval.setup.load_counterfactual_model`). ``context``: a format name of
    :data:`editors.retrieval.augmented.CONTEXT_FORMATS` or a template; None means the trained counterfactual model's own
    format, or :data:`editors.retrieval.augmented.DEFAULT_CONTEXT` for the base model. ``namespace``: the store
    namespace the edits are read from and written to. ``cloze_reply``: how an in-scope chat question that is a cloze
    prompt is answered (:data:`editors.retrieval.augmented.CLOZE_REPLIES`: ``complete`` starts the reply with the
    prompt's last sentence, ``free`` lets the model start it). ``reranker``: a relation reranker file (``editmem
    train-relation-rerank``) the router rescores its candidates with; the default, ``"default"``, is the one shipped
    with the package, used behind the shipped scope head only (any other scope routes without it; None turns it off;
    :func:`editors.retrieval.setup.load_rerankers`). ``cross``: a cross-encoder reranker folder (``editmem
    train-rerank``) over the candidates the scope classifier gates (:mod:`scope.router`); default none. With a
    reranker and no ``threshold``, the head's threshold calibrated behind that reranker is used when the file holds
    one for this head (``editmem train-relation-rerank --scope``); a ``threshold`` set replaces it.
    """

    store: str = "sqlite://"
    scope: str = DEFAULT_SCOPE
    threshold: float | None = None
    encoder: str | None = None
    k: int = 5
    counterfactual: str | None = DEFAULT_COUNTERFACTUAL
    context: str | None = None
    namespace: str = "default"
    cloze_reply: str = DEFAULT_CLOZE_REPLY
    reranker: str | None = DEFAULT_RERANKER
    cross: str | None = None

    def __post_init__(self) -> None:
        check_choice("serac", "cloze_reply", self.cloze_reply, CLOZE_REPLIES)
        if not isinstance(self.store, str) or not self.store:
            raise ValidationError(f"serac setting store must be a store URL, got {self.store!r}")
        check_namespace(self.namespace)
        if not isinstance(self.scope, str) or not self.scope:
            raise ValidationError(f"serac setting scope must be a classifier name or 'cosine', got {self.scope!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, (int, float))
                                           or not math.isfinite(self.threshold)):
            raise ValidationError(f"serac setting threshold must be a number or None, got {self.threshold!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValidationError(f"serac setting k must be a positive integer, got {self.k!r}")
        if self.encoder is not None and not isinstance(self.encoder, str):
            raise ValidationError(f"serac setting encoder must be an encoder name, got {self.encoder!r}")
        if self.counterfactual is not None and (not isinstance(self.counterfactual, str) or not self.counterfactual):
            raise ValidationError(f"serac setting counterfactual must be a trained model's name, got "
                                  f"{self.counterfactual!r}")
        if self.context is not None:
            context_template(self.context)
        for key in ("reranker", "cross"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValidationError(f"serac setting {key} must be a path or None, got {value!r}")


@register_editor
class SeracEditor(MemoryEditor):
    """Edits go into a store; a scope classifier routes in-scope queries to the base model conditioned on the edit."""

    name = "serac"
    label = "SERAC"
    Settings = SeracSettings
    settings: SeracSettings

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: SeracSettings | None = None):
        super().__init__(model, tokenizer, settings)
        s = self.settings
        clf = load_classifier(s.scope, threshold=s.threshold)
        options = counterfactual_options(s.counterfactual, model, tokenizer, context=s.context)
        reranker, cross = load_rerankers(s.reranker, s.cross, classifier=clf,
                                         keep_threshold=s.threshold is not None)
        self.open_memory(s.store, s.encoder or clf.encoder, clf, namespace=s.namespace)
        self._wrapper = AugmentedModel(model, tokenizer, self.memory, clf, k=s.k, cloze_reply=s.cloze_reply,
                                       reranker=reranker, cross=cross, **options)

    @property
    def model(self) -> AugmentedModel:
        return self._wrapper
