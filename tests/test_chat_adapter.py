"""The chat adapter (a peft LoRA counterfactual model for chat rows) on a tiny ChatML model: rows are the wrapper's
own in-scope chat rows with the reply after them, training fits its rows and leaves the base model alone, save/load
round-trips (merged weights equal the trained adapter's outputs) and refuses another model or a damaged file, and
SERAC sends in-scope chat rows to the merged copy while out-of-scope rows stay bit-identical to the base model."""

from __future__ import annotations

import json

import pytest
import torch

from editors import EditRequest, get_editor
from editors.lm.chat import chat_frame
from editors.lm.tokens import pad_rows
from editors.retrieval.augmented import AugmentedModel
from editors.retrieval.chat_adapter import (
    SHIPPED_DIR,
    ChatAdapterSettings,
    ChatRows,
    evaluate,
    file_sha256,
    is_chat_adapter,
    load_chat_adapter,
    reply_text,
    save_chat_adapter,
    train_chat_adapter,
)
from editors.retrieval.counterfactual import build_examples
from editors.retrieval.setup import load_counterfactual_model
from memory.errors import EditmemError, ValidationError
from memory.records import EditCase, Probe
from tests.tiny import chat_tokenizer, same_weights, snapshot, tiny_model, tiny_tokenizer

SUBJECTS = ["France", "Italy", "Spain", "Japan", "Kenya", "Peru", "Chile", "Egypt", "India", "China"]
CITIES = ["Rome", "Paris", "Tokyo", "Madrid", "Oslo", "Lima", "Cairo"]


def _cases() -> list[EditCase]:
    return [EditCase(prompt=f"The capital of {s} is", target_new=CITIES[i % len(CITIES)], subject=s,
                     rephrases=(f"What is the capital of {s}?",),
                     locality=(Probe(f"People in {SUBJECTS[(i + 1) % len(SUBJECTS)]} speak", "English"),),
                     case_id=str(i)) for i, s in enumerate(SUBJECTS)]


SMALL = ChatAdapterSettings(rank=4, alpha=8, layers=2, steps=40, batch_size=8, lr=1e-2, warmup=2, val_cases=2,
                            val_every=20, patience=5)


def _scope():
    from scope.classifier import CosineScope

    return CosineScope(0.8, "hashing-256")


@pytest.fixture(scope="module")
def trained():
    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    before = snapshot(model)
    tensors, meta = train_chat_adapter(model, tok, _cases(), SMALL, progress=False)
    return model, tok, before, tensors, meta


def test_settings_and_inputs_are_checked():
    for bad in ({"steps": 0}, {"rank": 0}, {"lr": 0}, {"alpha": 1.5}, {"mix": (0, 0, 0)},
                {"modules": ("nope",)}, {"modules": ()}, {"chat_context": "nope"}, {"warmup": -1}):
        with pytest.raises(ValidationError):
            ChatAdapterSettings(**bad)
    model, _ = tiny_model("llama")
    with pytest.raises(ValidationError, match="chat template"):
        train_chat_adapter(model, tiny_tokenizer(), _cases(), SMALL, progress=False)
    with pytest.raises(ValidationError, match="more than val_cases"):
        train_chat_adapter(model, chat_tokenizer(), _cases()[:2], SMALL, progress=False)
    with pytest.raises(ValidationError, match="layers"):
        train_chat_adapter(model, chat_tokenizer(), _cases(), ChatAdapterSettings(layers=99, val_cases=2),
                           progress=False)


def test_reply_text():
    assert reply_text("What is the capital of Peru?", "Rome") == "Rome."
    assert reply_text("The capital of Peru is", "Rome") == "The capital of Peru is Rome."
    assert reply_text("The capital of Peru is", "Rome.") == "The capital of Peru is Rome."
    assert reply_text("One person was hurt. The capital of Peru is", "Rome") == "The capital of Peru is Rome."


def test_rows_are_the_wrappers_in_scope_chat_rows_followed_by_the_reply():
    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    frame = chat_frame(tok)
    assert frame is not None
    rows = ChatRows(tok, frame, "exchange2-only")
    wrapper = AugmentedModel(model, tok, "sqlite://", _scope(), chat_context="exchange2-only")
    try:
        for ex in build_examples(_cases()[:2])["update"]:
            seq, start = rows.row(ex)
            assert seq[:start] == wrapper.condition_row(frame.encode(ex.query), ex.edit)
            reply = tok(reply_text(ex.query, ex.answer), add_special_tokens=False)["input_ids"]
            assert seq[start:] == [*reply, tok.eos_token_id]
    finally:
        wrapper.memory.close()


def test_training_fits_its_rows_and_leaves_the_base_model_alone(trained):
    model, tok, before, tensors, meta = trained
    assert same_weights(model, before)
    assert meta["kind"] == "chat-lora" and meta["curve"][0]["step"] == 0 and len(meta["curve"]) >= 2
    assert tensors and all("lora_" in k for k in tensors)
    top = model.config.num_hidden_layers - 1
    assert all(f"layers.{top}." in t or f"layers.{top - 1}." in t for t in meta["targets"])
    frame = chat_frame(tok)
    assert frame is not None
    rows = ChatRows(tok, frame, meta["chat_context"])
    train = build_examples(_cases()[:-SMALL.val_cases])
    losses = [c["train_loss"] for c in meta["curve"] if c["train_loss"] is not None]
    assert losses[-1] < losses[0]
    assert meta["best_val"]["update"] >= meta["curve"][0]["update"]
    assert evaluate(model, rows, train)["copy"] == 0.0  # the random base model gives no reply exactly


def test_save_load_round_trip_and_refusals(trained, tmp_path):
    model, _tok, before, tensors, meta = trained
    folder = save_chat_adapter(tensors, meta, tmp_path / "adapter")
    assert is_chat_adapter(folder) and not is_chat_adapter(tmp_path)
    saved = json.loads((folder / "meta.json").read_text())
    assert saved["adapter_sha256"] == file_sha256(folder / "adapter.safetensors")
    merged, chat_context = load_chat_adapter(folder, model)
    assert chat_context == meta["chat_context"] and same_weights(model, before)
    assert load_chat_adapter(folder, model)[0] is merged  # one merged copy per model and adapter
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed and all(any(n.startswith(t) for t in meta["targets"]) for n in changed)
    assert not any(p.requires_grad for p in merged.parameters())
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValidationError, match="trained for base model"):
        load_chat_adapter(folder, other)
    damaged = save_chat_adapter(tensors, meta, tmp_path / "damaged")
    data = bytearray((damaged / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(EditmemError, match="damaged"):
        load_chat_adapter(damaged, model)


def test_serac_answers_in_scope_chat_rows_with_the_merged_copy_and_keeps_the_rest_exact(trained, tmp_path):
    model, tok, before, tensors, meta = trained
    folder = save_chat_adapter(tensors, meta, tmp_path / "adapter")
    editor = get_editor("serac", model, tok, scope="cosine", encoder="hashing-256", threshold=0.8,
                        counterfactual=str(folder))
    wrapper = editor.model
    merged, _ = load_chat_adapter(folder, model)
    assert wrapper.counterfactual is merged and wrapper.chat_context == meta["chat_context"]
    editor.apply([EditRequest("The capital of France is", "Rome", subject="France")])
    frame = chat_frame(tok)
    assert frame is not None
    rows = [frame.encode("The capital of France is"), frame.encode("Bananas are yellow and")]
    ids, mask = pad_rows(rows, tok.pad_token_id)
    try:
        with torch.no_grad():
            out = wrapper(input_ids=ids, attention_mask=mask).logits
            base = model(input_ids=ids, attention_mask=mask).logits
            seq = wrapper.condition_row(rows[0], wrapper.last_routing[0].edit)
            by_copy = merged(input_ids=torch.tensor([seq])).logits[0, -1]
        assert [d.in_scope for d in wrapper.last_routing] == [True, False]
        assert torch.equal(out[1], base[1])
        torch.testing.assert_close(out[0, len(rows[0]) - 1], by_copy)
        assert same_weights(model, before)
    finally:
        editor.memory.close()


def test_the_default_counterfactual_is_the_base_model_where_the_shipped_adapter_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path))
    model, _ = tiny_model("llama")
    assert load_counterfactual_model("default", model, chat_tokenizer()) == (None, None, None)
    assert load_counterfactual_model(None, model, chat_tokenizer()) == (None, None, None)
    editor = get_editor("serac", model, chat_tokenizer(), scope="cosine", encoder="hashing-256")
    assert editor.model.counterfactual is None
    editor.memory.close()


def test_the_shipped_adapter_is_whole():
    meta = json.loads((SHIPPED_DIR / "meta.json").read_text())
    assert meta["kind"] == "chat-lora" and meta["base_fingerprint"].startswith("llama-")
    assert file_sha256(SHIPPED_DIR / "adapter.safetensors") == meta["adapter_sha256"]
    assert (SHIPPED_DIR / "adapter.safetensors").stat().st_size < 4_000_000


def test_a_chat_adapter_answers_chat_rows_only(trained, tmp_path):
    """With the adapter as counterfactual model, an in-scope plain row is the base model's with the plain context
    (the adapter was trained on chat rows alone), an in-scope chat row the merged copy's, in one batch."""
    model, tok, _, tensors, meta = trained
    folder = save_chat_adapter(tensors, meta, tmp_path / "adapter")
    editor = get_editor("serac", model, tok, scope="cosine", encoder="hashing-256", threshold=0.8,
                        counterfactual=str(folder))
    wrapper = editor.model
    assert wrapper.counterfactual_rows == "chat"
    merged, _ = load_chat_adapter(folder, model)
    editor.apply([EditRequest("The capital of France is", "Rome", subject="France")])
    frame = chat_frame(tok)
    assert frame is not None
    plain = tok("The capital of France is")["input_ids"]
    rows = [frame.encode("The capital of France is"), plain]
    assert wrapper.counterfactual_for(rows[0]) is merged and wrapper.counterfactual_for(plain) is model
    ids, mask = pad_rows(rows, tok.pad_token_id)
    width = ids.shape[1]
    try:
        with torch.no_grad():
            out = wrapper(input_ids=ids, attention_mask=mask).logits
            assert [d.in_scope for d in wrapper.last_routing] == [True, True]
            chat_seq = wrapper.condition_row(rows[0], wrapper.last_routing[0].edit)
            plain_seq, _ = wrapper._conditioned(plain, wrapper.last_routing[1].edit)
            by_copy = merged(input_ids=torch.tensor([chat_seq])).logits[0, -1]
            by_base = model(input_ids=torch.tensor([plain_seq])).logits[0, -1]
            torch.testing.assert_close(out[0, len(rows[0]) - 1], by_copy)
            torch.testing.assert_close(out[1, len(plain) - 1], by_base)
            generated = wrapper.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
            alone = model.generate(input_ids=torch.tensor([wrapper.condition_row(plain, wrapper.last_routing[1].edit)]),
                                   max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        assert generated[1, width:width + 3].tolist() == alone[0, -3:].tolist()
    finally:
        editor.memory.close()
