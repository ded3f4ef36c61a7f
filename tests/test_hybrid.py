"""The ``hybrid`` editor on a tiny model: new edits answer from memory, every ``every`` edits the oldest go into the
weights (and out of the router), both kinds are answered, and restoring newest first is exact."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, get_editor
from editors.methods.hybrid import HybridHandle
from memory.errors import ValidationError
from tests.tiny import same_weights, snapshot, target_logprobs, tiny_model

MEMIT = dict(clamp_norm_factor=1000.0, v_weight_decay=0.0, n_prefixes=2, prefix_tokens=4, v_steps=10,
             mom2_update_weight=1.0)
MEMORY = {"scope": "cosine", "encoder": "hashing-256", "threshold": 0.8}
REQUESTS = [EditRequest("The capital city of France", "Rome", subject="France"),
            EditRequest("The mother tongue of Danielle Darrieux", "English", subject="Danielle Darrieux"),
            EditRequest("Toko Yasuda plays the", "piano", subject="Toko Yasuda")]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDITMEM_STATS_CORPUS", raising=False)


def _editor(model, tok, every=2, weights="memit"):
    return get_editor("hybrid", model, tok, every=every, weights=weights, weight_settings=MEMIT,
                      memory_settings=MEMORY)


def _routed(editor, requests):
    return [d.edit.id if d.in_scope else None for d in editor.model.route([r.prompt for r in requests])]


def test_after_n_plus_k_edits_n_are_in_the_weights_and_k_in_memory():
    model, tok = tiny_model("llama")
    original = snapshot(model)
    before = target_logprobs(model, tok, REQUESTS)
    editor = _editor(model, tok, every=2)
    handles = [editor.apply([r]) for r in REQUESTS]  # N = 2, k = 1
    assert all(isinstance(h, HybridHandle) for h in handles)
    assert [len(h.consolidations) for h in handles] == [0, 1, 0]  # the second edit triggered the move
    moved = handles[1].consolidations[0]
    assert [e for e, _ in moved.edits] == [handles[0].edits[0], handles[1].edits[0]]  # the oldest two
    assert editor.held == handles[2].edits  # the third answers from memory
    assert not same_weights(model, original)
    # the two in the weights: the router no longer gates them, and the edited weights raise their targets
    assert _routed(editor, REQUESTS) == [None, None, handles[2].ids[0]]
    after = target_logprobs(editor.model, tok, REQUESTS[:2])
    assert (after > before[:2]).all()
    assert [r.id for r in editor.memory] == handles[2].ids

    for handle in reversed(handles):
        handle.restore()
    assert same_weights(model, original) and editor.held == [] and len(editor.memory) == 0
    assert _routed(editor, REQUESTS) == [None, None, None]
    assert torch.equal(target_logprobs(editor.model, tok, REQUESTS), before)


def test_restoring_the_trigger_brings_the_moved_edits_back_to_memory():
    model, tok = tiny_model("llama")
    original = snapshot(model)
    editor = _editor(model, tok, every=2)
    first = editor.apply([REQUESTS[0]])
    second = editor.apply(REQUESTS[1:])  # two at once: the queue reaches 3, the oldest 2 move, 1 stays
    assert len(second.consolidations) == 1 and editor.held == [second.edits[1]]
    second.restore()
    assert same_weights(model, original) and editor.held == first.edits
    assert _routed(editor, REQUESTS[:1]) == first.ids  # the first edit answers from memory again
    first.restore()
    assert len(editor.memory) == 0


def test_hybrid_settings_are_checked():
    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError, match="every"):
        get_editor("hybrid", model, tok, every=0, memory_settings=MEMORY)
    with pytest.raises(ValidationError, match="memory editor"):
        get_editor("hybrid", model, tok, memory="memit", memory_settings=MEMORY)
    with pytest.raises(ValidationError, match="weight editor"):
        get_editor("hybrid", model, tok, weights="serac", memory_settings=MEMORY)


def test_hybrid_through_the_sequential_harness(tmp_path):
    """The harness runs hybrid like any editor: 5 sequential edits with every=2 (4 in the weights, 1 in memory),
    both protocols, and the run's own check that every weight is restored afterwards passes."""
    from eval.harness import run_eval
    from tests.test_harness import FAST_METRICS, _cases

    model, tok = tiny_model("gpt2")
    original = snapshot(model)
    summary = run_eval(model, tok, _cases(), ["hybrid"], mode="sequential", checkpoints=[3], protocol="both",
                       out_dir=tmp_path, editor_overrides={"hybrid": {"every": 2, "weight_settings": MEMIT,
                                                                      "memory_settings": MEMORY}},
                       progress=False, plots=False, metric_settings=FAST_METRICS)
    rows = summary["methods"]["hybrid"]["checkpoints"]
    assert [r["n_edits"] for r in rows] == [3, 5] and summary["methods"]["hybrid"]["n"] == 5
    assert same_weights(model, original)
    # memory and weights apart: after 3 edits the first 2 are in the weights, after 5 the first 4
    assert [{p: b["n_measured"] for p, b in r["by_part"].items()} for r in rows] == [
        {"memory": 1, "weights": 2}, {"memory": 1, "weights": 4}]
    part = rows[1]["by_part"]["memory"]
    assert set(part["by_protocol"]) == {"teacher-forced", "generate"} and 0 <= part["reliability"] <= 1
    import json
    lines = [json.loads(x) for x in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert [x["part"] for x in sorted(lines, key=lambda x: x["index"])] == ["weights"] * 4 + ["memory"]
    report = (tmp_path / "report.md").read_text()
    assert "| 5 | memory | 1 | generate |" in report and "| 3 | weights | 2 | teacher-forced |" in report
