"""The lifelong-editing benchmarks on a tiny model: edit time per method (serve.bench_edit_time) and consolidate +
delete + rebuild (serve.bench_consolidation)."""

from __future__ import annotations

import json

import pytest

from serve.bench_edit_time import main, parse_method, table
from tests.tiny import tiny_model

CASES = [{"prompt": f"The capital of Country{i} is", "subject": f"Country{i}", "target_new": "Paris",
          "ground_truth": "Rome", "rephrase_prompt": f"Country{i}'s capital city is",
          "locality_prompt": "The sky is", "locality_ground_truth": "blue"} for i in range(3)]


def test_parse_method_reads_settings_as_json_else_strings():
    assert parse_method("rome") == ("rome", {})
    assert parse_method("rome+key_mode=consistent+layer=1") == ("rome", {"key_mode": "consistent", "layer": 1})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_method("rome+consistent")


def test_every_method_is_timed_in_one_run_and_a_method_that_cannot_run_is_reported(tmp_path, monkeypatch):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(CASES), encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of some text about the world and its capitals" for i in range(200)))
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "edit_time.json"
    assert main(["--data", str(data), "--model", str(tmp_path / "m"), "--edits", "2",
                 "--methods", "rome,rome+key_mode=consistent,alphaedit,grace,mend+checkpoint=missing",
                 "--stats-corpus", str(corpus), "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("rome", "rome+key_mode=consistent", "alphaedit", "grace"):
        assert rows[name]["n"] == 2 and len(rows[name]["edits"]) == 2
        assert 0 < rows[name]["edit_min"] <= rows[name]["edit_median"] <= rows[name]["edit_max"]
    # the statistics were computed (a fresh cache), and AlphaEdit's projection timed apart
    assert rows["rome"]["statistics_cached"] == 0.0 and rows["rome"]["statistics_seconds"] > 0
    assert rows["alphaedit"]["projection_seconds"] > 0
    assert "statistics_seconds" not in rows["grace"]
    assert "not_run" in rows["mend+checkpoint=missing"]
    text = table(list(rows.values()))
    assert "not run" in text and "| alphaedit |" in text


def test_consolidation_bench_deletes_and_finds_the_folder_equal_to_a_rebuild(tmp_path, monkeypatch):
    from serve.bench_consolidation import main as consolidation_main
    from serve.bench_consolidation import spread

    assert spread([1, 2, 3, 4, 5, 6], 2) == [2, 5] and spread([1, 2], 0) == []
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cases = [dict(c, prompt=f"The capital of Land{i} is", subject=f"Land{i}") for i, c in enumerate(CASES * 2)]
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(cases), encoding="utf-8")
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert consolidation_main(["--data", str(data), "--model", str(tmp_path / "m"), "--edits", "6",
                               "--batch-size", "3", "--delete", "2", "--method", "memit", "--sample", "3",
                               "--protocol", "teacher-forced", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["bit_identical"] and result["files_differing"] == [] and result["tensors_differing"] == []
    assert len(result["deleted"]) == 2 and result["held_edits"] == 4  # the batch mates were written again
    assert result["after_delete"]["teacher-forced"]["locality"] is not None


def test_grace_replay_bench_times_the_stores_replay(tmp_path):
    """serve.bench_grace_replay replays synthetic records through editors.adaptors.replay: close keys make some
    inserts merge (fewer entries than two per edit), and the result is written with the command."""
    from serve.bench_grace_replay import main as replay_main

    out = tmp_path / "replay.json"
    assert replay_main(["--edits", "20,40", "--repeats", "1", "--spread", "0.02", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["edits"] for r in result["rows"]] == [20, 40]
    assert all(0 < r["entries"] < 2 * r["edits"] and r["median_s"] > 0 for r in result["rows"])
    with pytest.raises(SystemExit):
        replay_main(["--edits", "0"])
