"""Merge KnowEdit bench folders (shards run as separate processes, perhaps on separate machines) into one table.

Each ``editmem bench knowedit --shard i/n --out DIR_i`` writes ``DIR_i/bench.json`` (its settings) and
``DIR_i/cells/<task>__<method>.json``. :func:`merge_bench_dirs` checks that the folders are runs of the same bench
(same protocol and ``--limit``, the same chat/cloze settings), copies every cell into ``out/cells`` (a cell present in
two folders must be the same result), writes the merged ``out/bench.json`` (methods and tasks: the union, in the
order first seen / KnowEdit's order) and then the table (:func:`eval.knowedit.bench.write_table`). Shards that all
wrote into one folder are merged by naming that folder once (``out`` may be one of the inputs).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.knowedit.bench import write_table
from eval.knowedit.tasks import TASKS
from eval.metrics import PROTOCOLS
from memory.errors import ValidationError

# Settings that must agree between the folders being merged (None where a folder predates the key).
SAME: tuple[str, ...] = ("protocol", "limit", "chat", "cloze")


def is_bench_dir(folder: str | Path) -> bool:
    """True for an ``editmem bench knowedit`` output folder (it has ``bench.json``)."""
    return (Path(folder) / "bench.json").is_file()


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValidationError(f"{path}: not readable as JSON ({err})") from None


def merge_bench_dirs(folders: Sequence[str | Path], out: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Merge the cells of every bench folder in ``folders`` into ``out`` and write its table; returns the table."""
    paths = [Path(f) for f in folders]
    missing = [str(f) for f in paths if not is_bench_dir(f)]
    if missing:
        raise ValidationError(f"not KnowEdit bench folders (no bench.json): {', '.join(missing)}")
    metas = [(f, _read(f / "bench.json")) for f in paths]
    first_folder, first = metas[0]
    for folder, meta in metas[1:]:
        differ = [k for k in SAME if meta.get(k) != first.get(k)]
        if differ:
            detail = ", ".join(f"{k}: {first.get(k)!r} vs {meta.get(k)!r}" for k in differ)
            raise ValidationError(f"{folder} is not a shard of the same run as {first_folder} ({detail})")
    methods: list[str] = []
    tasks: set[str] = set()
    for _, meta in metas:
        methods += [m for m in meta.get("methods", []) if m not in methods]
        tasks |= set(meta.get("tasks", []))

    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    merged: dict[str, Path] = {}
    for folder, _ in metas:
        for cell in sorted((folder / "cells").glob("*.json")):
            value = _read(cell)
            name = cell.name
            if name in merged and _read(merged[name]) != value:
                raise ValidationError(f"cell {name} differs between {merged[name].parent.parent} and {folder}")
            merged.setdefault(name, cell)
            target = out / "cells" / name
            if target.resolve() != cell.resolve():
                if target.is_file() and _read(target) != value:
                    raise ValidationError(f"{target} exists in --out with a different result than {cell}")
                shutil.copyfile(cell, target)
            methods += [value["method"]] if value.get("method") and value["method"] not in methods else []
            tasks |= {value["task"]} if value.get("task") else set()
    ordered_tasks = [t for t in TASKS if t in tasks]
    meta_out = {**first, "methods": methods, "tasks": ordered_tasks, "merged_from": [str(f) for f, _ in metas]}
    (out / "bench.json").write_text(json.dumps(meta_out, indent=1), encoding="utf-8")
    protocols = PROTOCOLS if first.get("protocol") == "both" else (first.get("protocol") or PROTOCOLS[0],)
    data_dir = Path(first["data_dir"]) if first.get("data_dir") else None
    return write_table(out, methods, ordered_tasks, protocols, data_dir, plots=plots)
