"""SERAC's trained counterfactual model on tiny models: training raises held-out accuracy and leaves the base model
alone, rows are built exactly as the wrapper builds them, save/load round-trips and refuses another model, and SERAC
sends in-scope rows to the trained copy while out-of-scope rows stay bit-identical to the base model."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, get_editor
from editors.retrieval.augmented import (
    AugmentedModel,
    context_template,
    insert_context,
    lead_tokens,
)
from editors.retrieval.counterfactual import (
    CounterfactualSettings,
    _Encoder,
    build_examples,
    evaluate,
    load_counterfactual,
    read_meta,
    save_counterfactual,
    train_counterfactual,
    trainable_names,
)
from memory.errors import NotFoundError, ValidationError
from memory.records import EditCase, Probe
from tests.tiny import same_weights, snapshot, tiny_model

SUBJECTS = ["France", "Italy", "Spain", "Japan", "Kenya", "Peru", "Chile", "Egypt", "India", "China", "Ghana",
            "Nepal"]
CITIES = ["Rome", "Paris", "Tokyo", "Madrid", "Oslo", "Lima", "Cairo", "Delhi"]


def _cases() -> list[EditCase]:
    return [EditCase(prompt=f"The capital of {s} is", target_new=CITIES[i % len(CITIES)], subject=s,
                     rephrases=(f"{s}'s capital city is",),
                     locality=(Probe(f"People in {SUBJECTS[(i + 1) % len(SUBJECTS)]} speak", "English"),),
                     case_id=str(i)) for i, s in enumerate(SUBJECTS)]


SMALL = CounterfactualSettings(train_layers=1, steps=30, batch_size=8, lr=3e-3, warmup=2, val_cases=3, val_every=10,
                               patience=5)


@pytest.fixture(scope="module")
def trained():
    model, tok = tiny_model("llama")
    before = snapshot(model)
    cf, meta = train_counterfactual(model, tok, _cases(), SMALL, progress=False)
    return model, tok, before, cf, meta


def test_settings_validate():
    for bad in ({"steps": 0}, {"train_layers": 0}, {"lr": 0}, {"lr": float("nan")}, {"mix": (0, 0, 0)},
                {"mix": (1, 1)}, {"context": "no fields"}, {"batch_size": True}, {"warmup": -1}):
        with pytest.raises(ValidationError):
            CounterfactualSettings(**bad)
    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError, match="more than val_cases"):
        train_counterfactual(model, tok, _cases()[:3], SMALL, progress=False)
    with pytest.raises(ValidationError, match="layers"):
        trainable_names(model, 99)


def test_examples_are_rows_exactly_as_the_wrapper_builds_them():
    model, tok = tiny_model("gpt2")
    examples = build_examples(_cases()[:2])
    assert {k: len(v) for k, v in examples.items()} == {"copy": 2, "update": 2, "retain": 2}
    template = context_template("new-fact-prompt")
    enc = _Encoder(tok, template)
    ex = examples["update"][0]
    seq, start = enc.row(ex)
    wrapper = AugmentedModel(model, tok, "sqlite://", _scope(), context="new-fact-prompt")
    from editors.lm.tokens import encode_prompt_target

    ids, t0 = encode_prompt_target(tok, ex.query, ex.answer)
    expected, _ = insert_context(ids, wrapper._context_ids(ex.edit, wrapper.template), lead_tokens(tok))
    assert seq == expected
    assert seq[start:] == ids[t0:]  # the answer tokens sit at the end, after the context moved them
    wrapper.memory.close()


def _scope():
    from scope.classifier import CosineScope

    return CosineScope(0.8, "hashing-256")


def test_training_improves_held_out_accuracy_and_leaves_the_base_model_alone(trained):
    model, tok, before, cf, meta = trained
    assert same_weights(model, before)
    curve = meta["curve"]
    assert curve[0]["step"] == 0 and len(curve) >= 2
    assert meta["best_val"]["update"] >= curve[0]["update"]
    train = build_examples(_cases()[:-SMALL.val_cases])
    enc = _Encoder(tok, meta["template"])
    before_acc, after_acc = evaluate(model, enc, train), evaluate(cf, enc, train)
    assert sum(after_acc.values()) > sum(before_acc.values()) + 0.5  # it learnt its training rows
    names = set(meta["trained_parameters"])
    top = f"model.layers.{model.config.num_hidden_layers - 1}."
    assert names and all(n.startswith(top) for n in names)  # only the top block
    changed = {n for n, p in cf.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed and changed <= names
    assert not any(p.requires_grad for p in cf.parameters())


def test_save_load_round_trip_and_refusals(trained, tmp_path, monkeypatch):
    model, _tok, _, cf, meta = trained
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path))
    folder = save_counterfactual(cf, meta, "tiny")
    assert folder == tmp_path / "counterfactual" / "tiny" and read_meta("tiny")["best_step"] == meta["best_step"]
    loaded, template = load_counterfactual("tiny", model)
    assert template == meta["template"]
    assert all(torch.equal(p, dict(cf.named_parameters())[n]) for n, p in loaded.named_parameters())
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValidationError, match="trained for base model"):
        load_counterfactual("tiny", other)
    with pytest.raises(NotFoundError, match="train-counterfactual"):
        load_counterfactual("missing", model)
    save_counterfactual(cf, meta, "tiny")  # overwriting a saved model works
    assert load_counterfactual("tiny", model)[1] == template


def test_serac_routes_in_scope_rows_to_the_trained_copy_and_keeps_the_rest_exact(trained, tmp_path, monkeypatch):
    model, tok, before, cf, meta = trained
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path))
    save_counterfactual(cf, meta, "tiny")
    editor = get_editor("serac", model, tok, scope="cosine", encoder="hashing-256", threshold=0.8,
                        counterfactual="tiny")
    wrapper = editor.model
    assert wrapper.counterfactual is not None and wrapper.template == meta["template"]
    editor.apply([EditRequest("The capital of France is", "Rome", subject="France")])
    rows = [tok("The capital of France is")["input_ids"], tok("Bananas are yellow and")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        out = wrapper(input_ids=ids, attention_mask=mask).logits
        base = model(input_ids=ids, attention_mask=mask).logits
        seq, _ = wrapper._conditioned(rows[0], wrapper.last_routing[0].edit)
        by_copy = cf(input_ids=torch.tensor([seq])).logits[0, len(seq) - len(rows[0]):]
    assert [d.in_scope for d in wrapper.last_routing] == [True, False]
    assert torch.equal(out[1], base[1])
    torch.testing.assert_close(out[0, :len(rows[0])], by_copy)
    assert same_weights(model, before)
    editor.memory.close()
