"""`editmem serve`, the edit store over HTTP (httpx against a live server without a model): CRUD, versions,
rollback, search, import/export, the change feed, every error path, API keys and roles, the bind refusal, and two
servers on one store (SQLite here; PostgreSQL when EDITMEM_TEST_PG_URL is set)."""

from __future__ import annotations

import json
import logging

import pytest

from tests.serving import EDIT, live_server, new_store, settings

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
# Index files of PostgreSQL stores go to a per-test cache folder (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("editmem_cache")

KEYS = {"reader-key-0001": "read", "writer-key-0001": "write", "admin-key-00001": "admin"}


def _app(store: str, **overrides):
    from serve.http.app import create_app

    return create_app(settings(store, "none", **overrides))


@pytest.fixture
def url(tmp_path):
    with live_server(_app(new_store(tmp_path / "s.db", EDIT), max_body_bytes=4096)) as base:
        yield base


def _error(r, status: int, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err
    return err


def test_crud_versions_history_and_rollback(url):
    c = httpx.Client(base_url=url)
    made = c.post("/v1/edits", json={"prompt": "The capital of France is", "target_new": "Rome",
                                     "subject": "France", "metadata": {"by": "test"}})
    assert made.status_code == 201
    e = made.json()
    assert (e["id"], e["version"], e["target_new"], e["metadata"]) == (2, 1, "Rome", {"by": "test"})
    assert c.get(f"/v1/edits/{e['id']}").json()["prompt"] == "The capital of France is"
    v2 = c.patch(f"/v1/edits/{e['id']}", json={"target_new": "Oslo"}).json()
    assert (v2["version"], v2["target_new"], v2["subject"]) == (2, "Oslo", "France")
    assert c.get(f"/v1/edits/{e['id']}", params={"version": 1}).json()["target_new"] == "Rome"
    gone = c.delete(f"/v1/edits/{e['id']}").json()
    assert gone["deleted"] and gone["version"] == 3
    assert [r["id"] for r in c.get("/v1/edits").json()["data"]] == [1]
    assert [r["id"] for r in c.get("/v1/edits", params={"include_deleted": True}).json()["data"]] == [1, 2]
    back = c.post(f"/v1/edits/{e['id']}/rollback", json={"version": 1}).json()
    assert (back["version"], back["target_new"], back["deleted"]) == (4, "Rome", False)
    hist = c.get(f"/v1/edits/{e['id']}/history").json()["data"]
    assert [h["version"] for h in hist] == [1, 2, 3, 4] and hist[2]["deleted"]


def test_bulk_delete_is_all_or_none(url):
    c = httpx.Client(base_url=url)
    ids = [c.post("/v1/edits", json={"prompt": f"The best town for fans of {t} is", "target_new": t}).json()["id"]
           for t in ("Lyon", "Nice", "Lille")]
    _error(c.post("/v1/edits/delete", json={"ids": [ids[0], 999]}), 404, "no edit with id 999")
    _error(c.post("/v1/edits/delete", json={"ids": [ids[0], ids[0]]}), 400, "more than once")
    _error(c.post("/v1/edits/delete", json={"ids": []}), 400)
    assert len(c.get("/v1/edits").json()["data"]) == 4  # nothing was deleted
    r = c.post("/v1/edits/delete", json={"ids": [ids[2], ids[0]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(t["id"], t["deleted"], t["version"]) for t in body["data"]] == [(ids[2], True, 2), (ids[0], True, 2)]
    assert "weights" not in body and body["change"] > 0
    assert sorted(e["id"] for e in c.get("/v1/edits").json()["data"]) == [1, ids[1]]


def test_list_pages_search_export_and_changes(url):
    c = httpx.Client(base_url=url)
    start = c.get("/v1/edits/changes").json()["change"]
    for i in range(5):
        c.post("/v1/edits", json={"prompt": f"Fact number {i} is about", "target_new": f"thing {i}"})
    page = c.get("/v1/edits", params={"limit": 2, "offset": 2}).json()
    assert [r["id"] for r in page["data"]] == [3, 4] and page["total"] == 6 and page["limit"] == 2
    hits = c.get("/v1/edits/search", params={"q": "The capital of Japan is", "k": 2}).json()["data"]
    assert hits[0]["edit"]["id"] == 1 and hits[0]["score"] > 0.99
    lines = c.get("/v1/edits/export").text.strip().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [1, 2, 3, 4, 5, 6]
    feed = c.get("/v1/edits/changes", params={"since": start}).json()
    assert feed["change"] == start + 5 and [x["edit_id"] for x in feed["data"]] == [2, 3, 4, 5, 6]
    assert {x["op"] for x in feed["data"]} == {"add"}
    c.delete("/v1/edits/2")
    last = c.get("/v1/edits/changes", params={"since": feed["change"]}).json()["data"]
    assert last == [{"seq": feed["change"] + 1, "op": "del", "edit_id": 2, "version": 1, "deleted": False}]


def test_list_filters_by_subject_and_text(url):
    c = httpx.Client(base_url=url)
    for prompt, target, subject in [("The capital of Peru is", "Lima_x", "Peru"), ("Peru's language is", "Quechua",
                                    "Peru"), ("The 100% city of Chile is", "Valparaiso", "Chile")]:
        assert c.post("/v1/edits", json={"prompt": prompt, "target_new": target, "subject": subject}).status_code == 201
    peru = c.get("/v1/edits", params={"subject": "Peru"}).json()
    assert [r["target_new"] for r in peru["data"]] == ["Lima_x", "Quechua"] and peru["matched"] == 2
    assert peru["total"] == 4
    assert [r["subject"] for r in c.get("/v1/edits", params={"contains": "QUECHUA"}).json()["data"]] == ["Peru"]
    assert c.get("/v1/edits", params={"contains": "100%"}).json()["matched"] == 1  # LIKE wildcards are literal
    assert c.get("/v1/edits", params={"contains": "a_x"}).json()["matched"] == 1
    assert c.get("/v1/edits", params={"contains": "a%x"}).json()["matched"] == 0
    page = c.get("/v1/edits", params={"subject": "Peru", "limit": 1, "offset": 1}).json()
    assert [r["target_new"] for r in page["data"]] == ["Quechua"] and page["matched"] == 2
    c.delete(f"/v1/edits/{peru['data'][0]['id']}")
    assert c.get("/v1/edits", params={"subject": "Peru"}).json()["matched"] == 1
    assert c.get("/v1/edits", params={"subject": "Peru", "include_deleted": True}).json()["matched"] == 2
    _error(c.get("/v1/edits", params={"contains": " "}), 400, "contains must be a non-empty string")


def test_import_json_and_file_all_or_nothing(url, tmp_path):
    c = httpx.Client(base_url=url)
    r = c.post("/v1/edits/import", json={"records": [{"prompt": "A is", "target_new": "B"},
                                                     {"prompt": "C is", "target_new": "D"}]})
    assert r.json()["added"] == 2
    before = c.get("/v1/edits").json()["total"]
    _error(c.post("/v1/edits/import", json={"records": [{"prompt": "E is", "target_new": "F"},
                                                        {"prompt": "", "target_new": "G"}]}), 400, "item 1")
    jsonl = "\n".join(json.dumps({"id": i, "version": 1, "prompt": f"Imported {i} is", "target_new": "x"})
                      for i in (1, 2)) + "\n"
    r = c.post("/v1/edits/import", files={"file": ("edits.jsonl", jsonl.encode(), "application/x-ndjson")})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 2
    bad = jsonl + '{"id": 3, "version": 1, "prompt": "no target"}\n'
    _error(c.post("/v1/edits/import", files={"file": ("bad.jsonl", bad.encode(), "application/x-ndjson")}), 400)
    assert c.get("/v1/edits").json()["total"] == before + 2


def test_every_error_path_is_a_clear_4xx(url):
    c = httpx.Client(base_url=url)
    _error(c.post("/v1/edits", content=b"{oops", headers={"content-type": "application/json"}), 400, "JSON")
    _error(c.post("/v1/edits", json={"prompt": "", "target_new": "x"}), 400, "prompt")
    _error(c.post("/v1/edits", json={"prompt": "p"}), 400, "target_new")
    _error(c.post("/v1/edits", json={"prompt": "p", "target_new": "t", "colour": "red"}), 400, "colour")
    _error(c.post("/v1/edits", json={"prompt": 3, "target_new": "t"}), 400, "prompt")
    _error(c.get("/v1/edits/99"), 404, "no edit with id 99")
    _error(c.get("/v1/edits/1", params={"version": 7}), 404, "no version 7")
    _error(c.get("/v1/edits/abc"), 400, "edit_id")
    _error(c.patch("/v1/edits/99", json={"target_new": "x"}), 404)
    _error(c.patch("/v1/edits/1", json={}), 400, "at least one field")
    _error(c.delete("/v1/edits/99"), 404)
    _error(c.post("/v1/edits/1/rollback", json={"version": 9}), 404)
    _error(c.get("/v1/edits/99/history"), 404)
    _error(c.get("/v1/edits", params={"limit": -1}), 400, "limit")
    _error(c.get("/v1/edits/search"), 400, "q")
    _error(c.post("/v1/edits", json={"prompt": "p" * 5000, "target_new": "t"}), 413, "at most 4096")
    _error(c.post("/v1/completions", json={"model": "x", "prompt": "p"}), 503, "no model")


def test_keys_roles_401_and_403(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="editmem.http")
    keys = tmp_path / "keys"
    keys.write_text("# test keys\n" + "".join(f"{k} {r}\n" for k, r in KEYS.items()))
    with live_server(_app(new_store(tmp_path / "k.db", EDIT), api_keys=str(keys))) as url:
        def call(method: str, path: str, key: str | None = None, **kw):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.request(method, url + path, headers=headers, **kw)

        new = {"prompt": "P is", "target_new": "Q"}
        assert _error(call("GET", "/v1/edits"), 401)["code"] == "missing_api_key"
        assert _error(call("GET", "/v1/edits", "wrong-key-0001"), 401)["code"] == "invalid_api_key"
        assert call("GET", "/v1/edits", "reader-key-0001").status_code == 200
        assert httpx.get(url + "/v1/edits", headers={"X-API-Key": "reader-key-0001"}).status_code == 200
        assert _error(call("POST", "/v1/edits", "reader-key-0001", json=new), 403)["code"] == "insufficient_role"
        assert _error(call("DELETE", "/v1/edits/1", "reader-key-0001"), 403)
        assert call("POST", "/v1/edits", "writer-key-0001", json=new).status_code == 201
        assert _error(call("POST", "/v1/edits/import", "writer-key-0001", json={"records": [new]}), 403)
        assert call("POST", "/v1/edits/import", "admin-key-00001", json={"records": [new]}).status_code == 200
        assert call("GET", "/healthz").status_code == 200 and call("GET", "/").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "editmem.http"]
    assert len(lines) == 11 and lines[0].startswith("GET /v1/edits 401 ") and lines[4].startswith("POST /v1/edits 403")
    assert not any(key in line for line in lines for key in KEYS)


def test_bad_keys_file_and_non_loopback_bind_are_refused(tmp_path, capsys):
    from serve.cli import main
    from serve.commands.serve import is_loopback

    store = new_store(tmp_path / "b.db")
    capsys.readouterr()
    assert main(["--store", store, "serve", "--model", "none", "--host", "0.0.0.0"]) == 2
    assert "without API keys" in capsys.readouterr().err
    bad = tmp_path / "keys"
    bad.write_text("onlyakey\n")
    assert main(["--store", store, "serve", "--model", "none", "--api-keys", str(bad)]) == 2
    assert "KEY ROLE" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def _two_servers_share(store: str) -> None:
    with live_server(_app(store)) as a, live_server(_app(store)) as b:
        made = httpx.post(f"{a}/v1/edits", json={"prompt": "The capital of Peru is", "target_new": "Oslo"}).json()
        assert httpx.get(f"{b}/v1/edits/{made['id']}").json()["target_new"] == "Oslo"
        hits = httpx.get(f"{b}/v1/edits/search", params={"q": "The capital of Peru is", "k": 1}).json()["data"]
        assert hits[0]["edit"]["id"] == made["id"]
        httpx.patch(f"{b}/v1/edits/{made['id']}", json={"target_new": "Lima"})
        assert httpx.get(f"{a}/v1/edits/{made['id']}").json()["version"] == 2
        hits = httpx.get(f"{a}/v1/edits/search", params={"q": "The capital of Peru is", "k": 1}).json()["data"]
        assert hits[0]["edit"]["target_new"] == "Lima"
        ready = httpx.get(f"{a}/readyz").json()
        assert ready["index_caught_up"] and ready["change"] == httpx.get(f"{b}/readyz").json()["change"]


def test_two_servers_on_one_sqlite_store_see_each_others_writes(tmp_path):
    _two_servers_share(new_store(tmp_path / "shared.db"))


@pytest.mark.postgres
def test_two_servers_on_one_postgres_store(pg_store_url):
    from serve.cli import main

    assert main(["--store", pg_store_url, "init", "--encoder", "hashing-256"]) == 0
    _two_servers_share(pg_store_url)


def test_cors_is_off_unless_an_origin_is_configured(tmp_path):
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    store = new_store(tmp_path / "c.db")
    with live_server(_app(store)) as url:
        r = httpx.options(f"{url}/v1/edits", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with live_server(_app(store, cors_origins=("http://example.test",))) as url:
        r = httpx.options(f"{url}/v1/edits", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://example.test"
        other = httpx.get(f"{url}/v1/edits", headers={"Origin": "http://elsewhere.test"})
        assert "access-control-allow-origin" not in other.headers
