"""The bounded load and fault test of ``editmem serve`` (serve/bench_load.py), a few seconds long: 16 clients mixing
chat, search and writes, zero 5xx; then SIGKILL mid-load and a restart: every acknowledged write is in the store, no
edit has inconsistent versions, verify() passes and the index caught up."""

from __future__ import annotations

import pytest

from tests.serving import EDIT, new_store, tiny_model_folder

pytest.importorskip("httpx")


@pytest.mark.slow
def test_bounded_load_then_sigkill_loses_no_acknowledged_write(tmp_path):
    from serve.bench_load import run_load_bench

    store = new_store(tmp_path / "load.db", EDIT)
    folder = tiny_model_folder(tmp_path / "tiny-llama")
    report = run_load_bench(store, str(folder), clients=16, duration=4.0, kill_after=2.0)
    steady, fault, checks = report["steady"], report["fault"], report["checks"]
    assert steady["requests"] > 0 and steady["acknowledged_writes"] > 0
    assert steady["5xx"] == 0 and fault["5xx"] == 0, report
    assert fault["acknowledged_writes"] > 0
    assert checks["acknowledged_missing"] == 0 and checks["acknowledged_changed"] == 0
    assert checks["edits_with_bad_versions"] == 0 and checks["acknowledged_not_found_by_search"] == 0
    assert report["readyz_after_restart"]["index_caught_up"] is True
