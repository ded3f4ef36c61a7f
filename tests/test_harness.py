"""The harness on a tiny random model with the `none` and `ft` editors, in every mode and protocol."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import pytest
import torch

import editors.base as editors_base
from editors.base import Editor, EditRequest, WeightEditHandle
from eval.harness import EvalSettings, RunSettings, run_eval
from eval.metrics import MetricSettings
from memory.errors import EditmemError, ValidationError
from memory.records import EditCase, Probe
from tests.tiny import save_folder, snapshot, tiny_model

METRIC_KEYS = {"reliability", "generalization", "locality", "portability", "fluency"}
METHOD_KEYS = METRIC_KEYS | {"edit_seconds", "n"}
TOP_KEYS = {"model", "dataset", "protocol", "mode", "n_cases", "methods"}

# FT that visibly moves a random 4-layer model in a few steps.
FT_FAST = {"lr": 0.05, "steps": 8, "norm_constraint": None}
# Fluency from 6 generated tokens instead of 50 keeps the tests fast; the code path is the same.
FAST_METRICS = MetricSettings(fluency_tokens=6)




def _cases() -> list[EditCase]:
    facts = [("France", "Rome"), ("Italy", "Paris"), ("Spain", "Tokyo"), ("Japan", "Madrid"), ("Peru", "Oslo")]
    return [EditCase(prompt=f"The capital of {c} is", target_new=t, subject=c, ground_truth=None,
                     rephrases=(f"{c} has its capital in",),
                     locality=(Probe("The capital of Germany is", "Berlin"), Probe("People in Kenya speak", "Swahili")),
                     portability=(Probe(f"People in {c} speak", "Latin"),) if i % 2 == 0 else (),
                     case_id=f"c{i}")
            for i, (c, t) in enumerate(facts)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gpt2")




def _assert_bit_identical(model, snapshot) -> None:
    now = model.state_dict()
    assert set(now) == set(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), k


def _run(tiny, tmp_path, **kw):
    model, tok = tiny
    before = snapshot(model)
    kw.setdefault("protocol", "teacher-forced")
    summary = run_eval(model, tok, _cases(), ["none", "ft"], out_dir=tmp_path, model_name="tiny-gpt2",
                       dataset_name="hand", editor_overrides={"ft": FT_FAST}, progress=False,
                       metric_settings=FAST_METRICS, **kw)
    _assert_bit_identical(model, before)
    return summary


def _check_common(summary, tmp_path, mode: str, protocol: str) -> list[dict]:
    assert set(summary) == TOP_KEYS | ({"methods"})
    assert summary["model"] == "tiny-gpt2" and summary["dataset"] == "hand"
    assert summary["mode"] == mode and summary["protocol"] == protocol and summary["n_cases"] == 5
    assert list(summary["methods"]) == ["none", "ft"]
    for _name, entry in summary["methods"].items():
        extra = set(entry) - METHOD_KEYS
        assert extra <= {"by_protocol", "checkpoints", "leaks"}
        assert ("leaks" in extra) == (protocol != "teacher-forced")
        assert ("checkpoints" in extra) == (mode == "sequential")
        assert ("by_protocol" in extra) == (protocol == "both")
        assert entry["n"] == 5
        for m in ("reliability", "generalization", "locality", "portability"):
            assert 0.0 <= entry[m] <= 1.0
        assert entry["fluency"] >= 0.0 and entry["edit_seconds"] >= 0.0
    assert summary["methods"]["none"]["locality"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "report.md").is_file() and (tmp_path / "metrics.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "| none |" in report and "| ft |" in report and "tiny-gpt2" in report
    lines = [json.loads(x) for x in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert len(lines) == 5 * 2
    assert sorted((line["method"], line["index"]) for line in lines) == sorted(
        (m, i) for m in ("none", "ft") for i in range(5))
    for line in lines:
        assert line["mode"] == mode and line["case_id"] == f"c{line['index']}"
        protocols = ["teacher-forced", "generate"] if protocol == "both" else [protocol]
        assert list(line["scores"]) == protocols
        for p in protocols:
            assert set(line["scores"][p]) == {"pre", "post"}
            assert set(line["scores"][p]["pre"]) == METRIC_KEYS
            assert line["scores"][p]["pre"]["locality"] == 1.0
            if line["method"] == "none":
                assert line["scores"][p]["post"]["locality"] == 1.0
            if line["index"] % 2 == 1:
                assert line["scores"][p]["post"]["portability"] is None
    return lines


@pytest.mark.parametrize("mode, kw", [("single", {}), ("batch", {"batch_size": 2}),
                                      ("sequential", {"checkpoints": [2, 4]})])
def test_modes_teacher_forced(tiny, tmp_path, mode, kw):
    summary = _run(tiny, tmp_path, mode=mode, **kw)
    lines = _check_common(summary, tmp_path, mode, "teacher-forced")
    ft = summary["methods"]["ft"]
    assert ft["edit_seconds"] > summary["methods"]["none"]["edit_seconds"]
    if mode == "single":  # FT with a large step does move a random model
        assert ft["reliability"] > summary["methods"]["none"]["reliability"]
    if mode == "batch":
        assert sorted({line["batch"] for line in lines}) == [0, 1, 2]
    if mode == "sequential":
        assert [c["n_edits"] for c in ft["checkpoints"]] == [2, 4, 5]
        assert [c["n_measured"] for c in ft["checkpoints"]] == [2, 4, 5]
        assert {k: ft[k] for k in METRIC_KEYS} == {k: ft["checkpoints"][-1][k] for k in METRIC_KEYS}
        assert all(line["n_edits"] == 5 for line in lines)
        assert (tmp_path / "sequential.png").stat().st_size > 1000


@pytest.mark.parametrize("protocol", ["generate", "both"])
def test_other_protocols(tiny, tmp_path, protocol):
    summary = _run(tiny, tmp_path, protocol=protocol)
    _check_common(summary, tmp_path, "single", protocol)
    if protocol == "both":
        for entry in summary["methods"].values():
            assert list(entry["by_protocol"]) == ["teacher-forced", "generate"]
            assert {k: entry[k] for k in METRIC_KEYS} == entry["by_protocol"]["teacher-forced"]
            assert set(entry["by_protocol"]["generate"]) == METRIC_KEYS
        assert summary["methods"]["none"]["by_protocol"]["generate"]["locality"] == 1.0
        assert "Protocol: generate" in (tmp_path / "report.md").read_text()


def test_sequential_samples_intermediate_checkpoints(tiny, tmp_path):
    summary = _run(tiny, tmp_path, mode="sequential", checkpoints=[3], checkpoint_sample=2, protocol="both")
    rows = summary["methods"]["ft"]["checkpoints"]
    assert [(r["n_edits"], r["n_measured"]) for r in rows] == [(3, 2), (5, 5)]
    assert set(rows[0]["by_protocol"]) == {"teacher-forced", "generate"}
    # each checkpoint is also on disk as soon as it is measured (a stopped run keeps its curve)
    written = [json.loads(line) for line in (tmp_path / "checkpoints.jsonl").read_text().splitlines()]
    assert [w for w in written if w["method"] == "ft"] == [{"method": "ft", **r} for r in rows]
    assert [w["method"] for w in written] == ["none", "none", "ft", "ft"]


def test_a_stopped_sequential_run_keeps_its_checkpoints_in_summary_json_marked_unfinished(tiny, tmp_path,
                                                                                          monkeypatch):
    from eval import harness
    from eval.report import format_table

    real_apply = harness._Runner._apply

    def stop_after_three(self, editor, indices, result):
        if indices[0] >= 3 and editor.name == "ft":
            raise RuntimeError("stopped")  # as a run killed after its first checkpoint
        return real_apply(self, editor, indices, result)

    monkeypatch.setattr(harness._Runner, "_apply", stop_after_three)
    with pytest.raises(RuntimeError, match="stopped"):
        _run(tiny, tmp_path, mode="sequential", checkpoints=[3], checkpoint_sample=2, protocol="both")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "tiny-gpt2" and summary["mode"] == "sequential"
    assert "unfinished" not in summary["methods"]["none"]  # finished before ft started
    ft = summary["methods"]["ft"]
    assert ft["unfinished"] == {"n_edits": 3, "of": 5} and ft["n"] == 2
    assert [r["n_edits"] for r in ft["checkpoints"]] == [3]
    assert ft["by_protocol"] == ft["checkpoints"][0]["by_protocol"] and ft["edit_seconds"] > 0
    assert "| ft (unfinished: 3 of 5 edits) |" in format_table(summary)


def test_sequential_sample_final_measures_a_sample_at_the_end_and_pre_edit_only_where_needed(tiny, tmp_path,
                                                                                             monkeypatch):
    from eval import harness

    measured_pre = []
    real_get = harness._PreCache.get

    def spy(self, i):
        if not self.has(i):
            measured_pre.append(i)
        return real_get(self, i)

    monkeypatch.setattr(harness._PreCache, "get", spy)
    summary = _run(tiny, tmp_path, mode="sequential", checkpoints=[3], checkpoint_sample=2, sample_final=True)
    rows = summary["methods"]["ft"]["checkpoints"]
    assert [(r["n_edits"], r["n_measured"]) for r in rows] == [(3, 2), (5, 2)]
    assert summary["methods"]["ft"]["n"] == 2 and summary["methods"]["none"]["n"] == 2
    lines = [json.loads(x) for x in (tmp_path / "cases.jsonl").read_text().splitlines()]
    final = sorted({x["index"] for x in lines})
    assert len(final) == 2
    assert len(measured_pre) == len(set(measured_pre)) <= 4  # two samples of two, never all five cases


def test_metric_without_probes_is_null(tiny, tmp_path):
    model, tok = tiny
    cases = [EditCase(prompt="The capital of France is", target_new="Rome", case_id="x")]
    summary = run_eval(model, tok, cases, ["none"], out_dir=tmp_path, progress=False, plots=False,
                       metric_settings=FAST_METRICS)
    entry = summary["methods"]["none"]
    assert entry["generalization"] is None and entry["locality"] is None and entry["portability"] is None
    assert entry["reliability"] is not None
    assert not (tmp_path / "metrics.png").exists() and (tmp_path / "report.md").is_file()


@pytest.mark.parametrize("kw", [dict(mode="stream"), dict(protocol="bleu"), dict(mode="batch", batch_size=0),
                                dict(batch_size=2), dict(checkpoints=[10]),
                                dict(mode="sequential", checkpoints=[0]), dict(methods=[]), dict(sample_final=True),
                                dict(methods=["none", "none"]), dict(methods=["nosuch"]),
                                dict(editor_overrides={"rome": {}})])
def test_bad_settings_are_refused(tiny, tmp_path, kw):
    model, tok = tiny
    methods = kw.pop("methods", ["none"])
    with pytest.raises(ValidationError):
        run_eval(model, tok, _cases(), methods, out_dir=tmp_path, progress=False, **kw)


def test_run_settings_give_the_same_run_as_keyword_options(tiny, tmp_path):
    model, tok = tiny
    by_kw = run_eval(model, tok, _cases()[:2], ["none"], out_dir=tmp_path / "kw", protocol="both", progress=False,
                     plots=False, metric_settings=FAST_METRICS, model_name="tiny")
    settings = RunSettings(out_dir=tmp_path / "rs", protocol="both", progress=False, plots=False,
                           metric_settings=FAST_METRICS, model_name="tiny")
    by_settings = run_eval(model, tok, _cases()[:2], ["none"], settings)
    for summary in (by_kw, by_settings):
        summary["methods"]["none"].pop("edit_seconds")
    assert by_settings == by_kw and by_settings["model"] == "tiny"
    with pytest.raises(ValidationError, match="not both"):
        run_eval(model, tok, _cases(), ["none"], settings, seed=1)
    with pytest.raises(ValidationError, match="unexpected keyword argument 'moed'"):
        run_eval(model, tok, _cases(), ["none"], out_dir=tmp_path, moed="single")


def test_settings_dataclass():
    s = EvalSettings(methods=("none",), mode="sequential", protocol="both")
    assert s.protocols == ("teacher-forced", "generate")
    assert s.checkpoints_for(5) == [5] and s.checkpoints_for(150) == [10, 100, 150]
    assert EvalSettings(methods=("none",), mode="sequential", checkpoints=(3, 50)).checkpoints_for(20) == [3, 20]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mode = "single"  # frozen


class _LeakyEditor(Editor):
    """Writes an edit whose handle forgets to undo it."""

    name = "leaky"

    def apply(self, requests: Sequence[EditRequest]):
        name, p = next(iter(self.model.named_parameters()))
        handle = WeightEditHandle.write(self.model, {name: p.detach() + 1.0})
        handle.restore = lambda: None
        return handle


def test_an_editor_that_does_not_restore_is_caught(tmp_path, monkeypatch):
    model, tok = tiny_model("gpt2", seed=1)
    monkeypatch.setitem(editors_base._REGISTRY, "leaky", _LeakyEditor)
    with pytest.raises(EditmemError, match=r"leaky.*did not restore"):
        run_eval(model, tok, _cases()[:1], ["none", "leaky"], out_dir=tmp_path, progress=False, plots=False,
                 metric_settings=FAST_METRICS)


# --- CLI ---------------------------------------------------------------------------------------------------------

CF_RECORDS = [
    {"case_id": i, "prompt": f"The capital of {c} is", "target_new": t, "subject": c, "ground_truth": g,
     "rephrase_prompt": f"{c} has its capital in", "locality_prompt": "The capital of Germany is",
     "locality_ground_truth": "Berlin"}
    for i, (c, t, g) in enumerate([("France", "Rome", "Paris"), ("Italy", "Paris", "Rome"),
                                   ("Spain", "Tokyo", "Madrid")])
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny):
    return save_folder(*tiny, tmp_path_factory.mktemp("tiny-gpt2"))


def test_cli_eval(model_folder, tmp_path, capsys):
    from serve.cli import main

    data = tmp_path / "counterfact-mini.json"
    data.write_text(json.dumps(CF_RECORDS))
    out = tmp_path / "out"
    code = main(["eval", "--data", str(data), "--methods", "none,ft", "--model", str(model_folder), "--limit", "2",
                 "--mode", "sequential", "--checkpoints", "1", "--protocol", "both", "--set", "ft.steps=3",
                 "--set", "ft.norm_constraint=null", "--fluency-tokens", "5", "--out", str(out), "--no-plots"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| none |" in printed and "| ft |" in printed and "Protocol: generate" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["dataset"] == "counterfact-mini.json"
    assert summary["protocol"] == "both" and summary["mode"] == "sequential"
    assert summary["methods"]["none"]["locality"] == 1.0
    assert [c["n_edits"] for c in summary["methods"]["ft"]["checkpoints"]] == [1, 2]
    assert len((out / "cases.jsonl").read_text().splitlines()) == 4
    report = (out / "report.md").read_text()
    assert "editmem eval --data" in report and "--set ft.steps=3" in report and "--fluency-tokens 5" in report
    assert "5 greedy new tokens" in report


def test_cli_report_merges_runs_into_one_table_and_plot(model_folder, tmp_path, capsys):
    from serve.cli import main

    data = tmp_path / "counterfact-mini.json"
    data.write_text(json.dumps(CF_RECORDS))
    common = ["--data", str(data), "--model", str(model_folder), "--mode", "sequential", "--checkpoints", "1",
              "--fluency-tokens", "0", "--no-plots"]
    assert main(["eval", *common, "--methods", "none", "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", *common, "--methods", "none,ft", "--set", "ft.steps=2", "--out", str(tmp_path / "b")]) == 0
    single = tmp_path / "single"
    assert main(["eval", "--data", str(data), "--model", str(model_folder), "--methods", "none", "--fluency-tokens",
                 "0", "--no-plots", "--out", str(single)]) == 0
    capsys.readouterr()

    out = tmp_path / "merged"
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    merged = json.loads((out / "summary.json").read_text())
    # "none" is in both runs, so it is labelled by run; "ft" only in one, so it keeps its name
    assert list(merged["methods"]) == ["none (a)", "none (b)", "ft"]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert merged["methods"]["ft"] == b["methods"]["ft"]
    assert [r["label"] for r in merged["runs"]] == ["a", "b"]
    assert "| none (a) |" in printed and "| ft |" in printed
    report = (out / "report.md").read_text()
    assert "Run `b`: none, ft" in report and "editmem report" in report and "#### ft" in report
    assert (out / "sequential.png").stat().st_size > 1000 and (out / "metrics.png").stat().st_size > 1000

    # unlike runs are refused in one line (exit 2), and nothing is written
    refused = tmp_path / "refused"
    assert main(["report", str(tmp_path / "a"), str(single), "--out", str(refused)]) == 2
    err = capsys.readouterr().err.strip()
    assert "differ in mode" in err and len(err.splitlines()) == 1 and not refused.exists()
    assert main(["report", str(tmp_path / "nosuch"), "--out", str(refused)]) == 2
    assert "no summary.json" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--methods", "none,nosuch"], "unknown editing method"),
    (["--methods", "none", "--checkpoints", "a,b", "--mode", "sequential"], "--checkpoints"),
    (["--methods", "none", "--set", "ft"], "METHOD.KEY=VALUE"),
    (["--methods", "none", "--mode", "batch", "--batch-size", "0"], "batch_size"),
    (["--methods", "none", "--fluency-tokens", "-1"], "fluency_tokens"),
])
def test_cli_user_errors_are_one_line(model_folder, tmp_path, capsys, args, message):
    from serve.cli import main

    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CF_RECORDS))
    code = main(["eval", "--data", str(data), "--model", str(model_folder), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_a_sequential_plot_of_many_methods_puts_its_legend_under_the_panels(tmp_path):
    from matplotlib.image import imread

    from eval.report import LEGEND_INSIDE, plot_sequential

    def summary(n_methods: int) -> dict:
        block = {"reliability": 0.9, "generalization": 0.5, "locality": 0.8, "portability": None, "fluency": None}
        rows = [{"n_edits": n, "by_protocol": {"teacher-forced": block, "generate": block}} for n in (10, 100)]
        return {"model": "m", "dataset": "d", "protocol": "both",
                "methods": {f"method{i}": {"checkpoints": rows} for i in range(n_methods)}}

    few = imread(plot_sequential(summary(LEGEND_INSIDE // 2), tmp_path / "few.png"))
    many = imread(plot_sequential(summary(LEGEND_INSIDE), tmp_path / "many.png"))
    assert few.shape[0] == 320 and many.shape[0] > few.shape[0]  # the long legend got its own rows below


# --- relation-aware locality ----------------------------------------------------------------------------------------
def _germany_cases() -> list[EditCase]:
    """_cases() with case 1 about Germany: every case's locality probe "The capital of Germany is" names it."""
    cases = _cases()
    cases[1] = dataclasses.replace(cases[1], prompt="The capital of Germany is", subject="Germany",
                                   rephrases=("Germany has its capital in",))
    return cases


@pytest.mark.parametrize("germany_relation,in_scope", [("P36", [0, 3, 5]), ("P37", [0, 1, 1])])
def test_sequential_relation_aware_locality_leaves_out_probes_in_a_stored_edits_scope(tiny, tmp_path,
                                                                                     germany_relation, in_scope):
    model, tok = tiny
    relations = ["P36", germany_relation, "P36", "P36", "P36"]
    summary = run_eval(model, tok, _germany_cases(), ["none", "ft"], out_dir=tmp_path, progress=False,
                       mode="sequential", checkpoints=[1, 3], protocol="both", metric_settings=FAST_METRICS,
                       editor_overrides={"ft": FT_FAST}, relations=relations)
    for method in ("none", "ft"):
        rows = summary["methods"][method]["checkpoints"]
        # before Germany's edit is stored nothing is in scope; afterwards each measured case's Germany probe is,
        # when Germany's edit asks that case's relation: every case's with P36, only its own case's with P37 (a
        # locality probe asks its own case's relation); each case has two locality probes
        assert [r["relation_aware"]["locality_in_scope"] for r in rows] == in_scope
        assert [r["relation_aware"]["locality_probes"] for r in rows] == [2, 6, 10]
        for row in rows:
            aware = row["relation_aware"]["locality"]
            assert set(aware) == {"teacher-forced", "generate"}
            if not row["relation_aware"]["locality_in_scope"]:
                assert aware == {p: row["by_protocol"][p]["locality"] for p in aware}
        assert summary["methods"][method]["relation_aware"] == rows[-1]["relation_aware"]
    assert summary["methods"]["none"]["relation_aware"]["locality"] == {"teacher-forced": 1.0, "generate": 1.0}
    report = (tmp_path / "report.md").read_text()
    assert "Locality, relation-aware (%)" in report and f"| {in_scope[-1]} / 10 |" in report


def test_relation_aware_locality_is_the_mean_over_probes_not_in_scope():
    from eval.locality_labels import relation_aware

    flags = [[True, False], [False, False], [True, True]]
    probes = [{"teacher-forced": (0.0, 0.5)}, {"teacher-forced": (1.0, 0.0)}, {"teacher-forced": (0.0, 0.0)}]
    out = relation_aware(flags, probes, ["teacher-forced"])
    assert out == {"locality_probes": 6, "locality_in_scope": 3, "locality": {"teacher-forced": 0.5}}
    assert relation_aware([[True]], [{"generate": (1.0,)}], ["generate"])["locality"] == {"generate": None}
    with pytest.raises(ValueError, match="per locality probe"):
        relation_aware([[True, False]], [{"generate": (1.0,)}], ["generate"])


@pytest.mark.parametrize("kw", [dict(relations=["P36"] * 5), dict(mode="sequential", relations=["P36"] * 4)])
def test_relations_need_sequential_mode_and_one_per_case(tiny, tmp_path, kw):
    model, tok = tiny
    with pytest.raises(ValidationError, match="relation"):
        run_eval(model, tok, _cases(), ["none"], out_dir=tmp_path, progress=False, **kw)


def test_sequential_plot_labels_ticks_that_do_not_overlap():
    from eval.report import spread_ticks

    assert spread_ticks([100, 150, 200, 250, 300, 500, 1000, 2000, 3000], log=True) == [100, 150, 250, 500, 1000,
                                                                                       2000, 3000]
    assert spread_ticks([10, 100, 1000], log=True) == [10, 100, 1000]
    assert spread_ticks([100, 101], log=False) == [100, 101] and spread_ticks([], log=False) == []
    assert spread_ticks([10, 20, 30, 990, 1000], log=False) == [10, 1000]
