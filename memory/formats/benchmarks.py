"""Parsers of the benchmark layouts (zsRE, CounterFact in ROME's and EasyEdit's layouts, KnowEdit, Sanitation, MQuAKE),
each mapping a loaded file onto EditCase as :mod:`memory.formats` documents.
"""

from __future__ import annotations

from typing import Any

from memory.errors import FormatError
from memory.formats.reading import (
    _answers,
    _case_id,
    _each,
    _error,
    _fill,
    _obj,
    _one_hop,
    _opt,
    _Rec,
    _report,
    _req,
    _Skip,
    _Source,
    _texts,
    _typename,
)
from memory.records import EditCase, Probe

# --------------------------------------------------------------------------------------------------------------------
# Parsers. Each takes the loaded source and returns every case, or raises on the first bad record.


def _parse_zsre(src: _Source) -> list[EditCase]:
    def one(rec: _Rec, r: dict) -> list[EditCase]:
        subject = _req(rec, r, "subject")
        prompt = _req(rec, r, "src", target=True)
        target = _req(rec, r, "alt", target=True)
        answers = _texts(rec, r, "answers", required=True)
        if not answers:
            raise rec.fail("answers", "empty array: the true answer is needed")
        rephrase = _opt(rec, r, "rephrase")
        meta: dict[str, Any] = {}
        if len(answers) > 1:
            meta["ground_truth_aliases"] = answers[1:]
        locality = []
        if r.get("loc") is not None or r.get("loc_ans") is not None:
            locality.append(Probe(_req(rec, r, "loc"), _req(rec, r, "loc_ans"), "neighborhood"))
        portability = _one_hop(rec, r, meta)
        if r.get("alter_subject_question") is not None:
            portability.append(Probe(_req(rec, r, "alter_subject_question"), target, "subject_replace"))
            alias = _opt(rec, r, "alternative_subject")
            if alias is not None:
                meta["alternative_subject"] = alias
        if r.get("inverse question") is not None:
            portability.append(Probe(_req(rec, r, "inverse question"), subject, "inverse_relation"))
        return [EditCase(prompt, target, subject, answers[0], (rephrase,) if rephrase else (), tuple(locality),
                         tuple(portability), str(rec.index), "zsre", meta)]

    return _each(src, one)


def _parse_counterfact_rome(src: _Source) -> list[EditCase]:
    def one(rec: _Rec, r: dict) -> list[EditCase]:
        rr = _obj(rec, r.get("requested_rewrite"), "requested_rewrite")
        subject = _req(rec, rr, "subject", "requested_rewrite.subject")
        template = _req(rec, rr, "prompt", "requested_rewrite.prompt", target=True)
        prompt = _fill(rec, template, subject, "requested_rewrite.prompt")
        new = _req(rec, _obj(rec, rr.get("target_new"), "requested_rewrite.target_new"), "str",
                   "requested_rewrite.target_new.str", target=True)
        true = _req(rec, _obj(rec, rr.get("target_true"), "requested_rewrite.target_true"), "str",
                    "requested_rewrite.target_true.str")
        meta: dict[str, Any] = {}
        relation = _opt(rec, rr, "relation_id", "requested_rewrite.relation_id")
        if relation is not None:
            meta["relation_id"] = relation
        locality = [Probe(p, true, "neighborhood") for p in _texts(rec, r, "neighborhood_prompts")]
        locality += [Probe(p, true, "distracting_neighborhood")
                     for p in _texts(rec, r, "distracting_neighborhood_prompts")]
        locality += [Probe(p, new, "attribute") for p in _texts(rec, r, "attribute_prompts")]
        if r.get("unrelated_relation") is not None:
            unrelated = _obj(rec, r["unrelated_relation"], "unrelated_relation")
            locality.append(Probe(_req(rec, unrelated, "question", "unrelated_relation.question"),
                                  _req(rec, unrelated, "object", "unrelated_relation.object"), "unrelated_relation"))
        portability = _one_hop(rec, r, meta)
        alias = _opt(rec, r, "alternative_subject")
        if alias is not None:
            portability.append(Probe(template.replace("{}", alias), new, "subject_replace"))
            meta["alternative_subject"] = alias
        generation = _texts(rec, r, "generation_prompts")
        if generation:
            meta["generation_prompts"] = generation
        return [EditCase(prompt, new, subject, true, tuple(_texts(rec, r, "paraphrase_prompts")), tuple(locality),
                         tuple(portability), _case_id(rec, r), "counterfact_rome", meta)]

    return _each(src, one)


def _parse_counterfact_easyedit(src: _Source) -> list[EditCase]:
    def one(rec: _Rec, r: dict) -> list[EditCase]:
        prompt = _req(rec, r, "prompt", target=True)
        target = _req(rec, r, "target_new", target=True)
        rephrase = _opt(rec, r, "rephrase_prompt")
        locality: tuple[Probe, ...] = ()
        if r.get("locality_prompt") is not None or r.get("locality_ground_truth") is not None:
            locality = (Probe(_req(rec, r, "locality_prompt"), _req(rec, r, "locality_ground_truth"),
                              "neighborhood"),)
        return [EditCase(prompt, target, _req(rec, r, "subject"), _opt(rec, r, "ground_truth"),
                         (rephrase,) if rephrase else (), locality, (), _case_id(rec, r), "counterfact_easyedit")]

    return _each(src, one)


def _knowedit_probes(rec: _Rec, r: dict, key: str) -> tuple[Probe, ...]:
    block = r.get(key)
    if block is None:
        return ()
    block = _obj(rec, block, key)
    probes: list[Probe] = []
    for kind, items in block.items():
        field = f"{key}.{kind}"
        if not isinstance(items, list):
            raise rec.fail(field, f"expected an array of {{prompt, ground_truth}} objects, got {_typename(items)}")
        for i, item in enumerate(items):
            item = _obj(rec, item, f"{field}[{i}]")
            prompt = _req(rec, item, "prompt", f"{field}[{i}].prompt")
            if "ground_truth" not in item:
                raise rec.fail(f"{field}[{i}].ground_truth", "missing required field")
            answers = _answers(rec, item["ground_truth"], f"{field}[{i}].ground_truth")
            if not answers:
                rec.src.dropped_answers += 1
                continue
            probes.append(Probe(prompt, answers[0], kind, tuple(answers[1:])))
    return tuple(probes)


def _parse_knowedit(src: _Source) -> list[EditCase]:
    if isinstance(src.data, dict):
        return _parse_sanitation(src)

    def one(rec: _Rec, r: dict) -> list[EditCase]:
        prompt = _req(rec, r, "prompt", target=True)
        target = _req(rec, r, "target_new", target=True)
        truths = _answers(rec, r["ground_truth"], "ground_truth") if r.get("ground_truth") is not None else []
        if r.get("ground_truth") is not None and not truths:
            rec.src.dropped_answers += 1
        meta = {"ground_truth_aliases": truths[1:]} if len(truths) > 1 else {}
        rephrase = _opt(rec, r, "rephrase_prompt")
        return [EditCase(prompt, target, _opt(rec, r, "subject"), truths[0] if truths else None,
                         (rephrase,) if rephrase else (), _knowedit_probes(rec, r, "locality"),
                         _knowedit_probes(rec, r, "portability"), _case_id(rec, r), "knowedit", meta)]

    return _each(src, one)


_SANITATION_SPLITS = (("success", "locality"), ("K_F", "K_R"))  # (edits, knowledge to keep): test, train


def _parse_sanitation(src: _Source) -> list[EditCase]:
    data = src.data
    if not isinstance(data, dict):
        raise _error(src.path, f"expected the Sanitation layout (a JSON object), found a JSON {_typename(data)}")
    split = next((s for s in _SANITATION_SPLITS if set(s) <= data.keys()), None)
    if split is None:
        raise _error(src.path, "expected the KnowEdit Sanitation layout: an object with keys 'success' and "
                               f"'locality' (test) or 'K_F' and 'K_R' (train); found keys {sorted(data)}")
    edit_key, keep_key = split
    for key in split:
        if not isinstance(data[key], list):
            raise _error(src.path, f"expected an array, got {_typename(data[key])}", field=key)

    keep: list[Probe] = []
    for i, item in enumerate(data[keep_key]):
        rec = _Rec(src, i, None, f"{keep_key}[{i}] (0-based)")
        item = _obj(rec, item, None)
        keep.append(Probe(_req(rec, item, "question"), _req(rec, item, "ground_truth"), keep_key))
    edits = data[edit_key]
    if keep and not edits:
        raise _error(src.path, f"{len(keep)} item(s) to keep but no edits", field=edit_key)

    out: list[EditCase] = []
    skipped: list[FormatError] = []
    for i, item in enumerate(edits):
        rec = _Rec(src, i, None, f"{edit_key}[{i}] (0-based)")
        try:
            item = _obj(rec, item, None)
            out.append(EditCase(_req(rec, item, "question", target=True), _req(rec, item, "target_new", target=True),
                                _opt(rec, item, "subject"), _opt(rec, item, "ground_truth"),
                                locality=tuple(keep[i::len(edits)]), case_id=f"{edit_key}/{i}", source="sanitation"))
        except _Skip as s:
            skipped.append(s.err)
    if skipped and keep and not out:
        raise skipped[0]
    if skipped:  # the kept items dealt to a skipped edit would be lost: deal again over the edits that remain
        out = [EditCase(c.prompt, c.target_new, c.subject, c.ground_truth, locality=tuple(keep[j::len(out)]),
                        case_id=c.case_id, source=c.source) for j, c in enumerate(out)]
    _report(src, skipped)
    return out


def _parse_mquake(src: _Source) -> list[EditCase]:
    def one(rec: _Rec, r: dict) -> list[EditCase]:
        group = _case_id(rec, r)
        rewrites = r.get("requested_rewrite")
        if not isinstance(rewrites, list) or not rewrites:
            raise rec.fail("requested_rewrite", f"expected a non-empty array of rewrites, got {_typename(rewrites)}")
        questions = _texts(rec, r, "questions", required=True)
        answer = _req(rec, r, "new_answer")
        aliases = tuple(_texts(rec, r, "new_answer_alias"))
        out = []
        for i, rr in enumerate(rewrites):
            f = f"requested_rewrite[{i}]"
            rr = _obj(rec, rr, f)
            subject = _req(rec, rr, "subject", f"{f}.subject")
            prompt = _fill(rec, _req(rec, rr, "prompt", f"{f}.prompt", target=True), subject, f"{f}.prompt")
            new = _req(rec, _obj(rec, rr.get("target_new"), f"{f}.target_new"), "str", f"{f}.target_new.str",
                       target=True)
            true = _req(rec, _obj(rec, rr.get("target_true"), f"{f}.target_true"), "str", f"{f}.target_true.str")
            question = _opt(rec, rr, "question", f"{f}.question")
            meta: dict[str, Any] = {"group": group, "group_size": len(rewrites)}
            relation = _opt(rec, rr, "relation_id", f"{f}.relation_id")
            if relation is not None:
                meta["relation_id"] = relation
            last = i == len(rewrites) - 1
            portability = tuple(Probe(q, answer, "multi_hop", aliases) for q in questions) if last else ()
            out.append(EditCase(prompt, new, subject, true, (question,) if question else (), (), portability,
                                f"{group}/{i}", "mquake", meta))
        return out

    return _each(src, one)
