"""The memory-augmented wrapper on tiny models: in-scope rows use the edit (and say so), out-of-scope rows are
bit-identical to the base model in forward and generate, logits line up with the original positions, and the answer
follows the store at once."""

from __future__ import annotations

import pytest
import torch

from editors.lm.tokens import encode_batch, encode_prompt
from editors.retrieval.augmented import (
    CLEAN_GENERATE_CONTEXT,
    CONTEXT_FORMATS,
    LEAKY_CONTEXTS,
    AugmentedModel,
    context_template,
    edit_context,
    measure_overhead,
)
from memory.errors import ValidationError
from memory.store import EditMemory
from scope import CosineScope
from tests.tiny import tiny_model

ARCHS = ("llama", "gpt2")
IN = "The capital of France is"
OUT = "Marie Curie was born in"




@pytest.fixture
def memory():
    with EditMemory.open("sqlite://", encoder="hashing-256") as mem:
        yield mem


def _wrapper(arch, memory, **kw):
    model, tok = tiny_model(arch)
    return AugmentedModel(model, tok, memory, CosineScope(0.6), **kw), model, tok


def _left_padded(tok, prompts):
    rows = [encode_prompt(tok, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_routes_rows_and_keeps_out_of_scope_rows_exact(arch, memory):
    edit = memory.add(IN, "Rome", subject="France")
    wrapper, model, tok = _wrapper(arch, memory)
    batch = encode_batch(tok, [IN, OUT, IN, "The official language of Spain is"], ["Rome", "Warsaw", "Paris",
                                                                                   "Spanish"])
    with torch.no_grad():
        base = model(**batch.model_inputs()).logits
        out = wrapper(**batch.model_inputs()).logits
    routed = [d.edit.id if d.in_scope else None for d in wrapper.last_routing]
    assert routed == [edit.id, None, edit.id, None]
    assert torch.equal(out[1], base[1]) and torch.equal(out[3], base[3])
    assert not torch.equal(out[0], base[0])

    # in-scope logits are the model's on context + row, at the original positions
    ctx = tok(edit_context(edit, wrapper.template), add_special_tokens=False)["input_ids"]
    n = int(batch.attention_mask[0].sum())
    row = batch.input_ids[0, :n].tolist()
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([ctx + row])).logits[0, len(ctx):]
    torch.testing.assert_close(out[0, :n], direct, rtol=1e-4, atol=1e-5)

    # all rows out of scope: the base model's own output object
    only_out = encode_batch(tok, [OUT], ["Warsaw"])
    with torch.no_grad():
        assert torch.equal(wrapper(**only_out.model_inputs()).logits, model(**only_out.model_inputs()).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_routes_rows_and_keeps_out_of_scope_rows_exact(arch, memory):
    edit = memory.add(IN, "Rome", subject="France")
    wrapper, model, tok = _wrapper(arch, memory)
    ids, mask = _left_padded(tok, [OUT, IN, "The official language of Spain is"])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    base = model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = wrapper.generate(input_ids=ids, attention_mask=mask, **kw)
    assert [d.in_scope for d in wrapper.last_routing] == [False, True, False]
    width = ids.shape[1]
    assert torch.equal(out[0, :base.shape[1]], base[0]) and torch.equal(out[2, :base.shape[1]], base[2])
    assert torch.equal(out[:, :width], ids)
    # generation conditions on the clean format (the default `answer` format is one a model repeats)
    assert wrapper.generate_template == CONTEXT_FORMATS[CLEAN_GENERATE_CONTEXT] != wrapper.template
    ctx = tok(edit_context(edit, wrapper.generate_template), add_special_tokens=False)["input_ids"]
    direct = model.generate(input_ids=torch.tensor([ctx + encode_prompt(tok, IN)]), **kw)
    assert out[1, width:width + 6].tolist() == direct[0, -6:].tolist()
    only_out = wrapper.generate(input_ids=ids[:1], attention_mask=mask[:1], **kw)
    assert torch.equal(only_out, model.generate(input_ids=ids[:1], attention_mask=mask[:1], **kw))


def test_answer_follows_update_rollback_and_delete_at_once(memory):
    wrapper, model, tok = _wrapper("llama", memory)
    batch = encode_batch(tok, [IN], ["Rome"])

    def logits():
        with torch.no_grad():
            return wrapper(**batch.model_inputs()).logits

    with torch.no_grad():
        base = model(**batch.model_inputs()).logits
    assert torch.equal(logits(), base)  # empty store
    edit = memory.add(IN, "Rome", subject="France")
    rome = logits()
    assert not torch.equal(rome, base) and wrapper.last_routing[0].edit.id == edit.id
    memory.update(edit.id, target_new="Tokyo")
    tokyo = logits()
    assert not torch.equal(tokyo, rome) and wrapper.last_routing[0].edit.version == 2
    memory.rollback(edit.id, 1)
    assert torch.equal(logits(), rome) and wrapper.last_routing[0].edit.version == 3
    memory.delete(edit.id)
    assert torch.equal(logits(), base) and not wrapper.last_routing[0].in_scope


def test_ask_reports_the_edit_that_shaped_the_answer(memory):
    wrapper, _model, _tok = _wrapper("llama", memory)
    edit = memory.add(IN, "Rome", subject="France")
    answer = wrapper.ask(IN, max_new_tokens=4)
    assert answer.edit is not None and (answer.edit.id, answer.edit.version) == (edit.id, 1)
    assert isinstance(answer.text, str)
    other = wrapper.ask(OUT, max_new_tokens=4)
    assert other.edit is None and "no edit" in other.decision.describe()
    with pytest.raises(ValidationError):
        wrapper.ask("  ")


def test_generation_never_conditions_on_a_format_the_model_repeats(memory):
    assert CLEAN_GENERATE_CONTEXT not in LEAKY_CONTEXTS
    for context in (*LEAKY_CONTEXTS, "plain"):
        wrapper, _model, _tok = _wrapper("llama", memory, context=context)
        assert wrapper.template == CONTEXT_FORMATS[context]  # teacher forcing keeps the format it was given
        clean = CLEAN_GENERATE_CONTEXT if context in LEAKY_CONTEXTS else context
        assert wrapper.generate_template == CONTEXT_FORMATS[clean]
        assert "(answer:" not in wrapper.generate_template and "Prompt:" not in wrapper.generate_template
    wrapper, _model, _tok = _wrapper("llama", memory, context="answer", generate_context="plain")
    assert wrapper.generate_template == CONTEXT_FORMATS["plain"]


def test_context_formats_and_bad_calls(memory):
    assert "{fact}" in context_template("new-fact")
    assert context_template("Fact: {fact}\n") == "Fact: {fact}\n"
    with pytest.raises(ValidationError):
        context_template("no fields here")
    wrapper, _model, tok = _wrapper("llama", memory, context="plain")
    edit = memory.add(IN, "Rome", subject="France")
    assert edit_context(edit, wrapper.template) == "The capital of France is Rome.\n"
    batch = encode_batch(tok, [IN], ["Rome"])
    with pytest.raises(ValidationError):
        wrapper(**batch.model_inputs(), labels=batch.labels)
    with pytest.raises(ValidationError):
        wrapper(input_ids=batch.input_ids[0])


def test_overhead_benchmark_runs(memory):
    wrapper, _, _ = _wrapper("llama", memory)
    memory.add(IN, "Rome", subject="France")
    report = measure_overhead(wrapper, [OUT, IN], new_tokens=4, repeats=1)
    assert report["runs"] == 1 and report["skipped_in_scope"] == [IN]
    assert report["base_generate_ms"] > 0 and report["routing_ms"] > 0
