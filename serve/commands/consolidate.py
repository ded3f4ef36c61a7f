"""`editmem consolidate`: write the store's memory edits into a model's weights, and keep those weights in step when an
edit is deleted, rolled back or updated.

    editmem consolidate --method memit [--batch-size N] [--model NAME] --out DIR [--set KEY=VALUE ...]

How the model is found. The store records every edited model it keeps weight edits for, with the folder it is
saved in (``editors.weights``; tables ``editmem_weight_*``). The first ``consolidate --out DIR`` loads the base model
``--model`` (default smollm2-135m), registers DIR with the store and saves the edited model there (a safetensors
folder, loadable with ``editors.models.load_model(DIR)``). A later ``consolidate --out DIR`` continues from the
edited model in DIR. ``editmem delete`` / ``rollback`` / ``update`` of an edit that some recorded folder holds load
that folder, take the edit out of its weights exactly (base + the remaining recorded deltas, in order), write the
other edits of a batch again, and save the folder; edits with no weight records never load a model.

``editmem rebuild-weights --out DIR [--model NAME]`` recomputes DIR from the base model and the store's records.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from memory.errors import ValidationError
from serve.options import key_values

DEFAULT_MODEL = "smollm2-135m"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("consolidate", help="write the store's edits into a model's weights and save the model",
                       description="Write the store's live edits that the model in --out does not hold yet into its "
                                   "weights with a weight editor, in batches; record the deltas in the store, so "
                                   "delete/rollback restore the weights exactly; save the model to --out.")
    p.add_argument("--method", required=True, help="weight editor: memit, rome or ft")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edits per editor call, one weight record each (default: all in one batch)")
    p.add_argument("--model", default=None,
                   help=f"base model (alias or local folder) for a new --out (default: {DEFAULT_MODEL}); "
                        "an --out the store already knows continues from the model saved there")
    p.add_argument("--out", required=True, help="folder of the edited model (created, or continued)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="editor setting, e.g. layers=[3,4] (value parsed as JSON, else a string); repeatable")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("rebuild-weights", help="recompute an edited model folder from its base and the store",
                       description="Load the base model of the edited model saved in --out, apply the store's "
                                   "recorded weight edits in order, and save it to --out.")
    p.add_argument("--out", required=True, help="folder of the edited model, as given to consolidate")
    p.add_argument("--model", default=None, help="base model (default: the one recorded for --out)")
    p.set_defaults(func=cmd_rebuild)


def _folder_key(folder: str | Path) -> str:
    return str(Path(folder).expanduser().resolve())


def cmd_consolidate(args: argparse.Namespace) -> int:
    from memory import EditMemory

    if args.batch_size is not None and args.batch_size < 1:
        raise ValidationError(f"--batch-size must be >= 1, got {args.batch_size}")
    overrides = key_values(args.overrides, example="layers=[3,4]")
    out = Path(args.out).expanduser()
    with EditMemory.open(args.store, create=False) as mem:
        from editors.base import available_editors

        if args.method not in available_editors():
            raise ValidationError(f"unknown editing method {args.method!r}; available: "
                                  f"{', '.join(available_editors())}")
        if len(mem) == 0:
            raise ValidationError(f"no edits to consolidate: the store {mem.url} is empty")

        from editors.weights import pending_edits

        known = mem.weight_models(folder=_folder_key(out))
        if known:
            row = known[0]
            if args.model is not None and args.model != row.base:
                raise ValidationError(f"{out} holds edits of base model {row.base}, not {args.model}; "
                                      "use another --out for another base model")
            if not pending_edits(mem, row.id):  # say so before loading the model
                raise ValidationError(f"no edits to consolidate: {out} already holds every live edit of the store")
            source = out
        else:
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise ValidationError(f"{out} exists and is not an edited model of this store; give a new or "
                                      "empty folder as --out")
            row = None
            source = args.model or DEFAULT_MODEL

        from editors.models import load_model
        from editors.weights import StoredWeights

        model, tokenizer = load_model(source)
        stored = StoredWeights.open(mem, model, tokenizer, base=str(args.model or DEFAULT_MODEL), folder=out,
                                    model_id=row.id if row else None)
        held = len(stored.records())
        written: list[Any] = []
        try:
            written = stored.consolidate(args.method, batch_size=args.batch_size, progress=True, **overrides)
        finally:
            # Save whatever SQL now records, also after a failed batch; a newly registered folder always holds its
            # model, even with no edits yet.
            if row is None or len(stored.records()) != held:
                stored.save(out)
    n = sum(len(r.edits) for r in written)
    print(f"consolidated {n} edit(s) into {out} with {args.method} in {len(written)} weight record(s); "
          f"edited model {stored.record.id}, base {stored.record.base}")
    for r in written:
        print(f"  record {r.id}: edits {', '.join(str(e) for e in r.edit_ids)} -> {', '.join(r.params)}")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from memory import EditMemory

    out = Path(args.out).expanduser()
    with EditMemory.open(args.store, create=False) as mem:
        known = mem.weight_models(folder=_folder_key(out))
        if not known:
            raise ValidationError(f"{out} is not an edited model of this store")
        row = known[0]
        from editors.models import load_model
        from editors.weights import rebuild, save_model

        model, tokenizer = load_model(args.model or row.base)
        rebuild(mem, model, row.id)
        save_model(model, tokenizer, out)
        n = len(mem.weight_records(model_id=row.id))
    print(f"rebuilt {out} from {args.model or row.base} and {n} applied weight record(s)")
    return 0


@contextmanager
def weights_follow(mem: Any, edit_id: int) -> Iterator[None]:
    """Wrap a store change to ``edit_id`` (delete, rollback, update): every saved edited model that holds a version
    of it is loaded and checked first (so a missing or changed folder stops the change before it is written), and
    after the change the records it made stale are removed exactly, batch mates written again, and the folder saved.
    Without weight records for the edit it does nothing (and imports no torch)."""
    records = mem.weight_records(edit_id=edit_id)
    if not records:
        yield
        return
    from editors.models import load_model
    from editors.weights import StoredWeights

    opened = []
    for model_id in sorted({r.model_id for r in records}):
        row = mem.get_weight_model(model_id)
        if row.folder is None:
            print(f"editmem: warning: edited model {row.id} (base {row.base}) is saved nowhere; its weights are "
                  "not updated here (use editors.weights.StoredWeights.sync_edit in Python)", file=sys.stderr)
            continue
        if not Path(row.folder).is_dir():
            raise ValidationError(f"edit {edit_id} is written into the weights saved in {row.folder}, which is "
                                  "missing; restore the folder (or rebuild it: editmem rebuild-weights --out "
                                  f"{row.folder}) before changing the edit")
        model, tokenizer = load_model(row.folder)
        opened.append(StoredWeights.open(mem, model, tokenizer, model_id=row.id))
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
        print(line)
