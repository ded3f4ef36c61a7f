"""`editmem serve` and store namespaces: inference routes within the request's namespace (the ``X-Editmem-Namespace``
header or the ``editmem.namespace`` option, through the official ``openai`` SDK), ``/v1/edits`` reads and writes within
it (``namespace`` query parameter or header), a key bound to a namespace can use only that one, and the server's
``--namespace`` default. Same prompt in two namespaces with different targets: each answer names its own edit."""

from __future__ import annotations

import pytest

from tests.serving import EDIT, live_server, new_store, settings, tiny_model_folder

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

PROMPT = EDIT["prompt"]
KEYS = {"acme-reader-0001": ("read", "acme"), "acme-writer-0001": ("write", "acme"),
        "free-writer-0001": ("write", None), "free-admin-00001": ("admin", None)}


def _keys_file(path):
    path.write_text("".join(f"{k} {role}{' ' + ns if ns else ''}\n" for k, (role, ns) in KEYS.items()))
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny-llama server whose store holds EDIT (target Lima) in ``default`` and the same prompt with target Oslo in
    ``acme`` (written over HTTP), with keys bound and unbound."""
    from serve.http.app import create_app

    tmp = tmp_path_factory.mktemp("serve-ns")
    folder = tiny_model_folder(tmp / "tiny-llama")
    store = new_store(tmp / "store.db", EDIT)
    app = create_app(settings(store, folder, api_keys=_keys_file(tmp / "keys")))
    with live_server(app) as url:
        made = httpx.post(f"{url}/v1/edits", params={"namespace": "acme"},
                          headers={"Authorization": "Bearer free-writer-0001"},
                          json={"prompt": PROMPT, "target_new": "Oslo", "subject": "Japan"})
        assert made.status_code == 201, made.text
        yield url, folder.name, made.json()["id"]


def _client(url: str, key: str, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)


def test_same_prompt_in_two_namespaces_routes_to_each_namespaces_own_edit(server):
    url, model, acme_id = server
    client = _client(url, "free-writer-0001")
    home = client.completions.create(model=model, prompt=PROMPT, max_tokens=3).model_extra["editmem"]
    assert (home["route"], home["edit_id"], home["target_new"], home["namespace"]) == ("serac", 1, "Lima", "default")
    acme = client.completions.create(model=model, prompt=PROMPT, max_tokens=3,
                                     extra_body={"editmem": {"namespace": "acme"}}).model_extra["editmem"]
    assert (acme["route"], acme["edit_id"], acme["target_new"], acme["namespace"]) == ("serac", acme_id, "Oslo",
                                                                                       "acme")
    by_header = _client(url, "free-writer-0001", default_headers={"X-Editmem-Namespace": "acme"})
    chat = by_header.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                             max_tokens=3).model_extra["editmem"]
    assert (chat["edit_id"], chat["target_new"], chat["namespace"]) == (acme_id, "Oslo", "acme")
    empty = client.completions.create(model=model, prompt=PROMPT, max_tokens=3,
                                      extra_body={"editmem": {"namespace": "nobody"}}).model_extra["editmem"]
    assert (empty["route"], empty["edit_id"], empty["namespace"]) == ("base", None, "nobody")


def test_streamed_answer_names_the_namespace(server):
    url, model, acme_id = server
    stream = _client(url, "acme-reader-0001").completions.create(model=model, prompt=PROMPT, max_tokens=3,
                                                                 stream=True)
    last = [c for c in stream][-1].model_extra["editmem"]
    assert (last["edit_id"], last["namespace"]) == (acme_id, "acme")


def test_a_key_bound_to_a_namespace_uses_it_and_no_other(server):
    url, model, acme_id = server
    bound = _client(url, "acme-reader-0001")
    shaped = bound.completions.create(model=model, prompt=PROMPT, max_tokens=3).model_extra["editmem"]
    assert (shaped["edit_id"], shaped["namespace"]) == (acme_id, "acme")  # the key's namespace, unasked
    same = bound.completions.create(model=model, prompt=PROMPT, max_tokens=3,
                                    extra_body={"editmem": {"namespace": "acme"}})
    assert same.model_extra["editmem"]["edit_id"] == acme_id
    with pytest.raises(openai.PermissionDeniedError) as err:
        bound.completions.create(model=model, prompt=PROMPT, max_tokens=3,
                                 extra_body={"editmem": {"namespace": "default"}})
    assert "bound to the namespace 'acme'" in str(err.value)
    with pytest.raises(openai.PermissionDeniedError):
        _client(url, "acme-reader-0001", default_headers={"X-Editmem-Namespace": "default"}).chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=3)
    writer = httpx.Client(base_url=url, headers={"Authorization": "Bearer acme-writer-0001"})
    made = writer.post("/v1/edits", json={"prompt": "The acme fact is", "target_new": "bound"})
    assert made.status_code == 201
    assert writer.get(f"/v1/edits/{made.json()['id']}").json()["target_new"] == "bound"
    assert writer.get(f"/v1/edits/{made.json()['id']}", params={"namespace": "default"}).status_code == 403
    free = httpx.Client(base_url=url, headers={"Authorization": "Bearer free-writer-0001"})
    assert free.get(f"/v1/edits/{made.json()['id']}").status_code == 404  # not in default
    assert free.get(f"/v1/edits/{made.json()['id']}", params={"namespace": "acme"}).status_code == 200


def test_edits_read_and_write_within_the_namespace(server):
    url, _, acme_id = server
    c = httpx.Client(base_url=url, headers={"Authorization": "Bearer free-writer-0001"})
    made = c.post("/v1/edits", params={"namespace": "tenant-b"}, json={"prompt": "Tenant B's colour is",
                                                                      "target_new": "teal"}).json()
    assert [e["id"] for e in c.get("/v1/edits", params={"namespace": "tenant-b"}).json()["data"]] == [made["id"]]
    assert made["id"] not in [e["id"] for e in c.get("/v1/edits").json()["data"]]
    assert c.get(f"/v1/edits/{made['id']}").status_code == 404
    assert c.patch(f"/v1/edits/{made['id']}", json={"target_new": "red"}).status_code == 404
    assert c.delete(f"/v1/edits/{made['id']}").status_code == 404
    v2 = c.patch(f"/v1/edits/{made['id']}", headers={"X-Editmem-Namespace": "tenant-b"}, json={"target_new": "red"})
    assert v2.status_code == 200 and v2.json()["version"] == 2
    hits = c.get("/v1/edits/search", params={"q": PROMPT, "k": 10}).json()["data"]
    assert [h["edit"]["id"] for h in hits] == [1]  # default's edit only, never acme's same prompt
    hits = c.get("/v1/edits/search", params={"q": PROMPT, "k": 10, "namespace": "acme"}).json()["data"]
    assert acme_id in [h["edit"]["id"] for h in hits] and 1 not in [h["edit"]["id"] for h in hits]
    feed = c.get("/v1/edits/changes", params={"namespace": "tenant-b"}).json()["data"]
    assert [(ch["edit_id"], ch["version"]) for ch in feed if ch["op"] == "add"] == [(made["id"], 1), (made["id"], 2)]
    lines = c.get("/v1/edits/export", params={"namespace": "tenant-b"}).text.strip().splitlines()
    assert len(lines) == 1 and "teal" not in lines[0] and "red" in lines[0]
    imported = httpx.post(f"{url}/v1/edits/import", params={"namespace": "tenant-c"},
                          headers={"Authorization": "Bearer free-admin-00001"},
                          json={"records": [{"prompt": "Tenant C's colour is", "target_new": "plum"}]})
    assert imported.json()["added"] == 1
    assert c.get("/v1/edits", params={"namespace": "tenant-c"}).json()["total"] == 1


def test_conflicting_or_invalid_namespaces_are_clear_4xx(server):
    url, _, _ = server
    c = httpx.Client(base_url=url, headers={"Authorization": "Bearer free-writer-0001"})
    both = c.get("/v1/edits", params={"namespace": "acme"}, headers={"X-Editmem-Namespace": "other"})
    assert both.status_code == 400 and "must agree" in both.json()["error"]["message"]
    bad = c.get("/v1/edits", params={"namespace": "../etc"})
    assert bad.status_code == 400 and "namespace must be" in bad.json()["error"]["message"]
    assert c.get("/v1/edits", headers={"X-Editmem-Namespace": "-x"}).status_code == 400


def test_keys_file_namespace_column_is_checked(tmp_path):
    from memory.errors import ValidationError
    from serve.http.auth import load_keys

    ring = load_keys(_keys_file(tmp_path / "keys"))
    assert ring is not None and ring.lookup("acme-reader-0001") == ("read", "acme")
    assert ring.lookup("free-writer-0001") == ("write", None) and ring.lookup("nope-nope-nope") is None
    (tmp_path / "bad").write_text("some-long-key-1 read bad/name\n")
    with pytest.raises(ValidationError, match="bad:1: namespace must be"):
        load_keys(tmp_path / "bad")
    (tmp_path / "four").write_text("some-long-key-1 read acme extra\n")
    with pytest.raises(ValidationError, match="KEY ROLE \\[NAMESPACE\\]"):
        load_keys(tmp_path / "four")


def test_server_namespace_default(tmp_path):
    """``--namespace`` (ServerSettings.namespace): requests that name none use it, for edits and for inference."""
    from memory.store import EditMemory
    from serve.http.app import create_app

    store = new_store(tmp_path / "d.db", EDIT)
    with EditMemory.open(store, namespace="team") as mem:
        team_id = mem.add(prompt=PROMPT, target_new="Quito").id
    folder = tiny_model_folder(tmp_path / "tiny-llama")
    with live_server(create_app(settings(store, folder, namespace="team"))) as url:
        assert [e["id"] for e in httpx.get(f"{url}/v1/edits").json()["data"]] == [team_id]
        assert [e["id"] for e in httpx.get(f"{url}/v1/edits?namespace=default").json()["data"]] == [1]
        out = _client(url, "unused").completions.create(model=folder.name, prompt=PROMPT, max_tokens=2)
        assert (out.model_extra["editmem"]["edit_id"], out.model_extra["editmem"]["namespace"]) == (team_id, "team")


def test_readyz_and_metrics_cover_every_open_namespace(server):
    url, _, _ = server
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["ready"] and set(ready["namespaces"]) >= {"default", "acme"}
    assert all(ns["index_caught_up"] for ns in ready["namespaces"].values())
    text = httpx.get(f"{url}/metrics").text
    admin = {"Authorization": "Bearer free-admin-00001"}
    for ns in ready["namespaces"]:
        total = httpx.get(f"{url}/v1/edits", params={"namespace": ns, "limit": 0}, headers=admin).json()["total"]
        assert f'editmem_edits{{namespace="{ns}"}} {float(total)}' in text, ns
        assert f'editmem_index_lag{{namespace="{ns}"}} 0.0' in text, ns


def test_admin_key_list_shows_roles_and_namespaces_never_keys(server):
    url, _, _ = server
    r = httpx.get(f"{url}/v1/admin/keys", headers={"Authorization": "Bearer free-admin-00001"})
    assert r.status_code == 200, r.text
    assert r.json()["keys_configured"] is True
    assert {(k["role"], k["namespace"], k["keys"]) for k in r.json()["data"]} == {
        ("read", "acme", 1), ("write", "acme", 1), ("write", None, 1), ("admin", None, 1)}
    assert not any(key in r.text for key in KEYS)
    denied = httpx.get(f"{url}/v1/admin/keys", headers={"Authorization": "Bearer free-writer-0001"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_role"
    assert denied.json()["error"]["message"] == "this needs an admin key; the key given is write"
    assert httpx.get(f"{url}/v1/admin/keys").status_code == 401
