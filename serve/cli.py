"""The `editmem` command line. Each group of subcommands lives in `serve/commands/<group>.py` and registers itself
with a `register(subparsers)` function; this file only dispatches and turns user errors into one clear line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from memory.errors import EditmemError

# Each module defines `register(subparsers: argparse._SubParsersAction) -> None`, which adds its subcommands and sets
# `func=handler` on each; a handler takes the parsed args and returns an exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "serve.commands.store",
    "serve.commands.eval",
    "serve.commands.demo",
    "serve.commands.bench",
    "serve.commands.memory",
    "serve.commands.mend",
    "serve.commands.consolidate",
    "serve.commands.trace",
)

DEFAULT_STORE = "sqlite:///editmem.db"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editmem", description="A versioned editing memory for language models.")
    parser.add_argument("--store", default=None,
                        help="store URL: sqlite:///path.db or postgresql+psycopg://user@host/db "
                             f"(default: $EDITMEM_STORE or {DEFAULT_STORE})")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `store_given` tells commands such as `demo` whether the user chose a store or gets the default.
    args.store_given = args.store is not None or bool(os.environ.get("EDITMEM_STORE"))
    args.store = args.store or os.environ.get("EDITMEM_STORE") or DEFAULT_STORE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EditmemError as err:
        print(f"editmem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("editmem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
