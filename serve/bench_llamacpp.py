"""editmem in front of llama.cpp, measured: ``python -m serve.bench_llamacpp [--cases N] [--encoder NAME] ...``.

llama.cpp's server (:func:`serve.llamacpp.llamacpp_server`, the shipped GGUF, 2 threads) and ``editmem serve
--upstream`` (its own process, cosine scope) in front of it, over a store holding the edits of the first ``N``
CounterFact and ``N`` zsRE evaluation cases. Figures (greedy, temperature 0):

- out of scope: p50 latency of a chat request through editmem vs the same request to llama.cpp, interleaved, each
  timed request after the same unmeasured one (llama.cpp reuses its previous prompt's evaluated prefix);
- in scope: p50 of an in-scope chat request through editmem vs the messages editmem forwards (the edit in context)
  sent to llama.cpp directly (the routing's own cost), and vs the bare question (what the longer prompt costs);
- throughput: ``clients`` concurrent clients, out-of-scope chat requests, through editmem vs llama.cpp alone;
- quality, through each of ``--paths`` (``llamacpp``: editmem in front of llama.cpp; ``torch``: ``editmem serve``
  with its own float32 torch model, made from the same GGUF): the harness's generation protocol (each probe as the
  user's chat message, greedy, 24 new tokens, the normalised target at word boundaries in the first answer) for edit
  success, generalization (the first rephrase) and locality (the first locality prompt's first answer equals the one
  with the memory off), plus the count of answers with a leaked format string.
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

RESET = "Tell me a short joke."  # sent before every timed request (see _latency)
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


def _reset(client: Any, upstream: str | None) -> None:
    """Send llama.cpp (``upstream``; None: nothing) the unmeasured :data:`RESET` request, so the next request starts
    from the same prompt cache whatever came before it."""
    if upstream:
        _post(client, upstream, "chat/completions", _chat(RESET, 1))


def _p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def _latency(client: Any, front: str, upstream: str, questions: list[str], forwarded: list[list[dict[str, Any]]],
             tokens: int, repeats: int) -> dict[str, Any]:
    # llama.cpp reuses the evaluated prefix of its previous prompt. So every measured request follows the same
    # unmeasured one (RESET, sent to llama.cpp directly): each starts from the same cache, the chat template's opening
    # tokens, whatever path and prompt it is (an in-scope prompt right after another with the same context would
    # otherwise reuse the context's tokens and look cheaper).
    def timed(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        _reset(client, upstream)
        return _post(client, url, "chat/completions", body)

    n = len(OUT_OF_SCOPE)
    via, direct = [], []
    for _ in range(repeats):
        for i in range(n):
            a, t_via = timed(front, _chat(OUT_OF_SCOPE[i], tokens))
            assert a["editmem"]["route"] == "base", a["editmem"]
            _, t_direct = timed(upstream, _chat(OUT_OF_SCOPE[i], tokens))
            via.append(t_via)
            direct.append(t_direct)
    m = len(questions)
    ins, ins_direct, bare = [], [], []
    for _ in range(repeats):
        for i in range(m):
            a, t_in = timed(front, _chat(questions[i], tokens))
            assert a["editmem"]["route"] != "base", a["editmem"]
            body = _chat(questions[i], tokens)
            body["messages"] = forwarded[i]
            _, t_fwd = timed(upstream, body)
            _, t_bare = timed(upstream, _chat(questions[i], tokens))
            ins.append(t_in)
            ins_direct.append(t_fwd)
            bare.append(t_bare)
    return {"out_of_scope_via_ms": _p50(via), "out_of_scope_direct_ms": _p50(direct),
            "out_of_scope_added": _p50(via) / _p50(direct) - 1, "requests": len(via),
            "in_scope_via_ms": _p50(ins), "in_scope_forwarded_direct_ms": _p50(ins_direct),
            "in_scope_routing_added": _p50(ins) / _p50(ins_direct) - 1, "bare_question_direct_ms": _p50(bare),
            "in_scope_vs_bare": _p50(ins) / _p50(bare), "in_scope_requests": len(ins)}


def _throughput(front: str, upstream: str, tokens: int, clients: int, requests: int, rounds: int = 3
                ) -> dict[str, Any]:
    """``rounds`` rounds, each ``requests`` out-of-scope requests from ``clients`` clients to llama.cpp alone and then
    through editmem; the medians and each round's ratio (one round's ratio ranged 0.80-1.03 on this VM)."""
    import httpx

    def run(url: str) -> float:
        qs = [OUT_OF_SCOPE[i % len(OUT_OF_SCOPE)] for i in range(requests)]
        with httpx.Client() as c:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda q: _post(c, url, "chat/completions", _chat(q, tokens)), qs))
            return requests / (time.perf_counter() - t0)

    direct, via = [], []
    for _ in range(rounds):
        direct.append(run(upstream))
        via.append(run(front))
    return {"clients": clients, "requests": requests, "rounds": rounds, "direct_rps": statistics.median(direct),
            "via_rps": statistics.median(via), "ratio": statistics.median(v / d for v, d in zip(via, direct)),
            "round_ratios": [round(v / d, 3) for v, d in zip(via, direct)]}


def _quality(client: Any, front: str, cases: list[Any], tokens: int, reset: str | None = None) -> dict[str, Any]:
    """The harness's generation protocol (:mod:`eval.answers`) through ``front``: each probe as the user's chat
    message, greedy, ``tokens`` new tokens; a probe scores 1 if the normalised target occurs at word boundaries in
    the first answer (first line, first sentence); locality: the first locality prompt's normalised first answer
    equals the one with the memory off (``editmem.disable``: the base model's own answer). ``reset``: a llama.cpp
    URL sent :data:`RESET` before each of the two locality requests, so both start from the same prompt cache
    (llama.cpp's greedy answer to the same request can differ with the prefix it reuses)."""
    from eval.answers import answer_matches, find_leaks, same_answer

    model = client.get(f"{front}/models", timeout=60).json()["data"][0]["id"]  # editmem serve checks the name

    def ask(prompt: str, disable: bool = False) -> tuple[str, dict[str, Any]]:
        body = _chat(prompt, tokens) | {"model": model}
        if disable:
            body["editmem"] = {"disable": True}
        data, _ = _post(client, front, "chat/completions", body)
        return data["choices"][0]["message"]["content"] or "", data.get("editmem", {})

    es, gen, loc, routed, answers, rows = [], [], [], [], [], []
    for c in cases:
        text, shaping = ask(c.prompt)
        es.append(answer_matches(text, [c.target_new]))
        routed.append(shaping.get("route") != "base")
        row: dict[str, Any] = {"prompt": c.prompt, "target": c.target_new, "answer": text}
        answers.append(text)
        if c.rephrases:
            row["rephrase_answer"] = ask(c.rephrases[0])[0]
            gen.append(answer_matches(row["rephrase_answer"], [c.target_new]))
            answers.append(row["rephrase_answer"])
        if c.locality:
            p = c.locality[0].prompt
            _reset(client, reset)
            row["locality_answer"] = ask(p)[0]
            _reset(client, reset)
            row["locality_base"] = ask(p, disable=True)[0]
            loc.append(same_answer(row["locality_answer"], row["locality_base"]))
            answers.append(row["locality_answer"])
        rows.append(row)
    mean = statistics.fmean
    return {"cases": len(cases), "edit_success": mean(es), "routed": mean(routed),
            "generalization": mean(gen) if gen else None, "locality": mean(loc) if loc else None,
            "leaks": len(find_leaks(answers)), "answers": rows}


SECTIONS: tuple[str, ...] = ("latency", "throughput", "quality")
PATHS: tuple[str, ...] = ("llamacpp", "torch")


def run_bench(data_dir: Path, *, cases: int = 200, encoder: str = "all-MiniLM-L6-v2", scope: str = "cosine",
              tokens: int = 16, repeats: int = 3, clients: int = 8, requests: int = 32, quality_tokens: int = 24,
              sections: tuple[str, ...] = SECTIONS, paths: tuple[str, ...] = ("llamacpp",), rounds: int = 3,
              out: Path | None = None, quality_cases: int | None = None) -> dict[str, Any]:
    """The figures of ``sections``; quality through each of ``paths`` (``llamacpp``: editmem in front of llama.cpp;
    ``torch``: ``editmem serve`` with its own torch model, the same store and scope). ``out``: the result so far is
    written there (JSON, every answer) after each section, so a run cut short keeps what it measured.
    ``quality_cases``: measure quality on the first that many cases of each set (the store still holds ``cases``)."""
    import httpx

    from editors.retrieval.proxy import ContextRouter
    from memory.formats import read_cases
    from memory.store import EditMemory
    from serve.llamacpp import editmem_proxy, editmem_server, llamacpp_server

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
        result: dict[str, Any] = {"edits": sum(len(cs) for cs in sets.values()), "encoder": encoder, "scope": scope,
                                  "quality": {}}
        t0 = time.perf_counter()
        if "llamacpp" in paths or {"latency", "throughput"} & set(sections):
            with llamacpp_server(threads=2) as upstream, editmem_proxy(store, upstream, scope=scope) as front, \
                    httpx.Client() as client:
                for q in OUT_OF_SCOPE[:2]:  # warm both
                    _post(client, front, "chat/completions", _chat(q, tokens))
                if "latency" in sections:
                    result["latency"] = _show("latency", _latency(client, front, upstream, questions, forwarded,
                                                                  tokens, repeats))
                    _save(out, result)
                if "throughput" in sections:
                    result["throughput"] = _show("throughput", _throughput(front, upstream, tokens, clients,
                                                                           requests, rounds))
                    _save(out, result)
                if "quality" in sections and "llamacpp" in paths:
                    result["quality"]["llamacpp"] = {}
                    for name, cs in sets.items():
                        result["quality"]["llamacpp"][name] = _show(f"quality llamacpp {name}", _quality(
                            client, front, cs[:quality_cases], quality_tokens, reset=upstream))
                        _save(out, result)
        if "quality" in sections and "torch" in paths:
            with editmem_server(store, scope=scope, threads=2) as front, httpx.Client() as client:
                result["quality"]["torch"] = {}
                for name, cs in sets.items():
                    result["quality"]["torch"][name] = _show(f"quality torch {name}", _quality(
                        client, front, cs[:quality_cases], quality_tokens))
                    _save(out, result)
        result["seconds"] = time.perf_counter() - t0
        _save(out, result)
    return result


def _save(out: Path | None, result: dict[str, Any]) -> None:
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _show(what: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Print a section's figures as soon as they are measured (a run cut short keeps them); per-answer rows only go
    to the final JSON."""
    import sys

    print(what, json.dumps({k: v for k, v in figures.items() if k != "answers"}), file=sys.stderr, flush=True)
    return figures


def _names(text: str, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"{flag}: choose from {', '.join(known)} (got {text!r})")
    return names


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("EDITMEM_DATA", str(Path(__file__).resolve().parents[2] /
                                                                         "shared" / "data")))
    p.add_argument("--cases", type=int, default=200, help="CounterFact and zsRE cases each (default: %(default)s)")
    p.add_argument("--encoder", default="all-MiniLM-L6-v2")
    p.add_argument("--scope", default="cosine")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (medians reported)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--paths", default="llamacpp", help="quality through: " + ", ".join(PATHS) + " (comma-separated)")
    p.add_argument("--quality-cases", type=int, default=None,
                   help="quality on the first N cases of each set only (default: all --cases)")
    p.add_argument("--out", default=None, help="also write the result (with every answer) to this JSON file")
    args = p.parse_args(argv)
    result = run_bench(Path(args.data), cases=args.cases, encoder=args.encoder, scope=args.scope,
                       repeats=args.repeats, clients=args.clients, requests=args.requests, rounds=args.rounds,
                       sections=_names(args.sections, SECTIONS, "--sections"),
                       paths=_names(args.paths, PATHS, "--paths"), out=Path(args.out) if args.out else None,
                       quality_cases=args.quality_cases)
    print(json.dumps({k: v for k, v in result.items() if k != "quality"} | {"quality": {
        path: {name: {k: v for k, v in q.items() if k != "answers"} for name, q in sets.items()}
        for path, sets in result["quality"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
