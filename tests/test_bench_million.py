"""The store-at-scale benchmark (serve/bench_million.py) runs end to end at a toy size, through every measurement
(HNSW growth, compaction and two namespaces included, by lowering the thresholds); its numbers at size are in
notes/scale.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve.bench_million import Templates, main, synthetic_edits


def _templates() -> Templates:
    return Templates(subjects=("Ann", "Bo", "Cy", "Di", "Ed"),
                     templates=("{} plays the", "{} was born in", "{} speaks"), relations=("P1", "P19", "P103"),
                     answers={"P1": ("piano",), "P19": ("Oslo", "Rome"), "P103": ("Dutch",)})


def test_synthetic_edits_are_distinct_seeded_and_use_their_relations_answers() -> None:
    t = _templates()
    every = list(synthetic_edits(t, 0, t.size, seed=3))
    assert len({e["prompt"] for e in every}) == t.size == 15  # every (subject, template) pair once
    assert list(synthetic_edits(t, 4, 9, seed=3)) == every[4:9]  # a slice is the same slice of the sequence
    assert every == list(synthetic_edits(t, 0, t.size, seed=3))
    assert every != list(synthetic_edits(t, 0, t.size, seed=4))
    for e in every:
        assert e["subject"] in e["prompt"] and e["target_new"] in t.answers[e["relation_id"]]
    with pytest.raises(ValueError, match="distinct"):
        list(synthetic_edits(t, 0, t.size + 1, seed=3))


def test_bench_million_runs_every_measurement_at_a_toy_size(data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import memory.index
    import memory.sync

    monkeypatch.setattr(memory.sync, "HNSW_AUTO_THRESHOLD", 300)  # so 600 edits grow into HNSW
    monkeypatch.setattr(memory.index, "STALE_MIN", 50)  # and 150 tombstones are compacted
    out = tmp_path / "out"
    assert main(["--n", "600", "--encoder", "hashing-64", "--batch", "250", "--queries", "20", "--ratio-sample", "50",
                 "--searches", "300", "--namespaces", "2", "--data", str(data_dir), "--out", str(out),
                 "--workdir", str(tmp_path)]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["command"].startswith("python -m serve.bench_million --n 600") and len(r["load_average_start"]) == 3
    assert [v["added"] for v in r["import"].values()] == [600, 600]
    assert r["import"]["a"]["index"]["kind"] == "hnsw" and not r["import"]["a"]["index"]["compacting"]
    assert r["search"]["n_edits"] == 600 and r["recall"]["n_live"] == 600 and r["recall"]["recall_at_1"] >= 0.9
    assert [e["ef_search"] for e in r["ef_sweep"]] == [128, 512] and r["ef_sweep"][1]["recall_at_1"] >= 0.9
    assert r["open"]["rebuilt"] is False and r["open"]["index"]["kind"] == "hnsw"
    d = r["delete"]
    assert d["deleted"] == 60 and d["after_delete"]["tombstones"] == 60 and d["check"]["deleted_returned"] == 0
    assert d["check"]["searches"] == 300
    c = d["compaction"]
    assert c["started_in_background"] and c["after"]["tombstones"] == 0 and c["check"]["deleted_returned"] == 0
    assert c["after"]["live"] == 600 - 60 - c["extra_deleted"]
    assert [v["leaks"] for v in r["namespaces"].values()] == [0, 0]
    assert r["sizes"]["sql_bytes_per_edit"] > 0 and r["sizes"]["index_bytes_per_edit"] > 0
    table = capsys.readouterr().out
    assert "| import throughput" in table and "two namespaces of 600" in table and "background compaction" in table


def test_bench_million_rebuild_measures_the_grown_graph_then_the_rebuilt_one(data_dir: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import memory.sync

    monkeypatch.setattr(memory.sync, "HNSW_AUTO_THRESHOLD", 200)
    out = tmp_path / "out"
    assert main(["--n", "400", "--encoder", "hashing-64", "--batch", "150", "--queries", "20", "--ratio-sample", "50",
                 "--searches", "50", "--no-compact", "--rebuild", "--ef-sweep", "16,64", "--data", str(data_dir),
                 "--out", str(out), "--workdir", str(tmp_path)]) == 0
    r = json.loads((out / "result.json").read_text())
    g = r["grown"]
    assert g["ef_search"] == r["recall"]["ef_search"] and 0 <= g["recall_at_1"] <= 1
    assert [e["ef_search"] for e in g["ef_sweep"]] == [16, 64] and all("added_p50_ms" not in e for e in g["ef_sweep"])
    assert r["rebuild"]["seconds"] > 0 and r["rebuild"]["index"]["kind"] == "hnsw"
    assert r["rebuild"]["index"]["live"] == 400 and r["rebuild"]["index"]["tombstones"] == 0
    assert all("added_p50_ms" in e for e in r["ef_sweep"])  # after the rebuild, timed as before
    assert "then `rebuild_index` in one batch" in capsys.readouterr().out


def test_bench_million_measure_compares_search_depths_on_a_kept_store(data_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--keep leaves the store; --measure opens it and times the default efSearch and the sweep's depths query by
    query, with recall against exact search; a missing store is refused."""
    import memory.sync

    monkeypatch.setattr(memory.sync, "HNSW_AUTO_THRESHOLD", 200)
    common = ["--n", "400", "--encoder", "hashing-64", "--queries", "20", "--data", str(data_dir)]
    assert main([*common, "--batch", "150", "--ratio-sample", "50", "--searches", "50", "--no-compact", "--ef-sweep",
                 "", "--keep", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "made")]) == 0
    kept = Path(json.loads((tmp_path / "made" / "result.json").read_text())["kept_store"])
    assert main([*common, "--measure", str(kept), "--ef-sweep", "16,64", "--out", str(tmp_path / "m")]) == 0
    r = json.loads((tmp_path / "m" / "result.json").read_text())
    rows = r["ef_paired"]
    assert [e["ef_search"] for e in rows] == [r["default_ef_search"], 16, 64] and r["n_queries"] == 20
    assert r["n_live"] == 360 and r["index"]["kind"] == "hnsw"  # 10% deleted by the run that made it
    assert all(e["n_timed"] == 20 and 0 <= e["recall_at_1"] <= 1 and "paired_extra_p50_ms" in e for e in rows)
    assert rows[0]["recall_at_1"] >= rows[1]["recall_at_1"] - 0.1
    with pytest.raises(SystemExit):
        main([*common, "--measure", str(tmp_path / "nothing.db"), "--out", str(tmp_path / "x")])
    # --top-up brings the store back to --n live edits with new ones (after the held-out queries) and rebuilds
    assert main([*common, "--measure", str(kept), "--ef-sweep", "", "--top-up", "--batch", "25",
                 "--out", str(tmp_path / "t")]) == 0
    r = json.loads((tmp_path / "t" / "result.json").read_text())
    t = r["top_up"]
    assert (t["live_before"], t["added"], t["live_after"], r["n_live"]) == (360, 40, 400, 400)
    assert t["grown_index"]["grown"] >= 40 and 0 <= t["grown_recall_at_1"] <= 1
    assert (t["index"]["built"], t["index"]["grown"], t["index"]["tombstones"]) == (400, 0, 0)
    assert main([*common, "--measure", str(kept), "--ef-sweep", "", "--top-up", "--out", str(tmp_path / "t2")]) == 0
    assert json.loads((tmp_path / "t2" / "result.json").read_text())["top_up"]["added"] == 0  # already full
    with pytest.raises(SystemExit):  # --top-up / --route only measure a kept store
        main([*common, "--top-up", "--out", str(tmp_path / "x")])


def test_route_timing_times_the_default_router_on_held_out_and_stored_prompts() -> None:
    """The default router (shipped head + relation reranker, on MiniLM) routes stored prompts to their edits and
    times every depth asked for, with the bare encoder beside it."""
    from memory import EditMemory
    from memory.encoder import DEFAULT_ENCODER
    from serve.bench_million import route_timing

    stored = ["The mother tongue of Tom Fletcher is", "Danielle Darrieux plays the", "The capital of Norland is"]
    held_out = ["The weather today is", "My favourite colour is", "Bananas are"]
    with EditMemory.open("sqlite://", encoder=DEFAULT_ENCODER) as mem:
        mem.add_many({"prompt": p, "target_new": t} for p, t in zip(stored, ("French", "piano", "Oslo")))
        rows = route_timing(mem, mem.encoder, held_out, stored, [1024, None])
    assert [(r["group"], r["ef_search"], r["n"]) for r in rows] == [
        ("held_out", 1024, 3), ("held_out", None, 3), ("stored", 1024, 3), ("stored", None, 3)]
    assert [r["routed"] for r in rows if r["group"] == "stored"] == [1.0, 1.0]
    assert all(r["route_p50_ms"] > 0 and r["encoder_p50_ms"] > 0 and "paired_added_p50_ms" in r for r in rows)


def test_routing_distractors_are_about_made_up_subjects_only() -> None:
    from serve.bench_routing import distractor_edits

    t = Templates(subjects=("Ann Lee", "Bo Dahl", "Cy Ames", "Di Roe", "Ed Fox Lin"),
                  templates=("{} plays the", "{} was born in", "{} speaks"), relations=("P1", "P19", "P103"),
                  answers={"P1": ("piano",), "P19": ("Oslo", "Rome"), "P103": ("Dutch",)})
    real = list(t.subjects)
    fake = distractor_edits(t, real, 30, seed=1)
    assert len(fake) == 30 and len({(f["subject"], f["prompt"]) for f in fake}) == 30
    assert not {f["subject"].lower() for f in fake} & {s.lower() for s in real}
    firsts, lasts = {"Ann", "Bo", "Cy", "Di", "Ed"}, {"Lee", "Dahl", "Ames", "Roe", "Lin"}
    for f in fake:
        first, last = f["subject"].split()
        assert first in firsts and last in lasts
        rel = t.relations[t.templates.index(f["prompt"].replace(f["subject"], "{}", 1))]
        assert f["target_new"] in t.answers[rel]
    assert distractor_edits(t, real, 30, seed=1) == fake and distractor_edits(t, real, 30, seed=2) != fake
    with pytest.raises(ValueError, match="too few"):
        distractor_edits(t, real, 1000)
