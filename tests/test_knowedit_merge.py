"""`editmem report` on KnowEdit bench shards: hand-made cell files in separate shard folders merge into one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.knowedit.merge import is_bench_dir, merge_bench_dirs
from memory.errors import ValidationError
from serve.cli import main


def _shard(folder: Path, data_dir: Path, cells: dict[tuple[str, str], dict], methods: list[str],
           protocol: str = "both", limit: int = 2) -> Path:
    (folder / "cells").mkdir(parents=True)
    (folder / "bench.json").write_text(json.dumps({"data_dir": str(data_dir), "limit": limit, "methods": methods,
                                                   "tasks": ["ZsRE", "ConvSent"], "protocol": protocol,
                                                   "chat": "auto", "cloze": "chat"}))
    for (task, method), body in cells.items():
        (folder / "cells" / f"{task}__{method}.json").write_text(json.dumps({"task": task, "method": method,
                                                                             **body}))
    return folder


def _metrics(tf: float, gen: float, loc: float) -> dict:
    return {"metrics": {"teacher-forced": {"edit_succ": tf, "locality": loc},
                        "generate": {"edit_succ": gen, "locality": loc}}, "n": 2, "seconds": 1.0}


@pytest.fixture
def shards(tmp_path):
    data = tmp_path / "data" / "knowedit"
    (tmp_path / "data" / "published").mkdir(parents=True)
    (tmp_path / "data" / "published" / "knowedit_published.json").write_text(json.dumps(
        {"source": "fixture table", "table": {"ZsRE": {"edit_succ": {"FT-M": 99.0, "ROME": 96.0}}}}))
    a = _shard(tmp_path / "s0", data, {("ZsRE", "ft_m"): _metrics(1.0, 0.5, 0.75),
                                       ("ConvSent", "ft_m"): _metrics(0.6, 0.6, 0.25)}, ["ft_m", "rome"])
    b = _shard(tmp_path / "s1", data, {("ZsRE", "rome"): _metrics(0.5, 0.25, 1.0),
                                       ("ConvSent", "rome"): {"not_run": "ROME: no subject"}}, ["ft_m", "rome"])
    return tmp_path, a, b


def test_report_merges_shard_folders_into_one_table(shards, capsys):
    tmp_path, a, b = shards
    out = tmp_path / "merged"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged 4 cells (2 methods x 2 tasks)" in printed
    table = json.loads((out / "table.json").read_text())
    rows = {(r["task"], r["metric"], r["protocol"]): r for r in table["rows"]}
    assert rows[("ZsRE", "edit_succ", "teacher-forced")]["values"] == {"ft_m": 100.0, "rome": 50.0}
    assert rows[("ZsRE", "edit_succ", "generate")]["values"] == {"ft_m": 50.0, "rome": 25.0}
    assert rows[("ZsRE", "edit_succ gap (tf - gen)", "")]["values"] == {"ft_m": 50.0, "rome": 25.0}
    assert rows[("ConvSent", "locality", "teacher-forced")]["values"]["ft_m"] == 0.25  # KL, not percent
    assert table["not_run"] == {"ConvSent": {"rome": "ROME: no subject"}}
    rank = table["rank_correlation"]["ZsRE"]
    assert rank["methods"] == ["ft_m", "rome"] and rank["spearman"] == pytest.approx(1.0)
    assert table["published_source"] == "fixture table"
    md = (out / "table.md").read_text()
    assert "| ZsRE | edit_succ | teacher-forced | 100.00 | 50.00 |" in md and "not run [1]" in md
    assert (out / "table.png").is_file()
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["ConvSent__ft_m.json", "ConvSent__rome.json",
                                                                 "ZsRE__ft_m.json", "ZsRE__rome.json"]
    assert json.loads((out / "bench.json").read_text())["merged_from"] == [str(a), str(b)]
    # merging again, into one of the shards itself, is idempotent
    again = merge_bench_dirs([a, b, out], a, plots=False)
    assert again["rows"] == table["rows"] and not (a / "table.png").exists()


def test_report_refuses_shards_of_different_runs(shards, capsys):
    tmp_path, a, _ = shards
    other = _shard(tmp_path / "s2", tmp_path, {}, ["ft"], protocol="teacher-forced")
    with pytest.raises(ValidationError, match="protocol"):
        merge_bench_dirs([a, other], tmp_path / "x")
    clash = _shard(tmp_path / "s3", tmp_path, {("ZsRE", "ft_m"): _metrics(0.0, 0.0, 0.0)}, ["ft_m"])
    with pytest.raises(ValidationError, match="differs"):
        merge_bench_dirs([a, clash], tmp_path / "y")
    eval_run = tmp_path / "evalrun"
    eval_run.mkdir()
    (eval_run / "summary.json").write_text("{}")
    assert not is_bench_dir(eval_run) and is_bench_dir(a)
    assert main(["report", str(a), str(eval_run), "--out", str(tmp_path / "z")]) == 2
    assert "cannot merge KnowEdit bench folders with eval runs" in capsys.readouterr().err
