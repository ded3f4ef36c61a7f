"""The one small protocol every editor follows, the undo contract, and the registry of editors by name.

An editor is built with ``get_editor(name, model, tokenizer, **overrides)``. ``editor.apply(requests)`` changes what
``editor.model`` answers and returns an :class:`EditHandle`; ``handle.restore()`` undoes exactly that change. The
harness only ever calls ``editor.model`` (an HF-style causal LM: ``model(input_ids=..., attention_mask=...).logits``
and ``model.generate(...)``), so it needs to know nothing about any particular method.

Weight editors compute their update without touching the model, then write it through :class:`WeightEditHandle`,
which keeps the original tensors so ``restore()`` is bit-identical.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from memory.errors import EditmemError, ValidationError
from memory.records import EditRequest

log = logging.getLogger(__name__)


def check_requests(requests: Sequence[EditRequest], method: str, *, need_subject: bool = False) -> list[EditRequest]:
    """The requests as a list; :class:`ValidationError` if there are none, one is not an :class:`EditRequest`, or
    (with ``need_subject``) one has no subject, naming ``method`` in the message."""
    requests = list(requests)
    if not requests:
        raise ValidationError("no edit requests given")
    for request in requests:
        if not isinstance(request, EditRequest):
            raise ValidationError(f"expected EditRequest objects, got {type(request).__name__}")
        if need_subject and not request.subject:
            raise ValidationError(f"{method} needs the subject: the edit request for {request.prompt!r} has none "
                                  "(the subject is where the fact is located and written)")
    return requests


class EditHandle(ABC):
    """What ``apply`` returns: enough to undo the edit exactly, and to save it and apply it again later."""

    @abstractmethod
    def restore(self) -> None:
        """Undo the edit. Calling it twice is an error-free no-op."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the handle (tensors allowed); see :meth:`save`."""

    def save(self, path: str | Path) -> None:
        torch.save({"kind": type(self).__name__, "state": self.state_dict()}, Path(path))


class WeightEditHandle(EditHandle):
    """Undo for weight editors: the original and the edited value of every touched parameter.

    ``restore()`` copies the originals back (bit-identical); ``reapply()`` writes the edited values again.
    """

    def __init__(self, model: torch.nn.Module, originals: Mapping[str, torch.Tensor],
                 edited: Mapping[str, torch.Tensor]):
        if set(originals) != set(edited):
            raise ValueError("originals and edited must name the same parameters")
        self.model = model
        self.originals = {k: v.detach().clone() for k, v in originals.items()}
        self.edited = {k: v.detach().clone() for k, v in edited.items()}
        self.applied = False

    @classmethod
    def write(cls, model: torch.nn.Module, new_values: Mapping[str, torch.Tensor]) -> WeightEditHandle:
        """Apply ``new_values`` (parameter name -> full new tensor) to ``model`` and return the handle undoing it."""
        params = dict(model.named_parameters())
        unknown = [k for k in new_values if k not in params]
        if unknown:
            raise KeyError(f"the model has no parameter(s) {unknown}")
        originals = {k: params[k].detach().clone() for k in new_values}
        handle = cls(model, originals, new_values)
        handle.reapply()
        return handle

    @classmethod
    def add_deltas(cls, model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> WeightEditHandle:
        """Add ``deltas`` (parameter name -> tensor of the same shape) to ``model``; return the handle undoing it."""
        params = dict(model.named_parameters())
        new_values = {}
        for name, delta in deltas.items():
            if name not in params:
                raise KeyError(f"the model has no parameter {name!r}")
            p = params[name]
            if tuple(delta.shape) != tuple(p.shape):
                raise ValueError(f"delta for {name} has shape {tuple(delta.shape)}, parameter has {tuple(p.shape)}")
            new_values[name] = p.detach() + delta.to(device=p.device, dtype=p.dtype)
        return cls.write(model, new_values)

    def _copy_in(self, values: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))

    def reapply(self) -> None:
        self._copy_in(self.edited)
        self.applied = True

    def restore(self) -> None:
        if self.applied:
            self._copy_in(self.originals)
            self.applied = False

    def release(self) -> None:
        """Put the original weights back but keep whatever else the edit left in its editor (AlphaEdit's kept keys):
        for a caller that writes the same change into the weights itself (:meth:`editors.weights.StoredWeights.apply`).
        For a plain weight edit it is :meth:`restore`."""
        WeightEditHandle.restore(self)

    def absorb(self, later: WeightEditHandle) -> None:
        """Become the handle of this edit followed by ``later`` (applied after it, to the same model): ``restore()``
        then puts back what was there before this edit, exactly as restoring ``later`` and then this one would, and
        ``reapply()`` writes the state after ``later``. Each parameter's original is kept once however many edits
        touch it, which is what keeps a long sequential run's undo at the size of the touched weights."""
        if later.model is not self.model:
            raise ValueError("only a handle of the same model can be absorbed")
        if not (self.applied and later.applied):
            raise ValueError("both handles must be applied")
        for name, value in later.originals.items():
            self.originals.setdefault(name, value)
        self.edited.update(later.edited)
        later.applied = False  # its undo now lives here; restoring it as well would be wrong

    def state_dict(self) -> dict[str, Any]:
        return {"originals": {k: v.cpu() for k, v in self.originals.items()},
                "edited": {k: v.cpu() for k, v in self.edited.items()}}

    @classmethod
    def _from_state(cls, model: torch.nn.Module, state: Mapping[str, Any]) -> WeightEditHandle:
        """The handle (not applied) from :meth:`state_dict`'s output; subclasses with more state override it."""
        return cls(model, state["originals"], state["edited"])

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module, *, apply: bool = True) -> WeightEditHandle:
        """Rebuild a saved handle for ``model`` (by default writing the edit into it again)."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if blob.get("kind") != cls.__name__:
            raise EditmemError(f"{path}: not a saved weight edit (kind {blob.get('kind')!r})")
        params = dict(model.named_parameters())
        for name, value in blob["state"]["originals"].items():
            if name not in params or tuple(params[name].shape) != tuple(value.shape):
                raise EditmemError(f"{path}: the saved edit touches {name!r}, which this model does not have "
                                   "in that shape; it was made for another model")
        handle = cls._from_state(model, blob["state"])
        if apply:
            handle.reapply()
        return handle


class NullHandle(EditHandle):
    """The handle of an edit that changed nothing (the ``none`` baseline)."""

    def restore(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class EditorSettings:
    """Base for each editor's settings. Subclasses are frozen dataclasses that validate in ``__post_init__``."""

    @classmethod
    def with_overrides(cls, base: EditorSettings, overrides: Mapping[str, Any]) -> EditorSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValidationError(f"unknown setting(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
        return dataclasses.replace(base, **overrides)


class Editor(ABC):
    """One editing method. Subclasses set ``name`` and ``Settings`` and register with :func:`register_editor`."""

    name: ClassVar[str]
    Settings: ClassVar[type[EditorSettings]] = EditorSettings

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: EditorSettings | None = None):
        self.base_model = model
        self.tokenizer = tokenizer
        self.settings = settings if settings is not None else self.default_settings(model)

    @classmethod
    def default_settings(cls, model: torch.nn.Module) -> EditorSettings:
        """Settings that are right for this model's architecture. Override where they depend on it."""
        return cls.Settings()

    @property
    def model(self) -> torch.nn.Module:
        """What answers after an edit: the edited model itself, or a wrapper that routes through memory."""
        return self.base_model

    @abstractmethod
    def apply(self, requests: Sequence[EditRequest]) -> EditHandle:
        """Make every request hold at once and return the handle that undoes it."""


_REGISTRY: dict[str, type[Editor]] = {}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Class decorator: add an editor under ``cls.name``. A bad or duplicate name is refused loudly."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not name.replace("-", "_").isidentifier():
        raise ValueError(f"{cls.__qualname__} needs a class attribute `name` like 'rome' or 'ft' (got {name!r})")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"an editor named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls
    return cls


def available_editors() -> list[str]:
    _load_builtin_editors()
    return sorted(_REGISTRY)


def editor_class(name: str) -> type[Editor]:
    """The editor class registered as ``name``; :class:`ValidationError` naming the available ones otherwise."""
    _load_builtin_editors()
    if name not in _REGISTRY:
        raise ValidationError(f"unknown editing method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_editor(name: str, model: torch.nn.Module, tokenizer: Any, **overrides: Any) -> Editor:
    """Build the editor registered as ``name`` for ``model``, its defaults adjusted by ``overrides``."""
    cls = editor_class(name)
    settings = cls.Settings.with_overrides(cls.default_settings(model), overrides) if overrides else None
    return cls(model, tokenizer, settings)


METHODS_PACKAGE = "editors.methods"


def _load_builtin_editors() -> None:
    """Import every module and subpackage of :mod:`editors.methods` once, so each registers itself: a new editor is
    one new file there, nothing else. Importing ``editors`` alone does no such work."""
    import importlib
    import pkgutil

    package = importlib.import_module(METHODS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{METHODS_PACKAGE}.{info.name}")
