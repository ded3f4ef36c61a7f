"""The KnowEdit bench on several local cores: ``jobs`` shard processes, then one merged table.

``editmem bench knowedit --jobs N`` is the one-machine form of ``--shard i/n`` + ``editmem report``: shard ``i`` of
``N`` runs in its own process (spawned, so each loads its own model copy and gets ``cores // N`` torch threads) and
writes ``OUT/shards/<i>of<N>/``; when every shard has finished, :func:`eval.knowedit.merge.merge_bench_dirs` merges
them into ``OUT``. Processes rather than threads because a 135M model on short prompts gains little from more torch
threads, while two processes keep two cores busy. ``resume`` resumes each shard's folder, so an interrupted run
started with the same ``--jobs`` picks up its finished cells.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from eval.knowedit.bench import BenchSettings, run_bench
from eval.knowedit.merge import merge_bench_dirs
from memory.errors import ValidationError


def shard_dir(out_dir: Path, i: int, n: int) -> Path:
    return Path(out_dir) / "shards" / f"{i}of{n}"


def _run_shard(model_name: str, settings: BenchSettings, threads: int, position: int) -> str:
    import torch

    from editors.lm.loading import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name)
    run_bench(model, tokenizer, settings, progress=True, position=position)
    return str(settings.out_dir)


def run_bench_jobs(model_name: str, settings: BenchSettings, jobs: int, *, plots: bool = True) -> dict[str, Any]:
    """Run the bench as ``jobs`` shard processes on this machine and merge them into ``settings.out_dir``."""
    if jobs < 1:
        raise ValidationError(f"--jobs must be >= 1 (got {jobs})")
    if settings.shard != (0, 1):
        raise ValidationError("--jobs splits the grid itself: give --jobs or --shard, not both")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    shards = [replace(settings, shard=(i, jobs), out_dir=shard_dir(settings.out_dir, i, jobs)) for i in range(jobs)]
    # The model is converted and cached by the parent first, so the shards never race to write the same cache entry.
    from editors.lm.loading import resolve_model

    resolve_model(model_name)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_shard, model_name, s, threads, i) for i, s in enumerate(shards)]
        folders = [f.result() for f in futures]
    return merge_bench_dirs(folders, settings.out_dir, plots=plots)
