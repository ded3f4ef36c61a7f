"""Proxy mode: a model-less editmem server in front of a second server (a plain editmem with the tiny model and an
empty store) as its upstream. Out of scope the request reaches the upstream untouched (same answer as asking it
directly); in scope the edit's context is put in front (same answer as asking the upstream with that context)."""

from __future__ import annotations

import pytest

from tests.serving import EDIT, live_server, new_store, settings, tiny_model_folder

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from serve.http.app import create_app

    tmp = tmp_path_factory.mktemp("proxy")
    folder = tiny_model_folder(tmp / "tiny-llama")
    upstream_app = create_app(settings(new_store(tmp / "upstream.db"), folder))
    with live_server(upstream_app) as upstream:
        proxy_app = create_app(settings(new_store(tmp / "front.db", EDIT), "none", upstream=f"{upstream}/v1"))
        with live_server(proxy_app) as front:
            yield front, upstream, folder.name


def _clients(servers):
    front, upstream, _ = servers
    return (openai.OpenAI(base_url=f"{front}/v1", api_key="x", max_retries=0),
            openai.OpenAI(base_url=f"{upstream}/v1", api_key="x", max_retries=0))


def test_models_come_from_the_upstream(servers):
    via, direct = _clients(servers)
    assert [m.id for m in via.models.list().data] == [m.id for m in direct.models.list().data] == [servers[2]]


def test_out_of_scope_is_forwarded_untouched(servers):
    via, direct = _clients(servers)
    prompt = "Marie Curie was born in"
    a = via.completions.create(model=servers[2], prompt=prompt, max_tokens=5)
    b = direct.completions.create(model=servers[2], prompt=prompt, max_tokens=5)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.model_extra["editmem"]["route"] == "base"


def test_in_scope_puts_the_edit_in_context(servers):
    from editors.retrieval.augmented import DEFAULT_CONTEXT, context_template, edit_context
    from memory.records import EditRecord

    via, direct = _clients(servers)
    prompt = EDIT["prompt"]
    a = via.completions.create(model=servers[2], prompt=prompt, max_tokens=5)
    assert a.model_extra["editmem"]["route"] == "serac" and a.model_extra["editmem"]["edit_id"] == 1
    context = edit_context(EditRecord(1, 1, EDIT["prompt"], EDIT["target_new"], EDIT["subject"]),
                           context_template(DEFAULT_CONTEXT))
    b = direct.completions.create(model=servers[2], prompt=context + prompt, max_tokens=5)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == b.usage.prompt_tokens
    chat = via.chat.completions.create(model=servers[2], max_tokens=4,
                                       messages=[{"role": "user", "content": prompt}])
    assert chat.model_extra["editmem"]["edit_id"] == 1
    off = via.completions.create(model=servers[2], prompt=prompt, max_tokens=5,
                                 extra_body={"editmem": {"disable": True}})
    assert off.model_extra["editmem"]["route"] == "base"
    assert off.usage.prompt_tokens == direct.completions.create(model=servers[2], prompt=prompt,
                                                                max_tokens=5).usage.prompt_tokens


def test_streams_pass_through_with_an_editmem_chunk(servers):
    via, _ = _clients(servers)
    chunks = list(via.chat.completions.create(model=servers[2], max_tokens=4, stream=True,
                                              messages=[{"role": "user", "content": EDIT["prompt"]}]))
    assert chunks[-1].model_extra["editmem"]["edit_id"] == 1 and chunks[-1].choices == []
    assert any(c.choices and c.choices[0].delta.content for c in chunks)


def test_upstream_errors_pass_through_and_ike_is_refused(servers):
    via, _ = _clients(servers)
    with pytest.raises(openai.NotFoundError):
        via.completions.create(model="no-such-model", prompt="x y z")
    with pytest.raises(openai.BadRequestError, match="local model"):
        via.completions.create(model=servers[2], prompt="x y z", extra_body={"editmem": {"method": "ike"}})
    with pytest.raises(openai.BadRequestError, match="as_of"):
        via.completions.create(model=servers[2], prompt="x y z", extra_body={"editmem": {"as_of": 1}})
