"""`editmem serve`, inference: a live server (tiny llama, hashing-256 store, cosine scope) answered through the
official ``openai`` SDK: models, completions, chat, streaming, the ``editmem`` field, ``extra_body`` options, the caps
and OpenAI-shaped errors."""

from __future__ import annotations

import pytest

from tests.serving import EDIT, live_server, new_store, settings, tiny_model_folder

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

IN_SCOPE = "The capital of Japan is"
OUT_OF_SCOPE = "Marie Curie was born in"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serve.http.app import create_app

    tmp = tmp_path_factory.mktemp("serve")
    folder = tiny_model_folder(tmp / "tiny-llama")
    store = new_store(tmp / "store.db", EDIT)
    app = create_app(settings(store, folder, max_body_bytes=4096))
    with live_server(app) as url:
        yield url, folder.name


@pytest.fixture
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, server):
    assert [m.id for m in client.models.list().data] == [server[1]]


def test_completion_in_scope_names_the_edit_and_counts_tokens(client, server):
    out = client.completions.create(model=server[1], prompt=IN_SCOPE, max_tokens=5)
    assert len(out.choices) == 1 and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    shaped = out.model_extra["editmem"]
    assert shaped["route"] == "serac" and shaped["edit_id"] == 1 and shaped["version"] == 1
    assert shaped["score"] >= shaped["threshold"] and shaped["change"] >= 1 and shaped["target_new"] == "Lima"


def test_out_of_scope_and_disable_take_the_base_route(client, server):
    out = client.completions.create(model=server[1], prompt=OUT_OF_SCOPE, max_tokens=3)
    assert out.model_extra["editmem"]["route"] == "base" and out.model_extra["editmem"]["edit_id"] is None
    off = client.completions.create(model=server[1], prompt=IN_SCOPE, max_tokens=3,
                                    extra_body={"editmem": {"disable": True}})
    assert off.model_extra["editmem"]["route"] == "base"
    on = client.completions.create(model=server[1], prompt=IN_SCOPE, max_tokens=3)
    base = client.completions.create(model=server[1], prompt=IN_SCOPE, max_tokens=3,
                                     extra_body={"editmem": {"disable": True}})
    assert off.choices[0].text == base.choices[0].text  # greedy: the base answer is reproducible
    assert on.model_extra["editmem"]["edit_id"] == 1


def test_chat_completion_routes_on_the_last_user_message(client, server):
    out = client.chat.completions.create(model=server[1], max_tokens=4, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": IN_SCOPE}])
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.model_extra["editmem"]["route"] == "serac" and out.model_extra["editmem"]["edit_id"] == 1
    assert out.usage.completion_tokens <= 4


def test_n_sampling_and_stop(client, server):
    out = client.completions.create(model=server[1], prompt=OUT_OF_SCOPE, max_tokens=6, n=3, temperature=1.0,
                                    top_p=0.9, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2]
    greedy = client.completions.create(model=server[1], prompt=OUT_OF_SCOPE, max_tokens=6)
    text = greedy.choices[0].text
    if len(text.strip()) > 1:
        stop = text.strip()[1]
        cut = client.completions.create(model=server[1], prompt=OUT_OF_SCOPE, max_tokens=6, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
        assert text.startswith(cut.choices[0].text)


def test_streaming_chat_and_completion(client, server):
    full = client.chat.completions.create(model=server[1], max_tokens=5,
                                          messages=[{"role": "user", "content": IN_SCOPE}])
    chunks = list(client.chat.completions.create(model=server[1], max_tokens=5, stream=True,
                                                 messages=[{"role": "user", "content": IN_SCOPE}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].model_extra["editmem"]["edit_id"] == 1 and chunks[-1].usage.completion_tokens <= 5
    pieces = list(client.completions.create(model=server[1], prompt=OUT_OF_SCOPE, max_tokens=4, stream=True))
    assert pieces[-1].model_extra["editmem"]["route"] == "base"


def test_raw_stream_ends_with_done(server):
    url, model = server
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": model, "prompt": IN_SCOPE, "max_tokens": 3,
                                                             "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_errors_are_openai_shaped_with_the_right_status(client, server):
    url, model = server
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=IN_SCOPE)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt=IN_SCOPE, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="context of 128 tokens"):
        client.completions.create(model=model, prompt=IN_SCOPE, max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="n is 99"):
        client.completions.create(model=model, prompt=IN_SCOPE, n=99)
    with pytest.raises(openai.BadRequestError, match="method"):
        client.completions.create(model=model, prompt=IN_SCOPE, extra_body={"editmem": {"method": "rome"}})
    with pytest.raises(openai.BadRequestError, match="as_of"):
        client.completions.create(model=model, prompt=IN_SCOPE, extra_body={"editmem": {"as_of": "yesterday"}})
    for body, needle in (({"model": model, "prompt": "  "}, "non-empty"),
                         ({"model": model}, "prompt"),
                         ({"model": model, "prompt": IN_SCOPE, "temperature": 5}, "temperature"),
                         ({"model": model, "messages": [{"role": "system", "content": "x"}]}, "user")):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = httpx.post(f"{url}{path}", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and needle in err["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_ops_routes(server):
    url, _ = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["index_caught_up"]
    httpx.post(f"{url}/v1/completions", json={"model": server[1], "prompt": IN_SCOPE, "max_tokens": 2})
    text = httpx.get(f"{url}/metrics").text
    assert 'editmem_answers_total{route="serac"}' in text and "editmem_http_request_seconds_bucket" in text
    assert 'editmem_edits{namespace="default"} 1.0' in text and 'editmem_index_lag{namespace="default"} 0.0' in text
    assert 'path="/v1/completions"' in text


def test_as_of_routes_as_the_store_stood_then(client, server):
    from datetime import UTC, datetime

    url, model = server
    question = "Ada Lovelace works as a"

    def shaped(as_of=None) -> dict:
        extra = {} if as_of is None else {"extra_body": {"editmem": {"as_of": as_of}}}
        return client.completions.create(model=model, prompt=question, max_tokens=2, **extra).model_extra["editmem"]

    before = shaped()["change"]
    made = httpx.post(f"{url}/v1/edits", json={"prompt": question, "target_new": "pilot"}).json()
    added = shaped()["change"]
    httpx.patch(f"{url}/v1/edits/{made['id']}", json={"target_new": "sailor"})
    now = shaped()
    try:
        assert (now["edit_id"], now["version"], now["target_new"]) == (made["id"], 2, "sailor")
        then = shaped(added)
        assert (then["edit_id"], then["version"], then["target_new"], then["as_of"]) == (made["id"], 1, "pilot",
                                                                                         added)
        assert shaped(before)["edit_id"] != made["id"]
        stamp = datetime.now(UTC).isoformat()
        assert shaped(stamp)["version"] == 2 and shaped(str(now["change"]))["version"] == 2
    finally:
        httpx.delete(f"{url}/v1/edits/{made['id']}")


def test_streams_with_stop_strings_and_with_n(client, server):
    model = server[1]
    text = client.completions.create(model=model, prompt=OUT_OF_SCOPE, max_tokens=8).choices[0].text
    stop = text.strip()[2:4] if len(text.strip()) > 4 else None
    kwargs = {"stop": [stop]} if stop else {}
    whole = client.completions.create(model=model, prompt=OUT_OF_SCOPE, max_tokens=8, **kwargs)
    parts = list(client.completions.create(model=model, prompt=OUT_OF_SCOPE, max_tokens=8, stream=True, **kwargs))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len(parts) >= 3  # pieces as they were generated, then the last chunk
    many = list(client.completions.create(model=model, prompt=OUT_OF_SCOPE, max_tokens=4, stream=True, n=2))
    assert {p.choices[0].index for p in many if p.choices} == {0, 1}
    assert many[-1].model_extra["editmem"]["route"] == "base"
