"""Consolidation as the CLI and the HTTP service both run it: write a store's live edits into a saved model's weights,
recompute such a folder from its base, and keep saved folders in step when an edit changes.

How the model is found. The store records every edited model it keeps weight edits for, with the folder it is saved
in (:mod:`editors.weights`; tables ``editmem_weight_*``). The first :func:`consolidate` into a folder loads the base
model (default smollm2-135m), registers the folder with the store and saves the edited model there (a safetensors
folder, loadable with :func:`editors.lm.loading.load_model`). A later one continues from the model in the folder.
:func:`weights_follow` wraps a delete / rollback / update of an edit that some recorded folder holds: it loads that
folder, takes the edit out of its weights exactly (base + the remaining recorded deltas, in order), writes the other
edits of its batch again, and saves the folder; edits with no weight records never load a model.

Memory first, the weights as the fallback (``every``). With ``every=N`` a consolidation writes only the *oldest*
pending edits (:func:`editors.weights.due_edits`), in whole groups of N (one editor call and one weight record each),
and leaves fewer than N answering from memory; with fewer than N pending it does nothing (:class:`NothingDue`).
Served through the memory router, the edits the folder's weights hold are not gated (:func:`held_edits`,
:class:`scope.router.HeldEdits`): the weights answer them. :class:`LiveWeights` does the same for a model object a
server keeps loaded: it follows the store's records for its folder in place, and consolidates due edits into it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memory.checks import check_number
from memory.errors import ValidationError

if TYPE_CHECKING:
    from scope.router import HeldEdits

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
    every: int | None = None  # only whole groups of the oldest pending edits, ``every`` per editor call


class NothingDue(ValidationError):
    """A consolidation with ``every`` found fewer than ``every`` pending edits: nothing is written, they keep
    answering from memory. Not a failure of the policy (``editmem consolidate --every`` exits 0)."""


def plan_consolidation(mem: Any, method: str, out: str | Path, *, model: str | None = None,
                       batch_size: int | None = None, every: int | None = None) -> Plan:
    """Check everything about a consolidation that can be checked without loading a model (the method, the batch
    size, that there are edits to write, that ``out`` is new, empty or this store's folder for the same base), and
    say where the model comes from. Raises ValidationError with a one-line reason; with ``every``,
    :class:`NothingDue` while fewer than ``every`` edits are pending."""
    from editors.base import available_editors

    check_number("consolidate", "batch_size", batch_size, integer=True, optional=True)
    check_number("consolidate", "every", every, integer=True, optional=True)
    if every is not None and batch_size is not None:
        raise ValidationError("give batch_size or every, not both: with every, each group of every edits is one "
                              "editor call")
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
        pending = len(pending_edits(mem, row.id))
        if every is None and not pending:
            raise ValidationError(f"no edits to consolidate: {out} already holds every live edit of the store")
        _check_due(pending, every)
        return Plan(method, out, out, row.base, row.id, every or batch_size, every)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValidationError(f"{out} exists and is not an edited model of this store; give a new or "
                              "empty folder as --out")
    _check_due(len(mem), every)
    return Plan(method, out, model or DEFAULT_MODEL, str(model or DEFAULT_MODEL), None, every or batch_size, every)


def _check_due(pending: int, every: int | None) -> None:
    if every is not None and pending < every:
        raise NothingDue(f"nothing due: {pending} edit(s) pending, fewer than every={every}; they keep answering "
                         "from memory")


def consolidate(mem: Any, method: str, out: str | Path, *, model: str | None = None, batch_size: int | None = None,
                every: int | None = None, overrides: Mapping[str, Any] | None = None,
                progress: bool = False) -> Consolidated:
    """Write ``mem``'s live edits that the model saved in ``out`` does not hold yet into its weights with ``method``,
    ``batch_size`` edits per editor call (default all at once), and save the model to ``out``. ``every``: only the
    oldest pending edits in whole groups of ``every`` (module docstring). Everything that can be checked is checked
    before a model is loaded (:func:`plan_consolidation`)."""
    plan = plan_consolidation(mem, method, out, model=model, batch_size=batch_size, every=every)
    return run_consolidation(mem, plan, overrides=overrides, progress=progress)


def run_consolidation(mem: Any, plan: Plan, *, overrides: Mapping[str, Any] | None = None,
                      progress: bool = False) -> Consolidated:
    """Carry out a checked :class:`Plan`: load the model, write the pending edits (with ``every``: the due ones,
    chosen now), save the folder."""
    from editors.lm.loading import load_model
    from editors.weights import StoredWeights, due_edits

    lm, tokenizer = load_model(plan.source)
    stored = StoredWeights.open(mem, lm, tokenizer, base=plan.base, folder=plan.out, model_id=plan.model_id)
    held = len(stored.records())
    written: list[Any] = []
    try:
        chosen = None
        if plan.every is not None:  # chosen now: the store may have changed since the plan
            chosen = [r.id for r in due_edits(mem, stored.record.id, plan.every)]
        if chosen != []:
            written = stored.consolidate(plan.method, batch_size=plan.batch_size, progress=progress,
                                         edit_ids=chosen, **dict(overrides or {}))
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


def delete_following(mem: Any, ids: Sequence[int], report: Callable[[str], None] = log.info, *,
                     progress: bool = False) -> list[Any]:
    """Delete ``ids``: in one transaction (``mem.delete_many``, all or none) when no saved edited model holds any of
    them; otherwise one at a time, each inside :func:`weights_follow` so the saved weights follow it exactly. Returns
    the tombstones in the order of ``ids``. What the CLI's ``editmem delete`` and the service's bulk delete share."""
    if len(ids) > 1 and {e for r in mem.weight_records() for e in r.edit_ids}.isdisjoint(ids):  # one read for all
        return list(mem.delete_many(ids, progress=progress))
    out = []
    for edit_id in ids:
        with weights_follow(mem, edit_id, report=report):
            out.append(mem.delete(edit_id))
    return out


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


def held_edits(mem: Any, folder: str | Path) -> HeldEdits | None:
    """What the router leaves to the weights of a model loaded from ``folder``: the edit versions its applied weight
    records hold (:class:`scope.router.HeldEdits`, pinned to those the folder holds now: a model loaded from it and
    not written in this process), or None when ``folder`` is not an edited model of this store (a base model, an
    alias)."""
    from scope.router import HeldEdits

    path = Path(folder).expanduser()
    if not path.is_dir():
        return None
    known = mem.weight_models(folder=folder_key(path))
    if not known:
        return None
    return HeldEdits(mem, known[0].id, loaded=mem.held_versions(known[0].id))  # what the folder holds as loaded


class LiveWeights:
    """A model object a server keeps loaded, kept equal to the store's weight records of one edited model folder,
    and the policy that moves the oldest pending edits into it (memory first, the weights as the fallback).

    :meth:`open` makes the model base + the folder's applied deltas in place (it may be the folder's model or its
    base model) or, for a new folder, registers the model as its base and saves it there. :meth:`follow` brings the
    model object up to the store's applied records (after a consolidation, or a delete/rollback/update that took an
    edit out of the folder's weights): each parameter those records touch becomes base + the applied deltas, exactly
    as the folder holds it, written while holding ``lock`` (the lock the server's generate calls hold, so no
    generation sees half-written weights). :meth:`consolidate_due` writes the due edits (:func:`due_edits`) into the
    folder as ``editmem consolidate --every`` does, on a copy loaded from the folder (generation goes on meanwhile),
    then follows. ``held`` is what the router leaves to these weights. GRACE records (a codebook adaptor, not
    parameters) are followed too: the adaptor is replayed from the applied records aside and swapped in under
    ``lock``."""

    def __init__(self, stored: Any, folder: Path, lock: Any):
        import threading

        self.stored = stored
        self.folder = folder
        self.lock = lock
        from scope.router import HeldEdits

        self._records: dict[int, Any] = {}
        self._sync = threading.Lock()  # one follow at a time
        self.held = HeldEdits(stored.mem, stored.record.id, loaded=())
        self.consolidations = 0  # consolidations this object made (not counting other processes')
        self._policy = threading.Lock()  # guards the two flags below (claim / run_due)
        self._running = False  # a run_due is queued or running
        self._again = False  # a write came in while it ran: look once more before stopping

    @property
    def model_id(self) -> int:
        return int(self.stored.record.id)

    @classmethod
    def open(cls, mem: Any, model: Any, tokenizer: Any, folder: str | Path, *, base: str,
             lock: Any = None) -> LiveWeights:
        import threading

        from editors.weights import StoredWeights

        folder = Path(folder).expanduser()
        known = mem.weight_models(folder=folder_key(folder))
        if known:
            stored = StoredWeights.open(mem, model, tokenizer, model_id=known[0].id, verify=False)
        else:
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise ValidationError(f"{folder} exists and is not an edited model of this store; give a new or "
                                      "empty folder (the served model becomes its base)")
            stored = StoredWeights.open(mem, model, tokenizer, base=base, folder=folder)
            stored.save(folder)
        live = cls(stored, folder, lock if lock is not None else threading.Lock())
        live.follow(everything=True)
        return live

    def follow(self, *, everything: bool = False) -> bool:
        """Bring the model object up to the store's applied weight records of its folder (see the class docstring);
        ``everything``: rewrite every touched parameter, not only those of records added or removed since the last
        call. Returns whether anything was written."""
        with self._sync:
            return self._follow(everything)

    def _follow(self, everything: bool) -> bool:
        from editors.adaptors import is_adaptor_record

        mem = self.stored.mem
        applied = {r.id: r for r in mem.weight_records(model_id=self.model_id)}
        changed = set(applied) ^ set(self._records)
        if not changed and not everything:
            return False
        if everything:
            params = set(self.stored.touched())
        else:
            params = {p for rid in changed for p in (applied.get(rid) or self._records[rid]).params}
        adaptor = everything or any(is_adaptor_record(applied.get(rid) or self._records[rid]) for rid in changed)
        book = self.stored.replayed_adaptor(list(applied.values())) if adaptor else None  # built before the lock
        with self.lock:
            self.stored.realize(sorted(params))
            if adaptor:
                self.stored.install_adaptor(book)
            self.held.loaded = frozenset((e, v) for r in applied.values() for e, v in r.edits)
        self._records = applied
        return True

    def due(self, every: int) -> int:
        """How many edits a consolidation with ``every`` would write now."""
        from editors.weights import due_edits

        return len(due_edits(self.stored.mem, self.model_id, every))

    def pending(self) -> int:
        """Live edits the folder's weights do not hold (answering from memory)."""
        from editors.weights import pending_edits

        return len(pending_edits(self.stored.mem, self.model_id))

    def claim(self, every: int) -> bool:
        """After a write: whether the caller should start a :meth:`run_due` now (``every`` or more edits are due and
        none is queued or running; the caller must then run it). A write while one runs makes it look again."""
        with self._policy:
            if self._running:
                self._again = True
                return False
            if not self.due(every):
                return False
            self._running = True
            return True

    def run_due(self, open_store: Callable[[], Any], every: int, method: str, *,
                overrides: Mapping[str, Any] | None = None, lock: Any = None) -> list[Any]:
        """What a :meth:`claim` starts (in a background job): :meth:`consolidate_due` on a store handle of its own
        (``open_store()``, closed after), once more whenever a write came in meanwhile, holding ``lock`` (the one
        every writer of saved model folders takes) while it writes. Returns the weight records written."""
        import contextlib

        records: list[Any] = []
        try:
            with open_store() as mem:
                while True:
                    with self._policy:
                        self._again = False
                    try:
                        with lock if lock is not None else contextlib.nullcontext():
                            records += self.consolidate_due(mem, every, method, overrides=overrides).records
                    except NothingDue:
                        pass
                    with self._policy:
                        if not self._again:
                            self._running = False
                            return records
        except BaseException:
            with self._policy:
                self._running = False
            raise

    def consolidate_due(self, mem: Any, every: int, method: str, *,
                        overrides: Mapping[str, Any] | None = None) -> Consolidated:
        """Write the due edits of ``mem`` (a store handle of this thread's own) into the folder with ``method`` in
        groups of ``every`` (:class:`NothingDue` if none), then follow. The model object changes only in
        :meth:`follow`."""
        plan = plan_consolidation(mem, method, self.folder, every=every)
        try:
            done = run_consolidation(mem, plan, overrides=overrides)
        finally:
            self.follow()
        if done.records:
            self.consolidations += 1
        return done
