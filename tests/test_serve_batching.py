"""Micro-batching in the service: greedy requests that wait together go through the model as one left-padded
generate call and get the same answers as one by one; sampled requests run on their own."""

from __future__ import annotations

import threading

import pytest
import torch

from editors.lm.tokens import encode_prompt, pad_id
from editors.retrieval.batching import MicroBatcher
from memory.errors import ValidationError
from tests.tiny import tiny_model

PROMPTS = ["The capital of France is", "Marie Curie was born in", "People in Japan speak",
           "The profession of Ada Lovelace is", "Toko Yasuda plays the", "Berlin is the capital city of"]


class _Gate(torch.nn.Module):
    """A model whose generate waits for ``open`` first: holds the worker busy while other requests queue up."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.open = threading.Event()
        self.entered = threading.Event()

    def generate(self, **kwargs):
        self.entered.set()
        assert self.open.wait(30)
        return self.inner.generate(**kwargs)


def test_waiting_greedy_requests_share_one_call_and_answer_as_alone():
    model, tok = tiny_model("llama")
    rows = [encode_prompt(tok, p) for p in PROMPTS]
    lengths = [3, 8, 5, 8, 2, 6]
    batcher = MicroBatcher(pad_id(tok))
    try:
        alone = [batcher.generate(model, r, n_tok) for r, n_tok in zip(rows, lengths)]
        assert batcher.calls == len(rows)
        gate = _Gate(model)
        results: dict[int, list[list[int]]] = {}
        blocker = threading.Thread(target=lambda: batcher.generate(gate, rows[0], 2))
        blocker.start()
        assert gate.entered.wait(30)  # the worker is busy in the gated call
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.generate(model, rows[i],
                                                                                              lengths[i])))
                   for i in range(len(rows))]
        for t in threads:
            t.start()
        while batcher._queue.qsize() < len(rows):
            threading.Event().wait(0.001)
        before = batcher.calls
        gate.open.set()
        for t in [blocker, *threads]:
            t.join(30)
        assert batcher.calls == before + 2  # the gated call, then all six in one
        assert [results[i] for i in range(len(rows))] == alone
        assert all(len(r[0]) == n for r, n in zip(alone, lengths))
    finally:
        batcher.close()


def test_sampled_requests_run_alone_and_are_seeded():
    model, tok = tiny_model("llama")
    batcher = MicroBatcher(pad_id(tok))
    try:
        row = encode_prompt(tok, PROMPTS[0])
        sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 3}
        a = batcher.generate(model, row, 6, 2, sampling)
        b = batcher.generate(model, row, 6, 2, sampling)
        assert a == b and len(a) == 2
    finally:
        batcher.close()


def test_a_call_waits_for_announced_requests_and_shares_with_them():
    model, tok = tiny_model("llama")
    rows = [encode_prompt(tok, p) for p in PROMPTS[:4]]
    batcher = MicroBatcher(pad_id(tok), max_wait=30.0)
    try:
        for _ in rows[1:]:
            batcher.announce()  # three requests are being routed
        first = batcher.submit(model, rows[0], 3)
        threading.Event().wait(0.2)
        assert not first.done.is_set()  # the call waits for the announced ones
        later = [batcher.submit(model, r, 3, announced=True) for r in rows[1:]]
        for job in [first, *later]:
            batcher.wait(job)
        assert batcher.calls == 1 and batcher.rows == 4 and batcher.announced == 0
    finally:
        batcher.close()


def test_a_call_waits_no_longer_than_max_wait_nor_for_a_withdrawn_request():
    model, tok = tiny_model("llama")
    row = encode_prompt(tok, PROMPTS[0])
    batcher = MicroBatcher(pad_id(tok), max_wait=0.3)
    try:
        batcher.announce()  # never submitted: the call starts after max_wait
        batcher.wait(batcher.submit(model, row, 2))
        assert batcher.calls == 1
        batcher.withdraw()
        patient = MicroBatcher(pad_id(tok), max_wait=30.0)
        try:
            patient.announce()
            job = patient.submit(model, row, 2)
            threading.Event().wait(0.2)
            assert not job.done.is_set()
            patient.withdraw()  # the announced request failed its checks: the call goes ahead at once
            assert job.done.wait(30) and patient.announced == 0
        finally:
            patient.close()
    finally:
        batcher.close()


def test_nothing_announced_means_no_wait():
    model, tok = tiny_model("llama")
    batcher = MicroBatcher(pad_id(tok), max_wait=30.0)
    try:
        job = batcher.submit(model, encode_prompt(tok, PROMPTS[0]), 2)
        assert job.done.wait(10)  # a lone request runs at once, not after max_wait
    finally:
        batcher.close()


def test_a_call_waits_for_the_clients_the_last_call_answered_but_a_lone_client_never_waits():
    model, tok = tiny_model("llama")
    rows = [encode_prompt(tok, p) for p in PROMPTS[:3]]
    batcher = MicroBatcher(pad_id(tok), max_wait=30.0)
    try:
        for _ in range(3):  # one client, one request after another: it is its own returning client
            job = batcher.submit(model, rows[0], 2)
            assert job.done.wait(10)
        batcher.max_wait = 0.0  # (the gated call's client does not come back: do not wait for it)
        gate = _Gate(model)
        blocker = batcher.submit(gate, rows[0], 2)
        assert gate.entered.wait(30)
        pair = [batcher.submit(model, r, 2) for r in rows[1:]]  # two clients queue while the worker is busy
        gate.open.set()
        for job in [blocker, *pair]:
            batcher.wait(job)
        calls = batcher.calls
        batcher.max_wait = 30.0
        back = batcher.submit(model, rows[1], 2)  # one of the pair's clients comes back ...
        threading.Event().wait(0.3)
        assert not back.done.is_set()  # ... and waits for the other one
        other = batcher.submit(model, rows[2], 2)
        for job in (back, other):
            batcher.wait(job)
        assert batcher.calls == calls + 1
    finally:
        batcher.close()


def test_queries_waiting_for_the_routing_lock_are_routed_in_one_call(tmp_path):
    from editors.retrieval.service import MemoryService, Sampling, ServiceSettings
    from tests.serving import EDIT, new_store

    model, tok = tiny_model("llama")
    store = new_store(tmp_path / "s.db", EDIT, {"prompt": "Toko Yasuda plays the", "target_new": "piano"})
    service = MemoryService(model, tok, store, ServiceSettings(scope="cosine", batch_wait=0.0))
    try:
        prompts = [EDIT["prompt"], "Toko Yasuda plays the", "Water boils at", "The author of Hamlet is"]
        alone = [service.complete(p, Sampling(max_tokens=2)).shaping for p in prompts]
        before = service.routed_batches
        results: dict[int, object] = {}
        with service._lock:  # another request is routing: these four wait for the lock together
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(
                i, service.complete(prompts[i], Sampling(max_tokens=2)).shaping)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            while sum(len(v) for v in service._asks.values()) < len(prompts):
                threading.Event().wait(0.001)
        for t in threads:
            t.join(30)
        assert service.routed_batches == before + 1
        assert [results[i] for i in range(len(prompts))] == alone
        assert [s.route for s in alone] == ["serac", "serac", "base", "base"]
        with pytest.raises(ValidationError, match=r"editmem\.method must be one of"):
            service.complete(prompts[0], Sampling(max_tokens=2), method="nope")
        assert service._asks == {}  # a request that fails before it is routed leaves no query behind
    finally:
        service.close()


def test_an_in_scope_cloze_chat_answer_starts_with_the_prompts_last_sentence(tmp_path):
    """The service starts the answer as the wrapper's generate does (AugmentedModel.reply_start), within max_tokens,
    streamed and not."""
    from editors.retrieval.service import MemoryService, Sampling, ServiceSettings
    from tests.serving import EDIT, new_store
    from tests.tiny import chat_tokenizer

    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    service = MemoryService(model, tok, new_store(tmp_path / "s.db", EDIT),
                            ServiceSettings(scope="cosine", threshold=0.6))
    try:
        prompt, route = service.chat_prompt([{"role": "user", "content": "It rained. The capital of Japan is"}])
        sampling = Sampling(max_tokens=12)
        done = service.complete(prompt, sampling, route_text=route, templated=True)
        assert done.shaping.route == "serac"
        text = done.choices[0].text
        assert text.startswith("The capital of Japan is") and done.choices[0].tokens <= 12
        *pieces, streamed = list(service.stream(prompt, sampling, route_text=route, templated=True))
        assert "".join(pieces) == text == streamed.choices[0].text
        question, route = service.chat_prompt([{"role": "user", "content": "What is the capital of Japan?"}])
        asked = service.complete(question, sampling, route_text=route, templated=True)
        assert asked.shaping.route == "serac" and not asked.choices[0].text.startswith("What is")
    finally:
        service.close()
