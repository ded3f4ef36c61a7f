"""Memory first, the weights as the fallback, in a real store and the service (issue 16): the router leaves the edits
an edited model's weights hold to them and routes them again once a change takes them out; ``every`` consolidates
the oldest pending edits in whole groups and leaves fewer than ``every`` in memory; ``editmem consolidate --every``;
and ``editmem serve --consolidate-every`` doing it by itself into the loaded model. Tiny llama, MEMIT, the hashing
encoder and SQLite."""

from __future__ import annotations

import time

import pytest

from editors.consolidation import NothingDue, consolidate
from editors.weights import StoredWeights, due_edits, pending_edits
from memory.errors import ValidationError
from scope.classifier import CosineScope
from scope.router import HeldEdits, Router
from serve.cli import main
from tests.test_store_fixtures import open_store
from tests.tiny import same_weights, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("editmem_cache", "no_ambient_store")

MEMIT = dict(clamp_norm_factor=1000.0, v_weight_decay=0.0, n_prefixes=2, prefix_tokens=4, v_steps=10,
             mom2_update_weight=1.0)
FACTS = [("The capital city of France", "Rome", "France"),
         ("The mother tongue of Danielle Darrieux", "English", "Danielle Darrieux"),
         ("Toko Yasuda plays the", "piano", "Toko Yasuda"),
         ("Michael Jordan plays the sport of", "baseball", "Michael Jordan"),
         ("The Eiffel Tower is located in", "Berlin", "Eiffel Tower")]


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'store.db'}"


def _fill(mem, facts):
    for prompt, target, subject in facts:
        mem.add(prompt, target, subject=subject)


def _routes(router, facts):
    """Per fact's prompt: ("memory", id) when the router gates it, ("weights", id) when it leaves it to the weights,
    None when no edit is in scope."""
    out = []
    for d in router.route([p for p, _, _ in facts]):
        out.append(("memory", d.edit.id) if d.edit is not None else ("weights", d.weights.id)
                   if d.weights is not None else None)
    return out


def test_router_leaves_held_edits_to_the_weights_and_routes_them_again(store, tmp_path):
    model, tok = tiny_model("llama")
    with open_store(store) as mem:
        _fill(mem, FACTS[:3])
        stored = StoredWeights.open(mem, model, tok, base="tiny-llama", folder=tmp_path / "edited")
        (record,) = stored.consolidate("memit", batch_size=2, edit_ids=[1, 2], **MEMIT)
        assert record.edits == ((1, 1), (2, 1))
        router = Router(mem, CosineScope(0.8, None), k=3, held=HeldEdits(mem, stored.record.id))
        assert _routes(router, FACTS[:3]) == [("weights", 1), ("weights", 2), ("memory", 3)]
        assert Router(mem, CosineScope(0.8, None), k=3).route([FACTS[0][0]])[0].edit.id == 1  # without held: gated

        mem.update(1, target_new="Madrid")  # a new version the weights do not hold: memory answers it at once
        assert _routes(router, FACTS[:3])[0] == ("memory", 1)
        result = stored.sync_edit(1)  # its record goes; edit 2 is written again as a record of its own
        assert [r.edit_ids for r in result.reapplied] == [(2,)]
        assert _routes(router, FACTS[:3]) == [("memory", 1), ("weights", 2), ("memory", 3)]

        mem.delete(2)
        stored.sync_edit(2)
        mem.rollback(2, 1)  # live again, not in the weights: routed from memory
        assert _routes(router, FACTS[:3]) == [("memory", 1), ("memory", 2), ("memory", 3)]

        stored.consolidate("memit", edit_ids=[3], **MEMIT)
        assert _routes(router, FACTS[:3])[2] == ("weights", 3)
        stored.remove_edit(3)  # the same version, out of the weights: the store's change counter says so
        assert _routes(router, FACTS[:3])[2] == ("memory", 3)

        stored.consolidate("memit", edit_ids=[3], **MEMIT)
        pinned = Router(mem, CosineScope(0.8, None), k=3, held=HeldEdits(mem, stored.record.id, loaded=()))
        assert _routes(pinned, FACTS[:3])[2] == ("memory", 3)  # the loaded weights lack it: memory keeps it


def test_every_consolidates_the_oldest_in_whole_groups(store, tmp_path):
    base_dir, out = tmp_path / "tiny-llama", tmp_path / "edited"
    model, tok = tiny_model("llama")
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    with open_store(store) as mem:
        _fill(mem, FACTS)
        time.sleep(0.01)
        mem.update(1, target_new="Madrid")  # its current version is now the newest
        assert [r.id for r in due_edits(mem, None, 2)] == [2, 3, 4, 5]
        assert due_edits(mem, None, 6) == []
        done = consolidate(mem, "memit", out, model=str(base_dir), every=2, overrides=MEMIT)
        assert [r.edit_ids for r in done.records] == [(2, 3), (4, 5)]
        model_id = done.model.id
        assert [r.id for r in pending_edits(mem, model_id)] == [1]  # fewer than every stay in memory
        with pytest.raises(NothingDue, match="1 edit\\(s\\) pending, fewer than every=2"):
            consolidate(mem, "memit", out, every=2, overrides=MEMIT)
        mem.add("Toko Yasuda was born in", "Osaka", subject="Toko Yasuda")
        done = consolidate(mem, "memit", out, every=2, overrides=MEMIT)
        assert [r.edit_ids for r in done.records] == [(1, 6)] and pending_edits(mem, model_id) == []
        with pytest.raises(ValidationError, match="not both"):
            consolidate(mem, "memit", out, every=2, batch_size=1)
        with pytest.raises(ValidationError, match="every"):
            consolidate(mem, "memit", out, every=0)
        stored = StoredWeights.open(mem, tiny_model("llama")[0], tok, model_id=model_id, verify=False)
        with pytest.raises(ValidationError, match="not pending"):
            stored.consolidate("memit", edit_ids=[2], **MEMIT)


def test_cli_consolidate_every(store, tmp_path, capsys):
    base_dir, out = tmp_path / "tiny-llama", tmp_path / "edited"
    model, tok = tiny_model("llama")
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    def cli(*argv):
        code = main(["--store", store, *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    assert cli("init", "--encoder", "hashing-256")[0] == 0
    for prompt, target, subject in FACTS[:3]:
        assert cli("add", "--prompt", prompt, "--target", target, "--subject", subject)[0] == 0
    sets = [arg for k, v in MEMIT.items() for arg in ("--set", f"{k}={v}")]
    code, text, err = cli("consolidate", "--method", "memit", "--every", "4", "--model", str(base_dir), "--out",
                          str(out), *sets)
    assert code == 0 and "nothing due: 3 edit(s) pending, fewer than every=4" in text, err
    assert not out.exists()  # nothing due: no folder, no model loaded
    code, text, err = cli("consolidate", "--method", "memit", "--every", "2", "--model", str(base_dir), "--out",
                          str(out), *sets)
    assert code == 0 and "consolidated 2 edit(s)" in text and "in 1 weight record(s)" in text, err
    assert "record 1: edits 1, 2" in text
    code, text, _ = cli("consolidate", "--method", "memit", "--every", "2", "--out", str(out), *sets)
    assert code == 0 and "nothing due: 1 edit(s) pending" in text
    code, _, err = cli("consolidate", "--method", "memit", "--every", "0", "--out", str(out))
    assert code == 2 and "every" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("consolidate", "--method", "memit", "--every", "2", "--batch-size", "1", "--out", str(out))
    assert code == 2 and "not both" in err
    code, listing, _ = cli("list")
    assert [line.split()[2] for line in listing.splitlines()[1:]] == ["consolidated", "consolidated", "current"]
    asked = [cli("ask", prompt, "--model", str(out), "--scope", "cosine", "--max-new-tokens", "1")[1]
             for prompt, _, _ in FACTS[:3]]
    assert "edit 1 v1" in asked[0] and "held by the weights" in asked[0]
    assert "shaped by edit 3 v1" in asked[2]
    assert "shaped by edit 1 v1" in cli("ask", FACTS[0][0], "--model", str(base_dir), "--scope", "cosine",
                                        "--max-new-tokens", "1")[1]  # the base model: memory answers


def _wait_jobs(url, n, kind="auto-consolidate"):
    import httpx

    for _ in range(1200):
        jobs = [j for j in httpx.get(f"{url}/v1/admin/jobs").json()["data"] if j["kind"] == kind]
        if len(jobs) >= n and all(j["status"] in ("succeeded", "failed") for j in jobs):
            return jobs
        time.sleep(0.05)
    raise AssertionError(f"no {n} finished {kind} job(s): {jobs}")


def test_serve_consolidates_every_n_into_the_live_model(tmp_path):
    """A served tiny model with --consolidate-every 2: the second write queues a job that writes the two oldest
    edits into the folder and the loaded model (bit-identical to the folder), their answers come from the weights
    (route "weights"), the third answers from memory; a delete takes its edit out of both exactly and a rollback
    makes it pending again, which, with the third, triggers the next consolidation."""
    httpx = pytest.importorskip("httpx")
    from editors.lm.loading import load_model
    from serve.http.app import ServerSettings, create_app
    from tests.serving import live_server, new_store, tiny_model_folder

    base = tiny_model_folder(tmp_path / "tiny-llama")
    out = tmp_path / "edited"
    store = new_store(tmp_path / "store.db")
    app = create_app(ServerSettings(store=store, model=str(base), scope="cosine", consolidate_every=2,
                                    consolidate_out=str(out), consolidate_settings=MEMIT, batch_wait=0.0))
    live = app.state.ctx.live
    served = app.state.ctx.service.model
    original = snapshot(served)

    def route(prompt):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, r.text
        shaped = r.json()["editmem"]
        return shaped["route"], shaped["edit_id"]

    def holds_folder():
        return same_weights(served, snapshot(load_model(out)[0]))

    with live_server(app) as url:
        assert holds_folder()  # a new folder: the served model is its base, saved there at start
        for prompt, target, subject in FACTS[:3]:
            r = httpx.post(f"{url}/v1/edits", json={"prompt": prompt, "target_new": target, "subject": subject})
            assert r.status_code == 201, r.text
        (job,) = _wait_jobs(url, 1)
        assert job["status"] == "succeeded", job
        assert job["result"]["edits"] == 2 and job["result"]["in_memory"] == 1 and job["result"]["in_weights"] == 2
        assert [r["edit_ids"] for r in job["result"]["records"]] == [[1, 2]]
        assert not same_weights(served, original) and holds_folder()
        assert [route(p) for p, _, _ in FACTS[:3]] == [("weights", 1), ("weights", 2), ("serac", 3)]
        metrics = httpx.get(f"{url}/metrics").text
        assert "editmem_weights_edits 2.0" in metrics and "editmem_memory_only_edits 1.0" in metrics

        gone = httpx.delete(f"{url}/v1/edits/1")
        assert gone.status_code == 200 and any("removed record" in line for line in gone.json()["weights"])
        assert holds_folder()  # the loaded model followed the folder: edit 1 out, edit 2 written again
        assert route(FACTS[1][0]) == ("weights", 2)
        assert httpx.post(f"{url}/v1/edits/1/rollback", json={"version": 1}).status_code == 200
        jobs = _wait_jobs(url, 2)  # edits 3 and 1 pending: the next group
        assert jobs[-1]["status"] == "succeeded" and jobs[-1]["result"]["edits"] == 2, jobs[-1]
        assert holds_folder()
        assert [route(p) for p, _, _ in FACTS[:3]] == [("weights", 1), ("weights", 2), ("weights", 3)]
    assert live.consolidations == 2


def test_serve_consolidate_every_is_checked(tmp_path):
    from serve.http.app import ServerSettings, create_app
    from tests.serving import new_store, tiny_model_folder

    base = tiny_model_folder(tmp_path / "tiny-llama")
    store = new_store(tmp_path / "store.db")
    bad = [({"consolidate_every": 0}, "consolidate_every"),
           ({"consolidate_every": 2, "consolidate_method": "serac"}, "weight editor"),
           ({"consolidate_every": 2}, "is not an edited model of the store"),
           ({"consolidate_every": 2, "model": "none"}, "needs a local model"),
           ({"consolidate_every": 2, "consolidate_out": str(tmp_path / "o"), "consolidate_settings": {"nope": 1}},
            "nope")]
    for overrides, message in bad:
        settings = {"store": store, "model": str(base), "scope": "cosine", **overrides}
        with pytest.raises(ValidationError, match=message):
            create_app(ServerSettings(**settings))
    code = main(["--store", store, "serve", "--model", str(base), "--consolidate-out", str(tmp_path / "x")])
    assert code == 2


def test_a_served_edited_folder_follows_a_delete_in_place(tmp_path):
    """Serving a folder written by consolidate (no automatic consolidation): its edits answer from the weights, and
    an HTTP delete takes the edit out of the loaded model as well as the folder (bit-identical to it)."""
    httpx = pytest.importorskip("httpx")
    from editors.lm.loading import load_model
    from serve.http.app import ServerSettings, create_app
    from tests.serving import live_server, new_store, tiny_model_folder

    base = tiny_model_folder(tmp_path / "tiny-llama")
    out = tmp_path / "edited"
    store = new_store(tmp_path / "store.db", *[{"prompt": p, "target_new": t, "subject": s} for p, t, s in FACTS[:3]])
    with open_store(store) as mem:
        consolidate(mem, "memit", out, model=str(base), batch_size=2, overrides=MEMIT)
    app = create_app(ServerSettings(store=store, model=str(out), scope="cosine", batch_wait=0.0))
    served = app.state.ctx.service.model
    assert same_weights(served, snapshot(load_model(out)[0]))

    def route(prompt):
        r = httpx.post(f"{url}/v1/completions", json={"model": "edited", "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["editmem"]["route"], r.json()["editmem"]["edit_id"]

    with live_server(app) as url:
        assert [route(p) for p, _, _ in FACTS[:3]] == [("weights", 1), ("weights", 2), ("weights", 3)]
        before = snapshot(served)
        assert httpx.delete(f"{url}/v1/edits/3").status_code == 200
        assert not same_weights(served, before) and same_weights(served, snapshot(load_model(out)[0]))
        assert httpx.post(f"{url}/v1/edits/3/rollback", json={"version": 1}).status_code == 200
        assert route(FACTS[2][0]) == ("serac", 3)  # live again, not in the weights: memory answers it
    with pytest.raises(ValidationError, match="another edited model"):
        create_app(ServerSettings(store=store, model=str(out), scope="cosine", consolidate_every=2,
                                  consolidate_out=str(tmp_path / "other")))


GRACE = dict(v_steps=10, clamp_norm_factor=1000.0)


def test_serve_follows_a_grace_adaptor(tmp_path):
    """--consolidate-method grace: the job writes the two oldest edits into the folder's codebook adaptor and the
    loaded model takes the same codebook (bit-identical to the saved file, one hook on the layer, the same logits as
    the folder loaded afresh); they answer from it (route "weights"), the third from memory. A delete through the
    server takes the edit's entries out of the loaded model too, and serving the folder itself (no consolidation)
    adopts the adaptor attached at load instead of hooking the layer twice."""
    httpx = pytest.importorskip("httpx")
    import torch

    from editors.adaptors import ADAPTOR_FILE, adaptor_bytes, load_edited_model
    from editors.lm.architectures import layer_module
    from editors.methods.grace import Codebook
    from serve.http.app import ServerSettings, create_app
    from tests.serving import live_server, new_store, tiny_model_folder

    base = tiny_model_folder(tmp_path / "tiny-llama")
    out = tmp_path / "edited"
    store = new_store(tmp_path / "store.db")

    def serve(**settings):
        app = create_app(ServerSettings(store=store, scope="cosine", batch_wait=0.0, **settings))
        return app, app.state.ctx.live, app.state.ctx.service

    def hooks(model, layer):
        return [h for h in layer_module(model, layer, "mlp_out")._forward_hooks.values()
                if isinstance(getattr(h, "__self__", None), Codebook)]

    def holds_folder(live, service):
        book = live.stored.adaptor
        assert adaptor_bytes(book) == (out / ADAPTOR_FILE).read_bytes()
        assert hooks(service.model, book.layer) == [book._forward]
        fresh, tok = load_edited_model(out)
        ids = tok(FACTS[1][0], return_tensors="pt").input_ids
        with torch.no_grad():
            return torch.equal(service.model(ids).logits, fresh(ids).logits)

    def route(url, prompt):
        body = {"model": app.state.ctx.model_name, "prompt": prompt, "max_tokens": 1}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["editmem"]["route"], r.json()["editmem"]["edit_id"]

    app, live, service = serve(model=str(base), consolidate_every=2, consolidate_method="grace",
                               consolidate_out=str(out), consolidate_settings=GRACE)
    with live_server(app) as url:
        for prompt, target, subject in FACTS[:3]:
            r = httpx.post(f"{url}/v1/edits", json={"prompt": prompt, "target_new": target, "subject": subject})
            assert r.status_code == 201, r.text
        (job,) = _wait_jobs(url, 1)
        assert job["status"] == "succeeded" and job["result"]["in_weights"] == 2, job
        assert [r["edit_ids"] for r in job["result"]["records"]] == [[1], [2]]  # GRACE: one record per edit
        assert len(live.stored.adaptor.entries) == 2 and holds_folder(live, service)
        assert [route(url, p) for p, _, _ in FACTS[:3]] == [("weights", 1), ("weights", 2), ("serac", 3)]
        assert httpx.delete(f"{url}/v1/edits/1").status_code == 200
        assert len(live.stored.adaptor.entries) == 1 and holds_folder(live, service)
        assert route(url, FACTS[1][0]) == ("weights", 2)

    app, live, service = serve(model=str(out))  # the folder itself: its adaptor was attached at load
    with live_server(app) as url:
        assert holds_folder(live, service) and route(url, FACTS[1][0]) == ("weights", 2)
        assert httpx.delete(f"{url}/v1/edits/2").status_code == 200
        assert not live.stored.adaptor.entries and not hooks(service.model, live.stored.adaptor.layer)
        assert route(url, FACTS[2][0]) == ("serac", 3)
