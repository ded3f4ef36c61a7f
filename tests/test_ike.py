"""IKE: registered, settings validate, a missing demonstration file is a clear error; the demonstrations in a prompt
are the nearest of the pool; classic puts the edit in context for every query; gated leaves out-of-scope queries to
the base model bit for bit (logits and generate); restore removes the edits and the model's weights never change.
Tiny models, a hashing encoder and a small pool file written per test."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from editors import EditRequest, available_editors, get_editor
from editors.methods.ike import (
    DEMO_TEMPLATES,
    Demo,
    DemoPool,
    IkeModel,
    IkeSettings,
    build_demos,
    with_examples,
)
from editors.retrieval.setup import MemoryEditHandle
from eval.harness import run_eval
from eval.metrics import MetricSettings
from memory.encoder import HashingEncoder
from memory.errors import EditmemError, ValidationError
from memory.formats import read_cases
from memory.records import EditCase, Probe
from tests.tiny import same_weights, save_folder, snapshot, tiny_model

_POOL = [("France", "Rome", "French"), ("Italy", "Paris", "Italian"), ("Spain", "Tokyo", "Spanish"),
         ("Japan", "Madrid", "Japanese"), ("Greece", "Cairo", "Greek"), ("Kenya", "Lima", "Swahili")]
_PEOPLE = [("Marie Curie", "Berlin"), ("Albert Einstein", "Warsaw"), ("Pablo Picasso", "Tokyo")]


@pytest.fixture()
def pool_file(tmp_path, monkeypatch):
    """A CounterFact-format (EasyEdit layout) training file; the IKE index cache goes to tmp_path."""
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    records = [{"case_id": i, "prompt": f"The capital of {c} is", "target_new": t, "subject": c,
                "ground_truth": "x", "rephrase_prompt": f"The capital city of {c} is",
                "locality_prompt": f"People in {c} speak", "locality_ground_truth": lang}
               for i, (c, t, lang) in enumerate(_POOL)]
    records += [{"case_id": 100 + i, "prompt": f"{name} was born in", "target_new": city, "subject": name,
                 "ground_truth": "x", "rephrase_prompt": f"The birthplace of {name} is",
                 "locality_prompt": "The Eiffel Tower is located in", "locality_ground_truth": "Paris"}
                for i, (name, city) in enumerate(_PEOPLE)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _ike(arch, pool_file, **overrides):
    model, tok = tiny_model(arch)
    # one demonstration and the short context: the tiny models hold 128 positions
    settings = {"demos": str(pool_file), "encoder": "hashing-256", "k": 1, "context": "new-fact-prompt",
                **overrides}
    return model, tok, get_editor("ike", model, tok, **settings)


def _batch(tok, texts):
    tok.padding_side = "right"
    return tok(texts, return_tensors="pt", padding=True)


def test_ike_is_registered_and_settings_validate():
    assert "ike" in available_editors()
    for bad in ({"mode": "always"}, {"k": -1}, {"k": 1.5}, {"k": True}, {"retrieve": "edit"}, {"demo_limit": 0},
                {"candidates": 0}, {"threshold": "high"}, {"context": "no fields"}, {"store": ""}, {"scope": ""},
                {"demos": ""}, {"encoder": 3}, {"kinds": ()}, {"kinds": ("copy", "copy")},
                {"kinds": "copy,forget"}, {"demo_template": "New Fact: {fact}"}, {"demo_template": "{query} {nope}"},
                {"chat_demos": "turns"}):
        with pytest.raises(ValidationError, match=r"ike setting|context"):
            IkeSettings(**bad)
    assert IkeSettings(kinds="copy,retain").kinds == ("copy", "retain")  # as `--set ike.kinds=copy,retain` gives it
    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError, match="unknown setting"):
        get_editor("ike", model, tok, nope=1)
    with pytest.raises(ValidationError, match="mode"):
        get_editor("ike", model, tok, mode="gate")


def test_missing_demo_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path))
    model, tok = tiny_model("llama")
    with pytest.raises(EditmemError, match=r"IKE demonstration file not found: .*nowhere\.json"):
        get_editor("ike", model, tok, demos=str(tmp_path / "nowhere.json"), encoder="hashing-256")
    monkeypatch.setenv("EDITMEM_DATA", str(tmp_path / "no-data"))
    with pytest.raises(EditmemError, match=r"no-data.*EDITMEM_DATA"):
        get_editor("ike", model, tok, encoder="hashing-256")


def test_pool_has_copy_update_retain_and_the_cache_is_reused(pool_file):
    cases = read_cases(pool_file)
    demos = build_demos(cases)
    assert len(demos) == 3 * len(cases)
    copy, update, retain = demos[:3]
    assert copy.render(DEMO_TEMPLATES["answer"]) == ("New Fact: The capital of France is Rome (answer: Rome)\n"
                                                     "Prompt: The capital of France is Rome\n\n")
    assert (copy.kind, copy.prompt, copy.answer) == ("copy", "The capital of France is", "Rome")
    assert (update.kind, update.prompt, update.answer) == ("update", "The capital city of France is", "Rome")
    assert (retain.kind, retain.prompt, retain.answer) == ("retain", "People in France speak", "French")
    assert retain.text == "New Fact: The capital of France is Rome\nPrompt: People in France speak French\n\n"
    enc = HashingEncoder(256)
    first = DemoPool.from_file(pool_file, enc)
    calls = []

    class Counting(HashingEncoder):
        def encode(self, texts):
            calls.append(len(texts))
            return super().encode(texts)

    again = DemoPool.from_file(pool_file, Counting(256))
    assert calls == []  # read from the cache, nothing encoded
    assert again.demos == first.demos and len(again.index) == len(demos)
    DemoPool.from_file(pool_file, Counting(256), limit=2)  # another pool: built, not taken from the cache
    assert calls and sum(calls) == 6


@pytest.mark.parametrize("kinds", [("copy", "update", "retain"), ("copy", "update"), ("retain",)])
def test_retrieved_demonstrations_are_the_nearest(pool_file, kinds):
    _, tok, editor = _ike("gpt2", pool_file, k=3, kinds=kinds)
    wrapper = editor.model
    assert isinstance(wrapper, IkeModel)
    editor.apply([EditRequest("The capital of Peru is", "Oslo", subject="Peru")])
    queries = ["Marie Curie was born in", "The capital city of Spain is", "People in Kenya speak"]
    decisions = wrapper.route_rows([tok(q)["input_ids"] for q in queries])
    enc = HashingEncoder(256)
    pool_vecs = enc.encode([d.text for d in editor.pool.demos])
    other = np.array([d.kind not in kinds for d in editor.pool.demos])
    for q, got in zip(queries, wrapper.last_demos):
        sims = pool_vecs @ enc.encode([q])[0]
        sims[other] = -np.inf  # only the wanted kinds count
        assert len(got) == 3
        picked = np.array([i for i, _ in got])
        assert np.allclose([s for _, s in got], sims[picked], atol=1e-5)  # the scores are the cosines
        assert all(a >= b - 1e-6 for (_, a), (_, b) in itertools.pairwise(got))  # nearest first
        assert sims[picked].min() >= np.sort(sims)[-3] - 1e-6  # no demonstration outside is nearer
    assert all(editor.pool.demos[i].kind in kinds for row in wrapper.last_demos for i, _ in row)
    spain = [editor.pool.demos[i] for i, _ in wrapper.last_demos[1]]
    assert any("Spain" in d.fact for d in spain)
    # the prompt: demonstrations farthest first, then the edit's own context, then the query
    ids = [i for i, _ in wrapper.last_demos[1]]
    text = wrapper.prompt_text(ids, decisions[1].edit)
    rendered = [editor.pool.demos[i].render(wrapper.demo_template) for i in ids]
    assert text.index(rendered[-1]) < text.index(rendered[0])
    assert text.endswith("New Fact: The capital of Peru is Oslo\nPrompt: ")


def test_fact_retrieval_uses_the_edit(pool_file):
    _, tok, editor = _ike("gpt2", pool_file, k=2, retrieve="fact")
    editor.apply([EditRequest("The capital of Italy is", "Oslo", subject="Italy")])
    editor.model(**_batch(tok, ["A question about nothing at all", "Pablo Picasso was born in"]))
    first, second = editor.model.last_demos
    assert first == second  # same edit, same demonstrations, whatever the query
    assert all("Italy" in editor.pool.demos[i].fact for i, _ in first)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_classic_puts_the_edit_in_context_for_every_query(pool_file, arch):
    model, tok, editor = _ike(arch, pool_file, mode="classic")
    saved = snapshot(model)
    queries = ["The capital of France is", "Marie Curie was born in", "The quick brown fox jumps"]
    batch = _batch(tok, queries)
    base = model(**batch).logits
    assert torch.equal(editor.model(**batch).logits, base)  # nothing stored: the base model answers
    handle = editor.apply([EditRequest("The capital of Japan is", "Lima", subject="Japan")])
    out = editor.model(**batch).logits
    assert all(d.in_scope and d.edit.target_new == "Lima" for d in editor.model.last_routing)
    assert all(len(d) == 1 for d in editor.model.last_demos)
    assert not torch.equal(out, base) and out.shape == base.shape
    # the row is answered from the demonstrations, the edit and the query, read back at the query's positions
    row = tok(queries[1], return_tensors="pt")
    ids = [i for i, _ in editor.model.last_demos[1]]
    full = tok(editor.model.prompt_text(ids, editor.model.last_routing[1].edit), return_tensors="pt")
    joined = torch.cat([full.input_ids, row.input_ids], dim=1)
    expected = model(input_ids=joined).logits[0, -row.input_ids.shape[1]:]
    n = row.input_ids.shape[1]
    assert torch.allclose(out[1, :n], expected, atol=1e-4)
    gen = editor.model.generate(**tok(queries[2:], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] <= tok(queries[2], return_tensors="pt").input_ids.shape[1] + 4
    handle.restore()
    assert len(editor.memory) == 0
    assert torch.equal(editor.model(**batch).logits, base)
    assert same_weights(model, saved)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_gated_leaves_out_of_scope_queries_to_the_base_model_bit_for_bit(pool_file, arch):
    model, tok, editor = _ike(arch, pool_file, mode="gated", scope="cosine", threshold=0.8)
    saved = snapshot(model)
    handle = editor.apply([EditRequest("The capital of Japan is", "Lima", subject="Japan")])
    outside = ["Marie Curie was born in", "The quick brown fox jumps over the lazy dog"]
    batch = _batch(tok, outside)
    with torch.no_grad():
        got, base = editor.model(**batch).logits, model(**batch).logits
    assert not any(d.in_scope for d in editor.model.last_routing)
    assert editor.model.last_demos == [(), ()]
    assert torch.equal(got, base)
    one = tok([outside[0]], return_tensors="pt")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(editor.model.generate(**one, **kw), model.generate(**one, **kw))
    # a mixed batch: the out-of-scope row stays exact, the in-scope row gets the context
    mixed = _batch(tok, ["The capital of Japan is", outside[0]])
    with torch.no_grad():
        got, base = editor.model(**mixed).logits, model(**mixed).logits
    assert [d.in_scope for d in editor.model.last_routing] == [True, False]
    n = int(mixed.attention_mask[1].sum())
    assert torch.equal(got[1, :n], base[1, :n]) and not torch.equal(got[0], base[0])
    handle.restore()
    with torch.no_grad():
        assert torch.equal(editor.model(**mixed).logits, model(**mixed).logits)
    assert not any(d.in_scope for d in editor.model.last_routing)
    assert same_weights(model, saved)


def test_restore_removes_exactly_its_edits_and_handles_save(pool_file, tmp_path):
    _, _, editor = _ike("llama", pool_file)
    mem = editor.memory
    h1 = editor.apply([EditRequest("The capital of France is", "Rome", subject="France")])
    h2 = editor.apply([EditRequest("Marie Curie was born in", "Tokyo", subject="Marie Curie"),
                       EditRequest("The capital of Japan is", "Oslo", subject="Japan")])
    assert isinstance(h1, MemoryEditHandle) and len(mem) == 3
    # classic mode, several stored edits: the query gets the nearest stored one
    assert editor.model.route(["The capital of Japan is"])[0].edit.id == h2.ids[1]
    h2.save(tmp_path / "h2.pt")
    h1.restore()
    h1.restore()
    assert {r.id for r in mem.list()} == set(h2.ids)
    h2.restore()
    assert len(mem) == 0 and not editor.model.route(["The capital of Japan is"])[0].in_scope
    with pytest.raises(ValidationError):
        editor.apply([])


def _cases() -> list[EditCase]:
    facts = [("France", "Rome"), ("Italy", "Paris"), ("Spain", "Tokyo")]
    return [EditCase(prompt=f"The capital of {c} is", target_new=t, subject=c,
                     rephrases=(f"The capital city of {c} is",),
                     locality=(Probe("Marie Curie was born in", "Warsaw"),), case_id=f"c{i}")
            for i, (c, t) in enumerate(facts)]


def test_gated_ike_through_the_harness_keeps_locality_exact(pool_file, tmp_path):
    model, tok = tiny_model("gpt2")
    overrides = {"ike": {"demos": str(pool_file), "encoder": "hashing-256", "k": 1, "mode": "gated",
                         "scope": "cosine", "threshold": 0.8}}
    summary = run_eval(model, tok, _cases(), ["ike"], out_dir=tmp_path / "run", editor_overrides=overrides,
                       metric_settings=MetricSettings(fluency_tokens=0), progress=False, plots=False)
    ike = summary["methods"]["ike"]
    assert ike["n"] == 3 and ike["locality"] == 1.0


def test_cli_ask_with_ike_names_the_edit_and_the_demonstrations(pool_file, one_edit_store, tmp_path, capsys):
    from serve.cli import main

    store = one_edit_store
    folder = save_folder(*tiny_model("llama"), tmp_path / "tiny-llama")
    common = ["--method", "ike", "--model", str(folder), "--demo-file", str(pool_file), "--demos", "2",
              "--max-new-tokens", "2"]
    assert main(["--store", store, "ask", "Marie Curie was born in", *common]) == 0
    out = capsys.readouterr().out
    assert "-- shaped by edit 1 v1" in out and "The capital of Japan is -> Lima" in out
    assert "-- demonstration 1 (" in out and "-- demonstration 2 (" in out and "-- demonstration 3" not in out
    gated = [*common, "--mode", "gated", "--scope", "cosine", "--threshold", "0.8"]
    assert main(["--store", store, "ask", "Marie Curie was born in", *gated]) == 0
    out = capsys.readouterr().out
    assert "no edit in scope" in out and "demonstration" not in out
    assert main(["--store", store, "ask", "The capital of Japan is", *gated]) == 0
    assert "-- shaped by edit 1 v1" in capsys.readouterr().out


def test_demonstrations_go_into_the_system_message_as_examples_before_the_fact():
    demo = Demo("copy", "The capital of Italy is Paris", "Paris", "The capital of Italy is", "Paris")
    messages = [{"role": "system", "content": "You are a helpful assistant. This fact is true: X is Y."},
                {"role": "user", "content": "X is"}, {"role": "assistant", "content": "X is Y."}]
    out = with_examples(messages, [demo])
    assert out[1:] == messages[1:] and messages[0]["content"].endswith("X is Y.")  # the input is left alone
    assert out[0] == {"role": "system", "content": 'You are a helpful assistant. (Example: given "The capital of '
                      'Italy is Paris", "The capital of Italy is" is completed as "The capital of Italy is Paris".) '
                      'This fact is true: X is Y.'}
    # a context without a system message gets one of its own, in front
    assert with_examples(messages[1:], [demo])[0]["role"] == "system"
    assert with_examples(messages[1:], [demo])[1:] == messages[1:]


@pytest.mark.parametrize("chat_demos", ["system", "exchanges"])
def test_a_chat_row_in_scope_gets_the_demonstrations_as_chat_demos_says(pool_file, chat_demos):
    from tests.tiny import chat_tokenizer

    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    ike = get_editor("ike", model, tok, demos=str(pool_file), encoder="hashing-256", k=1, mode="gated",
                     scope="cosine", threshold=0.5, chat_demos=chat_demos)
    ike.apply([EditRequest("The capital of France is", "Rome", subject="France")])
    wrapper = ike.model
    framed = wrapper.chat.encode("The capital of France is")
    decision = wrapper.route_rows([framed])[0]
    assert decision.in_scope
    messages = wrapper.chat_messages(framed, decision.edit)
    demo = wrapper.demo(wrapper._demo_ids(framed, decision.edit)[0])
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m["content"] for m in messages if m["role"] == "user"]
    if chat_demos == "system":
        assert len(system) == 1 and f'(Example: given "{demo.fact}"' in system[0]
        assert f"{demo.fact}. {demo.prompt}" not in turns
    else:
        assert "(Example:" not in system[0] and f"{demo.fact}. {demo.prompt}" in turns
    text = tok.decode(wrapper._conditioned(framed, decision.edit)[0])
    assert "The capital of France is Rome." in text
