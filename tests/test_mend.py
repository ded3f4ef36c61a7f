"""MEND on tiny models: training lowers the edit loss, an edit with a briefly trained hypernetwork raises the target,
compute leaves the model alone, restore is bit-identical, checkpoints round-trip and are refused for another model,
the low-rank training edit equals the written weight delta, settings validate, and `editmem train-mend` runs."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from editors import EditRequest, get_editor
from editors.lm.architectures import num_layers, param_name
from editors.methods.mend import (
    FrozenModel,
    MendCheckpointError,
    MENDSettings,
    MENDTrainSettings,
    edit_hooks,
    encode_rows,
    load_checkpoint,
    save_checkpoint,
    train_mend,
    transform_factors,
    weight_deltas,
)
from memory.errors import ValidationError
from memory.records import EditCase, Probe
from tests.tiny import TINY_ARCHS, same_weights, snapshot, target_logprobs, tiny_model

_CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
             ("China", "Beijing"), ("Russia", "Moscow"), ("Greece", "Athens"), ("Egypt", "Cairo"),
             ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Norway", "Oslo")]


def _cases() -> list[EditCase]:
    out = []
    for i, (country, capital) in enumerate(_CAPITALS):
        new = _CAPITALS[(i + 3) % len(_CAPITALS)][1]
        other, other_capital = _CAPITALS[(i + 1) % len(_CAPITALS)]
        out.append(EditCase(f"The capital of {country} is", new, country, capital,
                            rephrases=(f"{country} has its capital in",),
                            locality=(Probe(f"The capital of {other} is", other_capital, "neighborhood"),)))
    return out


CASES = _cases()
# a few quick steps with a large learning rate: enough to move a random tiny model
QUICK = MENDTrainSettings(steps=30, val_every=10, batch_size=4, val_cases=4, rank=16, lr=1e-2, lr_edit_lr=5e-2)
REQUESTS = [EditRequest(c.prompt, c.target_new, c.subject) for c in CASES[-3:]]  # the held-out validation cases


@functools.cache
def _trained(arch: str):
    model, tok = tiny_model(arch)
    return model, tok, train_mend(model, tok, CASES, QUICK)


@pytest.fixture
def trained(request):
    model, tok, result = _trained(request.param)
    original = snapshot(model)
    yield model, tok, result
    assert same_weights(model, original), "a test left the shared tiny model edited"


@pytest.mark.parametrize("trained", ["llama", "gpt2", "gptj"], indirect=True)
def test_training_lowers_the_edit_loss(trained):
    _, _, result = trained
    first, best = result.history[0], result.best
    assert result.steps == QUICK.steps and len(result.history) == 4
    assert best["edit_nll"] < 0.9 * first["edit_nll"]
    assert best["loss"] < first["loss"]
    assert result.layers == (1, 2, 3)  # the top three of four blocks


@pytest.mark.parametrize("trained", TINY_ARCHS, indirect=True)
def test_edit_raises_target_and_restores_bit_identically(trained, tmp_path):
    model, tok, result = trained
    folder = save_checkpoint(result, model, tmp_path / "ck")
    editor = get_editor("mend", model, tok, checkpoint=str(folder))
    original = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = target_logprobs(model, tok, REQUESTS)

    deltas = editor.compute(REQUESTS[:1])  # compute writes nothing: weights, flags and grads untouched
    assert sorted(deltas) == sorted(param_name(model, layer, "mlp_out") for layer in result.layers)
    assert same_weights(model, original)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    for i, request in enumerate(REQUESTS):
        handle = editor.apply([request])
        after = target_logprobs(model, tok, [request])[0]
        assert after > before[i] + 0.1, (request, float(before[i]), float(after))
        handle.restore()
        assert same_weights(model, original)
        handle.restore()  # a second restore is a no-op
        assert same_weights(model, original)


@pytest.mark.parametrize("trained", ["llama"], indirect=True)
def test_checkpoint_round_trip_by_name(trained, tmp_path, monkeypatch):
    model, tok, result = trained
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path))
    folder = save_checkpoint(result, model, "tiny-run")
    assert folder == tmp_path / "mend" / "tiny-run"
    config = json.loads((folder / "config.json").read_text())
    assert config["layers"] == [1, 2, 3] and config["model_type"] == "llama"
    assert config["settings"]["rank"] == 16 and len(json.loads((folder / "history.json").read_text())) == 4

    by_folder = get_editor("mend", model, tok, checkpoint=str(folder))
    expected = {k: v.clone() for k, v in by_folder.compute(REQUESTS).items()}
    reloaded = get_editor("mend", model, tok, checkpoint="tiny-run")
    assert reloaded.loaded.folder == folder
    got = reloaded.compute(REQUESTS)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # the network in memory and the loaded one agree too
    direct = load_checkpoint("tiny-run", model).net.state_dict()
    assert all(torch.equal(direct[k], v) for k, v in result.net.state_dict().items())


@pytest.mark.parametrize("trained", ["llama"], indirect=True)
def test_checkpoint_for_another_model_is_refused(trained, tmp_path):
    model, tok, result = trained
    folder = save_checkpoint(result, model, tmp_path / "ck")
    other, _ = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(MendCheckpointError, match="trained for another model"):
        get_editor("mend", other, tok, checkpoint=str(folder))
    gpt2, _ = tiny_model("gpt2")
    with pytest.raises(MendCheckpointError, match="trained for another model"):
        load_checkpoint(folder, gpt2)
    with pytest.raises(MendCheckpointError, match="no MEND checkpoint"):
        load_checkpoint(tmp_path / "missing", model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_low_rank_training_edit_equals_the_written_delta(arch):
    """What training optimises (the edit added by hooks, per row) is exactly what the editor writes."""
    model, tok, result = _trained(arch)
    frozen = FrozenModel(model, result.layers)
    rows = encode_rows(tok, [(r.prompt, r.target_new) for r in REQUESTS[:1]], [0], torch.device("cpu"))
    first = frozen.gradient_factors(rows, torch.ones(1, dtype=torch.bool))
    with torch.no_grad():
        ut, dt = transform_factors(result.net, first.us, first.deltas)
        hooked, _ = frozen.logits_at(rows, edit_hooks(result.net, ut, dt, first.owner, rows.owner))
        written = weight_deltas(result.net, frozen, ut, dt)
    original = snapshot(model)
    from editors.base import WeightEditHandle

    handle = WeightEditHandle.add_deltas(model, written)
    try:
        with torch.no_grad():
            plain, _ = frozen.logits_at(rows, None)
    finally:
        handle.restore()
    assert same_weights(model, original)
    assert torch.allclose(hooked, plain, atol=1e-4, rtol=1e-4)


def test_bad_settings_are_refused():
    model, tok = tiny_model("llama")
    for bad in (dict(rank=0), dict(layers=[-1]), dict(layers=[1, 1]), dict(c_loc=-1.0), dict(lr=float("nan")),
                dict(batch_size=1.5), dict(patience=-1), dict(time_limit_s=0), dict(steps=True),
                dict(all_tokens="yes")):
        with pytest.raises(ValidationError):
            MENDTrainSettings(**bad)
    with pytest.raises(ValidationError, match="unknown MEND training setting"):
        MENDTrainSettings.from_overrides({"ranks": 4})
    with pytest.raises(ValidationError, match="does not exist"):
        train_mend(model, tok, CASES, MENDTrainSettings(layers=(num_layers(model),), steps=1))
    for bad in (dict(edit_scale=0), dict(checkpoint=""), dict(checkpoint=3)):
        with pytest.raises(ValidationError):
            MENDSettings(**bad)
    with pytest.raises(ValidationError, match="unknown setting"):
        get_editor("mend", model, tok, checkpont="x")
    with pytest.raises(ValidationError, match="train-mend"):
        get_editor("mend", model, tok).apply(REQUESTS[:1])  # no checkpoint given


def test_cli_train_mend_then_edit(tmp_path, capsys):
    from serve.cli import main

    model, tok = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = [{"subject": c.subject, "src": c.prompt, "alt": c.target_new, "answers": [c.ground_truth],
                "rephrase": c.rephrases[0], "loc": c.locality[0].prompt, "loc_ans": c.locality[0].answer}
               for c in CASES]
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "ck"
    code = main(["train-mend", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out),
                 "--steps", "6", "--batch-size", "4", "--set", "val_every=3", "--set", "rank=8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 steps" in printed and "best validation" in printed
    for name in ("mend.pt", "config.json", "history.json", "validation.png"):
        assert (out / name).is_file()
    code = main(["train-mend", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out),
                 "--set", "rank=0"])
    assert code == 2 and "rank" in capsys.readouterr().err


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pass_two_may_skip_the_blocks_below_the_edited_ones(arch):
    """Training's second pass starts from pass 1's output below the first edited block; same logits as a full run,
    and the model's blocks are all back afterwards."""
    model, tok, result = _trained(arch)
    frozen = FrozenModel(model, (2, 3))
    blocks = list(frozen.blocks)
    rows = encode_rows(tok, [(r.prompt, r.target_new) for r in REQUESTS] + [("People in Peru speak", "Spanish")],
                   [0, 1, 2, 3], torch.device("cpu"))
    first = frozen.gradient_factors(rows, torch.tensor([True, True, False, False]))
    assert first.lower is not None
    net = result.net
    with torch.no_grad():
        ut, dt = transform_factors(net, [u[:, :] for u in first.us[:2]], first.deltas[:2])
        fns = edit_hooks(net, ut, dt, first.owner, rows.owner)
        full, labels = frozen.logits_at(rows, fns)
        skipped, labels2 = frozen.logits_at(rows, fns, lower=first.lower)
    assert list(frozen.blocks) == blocks
    assert torch.equal(labels, labels2)
    assert torch.allclose(full, skipped, atol=1e-5, rtol=1e-5)
    assert torch.allclose(first.logits, frozen.logits_at(rows, None)[0].detach(), atol=1e-5, rtol=1e-5)


def test_update_tokens_all_or_only_those_predicting_the_target():
    model, tok, result = _trained("llama")
    rows = encode_rows(tok, [(r.prompt, r.target_new) for r in REQUESTS[:1]], [0], torch.device("cpu"))
    batch = rows.batch
    n_target = int(batch.target_end[0] - batch.target_start[0])
    every = FrozenModel(model, result.layers).gradient_factors(rows, torch.ones(1, dtype=torch.bool))
    only = FrozenModel(model, result.layers, all_tokens=False).gradient_factors(rows, torch.ones(1, dtype=torch.bool))
    assert only.us[0].shape[0] == n_target  # the prompt's last token and every target token but the last
    assert every.us[0].shape[0] == int(batch.target_end[0]) - 1
    # the top layer's output gradient is zero at the positions that do not predict the target
    top = every.deltas[-1]
    assert top[:-n_target].abs().max() == 0 and top[-n_target:].abs().max() > 0
    assert torch.equal(only.deltas[-1], top[-n_target:])
