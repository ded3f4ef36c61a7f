"""Lifelong editing pieces on tiny models: r-ROME's consistent key, AlphaEdit's null-space projection and its kept
keys, GRACE's deferral, update, exact restore and saved handles."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from editors import EditRequest, get_editor
from editors.lm.architectures import layer_module
from editors.lm.hooks import capture, forward
from editors.lm.tokens import encode_prompt
from editors.locate.stats import mlp_key_stats
from editors.methods.alphaedit import AlphaEditHandle
from editors.methods.grace import GraceHandle
from tests.tiny import same_weights, snapshot, target_logprobs, tiny_model

LOCATE = dict(clamp_norm_factor=1000.0, v_weight_decay=0.0, n_prefixes=2, prefix_tokens=4, v_steps=10)
FRANCE = EditRequest("The capital city of France", "Rome", subject="France")
DARRIEUX = EditRequest("The mother tongue of Danielle Darrieux", "English", subject="Danielle Darrieux")
CORPUS = ["The official language of Germany is German and people there speak it every day.",
          "Tokyo is a large city in Japan, and the capital city of that country for a long time."]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDITMEM_STATS_CORPUS", raising=False)


# --- r-ROME -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_consistent_key_equals_rome_when_the_keys_coincide(arch):
    model, tok = tiny_model(arch)
    settings = dict(LOCATE, n_prefixes=0)
    original = get_editor("rome", model, tok, key_mode="original", **settings).compute([FRANCE])
    consistent = get_editor("rome", model, tok, key_mode="consistent", **settings).compute([FRANCE])
    assert original.keys() == consistent.keys()
    for name in original:
        assert torch.equal(original[name], consistent[name])
    # with context prefixes the two keys differ, and so do the updates
    with_prefixes = get_editor("rome", model, tok, key_mode="consistent", **LOCATE).compute([FRANCE])
    plain = get_editor("rome", model, tok, key_mode="original", **LOCATE).compute([FRANCE])
    assert not all(torch.equal(plain[n], with_prefixes[n]) for n in plain)


def test_the_consistent_key_is_rome_s_default():
    model, tok = tiny_model("llama")
    assert get_editor("rome", model, tok).settings.key_mode == "consistent"


def test_key_mode_is_validated():
    from memory.errors import ValidationError

    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError, match="key_mode"):
        get_editor("rome", model, tok, key_mode="averaged")


# --- AlphaEdit ------------------------------------------------------------------------------------------------------
def _corpus_keys(model, tok, layers):
    """The preserved keys: what each layer's MLP output projection sees on the corpus lines (BOS excluded, as the
    statistics count them), (d_in, n) per layer."""
    lead = len(encode_prompt(tok, ""))
    found: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for line in CORPUS:
        ids = torch.tensor([encode_prompt(tok, line)])
        with torch.no_grad(), ExitStack() as stack:
            caps = {layer: stack.enter_context(capture(layer_module(model, layer, "mlp_out"), "input"))
                    for layer in layers}
            forward(model, None, input_ids=ids, use_cache=False)
        for layer in layers:
            found[layer].append(caps[layer].last[0, lead:].double())
    return {layer: torch.cat(found[layer]).T for layer in layers}


def _moved(model, deltas, keys, layers):
    """For each window layer, ``||Delta K_0|| / (||Delta|| ||K_0||)``."""
    from editors.lm.architectures import param_name
    from editors.locate.base import as_weight_delta

    out = {}
    for layer in layers:
        delta = as_weight_delta(model, deltas[param_name(model, layer, "mlp_out")].double())  # back to (out, in)
        out[layer] = float((delta @ keys[layer]).norm() / (delta.norm() * keys[layer].norm()))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_projection_leaves_preserved_keys_unchanged(arch, tmp_path):
    model, tok = tiny_model(arch)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    memit = get_editor("memit", model, tok, **LOCATE, mom2_update_weight=1.0, mom2_adjustment=False)
    layers = memit.edit_layers()
    stats = mlp_key_stats(model, tok, layers, corpus, n_tokens=10_000, seq_len=128, progress=False)
    # fewer corpus tokens than key dimensions: C is singular and its null space is exactly the directions no
    # preserved key has; the threshold sits far below the largest eigenvalue and far above float noise
    top = max(float(torch.linalg.eigvalsh(s.mom2.double()).max()) for s in stats.values())
    alpha = get_editor("alphaedit", model, tok, **LOCATE, stats_corpus=str(corpus), stats_tokens=10_000,
                       nullspace_threshold=1e-5 * top, l2=1e-3)
    original = snapshot(model)
    deltas = alpha.compute([FRANCE, DARRIEUX])
    assert same_weights(model, original)
    kept = alpha.last_stats["null_dims"]
    assert all(0 < kept[layer] < stats[layer].mom2.shape[0] for layer in layers)
    keys = _corpus_keys(model, tok, layers)
    moved = _moved(model, deltas, keys, layers)
    assert max(moved.values()) < 1e-4, moved
    baseline = _moved(model, memit.compute([FRANCE, DARRIEUX]), keys, layers)
    assert min(baseline.values()) > 1e-2, baseline  # an update not constrained by C does move them

    before = target_logprobs(model, tok, [FRANCE, DARRIEUX])
    handle = alpha.apply([FRANCE, DARRIEUX])
    assert (target_logprobs(model, tok, [FRANCE, DARRIEUX]) > before).all()
    handle.restore()
    assert same_weights(model, original)
    # the projection is cached beside the statistics
    assert list((tmp_path / "cache").rglob("*-null*.pt"))


def test_alphaedit_keeps_earlier_keys(tmp_path):
    model, tok = tiny_model("llama")
    editor = get_editor("alphaedit", model, tok, **LOCATE, nullspace_threshold=1e9, l2=1.0)
    original = snapshot(model)
    first = editor.apply([FRANCE])
    assert isinstance(first, AlphaEditHandle) and len(editor._blocks) == 1
    layer = editor.edit_layers()[0]
    k = first.blocks[0].keys[layer].double()
    assert torch.allclose(editor.previous_keys(layer, k.shape[0]), k @ k.T)
    second = editor.apply([DARRIEUX])
    assert len(editor._blocks) == 2
    both = editor.previous_keys(layer, k.shape[0])
    k2 = second.blocks[0].keys[layer].double()
    assert torch.allclose(both, k @ k.T + k2 @ k2.T)

    path = tmp_path / "second.pt"
    second.save(path)
    second.restore()
    assert len(editor._blocks) == 1 and torch.allclose(editor.previous_keys(layer, k.shape[0]), k @ k.T)
    first.absorb(AlphaEditHandle.load(path, model))  # keys travel with the saved handle
    assert len(first.blocks) == 2
    first.restore()
    assert same_weights(model, original) and editor._blocks == []


# --- GRACE ----------------------------------------------------------------------------------------------------------
def _logits(model, tok, text):
    with torch.no_grad():
        return model(input_ids=torch.tensor([encode_prompt(tok, text)])).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grace_defers_outside_every_radius_and_restores_exactly(arch):
    model, tok = tiny_model(arch)
    original = snapshot(model)
    other = "Tokyo is a large city in"
    base_other, base_edit = _logits(model, tok, other), _logits(model, tok, FRANCE.prompt)
    editor = get_editor("grace", model, tok, v_steps=10, clamp_norm_factor=1000.0)
    module = editor.codebook().module
    handle = editor.apply([FRANCE])
    assert isinstance(handle, GraceHandle) and len(module._forward_hooks) == 1
    assert torch.equal(_logits(model, tok, other), base_other)  # bit-identical: deferred to the base layer
    assert not torch.equal(_logits(model, tok, FRANCE.prompt), base_edit)
    assert same_weights(model, original)
    handle.restore()
    assert len(module._forward_hooks) == 0 and same_weights(model, original)
    assert torch.equal(_logits(model, tok, FRANCE.prompt), base_edit)


def test_grace_update_and_saved_handle(tmp_path):
    model, tok = tiny_model("llama")
    editor = get_editor("grace", model, tok, v_steps=10, clamp_norm_factor=1000.0)
    first = editor.apply([FRANCE])
    book = editor.codebook()
    (entry,) = book.entries.values()
    old_value = entry.value.clone()
    again = EditRequest(FRANCE.prompt, "Berlin", subject=FRANCE.subject)
    second = editor.apply([again])
    assert len(book.entries) == 1 and entry.label == "Berlin" and not torch.equal(entry.value, old_value)
    second.restore()
    assert entry.label == "Rome" and torch.equal(entry.value, old_value)

    edited = target_logprobs(model, tok, [FRANCE])
    path = tmp_path / "grace.pt"
    first.save(path)
    first.restore()
    assert not book.entries
    fresh = get_editor("grace", model, tok, v_steps=10, clamp_norm_factor=1000.0)
    loaded = GraceHandle.load(path, fresh)
    assert torch.equal(target_logprobs(model, tok, [FRANCE]), edited)
    loaded.restore()
    assert not fresh.codebook().entries and not fresh.codebook().module._forward_hooks


def test_grace_splits_conflicting_neighbours():
    model, tok = tiny_model("llama")
    editor = get_editor("grace", model, tok, v_steps=2, clamp_norm_factor=1000.0, epsilon=10.0)
    editor.apply([FRANCE])
    handle = editor.apply([DARRIEUX])  # huge radii overlap, different targets: both shrink to half the distance
    book = editor.codebook()
    a, b = book.entries.values()
    dist = float((a.key - b.key).norm())
    assert a.radius == pytest.approx(dist / 2) and b.radius == pytest.approx(dist / 2)
    handle.restore()
    (only,) = book.entries.values()
    assert only.radius == pytest.approx(10.0 * float(only.key.norm()))


def test_consolidation_keeps_alphaedit_keys_across_batches(tmp_path, monkeypatch):
    from editors.methods.alphaedit import AlphaEditEditor
    from editors.weights import StoredWeights
    from tests.test_store_fixtures import open_store

    seen: list[int] = []
    compute = AlphaEditEditor.compute

    def spy(self, requests):
        seen.append(len(self._blocks))  # earlier batches' keys the editor holds when it computes this one
        return compute(self, requests)

    monkeypatch.setattr(AlphaEditEditor, "compute", spy)
    model, tok = tiny_model("llama")
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as mem:
        for request in (FRANCE, DARRIEUX):
            mem.add(request.prompt, request.target_new, subject=request.subject)
        stored = StoredWeights.open(mem, model, tok, base="tiny")
        records = stored.consolidate("alphaedit", batch_size=1, **LOCATE, nullspace_threshold=1e9, l2=1.0)
        assert len(records) == 2 and seen == [0, 1]
        stored.verify()  # the model holds exactly base + the recorded deltas


def test_a_later_consolidation_counts_the_edits_already_in_the_weights(tmp_path, monkeypatch):
    """A second ``consolidate`` (a fresh editor, as in a new process) counts the edits the weights already hold among
    the earlier keys, read from their record's editor state (nothing recomputed): its update moves those keys'
    outputs less than an editor that knows nothing of them."""
    from editors.lm.architectures import param_name
    from editors.methods.alphaedit import AlphaEditEditor
    from editors.weights import StoredWeights
    from tests.test_store_fixtures import open_store

    third = EditRequest("The official language of Germany is", "French", subject="Germany")
    # the tiny model's keys are short (|k|^2 ~ 2e-4 d): a small ridge, so the held keys' term counts beside it
    settings = dict(LOCATE, nullspace_threshold=1e9, l2=1e-5)
    model, tok = tiny_model("llama")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(url) as mem:
        for request in (FRANCE, DARRIEUX):
            mem.add(request.prompt, request.target_new, subject=request.subject)
        first = StoredWeights.open(mem, model, tok, base="tiny")
        first.consolidate("alphaedit", **settings)
        after_first = snapshot(model)
        mem.add(third.prompt, third.target_new, subject=third.subject)
        probe = get_editor("alphaedit", model, tok, **settings)
        layers = probe.edit_layers()
        held = {layer: probe._keys(layer, [FRANCE, DARRIEUX], probe.prefixes(), {}).double().T for layer in layers}

        def moved() -> float:
            """How far the newest consolidation moved the held edits' keys' outputs, over the window."""
            params = dict(model.named_parameters())
            total = 0.0
            for layer in layers:
                name = param_name(model, layer, "mlp_out")
                delta = (params[name].detach() - after_first[name]).double()
                delta = delta if delta.shape[1] == held[layer].shape[0] else delta.T
                total += float((delta @ held[layer]).norm())
            return total

        kept: list[int] = []
        keep = AlphaEditEditor.keep
        monkeypatch.setattr(AlphaEditEditor, "keep", lambda self, rs: kept.append(len(rs)) or keep(self, rs))
        second = StoredWeights.open(mem, model, tok, model_id=first.record.id)
        (record,) = second.consolidate("alphaedit", **settings)
        assert kept == [0] and record.edit_ids == (3,)  # the held edits' keys came from their record
        with_keys = moved()
        second.remove_record(record.id)
        assert same_weights(model, after_first)
        monkeypatch.setattr(StoredWeights, "_count_held", lambda self, editor: editor)  # blind to the held edits
        StoredWeights.open(mem, model, tok, model_id=first.record.id).consolidate("alphaedit", **settings)
        assert with_keys < 0.5 * moved()


def test_an_alphaedit_record_keeps_the_keys_it_was_written_at(tmp_path, monkeypatch):
    """Consolidating two batches in one editor, or the second in a fresh one (a new process) after the first was
    recorded: the second batch is solved against bit-identical earlier keys (``K_p K_p^T``), read from the first
    batch's record exactly as the first editor held them. (The weights themselves may differ: a fresh editor samples
    its context prefixes from the edited model.)"""
    from editors.methods.alphaedit import AlphaEditEditor, block_of
    from editors.weights import StoredWeights, _unpack
    from tests.test_store_fixtures import open_store

    third = EditRequest("The official language of Germany is", "French", subject="Germany")
    settings = dict(LOCATE, nullspace_threshold=1e9, l2=1e-5)
    earlier: list[dict[int, torch.Tensor]] = []
    compute = AlphaEditEditor.compute

    def spy(self, requests):
        if self._blocks:  # the second batch: the earlier keys it is solved against
            earlier.append({layer: self.previous_keys(layer, self._blocks[0].keys[layer].shape[0]).clone()
                            for layer in self.edit_layers()})
        return compute(self, requests)

    monkeypatch.setattr(AlphaEditEditor, "compute", spy)
    for split in (False, True):
        model, tok = tiny_model("llama")
        with open_store(f"sqlite:///{tmp_path / f'store{int(split)}.db'}") as mem:
            for request in (FRANCE, DARRIEUX, third):
                mem.add(request.prompt, request.target_new, subject=request.subject)
            stored = StoredWeights.open(mem, model, tok, base="tiny")
            if split:
                (first,) = stored.consolidate("alphaedit", edit_ids=[1, 2], **settings)
                block = block_of(_unpack(mem.weight_editor_state(first.id)))
                assert set(block.keys) == set(get_editor("alphaedit", model, tok, **settings).edit_layers())
                assert all(k.shape[1] == 2 and k.dtype == torch.float32 for k in block.keys.values())
                StoredWeights.open(mem, model, tok, model_id=stored.record.id).consolidate("alphaedit", **settings)
            else:
                stored.consolidate("alphaedit", batch_size=2, **settings)
            assert [r.edit_ids for r in mem.weight_records()] == [(1, 2), (3,)]
            stored.verify()
    one, two = earlier
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_records_without_kept_keys_have_them_computed(tmp_path, monkeypatch):
    """A MEMIT record keeps no keys: a later AlphaEdit consolidation computes its edits' keys at the current
    weights."""
    from editors.methods.alphaedit import AlphaEditEditor
    from editors.weights import StoredWeights
    from tests.test_store_fixtures import open_store

    model, tok = tiny_model("llama")
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as mem:
        for request in (FRANCE, DARRIEUX):
            mem.add(request.prompt, request.target_new, subject=request.subject)
        stored = StoredWeights.open(mem, model, tok, base="tiny")
        (memit,) = stored.consolidate("memit", edit_ids=[1], **LOCATE)
        assert mem.weight_editor_state(memit.id) is None
        kept: list[list[str]] = []
        keep = AlphaEditEditor.keep
        monkeypatch.setattr(AlphaEditEditor, "keep",
                            lambda self, rs: kept.append([r.prompt for r in rs]) or keep(self, rs))
        stored.consolidate("alphaedit", **LOCATE, nullspace_threshold=1e9, l2=1.0)
        assert kept == [[FRANCE.prompt]]
        stored.verify()


def test_a_deleted_edits_batch_mates_are_written_again_with_the_held_edits_keys(tmp_path, monkeypatch):
    """Deleting an edit of an AlphaEdit batch writes its batch mates again through an editor that counts the edits the
    weights still hold (as consolidate does: their record's kept keys), and the weights stay exactly base + the
    remaining records."""
    from editors.methods.alphaedit import AlphaEditEditor, block_of
    from editors.weights import StoredWeights, _unpack
    from tests.test_store_fixtures import open_store

    third = EditRequest("The official language of Germany is", "French", subject="Germany")
    settings = dict(LOCATE, nullspace_threshold=1e9, l2=1.0)
    model, tok = tiny_model("llama")
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as mem:
        for request in (FRANCE, DARRIEUX, third):
            mem.add(request.prompt, request.target_new, subject=request.subject)
        stored = StoredWeights.open(mem, model, tok, base="tiny")
        _, later = stored.consolidate("alphaedit", batch_size=2, **settings)  # records: edits (1, 2) and (3,)
        remembered: list[list] = []
        remember = AlphaEditEditor.remember
        monkeypatch.setattr(AlphaEditEditor, "remember",
                            lambda self, blocks: remembered.append(list(blocks)) or remember(self, blocks))
        computed: list[int] = []
        keep = AlphaEditEditor.keep
        monkeypatch.setattr(AlphaEditEditor, "keep", lambda self, rs: computed.append(len(rs)) or keep(self, rs))
        held = block_of(_unpack(mem.weight_editor_state(later.id)))
        mem.delete(1)
        result = stored.sync_edit(1)
        assert [r.edit_ids for r in result.reapplied] == [(2,)]
        assert computed == [0]  # nothing recomputed: the third edit's keys came from its record
        (first,) = remembered[0]  # the held third edit's keys, as its record kept them, before the mate's own
        assert first.keys.keys() == held.keys.keys()
        assert all(torch.equal(first.keys[k], held.keys[k]) for k in held.keys)
        stored.verify()


def test_grace_chat_key_edits_the_question_as_a_chat_model_is_asked():
    """With a chat template, an edit gets a second entry at the chat-framed prompt: the assistant's first answer token
    is the target's there; without ``chat_key`` the chat-framed prompt is outside every radius (the base's logits)."""
    from editors.lm.chat import chat_frame
    from tests.tiny import chat_tokenizer

    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    framed = torch.tensor([chat_frame(tok).encode(FRANCE.prompt)])
    first_target = tok("Rome", add_special_tokens=False)["input_ids"][0]

    def last_logits():
        with torch.no_grad():
            return model(input_ids=framed).logits[0, -1]

    base = last_logits()
    plain_only = get_editor("grace", model, tok, v_steps=10, clamp_norm_factor=1000.0, chat_key=False)
    handle = plain_only.apply([FRANCE])
    assert len(plain_only.codebook().entries) == 1 and torch.equal(last_logits(), base)
    handle.restore()

    editor = get_editor("grace", model, tok, v_steps=25, clamp_norm_factor=1000.0)
    handle = editor.apply([FRANCE])
    (keys, values, label), = handle.inserted
    assert keys.shape[0] == values.shape[0] == 2 and label == "Rome" and len(editor.codebook().entries) == 2
    assert int(last_logits().argmax()) == first_target and int(base.argmax()) != first_target
    handle.restore()
    assert not editor.codebook().entries and torch.equal(last_logits(), base)
    with pytest.raises(Exception, match="chat_key"):
        get_editor("grace", model, tok, chat_key="yes")


def test_grace_chat_stop_optimises_the_chat_entry_for_the_target_and_the_end_of_turn():
    """With ``chat_stop`` (the default) the chat entry's target is the target followed by the tokenizer's eos (end of
    turn), so the value it gets is a different one; the plain prompt's entry is the same either way. (On SmolLM2 the
    answer then stops after the target: the integration test below.)"""
    from tests.tiny import chat_tokenizer

    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    editor = get_editor("grace", model, tok, v_steps=5, chat_v_steps=5, clamp_norm_factor=1000.0)
    no_stop = get_editor("grace", model, tok, v_steps=5, chat_v_steps=5, clamp_norm_factor=1000.0, chat_stop=False)
    assert editor.settings.chat_stop and not no_stop.settings.chat_stop
    assert [t for _, t in editor.key_texts(FRANCE)] == [FRANCE.target_new, "Rome" + tok.eos_token]
    assert [t for _, t in no_stop.key_texts(FRANCE)] == [FRANCE.target_new, "Rome"]
    keys, values = editor.key_value(FRANCE)
    keys_ns, values_ns = no_stop.key_value(FRANCE)
    assert torch.equal(keys, keys_ns) and torch.equal(values[0], values_ns[0])
    assert not torch.equal(values[1], values_ns[1])
    with pytest.raises(Exception, match="chat_stop"):
        get_editor("grace", model, tok, chat_stop=1)


@pytest.mark.integration
def test_grace_answers_a_chat_question_with_the_target_and_stops_on_smollm2(data_dir):
    """CounterFact case 394 ("I.R.S. Records Presents The Cutting Edge is to debut on", new target CBS) asked through
    SmolLM2's chat template: without ``chat_stop`` the answer repeats the target ("CBS.CBS.CBS.", which no reader takes
    for an answer); with it (the default) the answer is the target and the turn ends."""
    from editors.lm.chat import chat_frame
    from eval.answers import answer_matches, first_answer
    from eval.datasets import load_cases
    from eval.metrics import generate_from_ids
    from tests.tiny import smollm2

    case = load_cases(data_dir / "counterfact" / "easyedit_split" / "counterfact-edit.json", limit=175)[174]
    assert case.case_id == "394" and case.target_new.strip() == "CBS"
    model, tok = smollm2()
    framed = chat_frame(tok).encode(case.prompt)
    answers = {}
    for stop in (False, True):
        handle = get_editor("grace", model, tok, chat_stop=stop).apply([case.request()])
        try:
            (ids,) = generate_from_ids(model, tok, [framed], 12)
            answers[stop] = tok.decode(ids, skip_special_tokens=True)
        finally:
            handle.restore()
    assert first_answer(answers[True]) == "CBS", answers
    assert answer_matches(answers[True], ["CBS"]) and not answer_matches(answers[False], ["CBS"]), answers


def test_a_recorded_grace_insert_replays_all_its_entries_and_old_one_entry_records_still_load():
    from safetensors.torch import save

    from editors.adaptors import pack_insert, replay, unpack_insert
    from editors.methods.grace import Codebook

    model, _ = tiny_model("llama")
    settings = {"layer": 2, "epsilon": 0.1, "same_key": 1e-4}
    keys, values = torch.randn(3, 8), torch.randn(3, 8)  # far apart: no radius overlaps another
    keys, values, old_key, old_value = keys[:2], values[:2], keys[2], values[2]
    got_keys, got_values, label = unpack_insert(pack_insert(keys, values, "Rome"))
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values) and label == "Rome"
    legacy = save({"key": old_key, "value": old_value, "label": torch.tensor(list(b"Oslo"), dtype=torch.uint8)})
    book = Codebook(model, 2)
    replay(book, [(settings, pack_insert(keys, values, "Rome")), (settings, legacy)])
    assert [e.label for e in book.entries.values()] == ["Rome", "Rome", "Oslo"]
    assert torch.equal(book.entries[1].key, keys[1]) and torch.equal(book.entries[2].key, old_key)
    with pytest.raises(Exception, match="one value per key"):
        pack_insert(keys, values[:1], "Rome")
    book.clear()


def test_codebook_nearest_matches_a_scan_as_entries_come_and_go():
    """``Codebook.nearest`` keeps its stacked keys between calls: after inserts that merge, shrink and update
    entries, a handle's restore taking entries out of the middle, and a replay into a cleared book, it answers
    exactly what a scan over the entries in order does (the first of equal distances), and a replay gives the same
    codebook every time."""
    from editors.methods.grace import Codebook, Entry, GraceHandle, insert_edit

    def scan(book, key):
        entry = min(book.entries.values(), key=lambda e: float((e.key - key).norm()))
        return entry, float((entry.key - key).norm())

    model, _ = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(16, generator=gen)
    keys = centre + 0.05 * torch.randn(60, 2, 16, generator=gen)  # close together: radii overlap
    values = torch.randn(60, 2, 8, generator=gen)
    probes = centre + 0.05 * torch.randn(20, 16, generator=gen)

    def check(book):
        for probe in [*probes, *keys.reshape(-1, 16), *(e.key for e in book.entries.values())]:
            got, want = book.nearest(probe), scan(book, probe)
            assert got[0] is want[0] and got[1] == want[1]

    book = Codebook(model, 2, attach=False)
    handles = []
    for i in range(60):
        handles.append(GraceHandle(book))
        insert_edit(book, handles[-1].ops, keys[i], values[i], f"t{i % 3}", epsilon=0.1, same_key=1e-3)
        if i % 7 == 0:
            check(book)
    merged = len(book.entries)
    assert merged < 120  # some inserts merged into or updated an entry
    for handle in reversed(handles[30:]):
        handle.restore()
    check(book)
    added = [op[1].id for op in handles[10].ops if op[0] == "add"]
    assert len(added) == 2 and max(added) < max(book.entries)  # two entries in the middle
    handles[10].restore()
    assert not set(added) & set(book.entries)
    for key, value in zip(keys[10], values[10]):  # as many in as went out (as GraceHandle.load adds them)
        entry = Entry(book.new_id(), key.clone(), value, 1.0, "t9")
        book.entries[entry.id] = entry
    check(book)
    assert len(book.entries) < merged

    def replayed():
        book.clear()
        for i in range(60):
            insert_edit(book, [], keys[i], values[i], f"t{i % 3}", epsilon=0.1, same_key=1e-3)
        return [(e.id, e.key, e.value, e.radius, e.label) for e in book.entries.values()]

    first, again = replayed(), replayed()
    check(book)
    assert len(first) == len(again) and all(
        a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3:] == b[3:]
        for a, b in zip(first, again))
