"""Proxy mode: a model-less editmem server in front of a second server (a plain editmem with the tiny model and an
empty store) as its upstream. Out of scope the request reaches the upstream untouched (same answer as asking it
directly); in scope the edit's context is put in front (same answer as asking the upstream with that context)."""

from __future__ import annotations

import pytest

from tests.serving import EDIT, live_server, new_store, settings, tiny_model_folder

openai = pytest.importorskip("openai")
CHAT_CONTEXT = "system-lead"
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from serve.http.app import create_app

    tmp = tmp_path_factory.mktemp("proxy")
    folder = tiny_model_folder(tmp / "tiny-llama")
    upstream_app = create_app(settings(new_store(tmp / "upstream.db"), folder))
    with live_server(upstream_app) as upstream:
        # the tiny model's context is 128 tokens: the short "system-lead" chat context, not the default
        proxy_app = create_app(settings(new_store(tmp / "front.db", EDIT), "none", upstream=f"{upstream}/v1",
                                        options={"chat_context": CHAT_CONTEXT}))
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
    from editors.retrieval.augmented import CHAT_CONTEXTS, chat_messages, context_template, edit_context
    from memory.records import EditRecord

    via, direct = _clients(servers)
    prompt = EDIT["prompt"]
    a = via.completions.create(model=servers[2], prompt=prompt, max_tokens=5)
    assert a.model_extra["editmem"]["route"] == "serac" and a.model_extra["editmem"]["edit_id"] == 1
    edit = EditRecord(1, 1, EDIT["prompt"], EDIT["target_new"], EDIT["subject"])
    # a completion gets the clean plain-text format (the default "answer" format is one a model repeats)
    context = edit_context(edit, context_template("new-fact"))
    assert context == "New fact: The capital of Japan is Lima.\n"
    b = direct.completions.create(model=servers[2], prompt=context + prompt, max_tokens=5)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == b.usage.prompt_tokens
    chat = via.chat.completions.create(model=servers[2], max_tokens=4,
                                       messages=[{"role": "user", "content": prompt}])
    assert chat.model_extra["editmem"]["edit_id"] == 1
    # a chat gets the chat context (default: the torch path's): its messages first, its lead in front of the question
    messages = chat_messages(edit, CHAT_CONTEXT)
    assert [m["role"] for m in messages] == [role for role, _ in CHAT_CONTEXTS[CHAT_CONTEXT]] == ["system", "lead"]
    lead = "".join(m["content"] for m in messages if m["role"] == "lead")
    sent = [m for m in messages if m["role"] != "lead"] + [{"role": "user", "content": lead + prompt}]
    same = direct.chat.completions.create(model=servers[2], max_tokens=4, messages=sent)
    assert chat.choices[0].message.content == same.choices[0].message.content
    assert chat.usage.prompt_tokens == same.usage.prompt_tokens
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


def test_upstream_errors_pass_through_and_as_of_is_refused(servers):
    via, _ = _clients(servers)
    with pytest.raises(openai.NotFoundError):
        via.completions.create(model="no-such-model", prompt="x y z")
    with pytest.raises(openai.BadRequestError, match="as_of"):
        via.completions.create(model=servers[2], prompt="x y z", extra_body={"editmem": {"as_of": 1}})


def _echo_upstream():
    """An OpenAI-shaped upstream that answers with the prompt it was sent (what the proxy forwarded, exactly)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        return {"id": "echo", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": body["prompt"], "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    return app


def test_ike_puts_demonstrations_and_the_edit_in_context(data_dir, tmp_path, monkeypatch):
    """IKE through the proxy (gated by the scope classifier): the nearest demonstrations, then the edit's context, go
    in front of the prompt, rendered as IKE renders them locally; out of scope the prompt is forwarded as it is."""
    from editors.methods.ike import DemoPool, IkeModel
    from editors.retrieval.proxy import ContextRouter
    from serve.http.app import create_app

    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    demo_file = str(data_dir / "counterfact" / "easyedit_split" / "counterfact-train.json")
    ike = {"demo_file": demo_file, "demo_limit": 20, "demos": 2}
    store = new_store(tmp_path / "ike.db", EDIT)
    router = ContextRouter(store, scope="cosine", method="ike", ike=ike)
    sent, shaping = router.completion(EDIT["prompt"])
    text = router.ike_context
    hits = text.pool.nearest([EDIT["prompt"]], 2, text.kinds)[0]
    local = IkeModel.prompt_text(text, [i for i, _ in hits], router.router.route([EDIT["prompt"]])[0].edit)
    chat, chat_shaping = router.chat([{"role": "user", "content": EDIT["prompt"]}])
    router.close()
    assert chat == [{"role": "user", "content": local + EDIT["prompt"]}] and chat_shaping.route == "ike"
    assert isinstance(text.pool, DemoPool) and len(hits) == 2
    assert shaping.route == "ike" and sent == local + EDIT["prompt"] and sent.count("New Fact:") >= 4
    with live_server(_echo_upstream()) as upstream:
        app = create_app(settings(store, "none", upstream=f"{upstream}/v1", method="ike", options={"ike": ike}))
        with live_server(app) as front:
            via = openai.OpenAI(base_url=f"{front}/v1", api_key="x", max_retries=0)
            a = via.completions.create(model="m", prompt=EDIT["prompt"], max_tokens=5)
            assert a.model_extra["editmem"]["route"] == "ike" and a.model_extra["editmem"]["edit_id"] == 1
            assert a.choices[0].text == sent
            serac = via.completions.create(model="m", prompt=EDIT["prompt"], max_tokens=5,
                                           extra_body={"editmem": {"method": "serac"}})
            assert serac.model_extra["editmem"]["route"] == "serac"
            assert serac.choices[0].text == "New fact: The capital of Japan is Lima.\n" + EDIT["prompt"]
            out = via.completions.create(model="m", prompt="Marie Curie was born in", max_tokens=5)
            assert out.model_extra["editmem"]["route"] == "base" and out.choices[0].text == "Marie Curie was born in"


def test_proxy_loads_no_language_model(tmp_path, monkeypatch):
    """Proxy mode routes with the store, its encoder and the scope classifier: the model loader is never called."""
    import editors.lm.loading as loading
    from serve.http.app import create_app

    def refuse(*args, **kwargs):
        raise AssertionError("proxy mode loaded a model")

    monkeypatch.setattr(loading, "load_model", refuse)
    app = create_app(settings(new_store(tmp_path / "front.db", EDIT), "smollm2-135m",
                              upstream="http://127.0.0.1:9/v1"))
    assert app.state.ctx.service is None and app.state.ctx.proxy is not None


def test_router_chat_context_defaults_to_the_torch_paths_and_refuses_unknown_names(tmp_path):
    from editors.retrieval.augmented import DEFAULT_CHAT_CONTEXT
    from editors.retrieval.proxy import ContextRouter
    from memory.errors import ValidationError

    store = new_store(tmp_path / "chat.db", EDIT)
    router = ContextRouter(store, scope="cosine")
    try:
        assert router.chat_context == DEFAULT_CHAT_CONTEXT == "exchange2-only"
        sent, shaping = router.chat([{"role": "user", "content": EDIT["prompt"]}])
        assert shaping.route == "serac" and [m["role"] for m in sent] == ["system", "user", "assistant", "user",
                                                                          "assistant", "user"]
        assert sent[-1]["content"] == "Answer using only this fact: The capital of Japan is Lima.\n" + EDIT["prompt"]
        out, shaping = router.chat([{"role": "user", "content": "Who wrote Hamlet?"}])
        assert shaping.route == "base" and out == [{"role": "user", "content": "Who wrote Hamlet?"}]
    finally:
        router.close()
    with pytest.raises(ValidationError, match="chat context must be one of"):
        ContextRouter(store, scope="cosine", chat_context="nope")
