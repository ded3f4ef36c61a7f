"""`editmem` maintenance subcommands: verify, rebuild-index, dump, restore.

    editmem verify                       SQL and the index agree on which versions are searchable (exit 2 if not)
    editmem rebuild-index [--index auto|flat|hnsw]
    editmem dump FILE [--no-embeddings]  the whole store: every version with its ids and times, weight records
    editmem restore FILE                 a dump into an empty (or new) store, with the dump's encoder

See :mod:`memory.backup` for what a dump holds.
"""

from __future__ import annotations

import argparse

from memory.errors import StoreError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check that the index and SQL agree (exit 2 if they do not)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rebuild-index", help="rebuild the FAISS index from the embeddings in SQL")
    p.add_argument("--index", choices=("auto", "flat", "hnsw"), default=None, help="index kind (default: as it is)")
    p.set_defaults(func=cmd_rebuild_index)

    p = sub.add_parser("dump", help="back up the whole store (every version, ids, times, weight records) to a file")
    p.add_argument("file")
    p.add_argument("--no-embeddings", action="store_true", help="leave the embeddings out (restore recomputes them)")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("restore", help="restore a dump into an empty store (created if missing)")
    p.add_argument("file")
    p.set_defaults(func=cmd_restore)


def cmd_verify(args: argparse.Namespace) -> int:
    from memory import EditMemory

    with EditMemory.open(args.store, create=False) as mem:
        mem.verify()
        n = len(mem)
    print(f"store {args.store}: index and SQL agree ({n} searchable edits)")
    return 0


def cmd_rebuild_index(args: argparse.Namespace) -> int:
    from memory import EditMemory

    with EditMemory.open(args.store, create=False) as mem:
        mem.rebuild_index(args.index)
        kind, n = mem.index_kind, len(mem)
    print(f"rebuilt the {kind} index of {args.store} ({n} searchable edits)")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from memory import EditMemory
    from memory.backup import dump

    with EditMemory.open(args.store, create=False) as mem:
        n = dump(mem, args.file, include_embeddings=not args.no_embeddings)
    print(f"dumped {n} rows of {args.store} to {args.file}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from memory import EditMemory
    from memory.backup import check_empty, read_header, restore

    header = read_header(args.file)  # before the store is created: a bad file leaves nothing behind
    try:
        with EditMemory.open(args.store, create=False) as mem:
            check_empty(mem)  # before the store is switched to the dump's encoder
    except StoreError as err:
        if "restore needs an empty store" in str(err):
            raise
        # no store there yet: the next open creates it with the dump's encoder
    with EditMemory.open(args.store, encoder=header["encoder"]) as mem:
        n = restore(mem, args.file)
        total = len(mem)
    print(f"restored {n} rows from {args.file} into {args.store} ({total} current edits)")
    return 0
