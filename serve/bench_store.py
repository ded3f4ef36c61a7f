"""The store benchmark behind `editmem bench store`: what the store costs on top of its encoder.

Four measurements, each against a reference taken in the same run:

1. import throughput of `import_file` on CounterFact prompts vs the encoder's own throughput on the same texts;
2. `search` latency (p50/p99) at two store sizes vs one bare encoder call on the same queries, interleaved;
3. HNSW at ``hnsw_n`` synthetic vectors: single-query p50 latency and recall@1 against exact search;
4. recall@1 of every CounterFact ``rephrase_prompt`` to its own edit, with all CounterFact edits stored (prompts only
   are indexed; the rephrases are not).

Results go to a JSON file and to a section of BENCHMARKS.md between markers, with the machine and the command.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from memory.encoder import DEFAULT_ENCODER
from memory.errors import ValidationError

log = logging.getLogger(__name__)

CF_FILES = ("counterfact-train.json", "counterfact-edit.json", "counterfact-val.json")
SECTION = "store"
PARTS = ("import", "search", "recall", "hnsw")


@dataclass(frozen=True)
class StoreBenchSettings:
    data_dir: Path
    encoder: str = DEFAULT_ENCODER
    import_n: int = 10_000  # CounterFact edit prompts imported for the throughput ratio (and the first store size)
    sizes: tuple[int, ...] = (10_000, 100_000)
    n_queries: int = 200
    hnsw_n: int = 1_000_000
    hnsw_queries: int = 1_000
    recall_all: bool = True  # recall@1 with all 21,919 CounterFact edits stored
    seed: int = 0
    parts: tuple[str, ...] = PARTS  # which measurements to run


    def __post_init__(self) -> None:
        if not (self.data_dir / "counterfact" / "easyedit_split").is_dir():
            raise ValidationError(f"no CounterFact data under {self.data_dir} (expected counterfact/easyedit_split/)")
        if self.import_n < 10 or any(s < 10 for s in self.sizes) or self.n_queries < 10:
            raise ValidationError("import_n, sizes and n_queries must be at least 10")
        if self.hnsw_n and self.hnsw_n < 1000:
            raise ValidationError("hnsw_n must be 0 (skip) or at least 1000")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise ValidationError(f"unknown benchmark part(s) {unknown}; choose from {', '.join(PARTS)}")


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _cf_cases(data_dir: Path) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for name in CF_FILES:
        with open(data_dir / "counterfact" / "easyedit_split" / name, encoding="utf-8") as f:
            cases.extend(json.load(f))
    return cases


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_import(mem_factory: Callable[[], Any], encoder: Any, cases: list[dict[str, Any]], n: int,
                 tmp: Path) -> tuple[dict[str, Any], Any]:
    """Import ``n`` CounterFact cases from a file; compare with encoding the same prompts. Returns the open store."""
    subset = cases[:n]
    path = tmp / "import.json"
    path.write_text(json.dumps(subset), encoding="utf-8")
    texts = [c["prompt"] for c in subset]
    encoder.encode(texts[:64])  # warm both paths alike
    enc_s, _ = _timed(lambda: encoder.encode(texts))
    mem = mem_factory()
    mem.encoder.encode(texts[:64])
    imp_s, added = _timed(lambda: mem.import_file(path))  # duplicates inside the file are added once
    return {"n": n, "added": added, "encoder_seconds": enc_s, "import_seconds": imp_s,
            "encoder_per_s": n / enc_s, "import_per_s": n / imp_s, "ratio": enc_s / imp_s}, mem


def _synthetic_edits(cases: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` realistic edits: CounterFact relation templates with other cases' subjects (see module docstring)."""
    rng = random.Random(seed)
    subjects = [c["subject"] for c in cases]
    out = []
    for i in range(n):
        c = cases[i % len(cases)]
        subject = subjects[rng.randrange(len(subjects))]
        prompt = c["prompt"].replace(c["subject"], subject) if c["subject"] in c["prompt"] else c["prompt"]
        out.append({"prompt": f"{prompt}", "target_new": c["target_new"], "subject": subject,
                    "metadata": {"synthetic": i}})
    return out


def bench_search(mem: Any, encoder: Any, queries: Sequence[str], *, ef_search: int | None = None) -> dict[str, Any]:
    """Interleave one bare encoder call and one `search` per query (at HNSW depth ``ef_search``, default the
    index's own); report p50/p99 of each and the difference."""
    mem.search(queries[0], k=5, ef_search=ef_search)
    encoder.encode([queries[0]])
    enc, srch = [], []
    for q in queries:
        t = time.perf_counter()
        encoder.encode([q])
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        mem.search(q, k=5, ef_search=ef_search)
        srch.append(time.perf_counter() - t)
    extra = [s - e for s, e in zip(srch, enc)]
    return {"n_edits": len(mem), "n_queries": len(queries),
            "encoder_p50_ms": 1e3 * _percentile(enc, 50), "encoder_p99_ms": 1e3 * _percentile(enc, 99),
            "search_p50_ms": 1e3 * _percentile(srch, 50), "search_p99_ms": 1e3 * _percentile(srch, 99),
            "added_p50_ms": 1e3 * (_percentile(srch, 50) - _percentile(enc, 50)),
            "paired_extra_p50_ms": 1e3 * _percentile(extra, 50)}


def _clustered_vectors(n: int, dim: int, rng: np.random.Generator, n_clusters: int = 4096) -> np.ndarray:
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        x = centres[rng.integers(0, n_clusters, m)] + 0.6 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_hnsw(n: int, n_queries: int, dim: int, seed: int, ef_sweep: Sequence[int] = (32, 128, 256)) -> dict[str, Any]:
    """HNSW through the store's own VectorIndex on clustered synthetic unit vectors.

    Queries are stored vectors plus noise (as a rephrase is near its edit); recall@1 is agreement with exact search.
    The index is built once and searched at the default ``ef_search`` and at each value of ``ef_sweep``.
    """
    import faiss

    from memory.index import (
        HNSW_EF_CONSTRUCTION,
        HNSW_EF_SEARCH,
        HNSW_M,
        IndexHeader,
        VectorIndex,
    )

    rng = np.random.default_rng(seed)
    vectors = _clustered_vectors(n, dim, rng)
    ids = np.arange(1, n + 1, dtype=np.int64)
    picks = rng.integers(0, n, n_queries)
    q = vectors[picks] + 0.5 * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    _, truth = exact.search(q, 1)
    truth_ids = ids[truth[:, 0]]
    del exact
    index = VectorIndex(IndexHeader(store_uid="bench", encoder="synthetic", dim=dim, kind="hnsw", seq=0))
    build_s, _ = _timed(lambda: index.add(ids, vectors))
    sweep = []
    for ef in sorted({HNSW_EF_SEARCH, *ef_sweep}):
        lat, found = [], []
        for row in q:
            t = time.perf_counter()
            _, got = index.search(row[None, :], 1, ef_search=ef)
            lat.append(time.perf_counter() - t)
            found.append(int(got[0, 0]))
        sweep.append({"ef_search": ef, "p50_ms": 1e3 * _percentile(lat, 50), "p99_ms": 1e3 * _percentile(lat, 99),
                      "recall_at_1": float(np.mean(np.asarray(found) == truth_ids))})
    default = next(s for s in sweep if s["ef_search"] == HNSW_EF_SEARCH)
    return {"n": n, "dim": dim, "n_queries": n_queries, "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
            "build_seconds": build_s, **default, "sweep": sweep}


def bench_recall(mem: Any, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """recall@1: does each case's rephrase_prompt retrieve its own edit?

    Matched by content (prompt and target_new), since the import stores a case that repeats another only once.
    """
    queries = [c["rephrase_prompt"] for c in cases]
    t = time.perf_counter()
    hits = mem.search_many(queries, k=1)
    seconds = time.perf_counter() - t
    correct = 0
    for c, h in zip(cases, hits):
        if h and (h[0].edit.prompt, h[0].edit.target_new) == (c["prompt"], c["target_new"]):
            correct += 1
    return {"n_edits": len(mem), "n_queries": len(queries), "recall_at_1": correct / len(queries),
            "seconds": seconds}


def _search_at_sizes(mem: Any, encoder: Any, cases: list[dict[str, Any]], settings: StoreBenchSettings,
                     rng: random.Random, progress: bool) -> list[dict[str, Any]]:
    """Grow the store to each size in turn (synthetic edits after the imported ones) and time search there."""
    queries = [c["rephrase_prompt"] for c in rng.sample(cases[:settings.import_n],
                                                        min(settings.n_queries, settings.import_n))]
    synthetic = _synthetic_edits(cases, max(settings.sizes), settings.seed)
    used, out = 0, []
    for size in sorted(settings.sizes):
        if len(mem) < size:
            log.info("search: growing the store to %d edits", size)
            need = size - len(mem)
            mem.add_many(synthetic[used:used + need], progress=progress)
            used += need
        log.info("search: %d queries at %d edits", len(queries), len(mem))
        out.append(bench_search(mem, encoder, queries))
    return out


def run_store_bench(settings: StoreBenchSettings, *, progress: bool = True) -> dict[str, Any]:
    from memory import EditMemory
    from memory.encoder import get_encoder

    encoder = get_encoder(settings.encoder)
    cases = _cf_cases(settings.data_dir)
    rng = random.Random(settings.seed)
    results: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in asdict(settings).items()},
                               "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="editmem-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if "import" in settings.parts or "search" in settings.parts:
            url = f"sqlite:///{tmp / 'bench.db'}"
            log.info("import: %d CounterFact edits", settings.import_n)
            imported, mem = bench_import(lambda: EditMemory.open(url, encoder=settings.encoder), encoder,
                                         cases, settings.import_n, tmp)
            if "import" in settings.parts:
                results["import"] = imported
            if "search" in settings.parts:
                results["search"] = _search_at_sizes(mem, encoder, cases, settings, rng, progress)
            mem.close()
        if "recall" in settings.parts and settings.recall_all:
            url2 = f"sqlite:///{tmp / 'recall.db'}"
            with EditMemory.open(url2, encoder=settings.encoder) as mem2:
                for name in CF_FILES:
                    mem2.import_file(settings.data_dir / "counterfact" / "easyedit_split" / name)
                log.info("recall@1: %d rephrases against %d edits", len(cases), len(mem2))
                results["recall"] = bench_recall(mem2, cases)
    if "hnsw" in settings.parts and settings.hnsw_n:
        log.info("hnsw: %d synthetic vectors", settings.hnsw_n)
        results["hnsw"] = bench_hnsw(settings.hnsw_n, settings.hnsw_queries, encoder.dim, settings.seed)
    return results


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render_markdown(results: dict[str, Any], command: str) -> str:
    m = results["machine"]
    lines = [f"## Store ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, Python {m['python']}. "
             f"Encoder: {results['settings']['encoder']}. Command: `{command}`", ""]
    lines += ["| measurement | value | target | |", "|---|---|---|---|"]
    if "import" in results:
        imp = results["import"]
        lines.append(f"| import throughput ({imp['n']:,} CounterFact edits) | {imp['import_per_s']:.0f} edits/s vs "
                     f"encoder {imp['encoder_per_s']:.0f} texts/s: ratio **{imp['ratio']:.2f}** | ≥ 0.8 "
                     f"| {_verdict(imp['ratio'] >= 0.8)} |")
    for s in results.get("search", []):
        ok = s["added_p50_ms"] <= 2.0
        lines.append(f"| `search` at {s['n_edits']:,} edits ({s['n_queries']} queries, k=5) | p50 "
                     f"{s['search_p50_ms']:.2f} ms, p99 {s['search_p99_ms']:.2f} ms; bare encoder p50 "
                     f"{s['encoder_p50_ms']:.2f} ms, p99 {s['encoder_p99_ms']:.2f} ms; added p50 "
                     f"**{s['added_p50_ms']:.2f} ms** (paired median {s['paired_extra_p50_ms']:.2f} ms) "
                     f"| p50 ≤ encoder + 2 ms | {_verdict(ok)} |")
    if "hnsw" in results:
        h = results["hnsw"]
        for s in h.get("sweep", [h]):
            ok = s["p50_ms"] <= 2.0 and s["recall_at_1"] >= 0.98
            mark = " (default)" if s["ef_search"] == h["ef_search"] else ""
            lines.append(f"| HNSW, {h['n']:,} synthetic {h['dim']}-d vectors (M={h['M']}, efC={h['ef_construction']}, "
                         f"efSearch={s['ef_search']}{mark}; build {h['build_seconds']:.0f} s) | p50 "
                         f"**{s['p50_ms']:.2f} ms**, p99 {s['p99_ms']:.2f} ms, recall@1 **{s['recall_at_1']:.3f}** "
                         f"({h['n_queries']} queries) | p50 ≤ 2 ms at recall@1 ≥ 0.98 | {_verdict(ok)} |")
    if "recall" in results:
        r = results["recall"]
        lines.append(f"| recall@1, CounterFact `rephrase_prompt` → own edit ({r['n_edits']:,} edits stored) "
                     f"| **{r['recall_at_1']:.4f}** | ≥ 0.95 | {_verdict(r['recall_at_1'] >= 0.95)} |")
    lines.append("")
    return "\n".join(lines)


def write_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the block between `<!-- bench:SECTION -->` markers in a markdown file, atomically."""
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
