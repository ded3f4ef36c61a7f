"""Every tiny architecture x every editor here (none, ft): the edit works, compute leaves the model alone, restore is
bit-identical, and a saved handle reapplies the same weights. Plus settings validation and one real-model edit."""

from __future__ import annotations

import pytest
import torch

from editors import (
    EditRequest,
    NullHandle,
    WeightEditHandle,
    available_editors,
    get_editor,
)
from editors.lm.architectures import num_layers, param_name
from editors.methods.ft import FTSettings, ft_default_layer
from memory.errors import ValidationError
from tests.tiny import (
    TINY_ARCHS,
    same_weights,
    smollm2,
    snapshot,
    target_logprobs,
    tiny_model,
)

EDITORS = ("none", "ft")
REQUESTS = [EditRequest("The capital of France is", "Rome", subject="France"),
            EditRequest("Marie Curie was born in", "Tokyo", subject="Marie Curie")]






def test_builtin_editors_are_registered():
    assert set(EDITORS) <= set(available_editors())


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("name", EDITORS)
def test_editor_grid(arch, name, tmp_path):
    model, tok = tiny_model(arch)
    original = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = target_logprobs(model, tok, REQUESTS)
    editor = get_editor(name, model, tok)
    assert editor.model is model

    if name == "ft":  # compute leaves the model (weights and flags) untouched
        new = editor.compute(REQUESTS)
        assert list(new) == [param_name(model, ft_default_layer(model), "mlp_out")]
        assert same_weights(model, original)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    handle = editor.apply(REQUESTS)
    after = target_logprobs(editor.model, tok, REQUESTS)
    edited = snapshot(model)
    if name == "none":
        assert isinstance(handle, NullHandle) and same_weights(model, original) and torch.equal(before, after)
    else:
        assert isinstance(handle, WeightEditHandle)
        assert (after > before).all(), (before, after)
        changed = [k for k in original if not torch.equal(original[k], edited[k])]
        assert changed == list(handle.edited)
        bound = editor.settings.norm_constraint
        delta = (edited[changed[0]] - original[changed[0]]).abs().max().item()
        assert 0 < delta <= bound * (1 + 1e-3)

    handle.restore()
    assert same_weights(model, original)
    handle.restore()  # a second restore is a no-op
    assert same_weights(model, original)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    path = tmp_path / "edit.pt"
    handle.save(path)
    if name == "ft":  # save -> load -> reapply gives the same weights; restore after that is exact again
        loaded = WeightEditHandle.load(path, model)
        assert same_weights(model, edited)
        loaded.restore()
        assert same_weights(model, original)


def test_ft_batch_size_only_chunks():
    model, tok = tiny_model("llama")
    a = get_editor("ft", model, tok, batch_size=1).compute(REQUESTS)
    b = get_editor("ft", model, tok, batch_size=16).compute(REQUESTS)
    (name, wa), = a.items()
    assert torch.allclose(wa, b[name], atol=1e-6)


def test_ft_unconstrained_and_explicit_layer():
    model, tok = tiny_model("gpt2")
    original = snapshot(model)
    editor = get_editor("ft", model, tok, layer=3, norm_constraint=None, lr=1e-2, steps=10)
    before = target_logprobs(model, tok, REQUESTS[:1])
    handle = editor.apply(REQUESTS[:1])
    assert list(handle.edited) == ["transformer.h.3.mlp.c_proj.weight"]
    assert target_logprobs(model, tok, REQUESTS[:1]) > before + 1.0  # free to move far
    handle.restore()
    assert same_weights(model, original)


def test_ft_works_inside_no_grad():
    model, tok = tiny_model("qwen2")
    before = target_logprobs(model, tok, REQUESTS[:1])
    with torch.no_grad():
        handle = get_editor("ft", model, tok).apply(REQUESTS[:1])
    assert target_logprobs(model, tok, REQUESTS[:1]) > before
    handle.restore()


def test_ft_defaults():
    model, tok = tiny_model("llama")
    settings = get_editor("ft", model, tok).settings
    assert settings == FTSettings(layer=num_layers(model) // 3)
    assert (settings.lr, settings.steps, settings.norm_constraint, settings.weight_decay) == (5e-4, 25, 5e-4, 0.0)


@pytest.mark.parametrize("overrides", [
    {"learning_rate": 1e-3}, {"lr": -1.0}, {"lr": float("nan")}, {"steps": 0}, {"steps": 2.5}, {"layer": -1},
    {"layer": True}, {"norm_constraint": 0}, {"batch_size": 0}, {"weight_decay": -0.1}, {"early_stop_loss": 0},
])
def test_ft_bad_settings(overrides):
    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError):
        get_editor("ft", model, tok, **overrides)


def test_bad_requests():
    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError, match="does not occur"):
        EditRequest("The capital of France is", "Rome", subject="Germany")
    with pytest.raises(ValidationError, match="no edit requests"):
        get_editor("ft", model, tok).apply([])
    with pytest.raises(ValidationError, match="layer 9 does not exist"):
        get_editor("ft", model, tok, layer=9).apply(REQUESTS)
    with pytest.raises(ValidationError):
        get_editor("none", model, tok).apply(["not a request"])
    with pytest.raises(ValidationError, match="unknown setting"):
        get_editor("none", model, tok, lr=1.0)
    with pytest.raises(ValidationError, match="unknown editing method"):
        get_editor("no-such-editor", model, tok)


@pytest.mark.integration
def test_ft_on_smollm2():
    model, tok = smollm2()
    request = [EditRequest("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")]
    editor = get_editor("ft", model, tok)
    assert editor.settings.layer == 10
    original = snapshot(model)
    before = target_logprobs(model, tok, request)
    handle = editor.apply(request)
    try:
        after = target_logprobs(model, tok, request)
        assert after > before + 0.1, (before, after)
    finally:
        handle.restore()
    assert same_weights(model, original)


def test_absorbed_handles_restore_and_reapply_exactly():
    """Three overlapping weight edits folded into the first handle (as the harness does in sequential mode): restore
    gives the base weights bit for bit, reapply the state after the last edit, and the originals are kept once."""
    model, _ = tiny_model("llama")
    base = snapshot(model)
    names = [n for n, _ in model.named_parameters() if "mlp" in n][:3]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    steps = [{names[0]: None, names[1]: None}, {names[1]: None, names[2]: None}, {names[0]: None}]
    handles = [WeightEditHandle.add_deltas(model, {n: torch.randn(params[n].shape, generator=g) for n in step})
               for step in steps]
    final = snapshot(model)
    first = handles[0]
    for later in handles[1:]:
        first.absorb(later)
        later.restore()  # a no-op now: its undo lives in `first`
    assert same_weights(model, final)
    assert set(first.originals) == set(names)
    assert all(torch.equal(first.originals[n], base[n]) for n in names)
    first.restore()
    assert same_weights(model, base)
    first.reapply()
    assert same_weights(model, final)
    other, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="same model"):
        first.absorb(WeightEditHandle.add_deltas(other, {names[0]: torch.zeros(params[names[0]].shape)}))
