"""The `editmem` command line. Each group of subcommands lives in `serve/commands/<group>.py` and registers itself
with a `register(subparsers)` function; this file only dispatches and turns user errors into one clear line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from memory.errors import EditmemError
from memory.validate import text_problem

# Each module defines `register(subparsers: argparse._SubParsersAction) -> None`, which adds its subcommands and sets
# `func=handler` on each; a handler takes the parsed args and returns an exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "serve.commands.store",
    "serve.commands.maintenance",
    "serve.commands.eval",
    "serve.commands.demo",
    "serve.commands.bench",
    "serve.commands.memory",
    "serve.commands.mend",
    "serve.commands.consolidate",
    "serve.commands.serve",
    "serve.commands.trace",
)

DEFAULT_STORE = "sqlite:///editmem.db"


STORE_HELP = f"store URL: sqlite:///path.db or postgresql+psycopg://user@host/db (default: $EDITMEM_STORE or " \
             f"{DEFAULT_STORE})"


NAMESPACE_HELP = "the store namespace every store command reads and writes (default: $EDITMEM_NAMESPACE or 'default')"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``editmem list: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="editmem", description="A versioned editing memory for language models.")
    parser.add_argument("--store", default=None, help=STORE_HELP)
    parser.add_argument("--namespace", default=None, help=NAMESPACE_HELP)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--json", action="store_true", default=False,
                        help="machine-readable output, for the commands that have it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():
        _accept_common_options(command)
    return parser


def _accept_common_options(command: argparse.ArgumentParser) -> None:
    """Let ``--store``, ``--namespace``, ``-v`` and ``--json`` follow the subcommand too. Their defaults are SUPPRESS
    here, so that a value given before the subcommand is not overwritten by the subcommand's default."""
    known = command._option_string_actions
    if "--store" not in known:
        command.add_argument("--store", default=argparse.SUPPRESS, help=STORE_HELP)
    if "--namespace" not in known:
        command.add_argument("--namespace", default=argparse.SUPPRESS, help=NAMESPACE_HELP)
    if "-v" not in known and "--verbose" not in known:
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
    action = known.get("--json")
    if action is None:
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    elif action.dest == "json":
        action.default = argparse.SUPPRESS


def _bad_argument(argv: Sequence[str]) -> str | None:
    """A one-line complaint about the first argument that is not valid text (a stray byte, a NUL), or None."""
    for position, arg in enumerate(argv, 1):
        problem = text_problem(arg) if isinstance(arg, str) else "is not a string"
        if problem:
            return f"argument {position} ({arg.encode('utf-8', 'backslashreplace').decode()!r}) {problem}" \
                if isinstance(arg, str) else f"argument {position} {problem}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bad = _bad_argument(argv)
    if bad:
        print(f"editmem: error: {bad}", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error (already printed as one line)
        return int(done.code or 0) if not isinstance(done.code, str) else 2
    # `store_given` tells commands such as `demo` whether the user chose a store or gets the default.
    args.store_given = args.store is not None or bool(os.environ.get("EDITMEM_STORE"))
    args.store = args.store or os.environ.get("EDITMEM_STORE") or DEFAULT_STORE
    args.namespace = args.namespace or os.environ.get("EDITMEM_NAMESPACE") or "default"
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EditmemError as err:
        print(f"editmem: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no (a missing or unwritable file, a full disk): the user's to fix
        where = f": {err.filename}" if err.filename else ""
        print(f"editmem: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("editmem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
