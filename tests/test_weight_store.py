"""Weight edits recorded in the store (editors.weights + the store's weight tables) and `editmem consolidate`:
removing any recorded edit (latest or not) is bit-identical to applying the others to the base in order; the edited
model rebuilds from the base plus its records; a model with another fingerprint, or one that does not hold the
records, is refused; consolidation marks edits, saves a loadable folder, and delete/rollback through the CLI restore
that folder exactly. Tiny models, the hashing encoder, SQLite and (with EDITMEM_TEST_PG_URL) PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from editors.base import WeightEditHandle
from editors.weights import StoredWeights, WeightMismatchError, _unpack, rebuild
from memory.errors import ValidationError
from serve.cli import main
from tests.test_store_fixtures import open_store
from tests.tiny import same_weights, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("editmem_cache", "no_ambient_store")  # PostgreSQL index files go to tmp_path

TINY = {"rome": dict(clamp_norm_factor=1000.0, v_weight_decay=0.0, n_prefixes=2, prefix_tokens=4, v_steps=10),
        "memit": dict(clamp_norm_factor=1000.0, v_weight_decay=0.0, n_prefixes=2, prefix_tokens=4, v_steps=10,
                      mom2_update_weight=1.0),
        "ft": dict(steps=5, norm_constraint=None, lr=1e-2)}
TINY["alphaedit"] = dict(TINY["memit"], nullspace_threshold=1e9, l2=1.0)
FACTS = [("The capital city of France", "Rome", "France"),
         ("The mother tongue of Danielle Darrieux", "English", "Danielle Darrieux"),
         ("Toko Yasuda plays the", "piano", "Toko Yasuda")]


@pytest.fixture
def mem(store_url):
    with open_store(store_url) as m:
        for prompt, target, subject in FACTS:
            m.add(prompt, target, subject=subject)
        yield m


def _replay(arch, mem, record_ids):
    """A fresh base model with the given records' deltas added in order (plain WeightEditHandle.add_deltas)."""
    model, _ = tiny_model(arch)
    for rid in record_ids:
        WeightEditHandle.add_deltas(model, _unpack(mem.weight_deltas(rid)))
    return model


@pytest.mark.parametrize("arch,method", [("llama", "rome"), ("gpt2", "memit"), ("qwen2", "ft")])
def test_apply_then_remove_latest_is_bit_identical(mem, arch, method):
    model, tok = tiny_model(arch)
    before = snapshot(model)
    stored = StoredWeights.open(mem, model, tok, base=f"tiny-{arch}")
    record = stored.apply([1], method, **TINY[method])
    assert record.edits == ((1, 1),) and record.method == method and record.applied
    assert not same_weights(model, before)
    assert mem.consolidated() == {1: [record]}
    assert same_weights(model, snapshot(_replay(arch, mem, [record.id])))  # live == base + recorded delta
    stored.remove_record(record.id, "test")
    assert same_weights(model, before)
    assert mem.weight_record(record.id).applied is False and mem.consolidated() == {}


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_removing_a_middle_edit_equals_the_other_two_on_base(mem, method):
    model, tok = tiny_model("llama")
    stored = StoredWeights.open(mem, model, tok, base="tiny-llama")
    records = [stored.apply([i], method, **TINY[method]) for i in (1, 2, 3)]
    assert len({r.params for r in records}) == 1  # all three touch the same parameters
    mem.delete(2)
    result = stored.sync_edit(2)
    assert [r.id for r in result.removed] == [records[1].id] and not result.reapplied
    assert same_weights(model, snapshot(_replay("llama", mem, [records[0].id, records[2].id])))
    stored.verify()
    # rolling edit 2 back makes it live again, unconsolidated: the next consolidation writes it at the end
    mem.rollback(2, 1)
    assert [e.id for e in stored.pending()] == [2]
    assert sorted(mem.consolidated()) == [1, 3]


def test_rebuild_from_base_equals_the_live_model(mem):
    model, tok = tiny_model("llama")
    stored = StoredWeights.open(mem, model, tok, base="tiny-llama")
    stored.consolidate("memit", batch_size=2, **TINY["memit"])
    stored.remove_edit(3)
    touched = stored.touched()
    assert touched and touched == sorted(mem.weight_bases(stored.record.id))  # names only, the same set
    fresh, _ = tiny_model("llama")
    assert same_weights(rebuild(mem, fresh, stored.record.id), snapshot(model))
    edited, _ = tiny_model("llama")  # an already edited copy is not the base
    rebuild(mem, edited, stored.record.id)
    with pytest.raises(WeightMismatchError, match="not its base"):
        rebuild(mem, edited, stored.record.id)


def test_fingerprint_mismatch_and_foreign_weights_are_refused(mem, tmp_path):
    model, tok = tiny_model("llama")
    stored = StoredWeights.open(mem, model, tok, base="tiny-llama", folder=tmp_path / "m")
    stored.apply([1], "rome", **TINY["rome"])
    other, _ = tiny_model("qwen2")
    with pytest.raises(WeightMismatchError, match="fingerprint"):
        StoredWeights.open(mem, other, tok, folder=tmp_path / "m")
    with pytest.raises(WeightMismatchError, match="fingerprint"):
        rebuild(mem, tiny_model("llama", seed=1)[0], stored.record.id)
    unedited, _ = tiny_model("llama")  # right fingerprint, but it does not hold the recorded edit
    with pytest.raises(WeightMismatchError, match="does not hold"):
        StoredWeights.open(mem, unedited, tok, folder=tmp_path / "m")


def test_batch_mate_is_written_again_when_one_edit_of_a_batch_goes(mem):
    model, tok = tiny_model("llama")
    stored = StoredWeights.open(mem, model, tok, base="tiny-llama")
    first, second = stored.consolidate("memit", batch_size=2, **TINY["memit"])
    assert [first.edit_ids, second.edit_ids] == [(1, 2), (3,)]
    mem.update(1, target_new="Madrid")
    result = stored.sync_edit(1)
    assert [r.id for r in result.removed] == [first.id]
    assert [r.edit_ids for r in result.reapplied] == [(2,)]
    assert result.reapplied[0].settings == TINY["memit"]
    assert same_weights(model, snapshot(_replay("llama", mem, [second.id, result.reapplied[0].id])))
    assert sorted(mem.consolidated()) == [2, 3] and [e.id for e in stored.pending()] == [1]


def test_consolidate_errors(mem):
    model, tok = tiny_model("llama")
    stored = StoredWeights.open(mem, model, tok, base="tiny-llama")
    with pytest.raises(ValidationError, match="unknown editing method"):
        stored.consolidate("nope")
    with pytest.raises(ValidationError, match="not a weight editor"):
        stored.apply([1], "none")
    with pytest.raises(ValidationError, match="batch size"):
        stored.consolidate("rome", batch_size=0)
    stored.consolidate("rome", **TINY["rome"])
    with pytest.raises(ValidationError, match="no edits to consolidate"):
        stored.consolidate("rome", **TINY["rome"])


def test_weight_tables_are_added_to_an_older_store(store_url):
    with open_store(store_url) as m:
        m.add("The capital city of France", "Rome", subject="France")
        with m._engine.begin() as conn:
            for name in ("editmem_weight_bases", "editmem_weight_links", "editmem_weight_records",
                         "editmem_weight_models"):
                conn.execute(text(f"DROP TABLE {name}"))
    with open_store(store_url) as m:
        assert m.weight_records() == [] and len(m) == 1
        assert m.add_weight_model("fp", "base").id == 1


@pytest.mark.parametrize("method,batch", [("memit", "2"), ("rome", "1"), ("alphaedit", "2")])
def test_cli_consolidate_then_delete_and_rollback(store_url, tmp_path, capsys, method, batch):
    from editors.lm.loading import load_model

    base_dir, out = tmp_path / "tiny-llama", tmp_path / "edited"
    model, tok = tiny_model("llama")
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    def cli(*argv):
        code = main(["--store", store_url, *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    assert cli("init", "--encoder", "hashing-256")[0] == 0
    code, _, err = cli("consolidate", "--method", method, "--model", str(base_dir), "--out", str(out))
    assert code == 2 and "store" in err and "empty" in err
    for prompt, target, subject in FACTS:
        assert cli("add", "--prompt", prompt, "--target", target, "--subject", subject)[0] == 0
    sets = [arg for k, v in TINY[method].items() for arg in ("--set", f"{k}={v}")]
    code, out_text, err = cli("consolidate", "--method", method, "--batch-size", batch, "--model", str(base_dir),
                              "--out", str(out), *sets)
    assert code == 0, err
    assert "consolidated 3 edit(s)" in out_text
    code, listing, _ = cli("list")
    assert [line.split()[2] for line in listing.splitlines()[1:]] == ["consolidated"] * 3
    assert "consolidated by " + method in cli("show", "2")[1]

    with open_store(store_url) as m:
        records = m.weight_records()
    edited, _ = load_model(out)
    assert same_weights(edited, snapshot(_replay_from(base_dir, m_url=store_url, ids=[r.id for r in records])))

    code, out_text, err = cli("delete", "2")
    assert code == 0, err
    assert "removed record" in out_text and "(exact)" in out_text
    with open_store(store_url) as m:
        live = [r.id for r in m.weight_records()]
        assert sorted(m.consolidated()) == [1, 3]
    assert same_weights(load_model(out)[0], snapshot(_replay_from(base_dir, m_url=store_url, ids=live)))
    code, _, err = cli("rollback", "2", "1")
    assert code == 0, err
    assert "current" in cli("show", "2")[1]
    code, out_text, err = cli("consolidate", "--method", method, "--out", str(out), *sets)
    assert code == 0 and "consolidated 1 edit(s)" in out_text, err
    code, _, err = cli("consolidate", "--method", method, "--out", str(out))
    assert code == 2 and "no edits to consolidate" in err
    code, _, err = cli("consolidate", "--method", "nope", "--out", str(out))
    assert code == 2 and "unknown editing method" in err
    code, _, err = cli("consolidate", "--method", method, "--out", str(out), "--model", str(tmp_path / "other"))
    assert code == 2 and "holds edits of base model" in err

    fresh = snapshot(load_model(out)[0])
    assert cli("rebuild-weights", "--out", str(out))[0] == 0
    assert same_weights(load_model(out)[0], fresh)

    code, out_text, err = cli("update", "1", "--target", "Madrid")  # a changed edit leaves the weights too
    assert code == 0 and "removed record" in out_text, err
    with open_store(store_url) as m:
        assert 1 not in m.consolidated()
        live = [r.id for r in m.weight_records()]
    assert same_weights(load_model(out)[0], snapshot(_replay_from(base_dir, m_url=store_url, ids=live)))


def _replay_from(base_dir, *, m_url, ids):
    from editors.lm.loading import load_model

    model, _ = load_model(base_dir)
    with open_store(m_url) as m:
        for rid in ids:
            WeightEditHandle.add_deltas(model, _unpack(m.weight_deltas(rid)))
    return model


def test_cli_refuses_a_foreign_out_folder(store_url, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    assert main(["--store", store_url, "init", "--encoder", "hashing-256"]) == 0
    assert main(["--store", store_url, "add", "--prompt", "a b", "--target", "c", "--subject", "a"]) == 0
    capsys.readouterr()
    assert main(["--store", store_url, "consolidate", "--method", "rome", "--out", str(tmp_path / "busy")]) == 2
    assert "is not an edited model of this store" in capsys.readouterr().err


def test_cli_failed_batch_keeps_folder_and_store_in_step(store_url, tmp_path, capsys):
    from editors.lm.loading import load_model

    base_dir, out = tmp_path / "tiny-llama", tmp_path / "edited"
    model, tok = tiny_model("llama")
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    assert main(["--store", store_url, "init", "--encoder", "hashing-256"]) == 0
    for prompt, target, subject in FACTS:
        assert main(["--store", store_url, "add", "--prompt", prompt, "--target", target, "--subject", subject]) == 0
    assert main(["--store", store_url, "add", "--prompt", "Who wrote Hamlet?", "--target", "Marlowe"]) == 0
    capsys.readouterr()
    sets = [arg for k, v in TINY["rome"].items() for arg in ("--set", f"{k}={v}")]
    code = main(["--store", store_url, "consolidate", "--method", "rome", "--batch-size", "2", "--model",
                 str(base_dir), "--out", str(out), *sets])
    err = capsys.readouterr().err
    assert code == 2 and "needs the subject" in err  # the second batch (edits 3, 4) fails as a whole
    with open_store(store_url) as m:
        assert sorted(m.consolidated()) == [1, 2]
        live = [r.id for r in m.weight_records()]
    assert same_weights(load_model(out)[0], snapshot(_replay_from(base_dir, m_url=store_url, ids=live)))


GRACE = dict(v_steps=10, clamp_norm_factor=1000.0)


def _adaptor(folder):
    from editors.adaptors import ADAPTOR_FILE

    path = folder / ADAPTOR_FILE
    return path.read_bytes() if path.is_file() else None


def test_grace_entries_follow_delete_and_rollback_and_rebuild(store_url, tmp_path, capsys):
    """GRACE through the store: one record per edit; delete takes exactly its entry out of the saved adaptor, the
    folder's adaptor equals a rebuild from the remaining records, and rollback + consolidate brings the entry back."""
    import torch

    from editors.adaptors import load_adaptor, unpack_insert
    from editors.lm.loading import load_model
    from editors.lm.tokens import encode_prompt

    base_dir, out = tmp_path / "tiny-llama", tmp_path / "edited"
    model, tok = tiny_model("llama")
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    other = "Tokyo is a large city in"

    def cli(*argv):
        code = main(["--store", store_url, *argv])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out

    def logits(m, text):
        with torch.no_grad():
            return m(input_ids=torch.tensor([encode_prompt(tok, text)])).logits

    def loaded():
        m, _ = load_model(out)
        book = load_adaptor(m, out)
        return m, book

    base, _ = load_model(base_dir)  # the base as a folder loads (not bit-equal to the in-memory tiny model)
    cli("init", "--encoder", "hashing-256")
    for prompt, target, subject in FACTS:
        cli("add", "--prompt", prompt, "--target", target, "--subject", subject)
    sets = [arg for k, v in GRACE.items() for arg in ("--set", f"{k}={v}")]
    assert "consolidated 3 edit(s)" in cli("consolidate", "--method", "grace", "--batch-size", "2",
                                           "--model", str(base_dir), "--out", str(out), *sets)
    with open_store(store_url) as m:
        records = m.weight_records()
        assert [r.edit_ids for r in records] == [(1,), (2,), (3,)] and {r.params for r in records} == {()}
        inserts = {r.edit_ids[0]: unpack_insert(m.weight_deltas(r.id)) for r in records}
    edited, book = loaded()
    assert same_weights(edited, snapshot(model))  # GRACE changes no weight
    _serves_with_adaptor(out, store_url, logits(edited, FACTS[0][0]), lambda m: logits(m, FACTS[0][0]))
    assert [e.label for e in book.entries.values()] == ["Rome", "English", "piano"]
    assert torch.equal(logits(edited, other), logits(base, other))  # outside every radius: the base, bit for bit
    assert not torch.equal(logits(edited, FACTS[0][0]), logits(base, FACTS[0][0]))

    assert "removed record" in cli("delete", "2")
    _, book = loaded()
    keys = [e.key for e in book.entries.values()]
    assert [e.label for e in book.entries.values()] == ["Rome", "piano"]
    assert torch.equal(keys[0], inserts[1][0][0]) and torch.equal(keys[1], inserts[3][0][0])
    after_delete = _adaptor(out)
    cli("rebuild-weights", "--out", str(out))
    assert _adaptor(out) == after_delete  # the same bytes as a rebuild from the remaining records

    cli("rollback", "2", "1")
    assert "consolidated 1 edit(s)" in cli("consolidate", "--method", "grace", "--out", str(out), *sets)
    _, book = loaded()
    assert sorted(e.label for e in book.entries.values()) == ["English", "Rome", "piano"]
    said = cli("delete", "1", "2", "3")  # held in saved weights: deleted one by one, each followed there
    assert said.count("removed record") == 3 and "deleted 3 edits" in said
    assert _adaptor(out) is None and load_adaptor(load_model(out)[0], out) is None
    assert torch.equal(logits(load_model(out)[0], FACTS[0][0]), logits(base, FACTS[0][0]))


def _serves_with_adaptor(folder, store_url, expected, logits_of):
    """What ``editmem serve`` / ``ask`` / ``eval`` load for a consolidated folder answers with its GRACE adaptor."""
    import torch

    from editors.adaptors import load_edited_model
    from serve.http.app import ServerSettings, create_app

    m, _ = load_edited_model(folder)
    assert torch.equal(logits_of(m), expected)
    app = create_app(ServerSettings(store=store_url, model=str(folder), scope="cosine"))
    try:
        assert torch.equal(logits_of(app.state.ctx.service.model), expected)
    finally:
        app.state.ctx.service.close()
        app.state.ctx.close()


def test_grace_removal_replays_the_rest_exactly(mem):
    """Removing a middle GRACE record in Python: the live adaptor equals a fresh replay of the other two, and the
    radii a conflict shrank grow back."""
    import torch

    from editors.adaptors import adaptor_bytes

    model, tok = tiny_model("llama")
    stored = StoredWeights.open(mem, model, tok, base="tiny-llama")
    records = stored.consolidate("grace", **GRACE, epsilon=10.0)  # huge radii: every pair conflicts
    assert len(records) == 3 and len(stored.adaptor.entries) == 3
    alone = StoredWeights.open(mem, tiny_model("llama")[0], tok, model_id=stored.record.id)
    assert adaptor_bytes(alone.adaptor) == adaptor_bytes(stored.adaptor)  # a replay in another model is the same
    mem.delete(2)
    stored.sync_edit(2)
    fresh, _ = tiny_model("llama")
    replayed = StoredWeights.open(mem, fresh, tok, model_id=stored.record.id).adaptor
    assert adaptor_bytes(replayed) == adaptor_bytes(stored.adaptor)
    a, b = stored.adaptor.entries.values()
    assert a.radius == b.radius == pytest.approx(float((a.key - b.key).norm()) / 2)
    assert torch.equal(a.key, alone.adaptor.entries[0].key)
