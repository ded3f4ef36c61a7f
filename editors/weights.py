"""Weight edits recorded in the store: apply an intrinsic edit through the store, remove any one of them exactly,
rebuild the edited model from its base, and consolidate the store's memory edits into the weights.

The store keeps, per edited model (:class:`memory.ledger.WeightModel`, identified by the base model's
:func:`~editors.lm.architectures.model_fingerprint`):

- one record per applied weight edit (one editor call, one edit or a batch), in the order applied, with the edit
  versions it wrote, the method and settings, and the **delta** of every touched parameter;
- the **base value** of every parameter any record touched, stored the first time one does.

Exactness. Every delta is applied with one operation, ``value + delta`` in the parameter's dtype (:func:`_add`), both
when the edit is made and when it is replayed, so the edited value of a parameter is always exactly
``base + d_1 + d_2 + ...`` over the applied records touching it, in order (IEEE addition is correctly rounded: the
same inputs give the same bits on any device). Removing a record, whichever its place, recomputes each parameter it
touched as base plus the *remaining* applied deltas in order: bit-identical to applying just those records to the
base model. Nothing ever subtracts a delta (``W + d - d`` need not be ``W``). The delta recorded for an edit is the
editor's ``edited - original`` in the parameter's dtype; what the model holds afterwards is ``original + delta``, which
for FT (an editor that writes values, not deltas) may differ from the editor's own value in the last bit.

An AlphaEdit record also keeps the keys it was written at (the record's editor state), so a later editor call in any
process counts the edits the weights hold exactly as the writing process did, without recomputing their keys.

GRACE edits change no parameter: each is one record holding its codebook insert, and the model's adaptor is the
replay of the applied GRACE records in order (:mod:`editors.adaptors`), saved beside the weights in the folder.

A record that wrote several edits at once (a MEMIT batch) is one joint update that cannot be split: removing one of
its edits removes the whole record, then (given a tokenizer) writes the batch's other edits again as a new record
with the same method and settings; without a tokenizer they are left for the next consolidation.

The store only holds opaque blobs (safetensors bytes) and metadata; this module does the torch side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editors.base import WeightEditHandle, get_editor
from editors.lm.architectures import CausalLM, model_fingerprint
from memory.errors import EditmemError, NotFoundError, ValidationError

log = logging.getLogger(__name__)


class WeightMismatchError(EditmemError):
    """The model is not the one the store's weight records were made for, or does not hold them."""


def _pack(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def _unpack(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(blob)


def _editor_state(handle: WeightEditHandle) -> bytes | None:
    """What a record keeps of its editor call for later ones: an AlphaEdit handle's keys (None for other editors)."""
    from editors.methods.alphaedit import AlphaEditHandle, joined_keys

    if isinstance(handle, AlphaEditHandle) and handle.blocks:
        return _pack(joined_keys(handle.blocks))
    return None


def _add(value: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The one way a recorded delta is applied (live and in replay), so both give the same bits."""
    return value + delta.to(device=value.device, dtype=value.dtype)


@dataclass
class RemoveResult:
    """What removing an edit's weight records did: the records removed, the records written again for their batch
    mates, and the batch mates left unwritten (no tokenizer, or ``reapply=False``)."""

    removed: list[Any] = field(default_factory=list)
    reapplied: list[Any] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)


class StoredWeights:
    """A model whose weight edits are recorded in an :class:`~memory.store.EditMemory`.

    Open with :meth:`open` (registers the model, or finds it by folder, and checks it); then :meth:`apply`,
    :meth:`remove_record`, :meth:`sync_edit`, :meth:`consolidate`; :meth:`save` writes the model to its folder.
    """

    def __init__(self, mem: Any, model: torch.nn.Module, tokenizer: Any, record: Any):
        self.mem = mem
        self.model = model
        self.tokenizer = tokenizer
        self.record = record
        self.adaptor: Any = None  # the GRACE codebook replayed from the records (editors.adaptors), if any

    def _replay_adaptor(self) -> None:
        """Make the model's GRACE adaptor the replay of the applied GRACE records (none: no entries, no hook)."""
        self.install_adaptor(self.replayed_adaptor())

    def replayed_adaptor(self, records: Sequence[Any] | None = None) -> Any:
        """The replay of the applied GRACE records (of ``records``, in order, when given) into a codebook built aside,
        not hooked on the model (:meth:`install_adaptor` puts it in place); None when there are none."""
        from editors.adaptors import is_adaptor_record, replay
        from editors.methods.grace import Codebook

        found = [r for r in (self.records() if records is None else records) if is_adaptor_record(r)]
        if not found:
            return None
        book = Codebook(self.model, int(found[0].settings["layer"]), attach=False)
        replay(book, [(r.settings, self.mem.weight_deltas(r.id)) for r in found])
        return book

    def install_adaptor(self, book: Any) -> None:
        """Make the model's adaptor hold ``book``'s entries (None: none, and no hook). The first adaptor of this model
        object is the codebook already hooked on the layer (a folder's, attached at load) or a new one."""
        if book is None:
            if self.adaptor is not None:
                self.adaptor.clear()
            return
        if self.adaptor is None:
            from editors.methods.grace import Codebook

            self.adaptor = Codebook.on(self.model, book.layer)
        elif self.adaptor.layer != book.layer:
            raise ValidationError(f"edited model {self.record.id} has its GRACE adaptor at layer "
                                  f"{self.adaptor.layer}, not {book.layer}")
        self.adaptor.take(book)

    def editor(self, method: str, **overrides: Any) -> Any:
        """An editor for ``method`` on this model; GRACE's works on the model's recorded adaptor."""
        editor = get_editor(method, self.model, self.tokenizer, **overrides)
        from editors.methods.grace import GraceEditor

        if isinstance(editor, GraceEditor):
            book = editor.codebook()
            if self.adaptor is None:
                self.adaptor = book
            elif self.adaptor.layer != book.layer:
                raise ValidationError(f"edited model {self.record.id} has its GRACE adaptor at layer "
                                      f"{self.adaptor.layer}, not {book.layer}")
            editor._codebook = self.adaptor
        return editor

    # --- opening --------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, mem: Any, model: torch.nn.Module, tokenizer: Any = None, *, base: str | None = None,
             folder: str | Path | None = None, model_id: int | None = None, verify: bool = True) -> StoredWeights:
        """The store's record of ``model``: the registered model ``model_id``, or the one saved in ``folder``, or
        (neither found) a new one for base model ``base`` (how the user names it: an alias or folder).

        The model's fingerprint must match the record's. With ``verify`` the model must also hold exactly the
        applied records (base + deltas in order on every touched parameter); otherwise :class:`WeightMismatchError`.
        """
        fingerprint = model_fingerprint(model)
        folder_key = str(Path(folder).expanduser().resolve()) if folder is not None else None
        if model_id is not None:
            record = mem.get_weight_model(model_id)
        else:
            found = mem.weight_models(folder=folder_key) if folder_key is not None else []
            if found:
                record = found[0]
            else:
                if base is None:
                    raise ValidationError("a new edited model needs the name of its base model (base=...)")
                record = mem.add_weight_model(fingerprint, str(base), folder_key)
                log.info("registered edited model %d (base %s, %s) in %s", record.id, base, fingerprint, mem.url)
        if record.fingerprint != fingerprint:
            raise WeightMismatchError(
                f"model fingerprint {fingerprint} does not match the store's edited model {record.id} "
                f"(base {record.base}, fingerprint {record.fingerprint}): the weight records were made for another "
                "model")
        stored = cls(mem, model, tokenizer, record)
        if verify:
            stored.verify()
        stored._replay_adaptor()
        return stored

    # --- reading the records ----------------------------------------------------------------------------------------
    def records(self, applied: bool | None = True) -> list[Any]:
        return self.mem.weight_records(model_id=self.record.id, applied=applied)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    def expected(self, params: Iterable[str], *, without: int | None = None) -> dict[str, torch.Tensor]:
        """What each of ``params`` should hold: its base value plus the applied records' deltas in order (leaving
        out record ``without``), computed on the parameter's device and in its dtype."""
        params = list(dict.fromkeys(params))
        bases = self.mem.weight_bases(self.record.id, params)
        missing = [p for p in params if p not in bases]
        if missing:
            raise NotFoundError(f"edited model {self.record.id} has no base value for {missing}")
        live = self._params()
        values: dict[str, torch.Tensor] = {}
        for name in params:
            if name not in live:
                raise WeightMismatchError(f"the model has no parameter {name!r} recorded in the store")
            p = live[name]
            values[name] = _unpack(bases[name])["value"].to(device=p.device, dtype=p.dtype)
        wanted = set(params)
        for rec in self.records():
            if rec.id == without or not wanted.intersection(rec.params):
                continue
            deltas = _unpack(self.mem.weight_deltas(rec.id))
            for name in wanted.intersection(rec.params):
                values[name] = _add(values[name], deltas[name])
        return values

    def touched(self) -> list[str]:
        """Every parameter some record of this model touched (applied or removed)."""
        return self.mem.weight_base_params(self.record.id)

    def verify(self) -> None:
        """:class:`WeightMismatchError` unless every touched parameter holds exactly base + applied deltas."""
        live = self._params()
        wrong = [name for name, value in self.expected(self.touched()).items()
                 if not torch.equal(live[name].detach(), value)]
        if wrong:
            raise WeightMismatchError(
                f"the model does not hold the weight edits the store records for edited model {self.record.id} "
                f"({len(wrong)} parameter(s) differ, e.g. {wrong[0]}): it is not that edited model, or was changed "
                "outside the store; rebuild it from the base model (editors.weights.rebuild)")

    def realize(self, params: Iterable[str] | None = None) -> None:
        """Write base + applied deltas into ``params`` (default: every touched parameter)."""
        values = self.expected(self.touched() if params is None else params)
        live = self._params()
        with torch.no_grad():
            for name, value in values.items():
                live[name].copy_(value)

    # --- writing ------------------------------------------------------------------------------------------------
    def apply(self, edit_ids: Sequence[int], method: str, *, editor: Any = None, **overrides: Any) -> Any:
        """Write the current versions of ``edit_ids`` into the weights with editor ``method`` (``overrides`` adjust
        its settings) in one editor call, record the deltas in the store, and return the :class:`WeightRecord`
        (GRACE: one record per edit, the last one returned; :meth:`apply_records` returns all).
        The store is written before the model: if recording fails, the model is unchanged. ``editor``: an editor
        for ``method`` built with ``overrides`` (by :meth:`editor`) to use instead of a new one
        (:meth:`consolidate` passes one for all its batches, so an editor that keeps state between edits,
        AlphaEdit's earlier keys, keeps it)."""
        return self.apply_records(edit_ids, method, editor=editor, **overrides)[-1]

    def apply_records(self, edit_ids: Sequence[int], method: str, *, editor: Any = None,
                      **overrides: Any) -> list[Any]:
        """:meth:`apply`, returning every record written (one, or one per edit for GRACE)."""
        if self.tokenizer is None:
            raise ValidationError("applying a weight edit needs the model's tokenizer")
        records = [self.mem.get(i) for i in edit_ids]
        for rec in records:
            if rec.deleted:
                raise NotFoundError(f"edit {rec.id} is deleted")
        requests = [r.request() for r in records]
        if editor is None:
            editor = self.editor(method, **overrides)
        handle = editor.apply(requests)
        from editors.methods.grace import GraceHandle

        if isinstance(handle, GraceHandle):
            return self._record_inserts(records, handle, editor)
        if not isinstance(handle, WeightEditHandle):
            handle.restore()
            raise ValidationError(f"{method} is not a weight editor: only editors that change the weights "
                                  "(rome, memit, alphaedit, ft) or keep a GRACE adaptor (grace) can be recorded "
                                  "or consolidated")
        originals = {k: v for k, v in handle.originals.items()}
        deltas = {k: handle.edited[k].to(originals[k].dtype) - originals[k] for k in originals}
        state = _editor_state(handle)
        handle.release()
        bases = {k: _pack({"value": v}) for k, v in originals.items()}
        record = self.mem.attach_weights(self.record.id, method, [(r.id, r.version) for r in records],
                                         sorted(deltas), _pack(deltas), bases=bases, settings=overrides,
                                         editor_state=state)
        live = self._params()
        with torch.no_grad():
            for name, delta in deltas.items():
                live[name].copy_(_add(originals[name].to(live[name].device), delta))
        log.info("weight record %d: %s wrote edit(s) %s into %s", record.id, method, list(record.edit_ids),
                 ", ".join(record.params))
        return [record]

    def _record_inserts(self, records: Sequence[Any], handle: Any, editor: Any) -> list[Any]:
        """GRACE: undo the live inserts, record one insert per edit, then replay the adaptor from the records (so
        the live adaptor is the recorded one by construction). A failure to record leaves the adaptor as recorded."""
        from editors.adaptors import ADAPTOR_METHOD, pack_insert, record_settings

        handle.restore()
        settings = record_settings(editor.settings, editor.codebook().layer)
        written = []
        try:
            for rec, (keys, values, label) in zip(records, handle.inserted, strict=True):
                written.append(self.mem.attach_weights(self.record.id, ADAPTOR_METHOD, [(rec.id, rec.version)], [],
                                                       pack_insert(keys, values, label), bases={},
                                                       settings=settings))
        finally:
            self._replay_adaptor()
        log.info("adaptor record(s) %s: grace wrote edit(s) %s into the codebook at layer %d",
                 [r.id for r in written], [r.id for r in records], settings["layer"])
        return written

    def remove_record(self, record_id: int, note: str | None = None) -> Any:
        """Remove one applied record: its parameters become base + the other applied deltas in order, exactly."""
        record = self.mem.weight_record(record_id)
        if record.model_id != self.record.id:
            raise ValidationError(f"weight record {record_id} belongs to edited model {record.model_id}, "
                                  f"not {self.record.id}")
        values = self.expected(record.params, without=record.id)
        removed = self.mem.detach_weights(record.id, note)
        live = self._params()
        with torch.no_grad():
            for name, value in values.items():
                live[name].copy_(value)
        from editors.adaptors import is_adaptor_record

        if is_adaptor_record(record):
            self._replay_adaptor()
        log.info("removed weight record %d (edit(s) %s)", record.id, list(record.edit_ids))
        return removed

    def stale_records(self, edit_id: int) -> list[Any]:
        """Applied records linked to ``edit_id`` at a version that is no longer its current live one."""
        current = self.mem.get(edit_id)
        out = []
        for rec in self.mem.weight_records(model_id=self.record.id, edit_id=edit_id):
            version = dict(rec.edits)[edit_id]
            if current.deleted or current.version != version:
                out.append(rec)
        return out

    def sync_edit(self, edit_id: int, *, reapply: bool = True, progress: bool = False) -> RemoveResult:
        """After ``edit_id`` was deleted, rolled back or updated: remove every applied record that wrote a version of
        it that is no longer current; write the other edits of those records again (when ``reapply`` and a
        tokenizer is at hand, as one new record per removed one with the same method and settings)."""
        return self._remove(self.stale_records(edit_id), edit_id, f"edit {edit_id} changed or was deleted",
                            reapply=reapply)

    def remove_edit(self, edit_id: int, *, reapply: bool = True) -> RemoveResult:
        """Take ``edit_id`` out of the weights (every applied record linked to it), keeping everything else."""
        return self._remove(self.mem.weight_records(model_id=self.record.id, edit_id=edit_id), edit_id,
                            f"edit {edit_id} removed from the weights", reapply=reapply)

    def _remove(self, records: Sequence[Any], edit_id: int, note: str, *, reapply: bool) -> RemoveResult:
        result = RemoveResult()
        for rec in records:
            result.removed.append(self.remove_record(rec.id, note))
            mates = [e for e, v in rec.edits if e != edit_id and self._is_current(e, v)]
            if not mates:
                continue
            if reapply and self.tokenizer is not None:
                editor = self._count_held(self.editor(rec.method, **rec.settings))
                result.reapplied.extend(self.apply_records(mates, rec.method, editor=editor, **rec.settings))
            else:
                result.pending.extend(mates)
        return result

    def _count_held(self, editor: Any) -> Any:
        """An editor about to write into these weights, told which edits they already hold: AlphaEdit counts their
        keys among the earlier edits' (:meth:`~editors.methods.alphaedit.AlphaEditEditor.keep`), so a new batch, or a
        deleted edit's batch mates written again, leaves them in place. A record that kept its keys (the editor state
        of an AlphaEdit record) gives them as they were written, exactly what the process that wrote it used; the
        keys of other records (MEMIT, ROME, FT, or keys at other layers) are computed at the current weights. Other
        editors are returned as they are."""
        from editors.adaptors import is_adaptor_record
        from editors.methods.alphaedit import AlphaEditEditor, block_of

        if not isinstance(editor, AlphaEditEditor):
            return editor
        layers = set(editor.edit_layers())
        compute: list[Any] = []
        for rec in self.records():
            if is_adaptor_record(rec):
                continue
            state = self.mem.weight_editor_state(rec.id)
            block = block_of(_unpack(state)) if state is not None else None
            if block is not None and layers <= set(block.keys):
                editor.remember([block])
            else:
                compute.extend(self.mem.get(e, v).request() for e, v in rec.edits)
        editor.keep(compute)
        return editor

    def _is_current(self, edit_id: int, version: int) -> bool:
        try:
            current = self.mem.get(edit_id)
        except NotFoundError:
            return False
        return not current.deleted and current.version == version

    # --- consolidation --------------------------------------------------------------------------------------------
    def pending(self) -> list[Any]:
        """The store's live edits whose current version this model's weights do not hold yet, by id."""
        return pending_edits(self.mem, self.record.id)

    def consolidate(self, method: str, *, batch_size: int | None = None, progress: bool = False,
                    edit_ids: Sequence[int] | None = None, **overrides: Any) -> list[Any]:
        """Write every pending edit (:meth:`pending`) into the weights with ``method``, ``batch_size`` edits per
        editor call (None: all in one), one record per batch. Returns the new records. Each batch is recorded
        before the next starts, so an error leaves the earlier batches written and recorded. ``edit_ids``: write
        only these pending edits, in this order (the rest stay pending; :func:`due_edits` picks the oldest)."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValidationError(f"batch size must be a positive integer, got {batch_size!r}")
        editor = self.editor(method, **overrides)  # a bad method or setting fails here
        todo = self.pending()
        if edit_ids is not None:
            by_id = {r.id: r for r in todo}
            missing = [i for i in edit_ids if i not in by_id]
            if missing:
                raise ValidationError(f"edit(s) {', '.join(map(str, missing))} are not pending for edited model "
                                      f"{self.record.id} (not live, or already in its weights)")
            todo = [by_id[i] for i in edit_ids]
        if not todo:
            raise ValidationError(f"no edits to consolidate: the store {self.mem.url} has no live edit that "
                                  f"edited model {self.record.id} does not already hold")
        for rec in todo:  # a bad edit fails here, before any weight changes
            rec.request()
        self._count_held(editor)
        size = batch_size or len(todo)
        from tqdm.auto import tqdm

        written = []
        with tqdm(total=len(todo), desc=f"consolidating ({method})", unit="edit", disable=not progress) as bar:
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                written.extend(self.apply_records([r.id for r in batch], method, editor=editor, **overrides))
                bar.update(len(batch))
        return written

    # --- saving -----------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path | None = None) -> Path:
        """Save the model (safetensors), tokenizer and GRACE adaptor (if it has entries) to ``folder`` (default: the
        record's folder)."""
        target = Path(folder) if folder is not None else (Path(self.record.folder) if self.record.folder else None)
        if target is None:
            raise ValidationError(f"edited model {self.record.id} has no folder; give one")
        extra = {}
        if self.adaptor is not None and self.adaptor.entries:
            from editors.adaptors import ADAPTOR_FILE, adaptor_bytes

            extra[ADAPTOR_FILE] = adaptor_bytes(self.adaptor)
        save_model(self.model, self.tokenizer, target, extra=extra)
        return target


def pending_edits(mem: Any, model_id: int | None) -> list[Any]:
    """The store's live edits whose current version edited model ``model_id`` does not hold yet, by id (every live
    edit for ``None``, a model not registered yet)."""
    written = mem.held_versions(model_id) if model_id is not None else set()
    return [r for r in mem if (r.id, r.version) not in written]


def oldest_first(records: Iterable[Any]) -> list[Any]:
    """Edits in the order they have been answering from memory: by the time their current version was written (an
    update or rollback makes an edit new again), then by id."""
    return sorted(records, key=lambda r: (r.valid_from.timestamp() if r.valid_from is not None else 0.0, r.id))


def due_edits(mem: Any, model_id: int | None, every: int) -> list[Any]:
    """The policy "memory first, the weights as the fallback": the oldest pending edits (:func:`oldest_first`) in
    whole groups of ``every``, so that fewer than ``every`` stay answering from memory; none while fewer than
    ``every`` are pending."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValidationError(f"every must be a positive integer, got {every!r}")
    todo = oldest_first(pending_edits(mem, model_id))
    return todo[:len(todo) // every * every]


def save_model(model: CausalLM, tokenizer: Any, folder: str | Path, *,
               extra: Mapping[str, bytes] | None = None) -> None:
    """Write a safetensors model folder (loadable with :func:`editors.lm.loading.load_model`), replacing its weights
    file as a whole: the new folder is written beside it and swapped in. ``extra``: more files (name -> bytes) to
    write into the folder (the GRACE adaptor)."""
    import os
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is not secret
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=folder.parent))
            os.replace(folder, old / "old")
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rebuild(mem: Any, base_model: torch.nn.Module, model_id: int) -> torch.nn.Module:
    """Turn ``base_model`` (the unedited base) into edited model ``model_id``: every touched parameter becomes its
    base value plus the applied records' deltas in order, and its GRACE adaptor the replay of its GRACE records.
    Refuses a model with another fingerprint, or one whose touched parameters are not exactly the recorded base
    values (an already edited copy, say)."""
    return rebuild_stored(mem, base_model, model_id).model


def rebuild_stored(mem: Any, base_model: torch.nn.Module, model_id: int, tokenizer: Any = None) -> StoredWeights:
    """:func:`rebuild`, returning the :class:`StoredWeights` of the rebuilt model (to save it with its adaptor)."""
    stored = StoredWeights.open(mem, base_model, tokenizer, model_id=model_id, verify=False)
    touched = stored.touched()
    bases = mem.weight_bases(model_id, touched)
    live = stored._params()
    differ = [n for n in touched
              if not torch.equal(live[n].detach().cpu(), _unpack(bases[n])["value"].to(live[n].dtype))]
    if differ:
        raise WeightMismatchError(
            f"the model given as the base of edited model {model_id} is not its base: {len(differ)} touched "
            f"parameter(s) differ from the recorded base values (e.g. {differ[0]}); load the unedited "
            f"{stored.record.base}")
    stored.realize(touched)
    return stored
