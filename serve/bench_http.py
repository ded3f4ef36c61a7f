"""`editmem bench http`: what the HTTP service costs and gains, measured in one process.

A live server (uvicorn on a loopback port, in a thread) answers with the same :class:`MemoryService` that is also
called in-process, so the three figures compare like with like:

- overhead: median latency of ``POST /v1/completions`` minus that of the in-process ``service.complete`` of the same
  request (greedy, ``max_tokens`` tokens), runs interleaved;
- out of scope: median latency of out-of-scope completions through the memory over the same requests with
  ``editmem.disable`` (base model only), interleaved, with the store as given (``--data`` fills it first);
- throughput: the same requests sent by ``clients`` concurrent clients against one at a time (batching on), with
  the batcher waiting for requests that are being routed (the default ``batch_wait``) and without (``0``), the two
  concurrent runs alternated ``rounds`` times; medians of the rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PROMPTS = ["The tallest mountain on Earth is", "Water boils at a temperature of", "The author of Hamlet is",
           "A popular programming language is", "The largest ocean in the world is",
           "The chemical symbol for gold is", "The first man on the moon was", "The speed of light is about"]


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def run_http_bench(model: str, *, data: str | None = None, limit: int = 10_000, encoder: str = "all-MiniLM-L6-v2",
                   scope: str = "cosine", tokens: int = 8, repeats: int = 5, clients: int = 8,
                   requests: int = 32, rounds: int = 2) -> dict[str, Any]:
    import httpx

    from editors.retrieval.service import Sampling
    from memory.store import EditMemory
    from serve.http.app import ServerSettings, create_app
    from serve.http.live import live_server

    with tempfile.TemporaryDirectory(prefix="editmem-bench-http-") as tmp:
        store = f"sqlite:///{Path(tmp) / 'bench.db'}"
        with EditMemory.open(store, encoder=encoder) as mem:
            if data:
                from memory.formats import read_cases

                cases = read_cases(data)[:limit]
                mem.add_many([{"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject} for c in cases])
            stored = len(mem)
        app = create_app(ServerSettings(store=store, model=model, scope=scope))
        service = app.state.ctx.service
        name = app.state.ctx.model_name
        sampling = Sampling(max_tokens=tokens)
        with live_server(app) as url, httpx.Client(base_url=url, timeout=600) as client:
            def http(prompt: str, disable: bool = False) -> dict[str, Any]:
                body: dict[str, Any] = {"model": name, "prompt": prompt, "max_tokens": tokens}
                if disable:
                    body["editmem"] = {"disable": True}
                r = client.post("/v1/completions", json=body)
                r.raise_for_status()
                return dict(r.json())

            skipped = [p for p in PROMPTS if http(p)["editmem"]["route"] != "base"]  # also the warm-up
            prompts = [p for p in PROMPTS if p not in skipped]
            for p in prompts:
                service.complete(p, sampling), http(p, True)
            local, remote, base = [], [], []
            for _ in range(repeats):
                for p in prompts:
                    t0 = time.perf_counter()
                    service.complete(p, sampling)
                    t1 = time.perf_counter()
                    http(p)
                    t2 = time.perf_counter()
                    http(p, True)
                    t3 = time.perf_counter()
                    local.append(t1 - t0)
                    remote.append(t2 - t1)
                    base.append(t3 - t2)
            batch = [prompts[i % len(prompts)] for i in range(requests)]
            t0 = time.perf_counter()
            for p in batch:
                http(p)
            one_at_a_time = time.perf_counter() - t0
            batcher = service.batcher
            waits = {"wait": batcher.max_wait, "no_wait": 0.0}
            seconds: dict[str, list[float]] = {k: [] for k in waits}
            calls: dict[str, list[int]] = {k: [] for k in waits}
            for _ in range(rounds):
                for key, wait in waits.items():
                    batcher.max_wait = wait
                    calls0 = batcher.calls
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        list(pool.map(lambda p: httpx.post(f"{url}/v1/completions", timeout=600, json={
                            "model": name, "prompt": p, "max_tokens": tokens}).raise_for_status(), batch))
                    seconds[key].append(time.perf_counter() - t0)
                    calls[key].append(batcher.calls - calls0)
            batcher.max_wait = waits["wait"]
            concurrent = statistics.median(seconds["wait"])
    return {
        "model": model, "stored_edits": stored, "encoder": encoder, "scope": scope, "tokens": tokens,
        "runs": len(local), "skipped_in_scope": skipped,
        "in_process_ms": _ms(local), "http_ms": _ms(remote), "http_overhead_ms": _ms(remote) - _ms(local),
        "out_of_scope_ms": _ms(remote), "disable_ms": _ms(base), "out_of_scope_ratio": _ms(remote) / _ms(base),
        "requests": requests, "clients": clients, "one_at_a_time_rps": requests / one_at_a_time,
        "concurrent_rps": requests / concurrent, "throughput_ratio": one_at_a_time / concurrent,
        "concurrent_generate_calls": calls["wait"], "batch_wait_s": waits["wait"],
        "throughput_ratio_no_wait": one_at_a_time / statistics.median(seconds["no_wait"]),
        "concurrent_generate_calls_no_wait": calls["no_wait"], "rounds": rounds,
        "concurrent_seconds": seconds,
    }
