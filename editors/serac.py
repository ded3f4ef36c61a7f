"""``serac``: SERAC-style memory editing (Mitchell et al. 2022) on the editmem store.

Memory: an :class:`memory.store.EditMemory` (default ``sqlite://``, a fresh in-memory store per editor, so the harness
can use it as is; give ``store`` to attach a persistent one). Scope: a saved scope classifier (:mod:`scope`, default
the one named ``default``; train it with ``editmem train-scope``), or ``scope="cosine"`` for the untrained cosine
threshold. Counterfactual model: the base model itself, prompted with the retrieved edit
(:mod:`editors.augmented`; the context format is a setting), or a copy trained to use edits
(``counterfactual=NAME``, made by ``editmem train-counterfactual``, :mod:`editors.counterfactual`), which then brings
its own context format. ``editor.model`` is the :class:`AugmentedModel` wrapper.

``apply(requests)`` inserts the edits into the store (no training) and returns a :class:`MemoryEditHandle` holding
their store ids; ``restore()`` deletes exactly those edits (tombstones, so the store's history keeps them). The base
model's weights are never touched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from editors.augmented import DEFAULT_CONTEXT, AugmentedModel, context_template
from editors.base import EditHandle, Editor, EditorSettings, EditRequest, check_requests, register_editor
from memory.errors import EditmemError, NotFoundError, ValidationError

log = logging.getLogger(__name__)

DEFAULT_SCOPE = "default"
DEFAULT_COSINE_THRESHOLD = 0.8


@dataclass(frozen=True)
class SeracSettings(EditorSettings):
    """Settings of :class:`SeracEditor`.

    ``store``: store URL (default an in-memory SQLite store of the editor's own). ``scope``: a saved scope classifier
    (name or folder) or ``"cosine"``. ``threshold``: replaces the classifier's calibrated threshold (for ``cosine``
    without a saved calibration: default 0.8). ``encoder``: the store's encoder (default: the classifier's; MiniLM for
    an uncalibrated cosine). ``k``: candidates retrieved per query. ``counterfactual``: the name (or folder) of a
    trained counterfactual model; None uses the base model. ``context``: a format name of
    :data:`editors.augmented.CONTEXT_FORMATS` or a template; None means the trained counterfactual model's own
    format, or :data:`editors.augmented.DEFAULT_CONTEXT` for the base model.
    """

    store: str = "sqlite://"
    scope: str = DEFAULT_SCOPE
    threshold: float | None = None
    encoder: str | None = None
    k: int = 5
    counterfactual: str | None = None
    context: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.store, str) or not self.store:
            raise ValidationError(f"serac setting store must be a store URL, got {self.store!r}")
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


def load_classifier(scope: str, *, threshold: float | None = None, encoder: str | None = None) -> Any:
    """The scope classifier a SERAC setting names: ``"cosine"`` or a saved one (name or folder)."""
    from scope.classifier import CosineScope, load_scope

    if scope == "cosine":
        return CosineScope(DEFAULT_COSINE_THRESHOLD if threshold is None else threshold, None)
    clf = load_scope(scope, encoder=encoder)
    if threshold is not None:
        clf.threshold = float(threshold)
    return clf


class MemoryEditHandle(EditHandle):
    """Undo for memory editors: the store ids (and versions) of the edits one ``apply`` added."""

    def __init__(self, memory: Any, edits: Sequence[tuple[int, int]]):
        self.memory = memory
        self.edits = [(int(i), int(v)) for i, v in edits]
        self.applied = True

    @property
    def ids(self) -> list[int]:
        return [i for i, _ in self.edits]

    def restore(self) -> None:
        """Delete this handle's edits from the store (those already deleted are left alone)."""
        if not self.applied:
            return
        for edit_id, _ in self.edits:
            try:
                current = self.memory.get(edit_id)
            except NotFoundError:
                continue
            if not current.deleted:
                self.memory.delete(edit_id)
        self.applied = False

    def state_dict(self) -> dict[str, Any]:
        return {"store": self.memory.url, "edits": [list(e) for e in self.edits], "applied": self.applied}

    @classmethod
    def load(cls, path: str | Path, memory: Any) -> "MemoryEditHandle":
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if blob.get("kind") != cls.__name__:
            raise EditmemError(f"{path}: not a saved memory edit (kind {blob.get('kind')!r})")
        handle = cls(memory, [tuple(e) for e in blob["state"]["edits"]])
        handle.applied = bool(blob["state"]["applied"])
        return handle


@register_editor
class SeracEditor(Editor):
    """Edits go into a store; a scope classifier routes in-scope queries to the base model conditioned on the edit."""

    name = "serac"
    Settings = SeracSettings
    settings: SeracSettings

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: SeracSettings | None = None):
        super().__init__(model, tokenizer, settings)
        from memory.encoder import get_encoder
        from memory.store import EditMemory

        s = self.settings
        clf = load_classifier(s.scope, threshold=s.threshold)
        encoder_name = s.encoder or clf.encoder
        encoder = get_encoder(encoder_name)
        clf.check_encoder(encoder.name)
        counterfactual, context = None, s.context or DEFAULT_CONTEXT
        if s.counterfactual is not None:
            from editors.counterfactual import load_counterfactual

            counterfactual, trained_context = load_counterfactual(s.counterfactual, model)
            context = s.context or trained_context
        self.memory = EditMemory.open(s.store, encoder=encoder)
        self._wrapper = AugmentedModel(model, tokenizer, self.memory, clf, k=s.k, context=context,
                                       counterfactual=counterfactual)

    @property
    def model(self) -> AugmentedModel:
        return self._wrapper

    def apply(self, requests: Sequence[EditRequest]) -> MemoryEditHandle:
        requests = check_requests(requests, "SERAC")
        records = self.memory.add_many([{"prompt": r.prompt, "target_new": r.target_new, "subject": r.subject,
                                         "ground_truth": r.ground_truth} for r in requests])
        return MemoryEditHandle(self.memory, [(rec.id, rec.version) for rec in records])
