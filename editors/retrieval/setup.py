"""What the memory editors (SERAC, IKE) share: the scope classifier a setting names, the store they open, and the
undo handle that holds the store ids one ``apply`` added."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from editors.base import EditHandle, Editor, EditRequest, check_requests
from editors.retrieval.augmented import AugmentedModel
from memory.errors import EditmemError, NotFoundError

log = logging.getLogger(__name__)

DEFAULT_SCOPE = "default"
DEFAULT_COSINE_THRESHOLD = 0.8
# The counterfactual model SERAC (and the demo) use unless told otherwise: one trained on this machine under this
# name, else the chat adapter shipped for the model (editors/retrieval/default_adapter), else the base model itself.
DEFAULT_COUNTERFACTUAL = "default"


def load_classifier(scope: str, *, threshold: float | None = None, encoder: str | None = None) -> Any:
    """The scope classifier a SERAC setting names: ``"cosine"`` or a saved one (name or folder)."""
    from scope.classifier import CosineScope, load_scope

    if scope == "cosine":
        return CosineScope(DEFAULT_COSINE_THRESHOLD if threshold is None else threshold, None)
    clf = load_scope(scope, encoder=encoder)
    if threshold is not None:
        clf.threshold = float(threshold)
    return clf


def load_rerankers(reranker: str | None, cross: str | None, *, classifier: Any = None,
                   keep_threshold: bool = False) -> tuple[Any, Any]:
    """The relation reranker file and cross-encoder reranker folder a setting names, loaded (None stays None).

    ``"default"`` (:data:`scope.rerank.DEFAULT_RERANKER`) is the relation reranker shipped with the package, used
    only behind the scope head it was calibrated behind (:func:`scope.rerank.default_reranker_for`; any other
    ``classifier`` routes without a reranker). With ``classifier`` and a relation reranker, the classifier takes the
    threshold calibrated behind that reranker when the file holds one for it (``editmem train-relation-rerank
    --scope``), unless ``keep_threshold`` (a threshold the user set); otherwise it keeps its own, with a warning."""
    from scope.cross_rerank import CrossReranker
    from scope.rerank import DEFAULT_RERANKER, PACKAGED_RERANKER, RelationReranker, default_reranker_for

    relation = None
    if reranker == DEFAULT_RERANKER:
        relation = (default_reranker_for(classifier) if classifier is not None
                    else RelationReranker.load(PACKAGED_RERANKER))
    elif reranker is not None:
        relation = RelationReranker.load(reranker)
    if relation is not None and classifier is not None and not keep_threshold:
        behind = relation.threshold_for(classifier)
        if behind is None:
            log.warning("the relation reranker %s was not calibrated behind scope %r: routing keeps its own threshold "
                        "%.4f (editmem train-relation-rerank --scope calibrates one)", reranker,
                        classifier.info.get("name", classifier.kind), classifier.threshold)
        else:
            classifier.threshold = behind
    return relation, CrossReranker.load(cross) if cross is not None else None


def load_counterfactual_model(name: str | None, model: torch.nn.Module,
                              tokenizer: Any) -> tuple[torch.nn.Module | None, str | None, str | None]:
    """The counterfactual model a setting names, as ``(model, plain context template, chat context)``.

    ``None`` is the base model itself (``(None, None, None)``). A name (or folder) holds either a full counterfactual
    model (:mod:`editors.retrieval.counterfactual`, which brings its plain context template) or a chat adapter
    (:mod:`editors.retrieval.chat_adapter`, which brings its chat context). :data:`DEFAULT_COUNTERFACTUAL`, when
    nothing of that name was trained here, is the shipped chat adapter if it was trained for ``model`` and the
    tokenizer has a chat template, and the base model otherwise. A chat adapter answers chat-framed rows only (the
    wrapper's ``counterfactual_rows="chat"``): plain rows go to the base model with the plain context."""
    if name is None:
        return None, None, None
    from editors.lm.chat import chat_frame
    from editors.retrieval.chat_adapter import SHIPPED_DIR, is_chat_adapter, load_chat_adapter, shipped_adapter_fits
    from editors.retrieval.counterfactual import counterfactual_dir, load_counterfactual

    folder = counterfactual_dir(name)
    if name == DEFAULT_COUNTERFACTUAL and not (folder / "meta.json").is_file():
        if chat_frame(tokenizer) is None or not shipped_adapter_fits(model):
            return None, None, None
        folder = SHIPPED_DIR
    if is_chat_adapter(folder):
        cf, chat_context = load_chat_adapter(folder, model)
        return cf, None, chat_context
    cf, template = load_counterfactual(folder, model)
    return cf, template, None


def counterfactual_options(name: str | None, model: torch.nn.Module, tokenizer: Any, *,
                           context: str | None = None) -> dict[str, Any]:
    """The :class:`~editors.retrieval.augmented.AugmentedModel` keyword arguments for the counterfactual model
    ``name`` names (:func:`load_counterfactual_model`): the model, the plain context (``context`` if given, else a
    trained model's own, else the default), the chat context and which rows the model answers (a chat adapter: chat
    rows only)."""
    from editors.retrieval.augmented import DEFAULT_CHAT_CONTEXT, DEFAULT_CONTEXT

    counterfactual, trained_context, chat_context = load_counterfactual_model(name, model, tokenizer)
    return {"counterfactual": counterfactual, "context": context or trained_context or DEFAULT_CONTEXT,
            "chat_context": chat_context or DEFAULT_CHAT_CONTEXT,
            "counterfactual_rows": "chat" if chat_context else "all"}


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
    def load(cls, path: str | Path, memory: Any) -> MemoryEditHandle:
        edits, applied = cls.read_saved(path, EditmemError(f"{path}: not a saved memory edit"))
        handle = cls(memory, edits)
        handle.applied = applied
        return handle

    @classmethod
    def read_saved(cls, path: str | Path, wrong_kind: EditmemError) -> tuple[list[tuple[int, int]], bool]:
        """The ``(edit id, version)`` pairs and the applied flag of a file saved by a handle of class ``cls``;
        ``wrong_kind``, with the kind found added, when the file holds another kind."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if blob.get("kind") != cls.__name__:
            raise type(wrong_kind)(f"{wrong_kind} (kind {blob.get('kind')!r})")
        return [(int(i), int(v)) for i, v in blob["state"]["edits"]], bool(blob["state"]["applied"])


class MemoryEditor(Editor):
    """Base of the editors whose edits live in a store: ``apply`` inserts them, the handle tombstones them."""

    memory: Any
    label = "memory"  # the method's name in error messages

    _wrapper: AugmentedModel  # each memory editor builds its wrapper (an AugmentedModel or a subclass)

    @property
    def model(self) -> AugmentedModel:
        """The memory-augmented wrapper: routes every input through the store before the model sees it."""
        return self._wrapper

    @classmethod
    def query_settings(cls, *, store: str, encoder: str, scope: str, threshold: float | None, k: int,
                       **options: Any) -> dict[str, Any]:
        """The settings that answer questions on ``store`` (encoded by ``encoder``) through this editor: ``k``
        candidates per query, and the method's own ``options`` (those it does not know are refused by its
        settings). Each memory editor maps the shared names onto its own settings."""
        return {"store": store, "encoder": encoder, "scope": scope, "threshold": threshold, "k": k,
                **{key: value for key, value in options.items() if value is not None}}

    @classmethod
    def scope_in_use(cls, settings: Any) -> str | None:
        """The scope classifier name these settings route with (None: none is loaded). Memory editors that load one
        only in some modes override this."""
        return getattr(settings, "scope", None)

    @classmethod
    def check_ready(cls, overrides: Mapping[str, Any]) -> None:
        """Before any model loads: validate the settings ``overrides`` and check that the scope classifier they
        route with is saved (ScopeError saying what to run otherwise)."""
        settings = cls.Settings.with_overrides(cls.Settings(), dict(overrides))
        scope = cls.scope_in_use(settings)
        if isinstance(scope, str) and scope != "cosine":
            load_classifier(scope)
        reranker, cross = getattr(settings, "reranker", None), getattr(settings, "cross", None)
        if reranker is not None or cross is not None:
            load_rerankers(reranker, cross)

    def open_memory(self, store: str, encoder: str | None, classifier: Any, *, namespace: str = "default") -> Any:
        """Open ``store``'s ``namespace`` with the encoder ``encoder`` (None: the store's own, or MiniLM for a new
        store), after checking that ``classifier`` was trained on that encoder."""
        from memory.encoder import DEFAULT_ENCODER, get_encoder
        from memory.store import EditMemory

        embedder = get_encoder(encoder or DEFAULT_ENCODER)
        classifier.check_encoder(embedder.name)
        self.memory = EditMemory.open(store, encoder=embedder, namespace=namespace)
        return self.memory

    def apply(self, requests: Sequence[EditRequest]) -> MemoryEditHandle:
        requests = check_requests(requests, self.label)
        records = self.memory.add_many([{"prompt": r.prompt, "target_new": r.target_new, "subject": r.subject,
                                         "ground_truth": r.ground_truth} for r in requests])
        return MemoryEditHandle(self.memory, [(rec.id, rec.version) for rec in records])
