"""editmem in front of llama.cpp, measured: ``python -m serve.bench_llamacpp [--cases N] [--encoder NAME] ...``.

llama.cpp's server (:func:`serve.llamacpp.llamacpp_server`, the shipped GGUF, 2 threads) and ``editmem serve
--upstream`` (its own process, cosine scope) in front of it, over a store holding the edits of the first ``N``
CounterFact and ``N`` zsRE evaluation cases. Figures (greedy, temperature 0):

- out of scope: p50 latency of a chat request through editmem vs the same request to llama.cpp, interleaved;
- in scope: p50 of an in-scope chat request through editmem vs the prompt editmem forwards (the edit in context)
  sent to llama.cpp directly (the routing's own cost), and vs the bare question (what the longer prompt costs);
- throughput: ``clients`` concurrent clients, out-of-scope chat requests, through editmem vs llama.cpp alone;
- quality (generation protocol, completions, ``max_tokens`` 8): edit success (the continuation of the edit's prompt
  starts with the new target, :func:`eval.metrics.generation_matches`), generalization (the first rephrase),
  locality (the first locality prompt's continuation equals llama.cpp's own without the memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

OUT_OF_SCOPE = ["Who wrote Hamlet?", "What is the boiling point of water?", "Name a popular programming language.",
                "What is the largest ocean in the world?", "What is the chemical symbol for gold?",
                "Who was the first man on the moon?", "How fast is the speed of light?", "What is photosynthesis?"]
DATA = {"counterfact": Path("counterfact") / "easyedit_split" / "counterfact-edit.json",
        "zsre": Path("zsre") / "zsre_mend_eval_portability_gpt4.json"}


def _post(client: Any, url: str, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    r = client.post(f"{url}/{path}", json=body, timeout=300)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return r.json(), dt


def _chat(content: str, tokens: int) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0}


def _p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def _latency(client: Any, front: str, upstream: str, questions: list[str], forwarded: list[list[dict[str, Any]]],
             tokens: int, repeats: int) -> dict[str, Any]:
    # llama.cpp reuses the evaluated prefix of its previous prompt, so a request never follows one with the same
    # question: at each step the two (three) paths ask different questions, and each path asks every question once
    # per repeat.
    n = len(OUT_OF_SCOPE)
    via, direct = [], []
    for _ in range(repeats):
        for i in range(n):
            a, t_via = _post(client, front, "chat/completions", _chat(OUT_OF_SCOPE[i], tokens))
            assert a["editmem"]["route"] == "base", a["editmem"]
            _, t_direct = _post(client, upstream, "chat/completions", _chat(OUT_OF_SCOPE[(i + n // 2) % n], tokens))
            via.append(t_via)
            direct.append(t_direct)
    m = len(questions)
    ins, ins_direct, bare = [], [], []
    for _ in range(repeats):
        for i in range(m):
            a, t_in = _post(client, front, "chat/completions", _chat(questions[i], tokens))
            assert a["editmem"]["route"] != "base", a["editmem"]
            j = (i + m // 2) % m
            body = _chat(questions[j], tokens)
            body["messages"] = forwarded[j]
            _, t_fwd = _post(client, upstream, "chat/completions", body)
            _, t_bare = _post(client, upstream, "chat/completions", _chat(questions[(i + m // 4) % m], tokens))
            ins.append(t_in)
            ins_direct.append(t_fwd)
            bare.append(t_bare)
    return {"out_of_scope_via_ms": _p50(via), "out_of_scope_direct_ms": _p50(direct),
            "out_of_scope_added": _p50(via) / _p50(direct) - 1, "requests": len(via),
            "in_scope_via_ms": _p50(ins), "in_scope_forwarded_direct_ms": _p50(ins_direct),
            "in_scope_routing_added": _p50(ins) / _p50(ins_direct) - 1, "bare_question_direct_ms": _p50(bare),
            "in_scope_vs_bare": _p50(ins) / _p50(bare), "in_scope_requests": len(ins)}


def _throughput(front: str, upstream: str, tokens: int, clients: int, requests: int) -> dict[str, Any]:
    import httpx

    def run(url: str) -> float:
        qs = [OUT_OF_SCOPE[i % len(OUT_OF_SCOPE)] for i in range(requests)]
        with httpx.Client() as c:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda q: _post(c, url, "chat/completions", _chat(q, tokens)), qs))
            return requests / (time.perf_counter() - t0)

    direct, via = run(upstream), run(front)
    return {"clients": clients, "requests": requests, "direct_rps": direct, "via_rps": via, "ratio": via / direct}


def _quality(client: Any, front: str, upstream: str, cases: list[Any], tokens: int) -> dict[str, Any]:
    from eval.metrics import generation_matches

    def complete(url: str, prompt: str) -> tuple[str, dict[str, Any]]:
        data, _ = _post(client, url, "completions", {"model": "smollm2", "prompt": prompt, "max_tokens": tokens,
                                                     "temperature": 0})
        return data["choices"][0]["text"], data.get("editmem", {})

    es, gen, loc, routed = [], [], [], []
    for c in cases:
        text, shaping = complete(front, c.prompt)
        es.append(generation_matches(text, [c.target_new]))
        routed.append(shaping.get("route") != "base")
        if c.rephrases:
            gen.append(generation_matches(complete(front, c.rephrases[0])[0], [c.target_new]))
        if c.locality:
            p = c.locality[0].prompt
            loc.append(complete(front, p)[0] == complete(upstream, p)[0])
    mean = statistics.fmean
    return {"cases": len(cases), "edit_success": mean(es), "routed": mean(routed),
            "generalization": mean(gen) if gen else None, "locality": mean(loc) if loc else None}


def _show(what: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Print a section as soon as it is measured (a run cut short keeps what it measured)."""
    import sys

    print(what, json.dumps(figures), file=sys.stderr, flush=True)
    return figures


def run_bench(data_dir: Path, *, cases: int = 200, encoder: str = "all-MiniLM-L6-v2", scope: str = "cosine",
              tokens: int = 16, repeats: int = 3, clients: int = 8, requests: int = 32,
              quality_tokens: int = 8) -> dict[str, Any]:
    import httpx

    from editors.retrieval.proxy import ContextRouter
    from memory.formats import read_cases
    from memory.store import EditMemory
    from serve.llamacpp import editmem_proxy, llamacpp_server

    sets = {name: read_cases(data_dir / path)[:cases] for name, path in DATA.items()}
    with tempfile.TemporaryDirectory(prefix="editmem-bench-llamacpp-") as tmp:
        store = f"sqlite:///{Path(tmp) / 'bench.db'}"
        with EditMemory.open(store, encoder=encoder) as mem:
            mem.add_many([{"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject}
                          for cs in sets.values() for c in cs])
        questions = [c.prompt for c in sets["counterfact"][:8]]
        router = ContextRouter(store, scope=scope)
        forwarded = [router.chat([{"role": "user", "content": q}])[0] for q in questions]
        router.close()
        result: dict[str, Any] = {"edits": sum(len(cs) for cs in sets.values()), "encoder": encoder, "scope": scope}
        with llamacpp_server(threads=2) as upstream, editmem_proxy(store, upstream, scope=scope) as front, \
                httpx.Client() as client:
            for q in OUT_OF_SCOPE[:2]:  # warm both
                _post(client, front, "chat/completions", _chat(q, tokens))
            t0 = time.perf_counter()
            result["latency"] = _show("latency", _latency(client, front, upstream, questions, forwarded, tokens,
                                                          repeats))
            result["throughput"] = _show("throughput", _throughput(front, upstream, tokens, clients, requests))
            result["quality"] = {name: _show(f"quality {name}", _quality(client, front, upstream, cs, quality_tokens))
                                 for name, cs in sets.items()}
            result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("EDITMEM_DATA", str(Path(__file__).resolve().parents[2] /
                                                                         "shared" / "data")))
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--encoder", default="all-MiniLM-L6-v2")
    p.add_argument("--scope", default="cosine")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    args = p.parse_args(argv)
    result = run_bench(Path(args.data), cases=args.cases, encoder=args.encoder, scope=args.scope,
                       repeats=args.repeats, clients=args.clients, requests=args.requests)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
