"""Evaluation cases from any supported data file. The parsing lives in :mod:`memory.formats`; this adds ``limit``.

How each data set maps onto :class:`EditCase` (which probes are locality, which portability, MQuAKE's grouping) is
documented in :mod:`memory.formats`. Probes keep their source's kind (``Probe.kind``), so an evaluator can report per
kind as EasyEdit does, or pick the kinds it wants (e.g. only "neighborhood" for ROME's neighbourhood score).
"""

from __future__ import annotations

import os

from memory.errors import ValidationError
from memory.formats import FORMATS, detect_format, read_cases
from memory.records import EditCase, Probe

__all__ = ["FORMATS", "EditCase", "Probe", "detect_format", "load_cases"]


def load_cases(path: str | os.PathLike, format: str = "auto", limit: int | None = None, *,
               skip_incomplete: bool = False) -> list[EditCase]:
    """The first ``limit`` cases of the file (all of them if None). The whole file is validated either way.

    ``limit`` counts EditCases: for MQuAKE that is rewrites, and a limit that cuts a case in the middle leaves that
    case without its multi-hop probes (they sit on its last rewrite).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValidationError(f"limit must be a non-negative integer or None, got {limit!r}")
    cases = read_cases(path, format, skip_incomplete=skip_incomplete)
    return cases if limit is None else cases[:limit]
