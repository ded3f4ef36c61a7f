"""Model loading, the architecture table, fingerprints and the shared tokenization, on tiny random models."""

from __future__ import annotations

import json
import types

import pytest
import torch

from editors.lm.architectures import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    arch_spec,
    get_module,
    layer_module,
    model_fingerprint,
    module_path,
    num_layers,
    param_name,
)
from editors.lm.loading import UnknownModelError, load_model, resolve_model
from editors.lm.tokens import (
    IGNORE_INDEX,
    encode_batch,
    encode_prompt,
    encode_prompt_target,
    target_logprob,
    target_text,
    target_token_logprobs,
)
from memory.errors import EditmemError, ValidationError
from tests.tiny import TINY_ARCHS, smollm2, tiny_model, tiny_tokenizer


def _extra_model(model_type: str):
    """Tiny models of the table's extra entries (not in TINY_ARCHS)."""
    import transformers as tf

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    config = {
        "gemma2": lambda: tf.Gemma2Config(head_dim=16, **common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **common),
        "phi3": lambda: tf.Phi3Config(**common, pad_token_id=tok.pad_token_id),
        "gpt_neo": lambda: tf.GPTNeoConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2,
                                           intermediate_size=64, attention_types=[[["global", "local"], 1]],
                                           max_position_embeddings=64),
    }[model_type]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(config).eval()


# --------------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_builds_runs_and_is_deterministic(arch):
    model, tok = tiny_model(arch)
    again, _ = tiny_model(arch)
    other, _ = tiny_model(arch, seed=1)
    assert model.config.model_type == arch and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    batch = tok(["The capital of France is", "Paris"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    out = model.generate(**tok(["The capital of France is"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_tiny_tokenizer_is_gpt2_like():
    tok = tiny_tokenizer()
    assert 300 <= len(tok) <= 1000
    assert tok.eos_token is not None and tok.pad_token is not None
    assert tok.tokenize(" Paris")[0].startswith("Ġ")
    assert tok.decode(tok(" The capital of France is Paris.")["input_ids"]) == " The capital of France is Paris."
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        batch = tok(["a b c d", "a"], padding=True, return_tensors="pt")
        assert batch["attention_mask"][1, 0] == 0 and batch["input_ids"][1, 0] == tok.pad_token_id
    finally:
        tok.padding_side = side


# ------------------------------------------------------------------------------------------ architecture table


def _check_spec(model):
    spec = arch_spec(model)
    cfg = model.config
    hidden = model.get_input_embeddings().weight.shape[1]
    n = num_layers(model)
    assert n == cfg.num_hidden_layers and isinstance(get_module(model, spec.layers), torch.nn.ModuleList)
    vocab = cfg.vocab_size
    assert get_module(model, spec.embeddings) is model.get_input_embeddings()
    assert get_module(model, spec.lm_head) is model.get_output_embeddings()
    assert get_module(model, spec.lm_head).weight.shape == (vocab, hidden)
    assert get_module(model, spec.final_norm).weight.shape == (hidden,)
    from transformers.pytorch_utils import Conv1D

    for i in (0, n - 1):
        out = layer_module(model, i, "mlp_out")
        up = layer_module(model, i, "mlp_in")
        assert isinstance(out, Conv1D) == spec.conv1d and isinstance(up, Conv1D) == spec.conv1d
        inter = out.weight.shape[0] if spec.conv1d else out.weight.shape[1]
        expected_out = (inter, hidden) if spec.weight_layout == "in_out" else (hidden, inter)
        expected_up = (hidden, inter) if spec.conv1d else ((2 if spec.mlp_in_fused else 1) * inter, hidden)
        assert tuple(out.weight.shape) == expected_out
        assert tuple(up.weight.shape) == expected_up
        if spec.mlp_gate:
            assert tuple(layer_module(model, i, "mlp_gate").weight.shape) == (inter, hidden)
        attn = layer_module(model, i, "attn_out")
        assert hidden in tuple(attn.weight.shape)
        assert layer_module(model, i, "mlp") is get_module(model, f"{spec.layers}.{i}.{spec.mlp}")
        assert layer_module(model, i, "block") is get_module(model, spec.layers)[i]
        names = dict(model.named_parameters())
        for which in ("mlp_in", "mlp_out", "attn_out") + (("mlp_gate",) if spec.mlp_gate else ()):
            name = param_name(model, i, which)
            assert names[name] is layer_module(model, i, which).weight
    return spec


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_arch_spec_resolves_on_tiny_models(arch):
    model, _ = tiny_model(arch)
    _check_spec(model)


def test_param_name_examples():
    llama, _ = tiny_model("llama")
    gpt2, _ = tiny_model("gpt2")
    neox, _ = tiny_model("gpt_neox")
    gptj, _ = tiny_model("gptj")
    assert param_name(llama, 3, "mlp_out") == "model.layers.3.mlp.down_proj.weight"
    assert param_name(gpt2, 1) == "transformer.h.1.mlp.c_proj.weight"
    assert param_name(neox, 0) == "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
    assert param_name(gptj, 0) == "transformer.h.0.mlp.fc_out.weight"
    assert arch_spec(gpt2).weight_layout == "in_out" and arch_spec(llama).weight_layout == "out_in"
    assert module_path(llama, 2, "block") == "model.layers.2"


@pytest.mark.parametrize("model_type", ["gemma2", "qwen3", "phi3", "gpt_neo"])
def test_arch_spec_extra_entries(model_type):
    model = _extra_model(model_type)
    assert model.config.model_type == model_type
    _check_spec(model)


def test_every_table_entry_is_tested():
    assert set(ARCHITECTURES) == set(TINY_ARCHS) | {"gemma2", "qwen3", "phi3", "gpt_neo"}


def test_unknown_architecture_is_a_clear_error():
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, is_decoder=True))
    with pytest.raises(UnsupportedArchitectureError, match=r"'bert'.*llama"):
        arch_spec(bert)
    made_up = torch.nn.Linear(2, 2)
    made_up.config = types.SimpleNamespace(model_type="made_up_lm")
    with pytest.raises(UnsupportedArchitectureError, match=r"made_up_lm.*gpt2"):
        num_layers(made_up)
    with pytest.raises(UnsupportedArchitectureError, match="model_type"):
        arch_spec(torch.nn.Linear(2, 2))
    assert issubclass(UnsupportedArchitectureError, EditmemError)


def test_layer_out_of_range_and_bad_kind():
    model, _ = tiny_model("llama")
    with pytest.raises(IndexError, match="4 layers"):
        param_name(model, 4)
    with pytest.raises(ValueError, match="unknown module kind"):
        layer_module(model, 0, "mlp_down")
    gpt2, _ = tiny_model("gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="not gated"):
        layer_module(gpt2, 0, "mlp_gate")


# ------------------------------------------------------------------------------------------------- fingerprints


def test_fingerprint_identifies_the_base_model():
    a, _ = tiny_model("llama")
    fp = model_fingerprint(a)
    assert fp.startswith("llama-") and fp == model_fingerprint(tiny_model("llama")[0])
    assert fp != model_fingerprint(tiny_model("llama", seed=1)[0])
    assert fp != model_fingerprint(tiny_model("mistral")[0])  # same weights, different model_type
    with torch.no_grad():
        dict(a.named_parameters())[param_name(a, 1)].add_(1.0)  # an MLP edit leaves it unchanged
    assert model_fingerprint(a) == fp
    assert model_fingerprint(tiny_model("llama")[0].to(torch.bfloat16)) == fp


# ------------------------------------------------------------------------------------------------------ loading


def test_unknown_model_name_lists_aliases(tmp_path):
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        load_model("no-such-model-anywhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError, match=r"no config\.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(EditmemError, match="dtype"):
        load_model(tmp_path / "empty", dtype="int8")


def test_load_local_folder(tmp_path):
    model, tok = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_model(str(tmp_path / "m"))
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    assert not loaded.training and ltok.pad_token is not None
    assert next(loaded.parameters()).dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    half, _ = load_model(tmp_path / "m", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_stale_conversion_is_detected(tmp_path, monkeypatch):
    from editors.lm import loading as models

    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "converted"
    folder.mkdir()
    stamp = models._source_stamp(gguf)
    assert not models._is_current(folder, stamp)
    (folder / models._MARKER).write_text(json.dumps(stamp))
    assert models._is_current(folder, stamp)
    gguf.write_bytes(b"GGUF2")
    assert not models._is_current(folder, models._source_stamp(gguf))


# ------------------------------------------------------------------------------------------------- tokenization


def test_prompt_target_tokenization():
    tok = tiny_tokenizer()
    prompt = "The capital of France is"
    ids, start = encode_prompt_target(tok, prompt, "Paris")
    assert ids[:start] == tok(prompt)["input_ids"] == encode_prompt(tok, prompt)
    assert ids[start:] == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert encode_prompt_target(tok, prompt, " Paris") == (ids, start)
    spaced, s2 = encode_prompt_target(tok, prompt + " ", "Paris")  # the prompt's own tokens stay as they are
    assert spaced[:s2] == tok(prompt + " ")["input_ids"] and len(spaced) > s2
    assert target_text("a", "b") == " b" and target_text("a ", "b") == "b" and target_text("a", " b") == " b"
    with pytest.raises(ValidationError):
        encode_prompt_target(tok, prompt, "   ")


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_batch_and_target_logprob(side):
    model, tok = tiny_model("llama")
    before_side = tok.padding_side
    prompts = ["The capital of France is", "Marie Curie"]
    targets = ["Paris", "was born in Warsaw"]
    batch = encode_batch(tok, prompts, targets, padding_side=side)
    assert tok.padding_side == before_side
    for row, (p, t) in enumerate(zip(prompts, targets)):
        ids, start = encode_prompt_target(tok, p, t)
        s, e = batch.target_start[row].item(), batch.target_end[row].item()
        assert batch.input_ids[row, s - start:e].tolist() == ids
        assert batch.labels[row, s:e].tolist() == ids[start:]
        assert (batch.labels[row, :s] == IGNORE_INDEX).all() and batch.target_mask[row].sum() == e - s
        assert batch.attention_mask[row].sum() == len(ids)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits if side == "right" else None
    if side == "right":  # compare with one-at-a-time scoring
        per = target_token_logprobs(logits, batch.labels)
        for row, (p, t) in enumerate(zip(prompts, targets)):
            ids, start = encode_prompt_target(tok, p, t)
            with torch.no_grad():
                single = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            manual = sum(single[i - 1, ids[i]].item() for i in range(start, len(ids)))
            assert per[row].sum().item() == pytest.approx(manual, abs=1e-4)
            assert target_logprob(logits, batch.labels)[row].item() == pytest.approx(manual, abs=1e-4)
            assert target_logprob(logits, batch.labels, mean=True)[row].item() == pytest.approx(
                manual / (len(ids) - start), abs=1e-4)
    with pytest.raises(ValidationError):
        encode_batch(tok, ["a"], ["b", "c"])


# ------------------------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_smollm2_loads_offline_and_generates(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = smollm2()
    assert model.config.model_type == "llama" and num_layers(model) == 30
    assert not model.training and tok.pad_token is not None
    _check_spec(model)
    t0 = time.perf_counter()
    again, _ = load_model("smollm2-135m")  # cached folder: no conversion
    assert time.perf_counter() - t0 < 30
    assert model_fingerprint(again) == model_fingerprint(model)
    del again
    ids = torch.tensor([encode_prompt(tok, "The capital of France is")])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text
