"""The store benchmark runs end to end at a toy size (its numbers are not checked here; BENCHMARKS.md has them)."""

from __future__ import annotations

import json

from serve.bench_store import (
    StoreBenchSettings,
    render_markdown,
    run_store_bench,
    write_section,
)


def test_store_bench_runs_and_writes_its_section(data_dir, tmp_path):
    settings = StoreBenchSettings(data_dir=data_dir, encoder="hashing-64", import_n=200, sizes=(200, 400),
                                  n_queries=20, hnsw_n=2000, hnsw_queries=50, recall_all=False)
    results = run_store_bench(settings, progress=False)
    assert results["import"]["added"] == 200
    assert [s["n_edits"] for s in results["search"]] == [200, 400]  # the store grows to each size exactly
    assert 0.0 <= results["hnsw"]["recall_at_1"] <= 1.0
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nintro\n")
    write_section(out, "store", render_markdown(results, "cmd"))
    write_section(out, "store", render_markdown(results, "cmd"))  # replaces, does not append twice
    text = out.read_text()
    assert text.count("<!-- bench:store:start -->") == 1 and "intro" in text and "import throughput" in text


def test_store_bench_runs_only_the_parts_asked_for(data_dir):
    settings = StoreBenchSettings(data_dir=data_dir, encoder="hashing-64", hnsw_n=2000, hnsw_queries=20,
                                  parts=("hnsw",))
    results = run_store_bench(settings, progress=False)
    assert "hnsw" in results and not {"import", "search", "recall"} & set(results)
    ef = [s["ef_search"] for s in results["hnsw"]["sweep"]]
    assert ef == sorted(ef)
    assert "HNSW" in render_markdown(results, "cmd")


def test_bench_search_stages_times_each_stage_and_puts_the_store_back(tmp_path, capsys):
    import memory.index as index_module
    import memory.store as store_module
    import memory.sync as sync_module
    from memory import EditMemory
    from serve.bench_search_stages import main

    url = f"sqlite:///{tmp_path / 's.db'}"
    with EditMemory.open(url, encoder="hashing-64") as mem:
        mem.add_many([{"prompt": f"Subject {i} plays the", "target_new": "piano"} for i in range(30)])
    before = (sync_module.IndexSync.catch_up, index_module._search, store_module.EditMemory._current_records)
    out = tmp_path / "stages.json"
    assert main(["--store", url, "--queries", "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_edits"] == 30 and result["n_queries"] == 12 and result["index"] == "flat"
    assert set(result["stages_ms"]) == {"catch_up", "faiss", "rows"}
    assert all(v > 0 for v in result["stages_ms"].values()) and result["faiss_alone_ms"] > 0
    assert result["search_ms"] > result["stages_ms"]["faiss"]
    assert (sync_module.IndexSync.catch_up, index_module._search, store_module.EditMemory._current_records) == before
    assert json.loads(capsys.readouterr().out) == result
