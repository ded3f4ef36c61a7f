"""`editmem consolidate`: write the store's memory edits into a model's weights, and keep those weights in step when an
edit is deleted, rolled back or updated.

    editmem consolidate --method memit [--batch-size N | --every N] [--model NAME] --out DIR [--set KEY=VALUE ...]

How the model is found. See :mod:`editors.consolidation`, which does the work
(this module only parses and prints): the first ``consolidate --out DIR`` loads the base model ``--model`` (default
smollm2-135m), registers DIR with the store and saves the edited model there; a later one continues from DIR.
``editmem delete`` / ``rollback`` / ``update`` of an edit that some recorded folder holds take it out of that
folder's weights exactly (:func:`editors.consolidation.weights_follow`). ``--method grace`` keeps the edits in a
GRACE codebook saved in DIR as ``grace-adaptor.safetensors`` instead (:mod:`editors.adaptors`), with the same follow.

``--every N`` is the policy "memory first, the weights as the fallback": only the N oldest pending edits, in whole
groups of N (one weight record each), go into the weights, and fewer than N keep answering from memory; with fewer
than N pending it writes nothing and exits 0. Served with ``--model DIR``, the edits DIR's weights hold are left to
them by the memory router.

``editmem rebuild-weights --out DIR [--model NAME]`` recomputes DIR from the base model and the store's records.
"""

from __future__ import annotations

import argparse

from editors.consolidation import DEFAULT_MODEL
from serve.options import key_values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("consolidate", help="write the store's edits into a model's weights and save the model",
                       description="Write the store's live edits that the model in --out does not hold yet into its "
                                   "weights with a weight editor, in batches; record the deltas in the store, so "
                                   "delete/rollback restore the weights exactly; save the model to --out.")
    p.add_argument("--method", required=True,
                   help="weight editor (memit, alphaedit, rome, ft) or grace (a codebook adaptor saved in --out, "
                        "one record per edit)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edits per editor call, one weight record each (default: all in one batch)")
    p.add_argument("--every", type=int, default=None, metavar="N",
                   help="only the N oldest pending edits in whole groups of N (one editor call each), leaving fewer "
                        "than N answering from memory; nothing (exit 0) while fewer than N are pending")
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


def cmd_consolidate(args: argparse.Namespace) -> int:
    from editors.consolidation import NothingDue, consolidate
    from memory import EditMemory

    overrides = key_values(args.overrides, example="layers=[3,4]")
    with EditMemory.open(args.store, create=False, namespace=getattr(args, "namespace", "default")) as mem:
        try:
            done = consolidate(mem, args.method, args.out, model=args.model, batch_size=args.batch_size,
                               every=args.every, overrides=overrides, progress=True)
        except NothingDue as err:
            print(err)
            return 0
    print(f"consolidated {done.n_edits} edit(s) into {done.folder} with {args.method} in {len(done.records)} weight "
          f"record(s); edited model {done.model.id}, base {done.model.base}")
    for r in done.records:
        print(f"  record {r.id}: edits {', '.join(str(e) for e in r.edit_ids)} -> {', '.join(r.params)}")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from editors.consolidation import rebuild_folder
    from memory import EditMemory

    with EditMemory.open(args.store, create=False, namespace=getattr(args, "namespace", "default")) as mem:
        base, n = rebuild_folder(mem, args.out, model=args.model)
    print(f"rebuilt {args.out} from {base} and {n} applied weight record(s)")
    return 0
