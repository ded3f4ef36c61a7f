"""Routing precision/recall with relation-aware labels, with and without the relation reranker, on CounterFact
(EasyEdit split) with the real MiniLM encoder: train the scope head and the reranker on the first ``--train`` cases of
counterfact-train, store the first ``--edit`` cases of counterfact-edit, route their rephrases and locality prompts.

Every text is encoded once (a memoising encoder; the cache is kept in ``--cache`` for reruns). Run::

    python -m serve.bench_routing --data-dir ../shared/data --train 800 --edit 1000 --focus-named
    python -m serve.bench_routing --data-dir ../shared/data --train 2000 --store-all --query-cases 5000
    python -m serve.bench_routing --data-dir ../shared/data --train 2000 --edit 2000 --cross FOLDER

``--cross FOLDER`` (a reranker from ``editmem train-rerank``) adds runs with the cross-encoder over the gated
candidates, after the head and after head + relation reranker (the first of ``--powers``). Latency: route p50 of one
out-of-scope query (a locality prompt, as before) and of one in-scope query (a rephrase, which pays the cross-encoder).

``--store-all`` stores every CounterFact case (21,919: train, edit and val) and routes the prompts of the cases the
head was not trained on (all of them, or a sample of ``--query-cases``); the labels come from every stored case.

``--distractors N`` also stores N synthetic edits about other subjects (:func:`distractor_edits`: CounterFact's
relation templates over made-up names, each a first word and a last word of two different CounterFact subjects, never
a real subject), which no routed prompt is about: a query routed to one counts as a false positive (a locality
prompt) or a wrong edit (a rephrase). Issue 17's target: precision and recall drop by no more than 0.01 with 200,000.

Relation-aware figures include the same-fact ones (``*_same_fact``, :mod:`scope.evaluate`: a rephrase routed to another
stored edit of its subject and relation counts as in scope). Every run without the cross-encoder also reports ``sweep``
per variant: on the same routings, the threshold with the best recall whose two same-fact precisions (no edited subject
named / one named) reach issue 17's targets, and a few points of the curve; an oracle (chosen on the routed queries
themselves), which says whether any threshold could meet the targets. ``--calibrate-in-store`` (with ``--store-all``)
chooses that threshold honestly: on the routings of the head's held-out training cases (stored like every case, never
routed otherwise), then routes the query cases at it (runs named ``...[store-calibrated]``). ``--threshold T`` adds head
+ relation reranker at a fixed threshold (the same one with and without ``--distractors``); ``--index flat`` stores with
exact search instead of ``auto``. Routers search at the router's default HNSW depth
(:data:`scope.router.ROUTE_EF_SEARCH`); ``--ef-search N`` (repeatable) routes every variant again at each depth N.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memory.encoder import DEFAULT_ENCODER, MemoEncoder, get_encoder

log = logging.getLogger(__name__)


def focus_named(cases: list[Any], n: int) -> list[Any]:
    """``n`` cases, first the pairs (c, c') where a locality prompt of c names the subject of c' (so that the
    named-subject group is not empty at a small store size), then the remaining cases in file order."""
    from scope.evaluate import SubjectIndex

    subjects = SubjectIndex([c.subject for c in cases], list(range(len(cases))))
    chosen: dict[int, None] = {}
    for i, c in enumerate(cases):
        for p in c.locality:
            for j in sorted(subjects.named(p.prompt) - {i}):
                if len(chosen) + 2 <= n // 2:
                    chosen[i] = chosen[j] = None
    for i in range(len(cases)):
        if len(chosen) >= n:
            break
        chosen.setdefault(i, None)
    return [cases[i] for i in sorted(chosen)]


def distractor_edits(templates: Any, real_subjects: Sequence[str], n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` edits about made-up subjects: a first word and a last word of two-or-more-word ``templates.subjects``
    drawn apart (never a name in ``real_subjects``, any case), put into a relation template with one of that relation's
    answers; distinct (subject, template) pairs, the same for the same seed (``templates``:
    :class:`serve.bench_million.Templates`)."""
    real = {s.lower() for s in real_subjects}
    words = [s.split() for s in templates.subjects if len(s.split()) >= 2]
    firsts, lasts = sorted({w[0] for w in words}), sorted({w[-1] for w in words})
    if len(firsts) * len(lasts) * len(templates.templates) < 2 * n:
        raise ValueError(f"too few name parts for {n:,} distinct distractors")
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen: set[tuple[str, int]] = set()
    while len(out) < n:
        subject, t = f"{rng.choice(firsts)} {rng.choice(lasts)}", rng.randrange(len(templates.templates))
        if subject.lower() in real or (subject, t) in seen:
            continue
        seen.add((subject, t))
        options = templates.answers[templates.relations[t]]
        out.append({"prompt": templates.templates[t].replace("{}", subject, 1), "subject": subject,
                    "target_new": options[rng.randrange(len(options))]})
    return out


def run(data_dir: Path, n_train: int, n_edit: int, cache: Path | None, powers: Sequence[float], *,
        focus: bool = False, store_all: bool = False, n_query: int = 0, latency_queries: int = 200,
        cross_folder: Path | None = None, distractors: int = 0, k: int = 5,
        recalibrate: bool = False, calibrate_in_store: bool = False,
        fixed_thresholds: Sequence[float] = (), index: str = "auto",
        ef_searches: Sequence[int] = ()) -> dict[str, Any]:
    from memory.formats import read_cases
    from memory.store import EditMemory
    from scope.evaluate import routing_report
    from scope.relations import RelationTable, rome_files
    from scope.rerank import RelationReranker, RerankSettings, relation_texts
    from scope.router import ROUTE_EF_SEARCH, Router
    from scope.train import TrainSettings, heldout_cases, train_scope

    cf = data_dir / "counterfact" / "easyedit_split"
    enc = MemoEncoder(get_encoder(DEFAULT_ENCODER), cache)
    table = RelationTable.from_rome_files(rome_files(data_dir))
    train = read_cases(cf / "counterfact-train.json")[:n_train]
    edit = read_cases(cf / "counterfact-edit.json")
    query_cases: list[int] | None = None
    if store_all:  # every CounterFact case stored (train, edit, val); the training cases' prompts are not routed
        rest = read_cases(cf / "counterfact-train.json")
        edit = rest + edit + read_cases(cf / "counterfact-val.json")
        query_cases = list(range(n_train, len(edit)))
        if 0 < n_query < len(query_cases):  # a fixed random sample, spread over the three splits
            query_cases = sorted(random.Random(0).sample(query_cases, n_query))
    else:
        edit = focus_named(edit, n_edit) if focus else edit[:n_edit]
    out: dict[str, Any] = {"n_train": len(train), "n_edit": len(edit), "encoder": enc.name, "focus_named": focus,
                           "store_all": store_all, "query_cases": len(query_cases or edit)}
    t = time.perf_counter()
    head, _cosine, train_report = train_scope(train, enc, TrainSettings())
    out["scope_train_seconds"] = round(time.perf_counter() - t, 1)
    out["scope_heldout"] = train_report["heldout"]["head"]["queries"]
    enc.save()
    texts, labels = relation_texts(train, table.case_relations(train))
    t = time.perf_counter()
    reranker = RelationReranker.train(texts, labels, enc, RerankSettings(), vectors=enc.encode(texts))
    out["reranker"] = {"train_texts": len(texts), "relations": len(reranker.relations),
                       "seconds": round(time.perf_counter() - t, 1)}
    thresholds: dict[float, float] = {}  # power -> the head's threshold calibrated behind the reranker
    if recalibrate:
        from scope.train import build_pairs, heldout_calibration

        pairs = build_pairs(train, enc, TrainSettings())  # the same pairs and held-out cases the head was trained on
        for power in powers:
            reranker.power = power
            cal = heldout_calibration(head, pairs, TrainSettings().target_precision, reranker)
            thresholds[power] = cal["calibration"]["threshold"]
            out.setdefault("recalibrated", {})[f"{power:g}"] = cal
    relations = table.case_relations(edit)
    out["edit_relations_known"] = sum(r is not None and not r.startswith("tmpl:") for r in relations)
    with EditMemory.open("sqlite://", encoder=enc, index=index) as mem:
        t = time.perf_counter()
        ids = [r.id for r in mem.add_many(edit)]
        if distractors:
            from serve.bench_million import load_templates

            templates = load_templates(data_dir)
            fake = distractor_edits(templates, [c.subject for c in edit if c.subject] + list(templates.subjects),
                                    distractors)
            mem.add_many(fake, progress=True)
            out["distractors"] = {"n": len(fake), "subjects": len({f["subject"] for f in fake}),
                                  "examples": [f["prompt"] + " " + f["target_new"] for f in fake[:3]]}
        mem.wait_for_index()  # past 20k edits `auto` builds HNSW in the background: route on the final index
        out["store_seconds"] = round(time.perf_counter() - t, 1)
        out["index_kind"] = mem.index_kind
        log.info("stored %d edits in %.1f s", len(ids), out["store_seconds"])
        enc.save()
        runs: dict[str, Any] = {}
        cross = None
        if cross_folder is not None:
            from scope.cross_rerank import CrossReranker

            cross = CrossReranker.load(cross_folder)
            out["cross"] = {"folder": str(cross_folder), "threshold": cross.threshold, "margin": cross.margin,
                            "trainable_parameters": cross.n_trainable()}
        # (name, reranker power or 0 for none, with the cross-encoder, the head's threshold or None for its own)
        configs: list[Any] = [("head", 0.0, False, None)]
        configs += [(f"head+reranker(power={power:g})", power, False, None) for power in powers]
        configs += [(f"head+reranker(power={power:g},recalibrated)", power, False, threshold)
                    for power, threshold in thresholds.items()]
        configs += [(f"head+reranker(power={powers[0]:g},threshold={t:g})", powers[0], False, t)
                    for t in fixed_thresholds if powers]
        if calibrate_in_store:  # the threshold at which the head's held-out training cases route best in this store
            held = heldout_cases(len(train), TrainSettings())
            out["store_calibration"] = {"cases": len(held)}
            for name, power, _, threshold in list(configs):
                if threshold is not None:  # one calibration per router: the sweep does not depend on the threshold
                    continue
                reranker.power = power
                router = Router(mem, head, k=k, reranker=reranker if power else None)
                report = routing_report(router, edit, ids, relations=relations, query_cases=held, sweep=True)
                best = report["bare"]["sweep"]["best"]
                out["store_calibration"][name] = report["bare"]["sweep"]
                log.info("%s calibrated in the store: %s", name, best)
                if best is not None:
                    configs.append((f"{name}[store-calibrated]", power, False, best["threshold"]))
        if cross is not None:
            configs.append(("head+cross", 0.0, True, None))
            if powers:
                configs.append((f"head+reranker(power={powers[0]:g})+cross", powers[0], True, None))
        routed = [edit[i] for i in (query_cases or range(len(edit)))][:latency_queries]
        out["route_ef_search"] = ROUTE_EF_SEARCH
        if ef_searches and mem.index_kind == "hnsw":  # each router again at each HNSW search depth
            configs = [(f"{name}[ef={ef}]", power, use_cross, threshold, ef)
                       for ef in ef_searches for name, power, use_cross, threshold in configs]
        else:
            configs = [(name, power, use_cross, threshold, ROUTE_EF_SEARCH)
                       for name, power, use_cross, threshold in configs]
        for name, power, use_cross, threshold, ef in configs:
            reranker.power = power
            clf = head
            if threshold is not None:
                clf = copy.copy(head)
                clf.threshold = threshold
            router = Router(mem, clf, k=k, reranker=reranker if power else None, cross=cross if use_cross else None,
                            ef_search=ef)
            t = time.perf_counter()
            runs[name] = routing_report(router, edit, ids, relations=relations, query_cases=query_cases,
                                        sweep=not use_cross)
            log.info("%s routed in %.1f s", name, time.perf_counter() - t)
            for key, texts in (("route_p50_ms_excluding_encoder",
                                [c.locality[0].prompt if c.locality else c.prompt for c in routed]),
                               ("route_p50_ms_in_scope_excluding_encoder",
                                [c.rephrases[0] if c.rephrases else c.prompt for c in routed])):
                lat = []
                for q in texts:
                    t = time.perf_counter()
                    router.route([q])
                    lat.append(time.perf_counter() - t)
                runs[name][key] = round(1e3 * float(np.median(lat)), 3)
                runs[name][key.replace("p50", "p90")] = round(1e3 * float(np.percentile(lat, 90)), 3)
            log.info("%s: %s", name, json.dumps(runs[name]["bare"].get("relation_aware")))
            enc.save()
        out["runs"] = runs
    out["texts_encoded"] = enc.encoded
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--edit", type=int, default=1000)
    p.add_argument("--powers", default="0.5,1")
    p.add_argument("--focus-named", action="store_true",
                   help="store first the pairs of cases whose locality prompts name each other's subjects")
    p.add_argument("--store-all", action="store_true",
                   help="store all 21,919 CounterFact cases (train, edit, val); route the prompts of all but the "
                        "first --train training cases (--edit is then ignored)")
    p.add_argument("--query-cases", type=int, default=0,
                   help="with --store-all, route the prompts of this many of those cases (a fixed random sample; "
                        "0: all)")
    p.add_argument("--cross", type=Path, default=None, metavar="FOLDER",
                   help="also route with this cross-encoder reranker (editmem train-rerank) over the gated candidates")
    p.add_argument("--distractors", type=int, default=0,
                   help="also store this many synthetic edits about made-up subjects (none is any query's edit)")
    p.add_argument("--recalibrate", action="store_true",
                   help="also route with the head's threshold calibrated behind the relation reranker (each power)")
    p.add_argument("--calibrate-in-store", action="store_true",
                   help="with --store-all, also route each configuration at the threshold its routings of the head's "
                        "held-out training cases reach best in the full store (both precision targets, then recall)")
    p.add_argument("--threshold", type=float, action="append", default=[], metavar="T",
                   help="also route with head + relation reranker (the first of --powers) at this fixed threshold "
                        "(repeatable): the same threshold with and without --distractors")
    p.add_argument("--index", choices=("auto", "flat", "hnsw"), default="auto",
                   help="the store's index (flat: exact search, to tell HNSW's misses from the ranking's)")
    p.add_argument("--ef-search", type=int, action="append", default=[], metavar="N",
                   help="route again at this HNSW search depth (repeatable; only when the index is HNSW)")
    p.add_argument("-k", type=int, default=5, help="candidates the router scores per query (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path("bench_out/routing_vectors.npz"))
    p.add_argument("--json", type=Path, default=Path("bench_out/routing.json"))
    a = p.parse_args()
    if a.calibrate_in_store and not a.store_all:
        p.error("--calibrate-in-store needs --store-all (the held-out training cases must be stored)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(a.data_dir, a.train, a.edit, a.cache, [float(x) for x in a.powers.split(",")],
                 focus=a.focus_named, store_all=a.store_all, n_query=a.query_cases, cross_folder=a.cross,
                 distractors=a.distractors, k=a.k, recalibrate=a.recalibrate,
                 calibrate_in_store=a.calibrate_in_store, fixed_thresholds=a.threshold, index=a.index,
                 ef_searches=a.ef_search)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
