"""`editmem` subcommands: eval (being written)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands. Empty until its commands land."""
