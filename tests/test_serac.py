"""SERAC: registered, settings validate, apply is an insert whose handle retracts exactly its edits (and saves and
loads), and through the harness on a tiny model out-of-scope locality probes score exactly 1.0. Plus one SmolLM2
integration test on real CounterFact edits."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, available_editors, get_editor
from editors.methods.serac import SeracSettings
from editors.retrieval.augmented import AugmentedModel
from editors.retrieval.setup import MemoryEditHandle
from eval.harness import run_eval
from eval.metrics import MetricSettings
from memory.errors import ValidationError
from memory.records import EditCase, Probe
from scope import ScopeError
from tests.tiny import save_folder, tiny_model

TINY = {"scope": "cosine", "encoder": "hashing-256", "threshold": 0.8}




def test_serac_is_registered_and_settings_validate():
    assert "serac" in available_editors()
    for bad in ({"k": 0}, {"threshold": "high"}, {"context": "no fields"}, {"store": ""}, {"scope": ""}):
        with pytest.raises(ValidationError):
            SeracSettings(**bad)
    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError, match="unknown setting"):
        get_editor("serac", model, tok, nope=1)


def test_missing_classifier_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path))
    model, tok = tiny_model("llama")
    with pytest.raises(ScopeError, match="editmem train-scope"):
        get_editor("serac", model, tok, scope="nope")  # "default" falls back to the head shipped in the package


def test_apply_inserts_and_restore_retracts_exactly_its_edits(tmp_path):
    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = get_editor("serac", model, tok, **TINY)
    assert isinstance(editor.model, AugmentedModel) and editor.model.model is model
    mem = editor.memory
    kept = mem.add("The official language of Spain is", "Latin", subject="Spain")
    h1 = editor.apply([EditRequest("The capital of France is", "Rome", subject="France")])
    h2 = editor.apply([EditRequest("Marie Curie was born in", "Tokyo", subject="Marie Curie"),
                       EditRequest("The capital of Japan is", "Oslo", subject="Japan")])
    assert len(mem) == 4 and len(h2.ids) == 2
    assert editor.model.route(["The capital of France is"])[0].edit.id == h1.ids[0]
    h2.save(tmp_path / "h2.pt")
    h1.restore()
    assert {r.id for r in mem.list()} == {kept.id, *h2.ids}
    assert not editor.model.route(["The capital of France is"])[0].in_scope
    h1.restore()  # a no-op the second time
    h2.restore()
    assert [r.id for r in mem.list()] == [kept.id]
    reloaded = MemoryEditHandle.load(tmp_path / "h2.pt", mem)
    assert reloaded.ids == h2.ids and reloaded.applied
    reloaded.restore()  # already deleted: left alone
    assert [r.id for r in mem.list()] == [kept.id]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValidationError):
        editor.apply([])


def _cases() -> list[EditCase]:
    facts = [("France", "Rome"), ("Italy", "Paris"), ("Spain", "Tokyo"), ("Japan", "Madrid")]
    return [EditCase(prompt=f"The capital of {c} is", target_new=t, subject=c,
                     rephrases=(f"The capital city of {c} is",),
                     locality=(Probe("Marie Curie was born in", "Warsaw"), Probe("People in Kenya speak", "Swahili")),
                     case_id=f"c{i}") for i, (c, t) in enumerate(facts)]


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_serac_through_the_harness_keeps_locality_exact(tmp_path, mode):
    model, tok = tiny_model("gpt2")
    summary = run_eval(model, tok, _cases(), ["none", "serac"], mode=mode, out_dir=tmp_path,
                       editor_overrides={"serac": TINY}, metric_settings=MetricSettings(fluency_tokens=4),
                       progress=False, plots=False)
    serac = summary["methods"]["serac"]
    assert serac["locality"] == 1.0 and serac["n"] == 4


@pytest.mark.integration
def test_smollm2_serac_on_counterfact(data_dir, tmp_path):
    from eval.datasets import load_cases
    from tests.tiny import smollm2

    path = data_dir / "counterfact" / "easyedit_split" / "counterfact-edit.json"
    cases = load_cases(path, limit=3)
    model, tok = smollm2()
    summary = run_eval(model, tok, cases, ["serac"], out_dir=tmp_path, progress=False, plots=False,
                       editor_overrides={"serac": {"scope": "cosine", "encoder": "hashing-256", "threshold": 0.7}},
                       metric_settings=MetricSettings(fluency_tokens=4))
    serac = summary["methods"]["serac"]
    assert serac["reliability"] >= 0.9 and serac["locality"] == 1.0


def test_cli_ask_with_serac_names_the_edit(one_edit_store, tmp_path, capsys):
    from serve.cli import main

    store = one_edit_store
    folder = save_folder(*tiny_model("llama"), tmp_path / "tiny-llama")
    common = ["--model", str(folder), "--scope", "cosine", "--threshold", "0.8", "--max-new-tokens", "2"]
    assert main(["--store", store, "ask", "The capital of Japan is", *common]) == 0
    out = capsys.readouterr().out
    assert "-- shaped by edit 1 v1" in out and "The capital of Japan is -> Lima" in out and "demonstration" not in out
    assert main(["--store", store, "ask", "Marie Curie was born in", *common]) == 0
    assert "no edit in scope" in capsys.readouterr().out
    assert main(["--store", store, "ask", "The capital of Japan is", *common, "--counterfactual", "nosuch"]) == 2
    assert "train-counterfactual" in capsys.readouterr().err
