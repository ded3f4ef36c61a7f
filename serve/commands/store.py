"""`editmem` store subcommands: init, add, import, export, list, show, history, update, delete, rollback, query.

The store URL comes from ``--store`` / ``$EDITMEM_STORE`` (serve/cli.py). The encoder is chosen once, at ``init``
(``--encoder``), and recorded in the store; later commands use it. Commands that only read refuse to create a store.
``delete``, ``rollback`` and ``update`` of an edit that ``editmem consolidate`` wrote into a saved model also take it
out of that model's weights exactly (``editors.consolidation.weights_follow``); ``list`` and ``show`` mark such
edits ``consolidated``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from memory.errors import ValidationError
from memory.records import EditRecord, Hit
from serve.options import bounded_int

CELL = 48  # widest table cell before it is shortened


def register(sub: argparse._SubParsersAction) -> None:
    """Add the store subcommands."""
    p = sub.add_parser("init", help="create a store (or show an existing one)")
    p.add_argument("--encoder", default=None,
                   help="encoder recorded in the store: all-MiniLM-L6-v2 (default for a new store), hashing-<dim>, "
                        "or a local sentence-transformers folder; on an existing store, switches it")
    p.add_argument("--index", choices=("auto", "flat", "hnsw"), default="auto", help="FAISS index kind")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("add", help="add an edit (an edit with the same content is returned, not added again)")
    _content_args(p, required=True)
    p.add_argument("--allow-duplicate", action="store_true",
                   help="add a new edit even if one with the same prompt, target and subject is current")
    p.set_defaults(func=cmd_add)

    from memory.formats import FORMATS

    p = sub.add_parser("import", help="import edits from a data file (zsRE, CounterFact, KnowEdit, MQuAKE, editmem)")
    p.add_argument("file")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), metavar="FORMAT",
                   help=f"file layout: auto (detect, the default), {', '.join(FORMATS)}")
    p.add_argument("--skip-incomplete", action="store_true",
                   help="leave out records with an empty prompt or target instead of failing")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write the store's current edits as JSONL")
    p.add_argument("file")
    p.add_argument("--history", action="store_true", help="every version, tombstones included")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("list", help="list current edits")
    p.add_argument("--all", action="store_true", help="include deleted edits")
    p.add_argument("--limit", type=bounded_int(1), default=None, help="at most this many edits (>= 1)")
    p.add_argument("--offset", type=bounded_int(0), default=0, help="skip this many edits first")
    p.add_argument("--subject", default=None, help="only edits with this exact subject")
    p.add_argument("--contains", default=None, help="only edits whose prompt or target contains this text (any case)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one edit (current version, or --version)")
    p.add_argument("id", type=bounded_int())
    p.add_argument("--version", type=bounded_int(), default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("history", help="every version of an edit, oldest first")
    p.add_argument("id", type=bounded_int())
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("update", help="write a new version of an edit with some fields changed")
    p.add_argument("id", type=bounded_int())
    _content_args(p, required=False)
    p.add_argument("--clear-rephrases", action="store_true", help="remove all rephrases")
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("delete", help="retract edits (a tombstone version each; rollback restores one)")
    p.add_argument("id", type=bounded_int(), nargs="+",
                   help="edit ids; several are deleted in one transaction unless saved weights hold one of them")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("rollback", help="write a new version equal to an earlier one (undeletes a deleted edit)")
    p.add_argument("id", type=bounded_int())
    p.add_argument("version", type=bounded_int())
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("query", help="the stored edits closest to a text")
    p.add_argument("text")
    p.add_argument("-k", type=bounded_int(1), default=5, help="number of hits (default 5)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_query)


def _content_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--prompt", required=required, help="the edit's key prompt (subject filled in)")
    p.add_argument("--target", dest="target_new", required=required, help="the new answer")
    p.add_argument("--subject", default=None)
    p.add_argument("--ground-truth", dest="ground_truth", default=None, help="the old (true) answer")
    p.add_argument("--rephrase", dest="rephrases", action="append", default=None,
                   help="a paraphrase of the prompt (repeatable)")


@contextmanager
def _open(args: argparse.Namespace, *, create: bool = False, encoder: str | None = None,
          index: str = "auto") -> Iterator[Any]:
    from memory import EditMemory

    with EditMemory.open(args.store, encoder=encoder, index=index, create=create,
                         namespace=getattr(args, "namespace", "default")) as mem:
        yield mem


# --- output -----------------------------------------------------------------------------------------------------------
def _short(value: Any, width: int = CELL) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_short(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _state(record: EditRecord, consolidated: dict[int, Any] | None = None) -> str:
    if record.deleted:
        return "deleted"
    if record.valid_to is None and consolidated and record.id in consolidated:
        return "consolidated"  # current, and written into the weights of a recorded model (editmem consolidate)
    return "current" if record.valid_to is None else "superseded"


def _weights_json(records: Any) -> list[dict[str, Any]]:
    return [{"record": r.id, "model": r.model_id, "method": r.method} for r in records]


def _record_json(record: EditRecord) -> dict[str, Any]:
    return {"id": record.id, "version": record.version, "prompt": record.prompt, "target_new": record.target_new,
            "subject": record.subject, "ground_truth": record.ground_truth, "rephrases": list(record.rephrases),
            "metadata": dict(record.metadata), "deleted": record.deleted,
            "valid_from": record.valid_from.isoformat() if record.valid_from else None,
            "valid_to": record.valid_to.isoformat() if record.valid_to else None}


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))


def _print_record(record: EditRecord, consolidated: dict[int, Any] | None = None) -> None:
    lines = [("id", record.id), ("version", record.version), ("state", _state(record, consolidated)),
             ("prompt", record.prompt), ("target_new", record.target_new), ("subject", record.subject),
             ("ground_truth", record.ground_truth)]
    lines += [("rephrase", r) for r in record.rephrases]
    if record.metadata:
        lines.append(("metadata", json.dumps(record.metadata, ensure_ascii=False)))
    lines += [("valid_from", _when(record.valid_from)), ("valid_to", _when(record.valid_to))]
    for key, value in lines:
        if value is not None and value != "":
            print(f"{key + ':':<13} {value}")


# --- commands ---------------------------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    with _open(args, create=True, encoder=args.encoder, index=args.index) as mem:
        print(f"store {mem.url}: encoder {mem.encoder.name}, {mem.index_kind} index, {len(mem)} edits")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    with _open(args, create=True) as mem:
        existing = None if args.allow_duplicate else mem.find(args.prompt, args.target_new, args.subject)
        if existing is not None:
            print(f"edit {existing.id} (version {existing.version}) already holds this prompt, target and subject; "
                  "nothing added (--allow-duplicate adds another)")
            return 0
        record = mem.add(args.prompt, args.target_new, subject=args.subject, ground_truth=args.ground_truth,
                         rephrases=args.rephrases or ())
    print(f"added edit {record.id} (version {record.version})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with _open(args, create=True) as mem:
        added = mem.import_file(args.file, format=args.format, skip_incomplete=args.skip_incomplete,
                                progress=True)
        total = len(mem)
    print(f"imported {added} edits from {args.file} (edits already in the store are skipped); {total} in all")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _open(args) as mem:
        n = mem.export(args.file, include_history=args.history)
    print(f"exported {n} {'versions' if args.history else 'edits'} to {args.file}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as mem:
        records = mem.list(limit=args.limit, offset=args.offset, include_deleted=args.all, subject=args.subject,
                           contains=args.contains)
        consolidated = mem.consolidated()
    if args.json:
        for r in records:
            row = _record_json(r)
            if r.id in consolidated:
                row["weights"] = _weights_json(consolidated[r.id])
            _print_json(row)
        return 0
    if not records:
        print("no edits")
        return 0
    _table(["ID", "VER", "STATE", "SUBJECT", "PROMPT", "TARGET"],
           [[r.id, r.version, _state(r, consolidated), r.subject, r.prompt, r.target_new] for r in records])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as mem:
        record = mem.get(args.id, args.version)
        consolidated = mem.consolidated()
        weights = consolidated.get(record.id, []) if record.valid_to is None else []
        folders = {r.model_id: mem.get_weight_model(r.model_id) for r in weights}
    if args.json:
        row = _record_json(record)
        if weights:
            row["weights"] = _weights_json(weights)
        _print_json(row)
    else:
        _print_record(record, consolidated)
        for r in weights:
            where = folders[r.model_id].folder or f"edited model {r.model_id}"
            print(f"{'weights:':<13} consolidated by {r.method} into {where} (weight record {r.id})")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with _open(args) as mem:
        versions = mem.history(args.id)
    if args.json:
        for r in versions:
            _print_json(_record_json(r))
        return 0
    _table(["VER", "STATE", "VALID FROM", "VALID TO", "PROMPT", "TARGET"],
           [[r.version, _state(r), _when(r.valid_from), _when(r.valid_to), r.prompt, r.target_new]
            for r in versions])
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    fields = {name: getattr(args, name) for name in ("prompt", "target_new", "subject", "ground_truth", "rephrases")
              if getattr(args, name) is not None}
    if args.clear_rephrases:
        fields["rephrases"] = ()
    if not fields:
        print("editmem: error: nothing to update (give --prompt, --target, --subject, --ground-truth or --rephrase)",
              file=sys.stderr)
        return 2
    from editors.consolidation import weights_follow

    with _open(args) as mem, weights_follow(mem, args.id, report=print):
        before = mem.get(args.id)
        record = mem.update(args.id, **fields)
    if record.version == before.version:
        print(f"edit {record.id} unchanged (version {record.version})")
    else:
        print(f"updated edit {record.id}: version {record.version}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from editors.consolidation import delete_following

    with _open(args) as mem:
        tombstones = delete_following(mem, args.id, report=print, progress=len(args.id) >= 1000)
    if len(tombstones) == 1:
        t = tombstones[0]
        print(f"deleted edit {t.id} (version {t.version} is the deletion; "
              f"`editmem rollback {t.id} {t.version - 1}` restores it)")
    else:
        print(f"deleted {len(tombstones)} edits (`editmem rollback ID VERSION` restores one)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from editors.consolidation import weights_follow

    with _open(args) as mem, weights_follow(mem, args.id, report=print):
        record = mem.rollback(args.id, args.version)
    print(f"edit {record.id} now has the content of version {args.version} (as version {record.version})")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    if not args.text.strip():
        raise ValidationError("the query text must not be empty")
    with _open(args) as mem:
        hits = mem.search(args.text, k=args.k)
    if args.json:
        _print_json([{"score": h.score, **_record_json(h.edit)} for h in hits])
        return 0
    if not hits:
        print("no edits")
        return 0
    _table(["RANK", "SCORE", "ID", "VER", "PROMPT", "TARGET"], [_hit_row(i, h) for i, h in enumerate(hits, 1)])
    return 0


def _hit_row(rank: int, hit: Hit) -> list[Any]:
    return [rank, f"{hit.score:.3f}", hit.edit.id, hit.edit.version, hit.edit.prompt, hit.edit.target_new]
