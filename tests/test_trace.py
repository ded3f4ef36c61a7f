"""Causal tracing (eval/trace.py) and `editmem trace` on tiny models."""

from __future__ import annotations

import json

import pytest

from eval.trace import GROUPS, average_traces, causal_trace, restore_all, subject_range, token_groups
from memory.errors import ValidationError
from tests.tiny import TINY_ARCHS, same_weights, save_folder, snapshot, tiny_model

PROMPT, SUBJECT = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_trace_shapes_and_clean_recovery(arch):
    model, tok = tiny_model(arch)
    saved = snapshot(model)
    trace = causal_trace(model, tok, PROMPT, SUBJECT, samples=3)
    n, layers = len(trace.tokens), 4
    assert set(trace.scores) == {"hidden", "mlp", "attn"}
    assert all(len(g) == n and all(len(r) == layers for r in g) for g in trace.scores.values())
    a, b = trace.subject_range
    assert "".join(trace.tokens[a:b]).strip() == SUBJECT
    # the last layer's hidden state at the last token is the whole answer: restoring it gives p_clean back
    assert trace.scores["hidden"][-1][-1] == pytest.approx(trace.p_clean, rel=1e-5)
    # tokens before the subject never see the noise: restoring them changes nothing
    assert trace.scores["hidden"][0][0] == pytest.approx(trace.p_corrupt, rel=1e-5)
    assert same_weights(model, saved)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_restoring_every_token_of_any_layer_recovers_clean(arch):
    model, tok = tiny_model(arch)
    for layer in range(4):
        p_clean, p = restore_all(model, tok, PROMPT, SUBJECT, layer)
        assert p == pytest.approx(p_clean, rel=1e-5)


def test_subject_range_and_groups():
    _, tok = tiny_model("gpt2")
    a, b = subject_range(tok, PROMPT, SUBJECT)
    assert 0 < a < b
    with pytest.raises(ValidationError):
        subject_range(tok, PROMPT, "Paris")
    model, _ = tiny_model("gpt2")
    trace = causal_trace(model, tok, PROMPT, SUBJECT, samples=2, kinds=("mlp",))
    groups = token_groups(trace)
    assert groups[a] == 0 and groups[b - 1] == 2 and groups[-1] == 5
    avg = average_traces([trace, trace])
    assert avg["n"] == 2 and len(avg["scores"]["mlp"]) == len(GROUPS)


def test_trace_cli_writes_json_and_three_pngs(tmp_path, capsys):
    from serve.cli import main

    model, tok = tiny_model("llama")
    folder = save_folder(model, tok, tmp_path / "tiny")
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(folder), "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2",
                 "--out", str(out)]) == 0
    data = json.loads((out / "trace.json").read_text())
    assert data["subject"] == SUBJECT and len(data["scores"]["mlp"]) == len(data["tokens"])
    assert all((out / f"trace_{k}.png").is_file() for k in ("hidden", "mlp", "attn"))
    assert main(["trace", "--model", str(folder)]) == 2
