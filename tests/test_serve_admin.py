"""Admin routes of `editmem serve`: consolidation of the store's edits into a model's weights as a background job
(checked before it is queued), the job's state, the store's edited models, and HTTP delete/rollback of a
consolidated edit taking it out of the saved weights exactly, as the CLI does."""

from __future__ import annotations

import pytest

from tests.serving import live_server, new_store, tiny_model_folder

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

ROME = {"clamp_norm_factor": 1000.0, "v_weight_decay": 0.0, "n_prefixes": 2, "prefix_tokens": 4, "v_steps": 10}
FACTS = [{"prompt": "The capital city of France", "target_new": "Rome", "subject": "France"},
         {"prompt": "Toko Yasuda plays the", "target_new": "piano", "subject": "Toko Yasuda"}]
ADMIN = {"Authorization": "Bearer admin-key-0001"}
WRITER = {"Authorization": "Bearer write-key-0001"}


@pytest.fixture()
def admin_server(tmp_path):
    from serve.http.app import ServerSettings, create_app

    keys = tmp_path / "keys"
    keys.write_text("admin-key-0001 admin\nwrite-key-0001 write\n")
    base = tiny_model_folder(tmp_path / "tiny-llama")
    store = new_store(tmp_path / "store.db", *FACTS)
    app = create_app(ServerSettings(store=store, model="none", api_keys=str(keys),
                                    weights_dir=str(tmp_path / "weights")))
    with live_server(app) as url:
        yield url, base, tmp_path / "weights", app


def _wait(url: str, job_id: int) -> dict:
    import time

    for _ in range(1200):
        job = httpx.get(f"{url}/v1/admin/jobs/{job_id}", headers=ADMIN).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_consolidate_over_http_then_delete_and_rollback_follow_the_weights(admin_server):
    from editors.lm.loading import load_model
    from editors.weights import rebuild
    from memory.store import EditMemory

    url, base, weights, app = admin_server
    r = httpx.post(f"{url}/v1/admin/consolidate", headers=ADMIN,
                   json={"method": "rome", "out": "edited", "model": str(base), "batch_size": 1, "settings": ROME})
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("queued", "running", "succeeded")
    job = _wait(url, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["edits"] == 2 and len(job["result"]["records"]) == 2
    assert job["result"]["folder"] == str(weights / "edited")
    listed = httpx.get(f"{url}/v1/admin/jobs", headers=ADMIN).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]
    models = httpx.get(f"{url}/v1/admin/weights", headers=ADMIN).json()["data"]
    assert len(models) == 1 and [rec["edit_ids"] for rec in models[0]["records"]] == [[1], [2]]

    gone = httpx.delete(f"{url}/v1/edits/1", headers=WRITER)
    assert gone.status_code == 200, gone.text
    assert any("removed record" in line and "(exact)" in line for line in gone.json()["weights"])
    store = app.state.ctx.settings.store
    with EditMemory.open(store, create=False) as mem:
        model_id = mem.weight_models()[0].id
        assert [r.edit_ids for r in mem.weight_records(model_id=model_id)] == [(2,)]
        saved, _ = load_model(weights / "edited")
        rebuilt, _ = load_model(base)
        rebuild(mem, rebuilt, model_id)
    assert all((a == b).all() for a, b in zip(saved.state_dict().values(), rebuilt.state_dict().values()))
    back = httpx.post(f"{url}/v1/edits/1/rollback", headers=WRITER, json={"version": 1})
    assert back.status_code == 200 and "weights" not in back.json()  # live again, not in the weights until consolidated
    again = httpx.post(f"{url}/v1/admin/consolidate", headers=ADMIN,
                       json={"method": "rome", "out": "edited", "settings": ROME})
    assert _wait(url, again.json()["id"])["result"]["edits"] == 1


def test_consolidate_every_writes_only_whole_groups(admin_server):
    url, base, _, _ = admin_server
    body = {"method": "rome", "out": "hybrid", "model": str(base), "settings": ROME}
    r = httpx.post(f"{url}/v1/admin/consolidate", headers=ADMIN, json={**body, "every": 3})
    assert r.status_code == 200 and r.json()["status"] == "nothing_due", r.text
    assert "fewer" in r.json()["message"] or "pending" in r.json()["message"]
    assert httpx.get(f"{url}/v1/admin/jobs", headers=ADMIN).json()["data"] == []  # nothing queued
    r = httpx.post(f"{url}/v1/admin/consolidate", headers=ADMIN, json={**body, "every": 1})
    assert r.status_code == 202, r.text
    job = _wait(url, r.json()["id"])
    assert job["status"] == "succeeded" and job["params"]["every"] == 1, job
    assert job["result"]["edits"] == 2 and [rec["edit_ids"] for rec in job["result"]["records"]] == [[1], [2]]
    r = httpx.post(f"{url}/v1/admin/consolidate", headers=ADMIN, json={**body, "model": None, "every": 1})
    assert r.status_code == 200 and r.json()["status"] == "nothing_due", r.text  # both held now
    r = httpx.post(f"{url}/v1/admin/consolidate", headers=ADMIN, json={**body, "every": 1, "batch_size": 1})
    assert r.status_code == 400 and "not both" in r.json()["error"]["message"]


def test_consolidate_is_checked_before_it_is_queued(admin_server):
    url, base, _, _ = admin_server

    def post(body, headers=ADMIN):
        return httpx.post(f"{url}/v1/admin/consolidate", headers=headers, json=body)

    r = post({"method": "nope", "out": "x", "model": str(base)})
    assert r.status_code == 400 and "unknown editing method 'nope'" in r.json()["error"]["message"]
    for bad in ("../escape", "/tmp/abs", "a/b", ".hidden", ""):
        r = post({"method": "rome", "out": bad, "model": str(base)})
        assert r.status_code == 400 and "out must be a folder name" in r.json()["error"]["message"], bad
    r = post({"method": "rome", "out": "x", "batch_size": 0, "model": str(base)})
    assert r.status_code == 400 and "batch_size" in r.json()["error"]["message"]
    r = post({"method": "rome", "out": "x", "surprise": 1})
    assert r.status_code == 400
    assert post({"method": "rome", "out": "x"}, headers=WRITER).status_code == 403
    assert httpx.get(f"{url}/v1/admin/jobs", headers=ADMIN).json()["data"] == []  # nothing was queued
    missing = httpx.get(f"{url}/v1/admin/jobs/99", headers=ADMIN)
    assert missing.status_code == 404 and "no job with id 99" in missing.json()["error"]["message"]


def test_a_failing_job_says_why(admin_server):
    url, _, _, _ = admin_server
    r = httpx.post(f"{url}/v1/admin/consolidate", headers=ADMIN,
                   json={"method": "rome", "out": "broken", "model": "/nonexistent/model-folder"})
    assert r.status_code == 202, r.text
    job = _wait(url, r.json()["id"])
    assert job["status"] == "failed" and job["error"] and job["finished"] >= job["started"]
