"""ROME and MEMIT on every tiny architecture: the edit raises each target, compute leaves the model alone, restore is
bit-identical, a saved handle reapplies the same weights; plus the shared maths (hooks, keys, the cached tail pass),
settings, errors, and one real CounterFact edit on SmolLM2.

Tiny random models have near-zero MLP outputs, so ROME's norm clamp (a multiple of the unedited output's norm) and
weight decay (divided by its squared norm) would freeze the value optimisation; the grid loosens those two settings
(and MEMIT's covariance weight, which is calibrated for real statistics) and edits prompts that end with the subject,
where a random model's attention does not have to carry the change forward.
"""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, WeightEditHandle, get_editor
from editors.lm.architectures import (
    UnsupportedArchitectureError,
    layer_module,
    param_name,
)
from editors.lm.hooks import add_at, capture, forward, skip_blocks, stop_after
from editors.locate.keys import context_prefixes, encode_row, subject_last_index
from editors.locate.values import (
    ValueOptions,
    _Runner,
    optimize_value,
    optimize_values,
    value_rows,
)
from editors.methods.memit import (
    MEMITSettings,
    default_layers,
    default_mom2_update_weight,
)
from editors.methods.rome import ROMESettings, rome_default_layer
from memory.errors import ValidationError
from tests.tiny import (
    TINY_ARCHS,
    same_weights,
    smollm2,
    snapshot,
    target_logprobs,
    tiny_model,
)

METHODS = ("rome", "memit")
REQUESTS = [EditRequest("The mother tongue of Danielle Darrieux", "English", subject="Danielle Darrieux"),
            EditRequest("The capital city of France", "Rome", subject="France")]
TINY = {"rome": dict(clamp_norm_factor=1000.0, v_weight_decay=0.0, n_prefixes=2, prefix_tokens=4, v_steps=10),
        "memit": dict(clamp_norm_factor=1000.0, v_weight_decay=0.0, n_prefixes=2, prefix_tokens=4, v_steps=10,
                      mom2_update_weight=1.0)}




@pytest.fixture(autouse=True)
def _no_corpus(monkeypatch, tmp_path):
    monkeypatch.delenv("EDITMEM_STATS_CORPUS", raising=False)




@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_grid(arch, name, tmp_path):
    model, tok = tiny_model(arch)
    original = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = target_logprobs(model, tok, REQUESTS)
    editor = get_editor(name, model, tok, **TINY[name])
    layers = [rome_default_layer(model)] if name == "rome" else list(default_layers(model))
    expected = [param_name(model, layer, "mlp_out") for layer in layers]

    deltas = editor.compute(REQUESTS)  # compute writes nothing: weights, flags and grads untouched
    assert sorted(deltas) == sorted(expected)
    assert same_weights(model, original)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for key, delta in deltas.items():
        assert delta.shape == original[key].shape and delta.abs().max() > 0
    assert "identity" in editor.stats_source

    handle = editor.apply(REQUESTS)
    assert isinstance(handle, WeightEditHandle)
    after = target_logprobs(model, tok, REQUESTS)
    assert (after > before).all(), (before, after)
    edited = snapshot(model)
    changed = sorted(k for k in original if not torch.equal(original[k], edited[k]))
    assert changed == sorted(expected) == sorted(handle.edited)
    for key in changed:  # apply adds exactly what compute returns (it is deterministic)
        torch.testing.assert_close(edited[key] - original[key], deltas[key], rtol=1e-4, atol=1e-6)

    handle.restore()
    assert same_weights(model, original)
    handle.restore()
    assert same_weights(model, original)

    path = tmp_path / "edit.pt"
    handle.save(path)
    loaded = WeightEditHandle.load(path, model)
    assert same_weights(model, edited)
    loaded.restore()
    assert same_weights(model, original)


def test_memit_many_requests_raise_each_target():
    model, tok = tiny_model("llama")
    requests = [EditRequest("The mother tongue of Danielle Darrieux", "English", subject="Danielle Darrieux"),
                EditRequest("The capital city of France", "Rome", subject="France"),
                EditRequest("The profession of Marie Curie", "painter", subject="Marie Curie"),
                EditRequest("The official language of Japan", "Swedish", subject="Japan")]
    before = target_logprobs(model, tok, requests)
    handle = get_editor("memit", model, tok, **TINY["memit"]).apply(requests)
    after = target_logprobs(model, tok, requests)
    handle.restore()
    assert (after > before).all(), (before, after)


def test_rome_conv1d_delta_is_transposed():
    model, tok = tiny_model("gpt2")  # Conv1D weight is (in, out) = (128, 64)
    (name, delta), = get_editor("rome", model, tok, **TINY["rome"]).compute(REQUESTS[:1]).items()
    assert name.endswith("mlp.c_proj.weight") and tuple(delta.shape) == (128, 64)
    singular = torch.linalg.svdvals(delta.double())
    assert singular[1] < 1e-5 * singular[0]  # rank one


SPEEDUPS = dict(prefix_cache=True, skip_lower=True, logits_at_targets=True, drop_last_token=True)
PLAIN = dict(prefix_cache=False, skip_lower=False, logits_at_targets=False, drop_last_token=False)


def _value_module(model, which):
    """ROME's hooked module (an MLP output projection) or MEMIT's (a whole block), at layer 2 of 4."""
    return model.get_submodule(param_name(model, 2, "mlp_out").removesuffix(".weight")) if which == "mlp_out" \
        else layer_module(model, 2, "block")


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("which", ["mlp_out", "block"])
@pytest.mark.parametrize("speedups", [dict(prefix_cache=True), dict(skip_lower=True), dict(logits_at_targets=True),
                                      dict(drop_last_token=True), SPEEDUPS],
                         ids=["cache", "skip", "head", "drop-last", "all"])
def test_fast_passes_match_plain_pass(arch, which, speedups):
    """Every speed-up of the value optimisation's pass, alone and together, gives the plain pass's logits where the
    loss reads them, call after call (the first call records the lower blocks, later ones skip them)."""
    model, tok = tiny_model(arch)
    prefixes = context_prefixes(model, tok, 3, 5)
    rows = value_rows(tok, EditRequest("Marie Curie was born in", "Tokyo", subject="Marie Curie"), prefixes)
    params = {n: p.detach() for n, p in model.named_parameters()}
    module = _value_module(model, which)
    on = {**PLAIN, **speedups}
    fast = _Runner(model, tok, rows, params, on["prefix_cache"], module, skip_lower=on["skip_lower"],
                   at_targets=on["logits_at_targets"], drop_last=on["drop_last_token"])
    plain = _Runner(model, tok, rows, params, False, module)
    if not on["prefix_cache"]:  # the rewrite rows are the longest; without their last token one column less is run
        assert fast.ids.shape[1] == plain.ids.shape[1] - on["drop_last_token"]
    assert (fast.cache is not None) == on["prefix_cache"] and plain.cache is None
    assert fast.skip == (2 if on["skip_lower"] else 0)
    delta = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = plain.logits(delta)
        for d in (None, delta, delta, 2 * delta):  # the cache is not consumed; the recorded blocks are reused
            expected = reference if d is delta else plain.logits(d)
            torch.testing.assert_close(fast.logits(d), expected, rtol=1e-4, atol=1e-5)
    assert on["skip_lower"] == (fast.lower is not None)
    assert same_weights(model, snapshot(tiny_model(arch)[0]))  # the blocks are back in place


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("which", ["mlp_out", "block"])
def test_fast_value_optimisation_matches_plain(arch, which):
    """The optimised value (delta, v0, losses, number of passes) equals the one of the plain passes."""
    model, tok = tiny_model(arch)
    prefixes = context_prefixes(model, tok, 2, 4)
    request = EditRequest("The capital city of France", "Rome", subject="France")
    module = _value_module(model, which)
    settings = dict(clamp_norm_factor=1000.0, weight_decay=0.0, steps=8, early_stop_loss=None)
    fast = optimize_value(model, tok, request, prefixes, module, ValueOptions(**settings, **SPEEDUPS))
    plain = optimize_value(model, tok, request, prefixes, module, ValueOptions(**settings, **PLAIN))
    assert fast.steps == plain.steps == 8
    assert plain.delta.norm() > 0 and plain.loss_last < plain.loss_first
    torch.testing.assert_close(fast.v0, plain.v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.delta, plain.delta, rtol=1e-3, atol=1e-4)
    for a, b in ((fast.loss_first, plain.loss_first), (fast.loss_last, plain.loss_last),
                 (fast.target_prob_last, plain.target_prob_last)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_argmax_early_stop_stops_at_the_first_delta_that_makes_every_target_token_the_most_probable(arch):
    """With ``early_stop_argmax`` the value is the first one (pass by pass) under which every target token is the
    most probable next token behind every prefix; the delta one pass earlier is not."""
    model, tok = tiny_model(arch)
    prefixes = context_prefixes(model, tok, 2, 4)
    request = EditRequest("The capital city of France", "Rome", subject="France")
    module = _value_module(model, "block")
    settings = dict(steps=30, lr=0.5, clamp_norm_factor=1000.0, weight_decay=0.0, early_stop_loss=None)
    stopped = optimize_value(model, tok, request, prefixes, module, ValueOptions(**settings, early_stop_argmax=True))
    assert 1 < stopped.steps < 30, "the test needs an edit that becomes the most probable after a few passes"
    before = optimize_value(model, tok, request, prefixes, module,
                            ValueOptions(**{**settings, "steps": stopped.steps - 1}))
    params = {n: p.detach() for n, p in model.named_parameters()}
    runner = _Runner(model, tok, value_rows(tok, request, prefixes), params, False, module)
    labels = runner.plan.nll_labels

    def all_most_probable(delta: torch.Tensor) -> bool:
        with torch.no_grad():
            return bool((runner.logits(delta)[:len(labels)].argmax(-1) == labels).all())

    assert all_most_probable(stopped.delta) and not all_most_probable(before.delta)
    assert stopped.delta.norm() < optimize_value(model, tok, request, prefixes, module,
                                                 ValueOptions(**settings)).delta.norm()


BATCH_REQUESTS = [EditRequest("The capital city of France", "Rome", subject="France"),
                  EditRequest("Marie Curie was born in", "Tokyo Bay", subject="Marie Curie"),
                  EditRequest("Danielle Darrieux speaks", "English", subject="Danielle Darrieux")]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_values_equal_one_at_a_time(arch):
    """Requests optimised together (one pass for all their rows) get what each gets alone: delta, v0, losses and the
    number of passes, also when they stop early at different steps and when the norm clamp holds them back."""
    model, tok = tiny_model(arch)
    prefixes = context_prefixes(model, tok, 2, 4)
    module = _value_module(model, "block")
    settings = dict(steps=8, clamp_norm_factor=0.6, weight_decay=0.05)
    free = [optimize_value(model, tok, r, prefixes, module, ValueOptions(**settings, early_stop_loss=None))
            for r in BATCH_REQUESTS]
    # stop halfway down the request whose loss falls most, so that it stops early and the others run all 8 passes
    first, last = max(((a.loss_first, a.loss_last) for a in free), key=lambda fl: fl[0] - fl[1])
    options = ValueOptions(**settings, early_stop_loss=(first + last) / 2)
    alone = [optimize_value(model, tok, r, prefixes, module, options) for r in BATCH_REQUESTS]
    assert len({a.steps for a in alone}) > 1, "the test needs requests that stop at different passes"
    assert any(a.delta.norm().item() == pytest.approx(0.6 * a.v0.norm().item(), rel=1e-4) for a in alone), \
        "the clamp never bound"
    together = optimize_values(model, tok, BATCH_REQUESTS, prefixes, module, options, batch=3)
    pairs = optimize_values(model, tok, BATCH_REQUESTS, prefixes, module, options, batch=2)
    for got in (together, pairs):
        assert [g.steps for g in got] == [a.steps for a in alone]
        for g, a in zip(got, alone):
            torch.testing.assert_close(g.v0, a.v0, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g.delta, a.delta, rtol=1e-3, atol=1e-4)
            for x, y in ((g.loss_first, a.loss_first), (g.loss_last, a.loss_last),
                         (g.target_prob_last, a.target_prob_last)):
                assert x == pytest.approx(y, rel=1e-4, abs=1e-5)


def test_memit_value_batch_gives_the_same_deltas():
    model, tok = tiny_model("llama")
    one = get_editor("memit", model, tok, **TINY["memit"], value_batch=1).compute(BATCH_REQUESTS)
    three = get_editor("memit", model, tok, **TINY["memit"], value_batch=3).compute(BATCH_REQUESTS)
    assert one.keys() == three.keys()
    for name in one:
        torch.testing.assert_close(three[name], one[name], rtol=1e-3, atol=1e-5)
    with pytest.raises(ValidationError, match="value_batch"):
        get_editor("memit", model, tok, value_batch=0)


def test_skip_blocks_puts_the_blocks_back_on_error():
    model, _ = tiny_model("llama")
    blocks = model.model.layers
    originals = list(blocks)
    with pytest.raises(RuntimeError, match="boom"), skip_blocks(blocks, 2, torch.zeros(1)):
        assert blocks[0] is blocks[1] and blocks[0] is not originals[0]
        raise RuntimeError("boom")
    assert all(a is b for a, b in zip(blocks, originals))


def test_rome_several_requests_are_sequential():
    """ROME applies several requests one after another; each one's target goes up."""
    model, tok = tiny_model("qwen2")
    before = target_logprobs(model, tok, REQUESTS)
    editor = get_editor("rome", model, tok, **TINY["rome"])
    handle = editor.apply(REQUESTS)
    assert (target_logprobs(model, tok, REQUESTS) > before).all()
    assert editor.last_stats["n_requests"] == 2
    handle.restore()


# ------------------------------------------------------------------------------------------------ hooks and keys


def test_hooks_remove_themselves_even_on_error():
    model, tok = tiny_model("llama")
    module = model.model.layers[1].mlp.down_proj
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    plain = model(input_ids=ids).logits
    with pytest.raises(RuntimeError, match="boom"), capture(module, "input"), \
            add_at(module, torch.ones(64), torch.tensor([0]), torch.tensor([1])):
        raise RuntimeError("boom")
    assert not module._forward_hooks and not module._forward_pre_hooks
    with capture(module, "input") as k, capture(module, "output") as v, stop_after(module):
        model(input_ids=ids)
    assert k.last.shape == (1, ids.shape[1], 128) and v.last.shape == (1, ids.shape[1], 64)
    assert not module._forward_hooks and not module._forward_pre_hooks
    torch.testing.assert_close(model(input_ids=ids).logits, plain)
    with add_at(module, torch.ones(64), torch.tensor([0]), torch.tensor([2])):
        moved = model(input_ids=ids).logits
    assert torch.equal(moved[0, :2], plain[0, :2]) and not torch.equal(moved[0, 2], plain[0, 2])


def test_forward_with_overrides_writes_nothing():
    model, tok = tiny_model("gpt2")
    original = snapshot(model)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    name = "transformer.h.1.mlp.c_proj.weight"
    out = forward(model, {name: torch.zeros_like(original[name])}, input_ids=ids).logits
    assert not torch.equal(out, model(input_ids=ids).logits)
    assert same_weights(model, original)


def test_subject_last_index():
    _, tok = tiny_model("llama")
    text = "The mother tongue of Danielle Darrieux is"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    i = subject_last_index(tok, text, "Danielle Darrieux")
    assert tok.decode(ids[:i + 1]).endswith("Danielle Darrieux") and not tok.decode(ids[:i]).endswith("Darrieux")
    row = encode_row(tok, "Some prefix about France. ", "The capital of France is", "France", "Rome")
    assert tok.decode(list(row.ids[:row.subject_index + 1])).endswith("The capital of France")
    assert row.target_start is not None and tok.decode(list(row.ids[row.target_start:])).strip() == "Rome"


def test_context_prefixes_are_deterministic_and_leave_the_global_rng():
    model, tok = tiny_model("llama")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = context_prefixes(model, tok, 3, 4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == context_prefixes(model, tok, 3, 4, seed=0) and a != context_prefixes(model, tok, 3, 4, seed=1)
    assert a[0] == "" and len(a) == 4 and all(p.endswith(". ") and "{" not in p for p in a[1:])


# ------------------------------------------------------------------------------------------ settings and errors


def test_defaults_for_the_architecture():
    model, tok = tiny_model("llama")
    assert get_editor("rome", model, tok).settings == ROMESettings(layer=1)
    assert get_editor("memit", model, tok).settings == MEMITSettings(layers=(1, 2), mom2_update_weight=100.0)
    assert default_mom2_update_weight(model) == 100.0  # 15000 * 128 / 16384 / 3 = 39 -> the floor of 100
    wide, _ = tiny_model("gpt2")  # widen one MLP to SmolLM2-135M's key width: 15000 * 1536 / 16384 / 3 = 469 -> 500
    wide.transformer.h[0].mlp.c_proj.weight = torch.nn.Parameter(torch.zeros(1536, 64))  # Conv1D: (in, out)
    assert default_mom2_update_weight(wide) == 500.0
    s = get_editor("rome", model, tok).settings
    assert (s.v_lr, s.v_steps, s.v_weight_decay, s.clamp_norm_factor, s.kl_factor) == (0.5, 20, 0.5, 4.0, 0.0625)
    assert get_editor("memit", model, tok).settings.clamp_norm_factor == 0.75
    assert get_editor("memit", model, tok, layers=[2, 1]).settings.layers == (1, 2)  # JSON lists from --set


@pytest.mark.parametrize("name,overrides", [
    ("rome", {"layer": -1}), ("rome", {"layer": True}), ("rome", {"v_lr": 0}), ("rome", {"v_steps": 1.5}),
    ("rome", {"clamp_norm_factor": float("nan")}), ("rome", {"kl_factor": -1}), ("rome", {"stats_tokens": 0}),
    ("rome", {"mom2_adjustment": "yes"}), ("rome", {"layers": [1]}), ("memit", {"layers": []}),
    ("memit", {"layers": [1, 1]}), ("memit", {"layers": [-1]}), ("memit", {"mom2_update_weight": -1.0}),
    ("memit", {"layer": 1}), ("memit", {"stats_corpus": ""}), ("rome", {"early_stop_argmax": 1}),
])
def test_bad_settings(name, overrides):
    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError):
        get_editor(name, model, tok, **overrides)


@pytest.mark.parametrize("name", METHODS)
def test_request_errors(name):
    model, tok = tiny_model("llama")
    editor = get_editor(name, model, tok)
    label = {"rome": "ROME", "memit": "MEMIT"}[name]
    with pytest.raises(ValidationError, match=f"{label} needs the subject"):
        editor.compute([EditRequest("The capital of France is", "Rome")])
    with pytest.raises(ValidationError, match="does not occur"):
        EditRequest("The capital of France is", "Rome", subject="Germany")
    with pytest.raises(ValidationError, match="no edit requests"):
        editor.apply([])
    with pytest.raises(ValidationError, match="layer 9 does not exist"):
        get_editor(name, model, tok, **({"layer": 9} if name == "rome" else {"layers": [2, 9]})).compute(REQUESTS)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_architecture(name):
    model, tok = tiny_model("llama")
    model.config.model_type = "no-such-arch"
    with pytest.raises(UnsupportedArchitectureError, match="not supported"):
        get_editor(name, model, tok)
    with pytest.raises(UnsupportedArchitectureError, match="not supported"):
        get_editor(name, model, tok, **({"layer": 1} if name == "rome" else {"layers": [1]}))


def test_value_options_defaults_match_settings():
    model, tok = tiny_model("llama")
    assert get_editor("rome", model, tok).settings.value_options() == ValueOptions()


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_harness_runs_rome_and_memit(tmp_path, mode):
    """Registered by name, the harness runs both and finds the model bit-identical afterwards."""
    from eval.harness import run_eval
    from memory.records import EditCase, Probe

    model, tok = tiny_model("gpt2")
    cases = [EditCase(prompt=f"The capital city of {c}", target_new=t, subject=c, rephrases=(f"{c} has its capital",),
                      locality=(Probe("The capital of Germany is", "Berlin"),), case_id=c)
             for c, t in [("France", "Rome"), ("Japan", "Oslo")]]
    summary = run_eval(model, tok, cases, ["rome", "memit"], mode=mode, batch_size=2 if mode == "batch" else 1,
                       out_dir=tmp_path, editor_overrides=TINY, progress=False, plots=False)
    for name in METHODS:
        assert summary["methods"][name]["n"] == 2 and summary["methods"][name]["edit_seconds"] > 0


# ---------------------------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_rome_counterfact_edit_on_smollm2(monkeypatch, tmp_path, data_dir):
    model, tok = smollm2()
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path))  # after loading: the statistics go to tmp
    corpus = data_dir / "text_corpus" / "wikitext-2-raw_wiki.test.raw"
    request = [EditRequest("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        editor = get_editor("rome", model, tok, stats_corpus=str(corpus), stats_tokens=2000, n_prefixes=3,
                            prefix_tokens=5)
        assert editor.settings.layer == rome_default_layer(model) == 4
        original = snapshot(model)
        neighbour = [EditRequest("Michel Rocard is a native speaker of", "French")]
        before, other_before = target_logprobs(model, tok, request), target_logprobs(model, tok, neighbour)
        handle = editor.apply(request)
        try:
            after, other_after = target_logprobs(model, tok, request), target_logprobs(model, tok, neighbour)
        finally:
            handle.restore()
    finally:
        torch.set_num_threads(threads)
    assert same_weights(model, original)
    assert "corpus wikitext-2-raw_wiki.test.raw (2000 tokens" in editor.stats_source
    assert after.exp().item() > 0.5 > before.exp().item(), (before, after)
    assert abs(other_after.item() - other_before.item()) < 0.5  # a neighbouring fact barely moves (nats)
