"""Consolidation as the CLI and the HTTP service both run it: write a store's live edits into a saved model's weights,
recompute such a folder from its base, and keep saved folders in step when an edit changes.

How the model is found. The store records every edited model it keeps weight edits for, with the folder it is saved
in (:mod:`editors.weights`; tables ``editmem_weight_*``). The first :func:`consolidate` into a folder loads the base
model (default smollm2-135m), registers the folder with the store and saves the edited model there (a safetensors
folder, loadable with :func:`editors.lm.loading.load_model`). A later one continues from the model in the folder.
:func:`weights_follow` wraps a delete / rollback / update of an edit that some recorded folder holds: it loads that
folder, takes the edit out of its weights exactly (base + the remaining recorded deltas, in order), writes the other
edits of its batch again, and saves the folder; edits with no weight records never load a model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory.checks import check_number
from memory.errors import ValidationError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


def folder_key(folder: str | Path) -> str:
    """How the store names a saved model folder: its absolute, resolved path."""
    return str(Path(folder).expanduser().resolve())


@dataclass
class Consolidated:
    """What one :func:`consolidate` wrote: the weight records, and the edited model's store row."""

    records: list[Any]
    model: Any
    folder: Path

    @property
    def n_edits(self) -> int:
        return sum(len(r.edits) for r in self.records)


@dataclass(frozen=True)
class Plan:
    """A checked consolidation (:func:`plan_consolidation`): where the model comes from and where it goes."""

    method: str
    out: Path
    source: str | Path  # the base model (a new folder) or ``out`` itself (continuing)
    base: str
    model_id: int | None  # the store's row of ``out`` when it is continued
    batch_size: int | None


def plan_consolidation(mem: Any, method: str, out: str | Path, *, model: str | None = None,
                       batch_size: int | None = None) -> Plan:
    """Check everything about a consolidation that can be checked without loading a model (the method, the batch
    size, that there are edits to write, that ``out`` is new, empty or this store's folder for the same base), and
    say where the model comes from. Raises ValidationError with a one-line reason."""
    from editors.base import available_editors

    check_number("consolidate", "batch_size", batch_size, integer=True, optional=True)
    if method not in available_editors():
        raise ValidationError(f"unknown editing method {method!r}; available: {', '.join(available_editors())}")
    if len(mem) == 0:
        raise ValidationError(f"no edits to consolidate: the store {mem.url} is empty")
    from editors.weights import pending_edits

    out = Path(out).expanduser()
    known = mem.weight_models(folder=folder_key(out))
    if known:
        row = known[0]
        if model is not None and model != row.base:
            raise ValidationError(f"{out} holds edits of base model {row.base}, not {model}; "
                                  "use another --out for another base model")
        if not pending_edits(mem, row.id):
            raise ValidationError(f"no edits to consolidate: {out} already holds every live edit of the store")
        return Plan(method, out, out, row.base, row.id, batch_size)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValidationError(f"{out} exists and is not an edited model of this store; give a new or "
                              "empty folder as --out")
    return Plan(method, out, model or DEFAULT_MODEL, str(model or DEFAULT_MODEL), None, batch_size)


def consolidate(mem: Any, method: str, out: str | Path, *, model: str | None = None, batch_size: int | None = None,
                overrides: Mapping[str, Any] | None = None, progress: bool = False) -> Consolidated:
    """Write ``mem``'s live edits that the model saved in ``out`` does not hold yet into its weights with ``method``,
    ``batch_size`` edits per editor call (default all at once), and save the model to ``out``. Everything that can
    be checked is checked before a model is loaded (:func:`plan_consolidation`)."""
    plan = plan_consolidation(mem, method, out, model=model, batch_size=batch_size)
    return run_consolidation(mem, plan, overrides=overrides, progress=progress)


def run_consolidation(mem: Any, plan: Plan, *, overrides: Mapping[str, Any] | None = None,
                      progress: bool = False) -> Consolidated:
    """Carry out a checked :class:`Plan`: load the model, write the pending edits, save the folder."""
    from editors.lm.loading import load_model
    from editors.weights import StoredWeights

    lm, tokenizer = load_model(plan.source)
    stored = StoredWeights.open(mem, lm, tokenizer, base=plan.base, folder=plan.out, model_id=plan.model_id)
    held = len(stored.records())
    written: list[Any] = []
    try:
        written = stored.consolidate(plan.method, batch_size=plan.batch_size, progress=progress,
                                     **dict(overrides or {}))
    finally:
        # Save whatever SQL now records, also after a failed batch; a newly registered folder always holds its
        # model, even with no edits yet.
        if plan.model_id is None or len(stored.records()) != held:
            stored.save(plan.out)
    return Consolidated(written, stored.record, plan.out)


def rebuild_folder(mem: Any, out: str | Path, *, model: str | None = None) -> tuple[str, int]:
    """Recompute the edited model saved in ``out`` from its base (or ``model``) and the store's applied weight
    records, and save it there. Returns the base used and the number of records applied."""
    out = Path(out).expanduser()
    known = mem.weight_models(folder=folder_key(out))
    if not known:
        raise ValidationError(f"{out} is not an edited model of this store")
    row = known[0]
    from editors.lm.loading import load_model
    from editors.weights import rebuild_stored

    base = model or row.base
    lm, tokenizer = load_model(base)
    rebuild_stored(mem, lm, row.id, tokenizer).save(out)  # the weights, and the GRACE adaptor if any
    return base, len(mem.weight_records(model_id=row.id))


@contextmanager
def weights_follow(mem: Any, edit_id: int, report: Callable[[str], None] = log.info) -> Iterator[None]:
    """Wrap a store change to ``edit_id`` (delete, rollback, update): every saved edited model that holds a version
    of it is loaded and checked first (so a missing or changed folder stops the change before it is written), and
    after the change the records it made stale are removed exactly, batch mates written again, and the folder saved.
    Each folder changed is described by one line passed to ``report``; a folder that cannot be followed gives a
    warning. Without weight records for the edit it does nothing (and imports no torch)."""
    records = mem.weight_records(edit_id=edit_id)
    if not records:
        yield
        return
    from editors.lm.loading import load_model
    from editors.weights import StoredWeights

    opened = []
    for model_id in sorted({r.model_id for r in records}):
        row = mem.get_weight_model(model_id)
        if row.folder is None:
            log.warning("edited model %s (base %s) is saved nowhere; its weights are not updated here (use "
                        "editors.weights.StoredWeights.sync_edit in Python)", row.id, row.base)
            continue
        if not Path(row.folder).is_dir():
            raise ValidationError(f"edit {edit_id} is written into the weights saved in {row.folder}, which is "
                                  "missing; restore the folder (or rebuild it: editmem rebuild-weights --out "
                                  f"{row.folder}) before changing the edit")
        lm, tokenizer = load_model(row.folder)
        opened.append(StoredWeights.open(mem, lm, tokenizer, model_id=row.id))
    yield
    for stored in opened:
        result = stored.sync_edit(edit_id)
        if not result.removed:
            continue
        stored.save()
        removed = ", ".join(str(r.id) for r in result.removed)
        line = f"weights in {stored.record.folder}: removed record {removed} (exact)"
        if result.reapplied:
            line += "; wrote batch mates again as record " + ", ".join(
                f"{r.id} (edits {', '.join(str(e) for e in r.edit_ids)})" for r in result.reapplied)
        if result.pending:
            line += f"; edits {', '.join(map(str, result.pending))} are pending (run consolidate)"
        report(line)
