"""Edit data sets in, the store's JSONL out: one parser per source layout, each producing :class:`EditCase`.

``read_cases(path)`` detects the layout from the keys of the first record, validates every record, and only then
returns, so a caller (the store's import) can write all of them in one transaction or none. Every problem is a
:class:`FormatError` naming the file, the record (0-based index for JSON arrays, line number for JSONL) and the field.

Formats (``FORMATS``) and how each maps onto EditCase
---------------------------------------------------
``zsre`` -- MEND/ROME zsRE keys (``subject, src, rephrase, alt, answers, loc, loc_ans``), EasyEdit convention:
    prompt=src, target_new=alt, ground_truth=answers[0] (further answers go to metadata["ground_truth_aliases"]),
    rephrases=(rephrase,). Locality: one probe (loc, loc_ans), kind "neighborhood"; ``loc`` is kept exactly as in the
    file, "nq question: " prefix included, as EasyEdit and ROME do. Portability: the "One Hop" block
    {"New Question", "New Answer"} -> kind "one_hop" ("Recalled Relation" to metadata["recalled_relation"]);
    ``alter_subject_question`` -> kind "subject_replace" answered by alt (the alias inherits the edit);
    ``inverse question`` -> kind "inverse_relation" answered by the subject (edit "Claire's sister is Marian", ask
    "Who is Marian's sister?" -> "Claire"). ``pred`` and ``cond`` are ignored. case_id = the 0-based record index.
    (ROME/MEMIT edit zsRE towards answers[0] instead; that is not what this loader does.)
``counterfact_rome`` -- ROME's CounterFact layout. prompt = requested_rewrite.prompt with "{}" replaced by the
    subject; target_new/ground_truth = target_new.str/target_true.str; rephrases = paraphrase_prompts. Locality kinds:
    "neighborhood" (neighborhood_prompts, answered by target_true: other subjects whose true answer is the edited
    fact's old object, as in ROME's neighbourhood score), "distracting_neighborhood" (same answer), "attribute"
    (attribute_prompts: other subjects whose true answer *is* target_new; ROME's own evaluation does not use them),
    "unrelated_relation" (question -> object). Portability: "one_hop" block as in zsRE; ``alternative_subject`` ->
    kind "subject_replace": the template filled with the alias, answered by target_new. generation_prompts have no
    answer, so they are not probes: they go to metadata["generation_prompts"]; relation_id to metadata. An evaluator
    that wants ROME's neighbourhood score alone filters locality by kind.
``counterfact_easyedit`` -- EasyEdit's flat CounterFact: prompt, target_new, subject, ground_truth,
    rephrases=(rephrase_prompt,), one locality probe (locality_prompt, locality_ground_truth), kind "neighborhood".
``knowedit`` -- KnowEdit ZsRE / WikiData_counterfact / WikiData_recent: prompt, target_new, subject,
    ground_truth (optional), rephrases=(rephrase_prompt,) if present. ``locality`` and ``portability`` are dicts of
    kind -> [{prompt, ground_truth}]; probe.kind is that key (Relation_Specificity, Forgetfulness, Reasoning,
    Subject_Aliasing, Logical_Generalization). An answer may be a string, a list of strings, or a list of alias lists
    ([["Syria", "SYR"], ["..."]]): answer = the first non-empty string, aliases = the rest in order. KnowEdit ships
    some probes with no answer at all ("" or [[]]): those probes are dropped and counted in a logged warning; an
    empty main ground_truth becomes None (same warning). A top-level dict is the Sanitation layout (below).
``sanitation`` -- KnowEdit Sanitation (TriviaQA), a dict of two lists: edits {question, target_new, ground_truth,
    subject?} under "success" (test) or "K_F" (train), and knowledge to keep {question, ground_truth} under
    "locality" (test) or "K_R" (train). The file does not pair kept items with edits; this loader deals them out
    round-robin (kept item j goes to edit j mod n), so one pass over the edits probes every kept item exactly once.
    Probe kind = the list's key. case_id = "<key>/<index>".
``mquake`` -- MQuAKE: one EditCase per requested_rewrite, case_id "<case_id>/<i>", prompt = template filled with
    the subject, rephrases = (the rewrite's ``question``,). The case's multi-hop ``questions`` (answer new_answer,
    aliases new_answer_alias) are portability probes of kind "multi_hop" attached to the LAST rewrite only: they
    make sense only once every rewrite of the case is applied, which in a sequential run (cases in file order) is
    exactly when the last one has been; attaching them to every rewrite would count them k times. A single-edit run
    therefore measures them with only the last edit applied -- group by metadata["group"] (the MQuAKE case_id;
    metadata["group_size"] = number of rewrites) to apply a whole case as a batch. MQuAKE has no locality probes.
    MQuAKE's standard metric counts a case correct if ANY of its questions is answered; a per-probe average differs.
``editmem`` -- the store's own JSONL (:func:`write_jsonl`). read_cases yields the *current* versions only (not
    deleted, valid_to null); :func:`read_records` returns every line as an EditRecord. The record's metadata keys
    case_id / source / locality / portability (see :func:`case_to_metadata`) become the EditCase fields of those
    names; the rest of the metadata is carried in EditCase.metadata. case_id defaults to the stored id.

WikiBio and ConvSent (KnowEdit) are long-form text and sentiment edits, not fact edits: they are rejected with a
FormatError, as are ROME's "knowns" and the PIQA locality file.

Strictness: missing required fields, wrong types and empty prompts/targets are errors. ``skip_incomplete=True``
leaves out, with a logged warning naming them, records whose prompt or target is an empty string (MEND's zsRE train
sample has two with ``alt == ""``); structural errors are never skipped.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from memory.errors import FormatError, ValidationError
from memory.records import EditCase, EditRecord, Probe

__all__ = [
    "FORMATS", "Format", "case_from_record", "case_to_metadata", "detect_format", "read_cases", "read_records",
    "record_to_json", "write_jsonl",
]

log = logging.getLogger(__name__)

_MISSING = object()


# --------------------------------------------------------------------------------------------------------------------
# Errors and the loaded file


def _error(path: str, message: str, *, index: int | None = None, line: int | None = None, label: str | None = None,
           field: str | None = None) -> FormatError:
    """A FormatError whose location reads "file, line 7" (JSONL) or "file, record 6 (0-based)" (JSON)."""
    return FormatError(path, message, record=index, line=line, label=label, field=field)


_SKIP_HINT = " (skip_incomplete=True leaves such records out)"


class _Skip(Exception):
    """A record with an empty prompt or target, left out when skip_incomplete is set."""

    def __init__(self, err: FormatError):
        super().__init__(str(err))
        self.err = err


@dataclass
class _Source:
    """One loaded file: the parsed top-level value and, for JSONL, the line each record came from."""

    path: str
    data: Any
    lines: list[int] | None = None
    skip_incomplete: bool = False
    dropped_answers: int = 0

    def records(self) -> list[Any]:
        if isinstance(self.data, list):
            return self.data
        raise _error(self.path, f"expected a JSON array of records (or JSON Lines), found a JSON "
                                f"{_typename(self.data)}")

    def rec(self, index: int, label: str | None = None) -> _Rec:
        return _Rec(self, index, None if self.lines is None else self.lines[index], label)


class _Rec:
    """Where one record is, for error messages."""

    __slots__ = ("src", "index", "line", "label")

    def __init__(self, src: _Source, index: int | None, line: int | None, label: str | None):
        self.src, self.index, self.line, self.label = src, index, line, label

    def fail(self, field: str | None, message: str) -> FormatError:
        return _error(self.src.path, message, index=self.index, line=self.line, label=self.label, field=field)


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


def _load(path: str | os.PathLike, skip_incomplete: bool = False) -> _Source:
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise _error(name, "no such file")
    if not p.is_file():
        raise _error(name, "not a regular file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise _error(name, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _error(name, f"not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        return _Source(name, [], [], skip_incomplete)
    start = text.lstrip()[0]
    if start not in "[{":
        raise _error(name, f"not a JSON or JSON Lines file (the text starts with {start!r}, not '[' or '{{')")
    if p.suffix.lower() != ".jsonl":
        try:
            return _Source(name, json.loads(text), None, skip_incomplete)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise _error(name, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
            # one complete value followed by more: JSON Lines
    return _load_jsonl(name, text, skip_incomplete)


def _load_jsonl(name: str, text: str, skip_incomplete: bool) -> _Source:
    records: list[Any] = []
    lines: list[int] = []
    # split on "\n" only: json.dumps(ensure_ascii=False) writes U+2028 and friends raw; str.splitlines cuts there
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise _error(name, f"invalid JSON (column {e.colno}): {e.msg}", line=lineno) from None
        lines.append(lineno)
    return _Source(name, records, lines, skip_incomplete)


# --------------------------------------------------------------------------------------------------------------------
# Field readers: each takes the record's location, the containing object, the key and the dotted field name to report


def _obj(rec: _Rec, value: Any, field: str | None) -> dict:
    if not isinstance(value, dict):
        raise rec.fail(field, f"expected a JSON object, got {_typename(value)}")
    return value


def _text(rec: _Rec, value: Any, field: str, *, target: bool = False) -> str:
    """A non-empty string. ``target`` marks a prompt/target that skip_incomplete may skip when empty."""
    if not isinstance(value, str):
        raise rec.fail(field, f"expected a string, got {_typename(value)}")
    if not value.strip():
        err = rec.fail(field, "empty string" + (_SKIP_HINT if target else ""))
        if target and rec.src.skip_incomplete:
            raise _Skip(err)
        raise err
    return value


def _req(rec: _Rec, obj: dict, key: str, field: str | None = None, *, target: bool = False) -> str:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise rec.fail(field or key, "missing required field")
    return _text(rec, value, field or key, target=target)


def _opt(rec: _Rec, obj: dict, key: str, field: str | None = None) -> str | None:
    value = obj.get(key)
    return None if value is None else _text(rec, value, field or key)


def _texts(rec: _Rec, obj: dict, key: str, field: str | None = None, *, required: bool = False) -> list[str]:
    field = field or key
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise rec.fail(field, "missing required field")
        return []
    if not isinstance(value, list):
        raise rec.fail(field, f"expected an array of strings, got {_typename(value)}")
    return [_text(rec, v, f"{field}[{i}]") for i, v in enumerate(value)]


def _answers(rec: _Rec, value: Any, field: str) -> list[str]:
    """KnowEdit answers: a string, a list of strings, or a list of alias lists. Returns the non-empty strings."""
    out: list[str] = []
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise rec.fail(field, f"expected a string or an array of strings, got {_typename(value)}")
    for i, item in enumerate(items):
        group = item if isinstance(item, list) else [item]
        for j, alias in enumerate(group):
            if not isinstance(alias, str):
                where = f"{field}[{i}]" if group is not item else f"{field}[{i}][{j}]"
                raise rec.fail(where, f"expected a string, got {_typename(alias)}")
            if alias.strip() and alias not in out:
                out.append(alias)
    return out


def _case_id(rec: _Rec, obj: dict, key: str = "case_id") -> str:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        return str(rec.index)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise rec.fail(key, f"expected a number or a non-empty string, got {_typename(value)}")
    return str(value)


def _one_hop(rec: _Rec, r: dict, meta: dict) -> list[Probe]:
    """EasyEdit's "One Hop" portability block, shared by zsRE and ROME CounterFact."""
    block = r.get("portability")
    if block is None:
        return []
    block = _obj(rec, block, "portability")
    if not block:
        return []
    probe = Probe(_req(rec, block, "New Question", "portability.New Question"),
                  _req(rec, block, "New Answer", "portability.New Answer"), "one_hop")
    relation = _opt(rec, block, "Recalled Relation", "portability.Recalled Relation")
    if relation is not None:
        meta["recalled_relation"] = relation
    return [probe]


def _fill(rec: _Rec, template: str, subject: str, field: str) -> str:
    if "{}" not in template:
        raise rec.fail(field, f"template {template!r} has no '{{}}' for the subject")
    return template.replace("{}", subject)


# --------------------------------------------------------------------------------------------------------------------
# Parsers. Each takes the loaded source and returns every case, or raises on the first bad record.


def _each(src: _Source, parse_one: Callable[[_Rec, dict], list[EditCase]]) -> list[EditCase]:
    out: list[EditCase] = []
    skipped: list[FormatError] = []
    for i, r in enumerate(src.records()):
        rec = src.rec(i)
        try:
            out.extend(parse_one(rec, _obj(rec, r, None)))
        except _Skip as s:
            skipped.append(s.err)
    _report(src, skipped)
    return out


def _report(src: _Source, skipped: list[FormatError]) -> None:
    if skipped:
        log.warning("%s: skipped %d record(s) with an empty prompt or target: %s", src.path, len(skipped),
                    "; ".join(str(e).removeprefix(src.path + ", ").removesuffix(_SKIP_HINT) for e in skipped))
    if src.dropped_answers:
        log.warning("%s: %d answer(s) given as empty in the file were treated as absent (probes without an answer "
                    "dropped, an empty ground_truth read as none)", src.path, src.dropped_answers)


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
        locality = ()
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


# --------------------------------------------------------------------------------------------------------------------
# The store's own JSONL


_CASE_KEYS = ("case_id", "source", "locality", "portability")  # metadata keys that hold EditCase fields


def _probe_to_json(probe: Probe) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": probe.prompt, "answer": probe.answer}
    if probe.kind:
        out["kind"] = probe.kind
    if probe.aliases:
        out["aliases"] = list(probe.aliases)
    return out


def case_to_metadata(case: EditCase) -> dict[str, Any]:
    """The metadata a stored edit should carry so that exporting and importing it gives ``case`` back.

    ``case.metadata`` plus the case's case_id, source, locality and portability (the latter as lists of
    {prompt, answer, kind?, aliases?}); empty or None fields are left out.
    """
    clash = [k for k in _CASE_KEYS if k in case.metadata]
    if clash:
        raise ValidationError(f"metadata key(s) {clash} are reserved for the EditCase fields of the same name")
    meta = dict(case.metadata)
    if case.case_id is not None:
        meta["case_id"] = case.case_id
    if case.source is not None:
        meta["source"] = case.source
    if case.locality:
        meta["locality"] = [_probe_to_json(p) for p in case.locality]
    if case.portability:
        meta["portability"] = [_probe_to_json(p) for p in case.portability]
    return meta


def _probes_from_json(rec: _Rec, value: Any, field: str) -> tuple[Probe, ...]:
    if not isinstance(value, list):
        raise rec.fail(field, f"expected an array of probes, got {_typename(value)}")
    out = []
    for i, item in enumerate(value):
        f = f"{field}[{i}]"
        item = _obj(rec, item, f)
        kind = item.get("kind", "")
        if not isinstance(kind, str):
            raise rec.fail(f"{f}.kind", f"expected a string, got {_typename(kind)}")
        out.append(Probe(_req(rec, item, "prompt", f"{f}.prompt"), _req(rec, item, "answer", f"{f}.answer"), kind,
                         tuple(_texts(rec, item, "aliases", f"{f}.aliases"))))
    return tuple(out)


def _case_from_record(record: EditRecord, rec: _Rec) -> EditCase:
    meta = dict(record.metadata)
    case_id = meta.pop("case_id", None)
    source = meta.pop("source", None)
    if case_id is not None and (isinstance(case_id, bool) or not isinstance(case_id, (str, int))):
        raise rec.fail("metadata.case_id", f"expected a string, got {_typename(case_id)}")
    if source is not None and not isinstance(source, str):
        raise rec.fail("metadata.source", f"expected a string, got {_typename(source)}")
    locality = _probes_from_json(rec, meta.pop("locality", []), "metadata.locality")
    portability = _probes_from_json(rec, meta.pop("portability", []), "metadata.portability")
    return EditCase(record.prompt, record.target_new, record.subject, record.ground_truth, record.rephrases, locality,
                    portability, str(record.id) if case_id is None else str(case_id), source or "editmem", meta)


def case_from_record(record: EditRecord) -> EditCase:
    """The EditCase a stored edit stands for: the inverse of :func:`case_to_metadata` (ValidationError if its
    metadata holds malformed locality/portability)."""
    src = _Source(f"edit {record.id} version {record.version}", None)
    try:
        return _case_from_record(record, _Rec(src, None, None, None))
    except FormatError as e:
        raise ValidationError(str(e)) from None


def _datetime(rec: _Rec, r: dict, key: str) -> datetime | None:
    value = r.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise rec.fail(key, f"expected an ISO 8601 string or null, got {_typename(value)}")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise rec.fail(key, f"not an ISO 8601 date-time: {value!r}") from None


def _int(rec: _Rec, r: dict, key: str, minimum: int) -> int:
    value = r.get(key, _MISSING)
    if value is _MISSING:
        raise rec.fail(key, "missing required field")
    if isinstance(value, bool) or not isinstance(value, int):
        raise rec.fail(key, f"expected an integer, got {_typename(value)}")
    if value < minimum:
        raise rec.fail(key, f"must be at least {minimum}, got {value}")
    return value


def _record(rec: _Rec, r: dict) -> EditRecord:
    deleted = r.get("deleted", False)
    if not isinstance(deleted, bool):
        raise rec.fail("deleted", f"expected true or false, got {_typename(deleted)}")
    metadata = r.get("metadata")
    metadata = {} if metadata is None else _obj(rec, metadata, "metadata")
    return EditRecord(
        id=_int(rec, r, "id", 0), version=_int(rec, r, "version", 1),
        prompt=_req(rec, r, "prompt", target=True), target_new=_req(rec, r, "target_new", target=True),
        subject=_opt(rec, r, "subject"), ground_truth=_opt(rec, r, "ground_truth"),
        rephrases=tuple(_texts(rec, r, "rephrases")), metadata=metadata, deleted=deleted,
        valid_from=_datetime(rec, r, "valid_from"), valid_to=_datetime(rec, r, "valid_to"))


def _records(src: _Source) -> list[EditRecord]:
    out: list[EditRecord] = []
    seen: dict[tuple[int, int], _Rec] = {}
    current: dict[int, _Rec] = {}
    for i, r in enumerate(src.records()):
        rec = src.rec(i)
        record = _record(rec, _obj(rec, r, None))  # no skipping: an export is the store's own and must be whole
        key = (record.id, record.version)
        if key in seen:
            raise rec.fail("version", f"id {record.id} version {record.version} appears twice (first at "
                                      f"{_where(seen[key])})")
        seen[key] = rec
        if record.is_current:
            if record.id in current:
                raise rec.fail("valid_to", f"id {record.id} has two current versions (the other at "
                                           f"{_where(current[record.id])})")
            current[record.id] = rec
        out.append(record)
    return out


def _where(rec: _Rec) -> str:
    return f"line {rec.line}" if rec.line is not None else f"record {rec.index}"


def _parse_editmem(src: _Source) -> list[EditCase]:
    if src.skip_incomplete:
        log.info("%s: skip_incomplete does not apply to the store's own export; every record must be whole", src.path)
        src.skip_incomplete = False
    records = _records(src)
    out = []
    for i, record in enumerate(records):
        if record.is_current:
            out.append(_case_from_record(record, src.rec(i)))
    if len(out) < len(records):
        log.info("%s: imported the %d current version(s); %d superseded or deleted version(s) left out", src.path,
                 len(out), len(records) - len(out))
    return out


def read_records(path: str | os.PathLike) -> list[EditRecord]:
    """Every line of a store export (:func:`write_jsonl`) as an EditRecord, history and tombstones included."""
    return _records(_load(path))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def record_to_json(record: EditRecord) -> dict[str, Any]:
    """One export line: the EditRecord's fields, tuples as lists and datetimes as ISO 8601 strings."""
    return {
        "id": record.id, "version": record.version, "prompt": record.prompt, "target_new": record.target_new,
        "subject": record.subject, "ground_truth": record.ground_truth, "rephrases": list(record.rephrases),
        "metadata": dict(record.metadata), "deleted": record.deleted, "valid_from": _iso(record.valid_from),
        "valid_to": _iso(record.valid_to),
    }


def write_jsonl(records: Iterable[EditRecord], path: str | os.PathLike) -> int:
    """Write records as JSON Lines, atomically: a temporary file beside ``path``, then os.replace. Returns the count.

    If anything fails (a record whose metadata is not JSON, a full disk) the temporary file is removed and ``path``
    is left as it was.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise _error(str(path), "the directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                try:
                    line = json.dumps(record_to_json(record), ensure_ascii=False, allow_nan=False)
                except (TypeError, ValueError) as e:
                    raise _error(str(path), f"edit {record.id} version {record.version} cannot be written as JSON: "
                                            f"{e}", field="metadata") from None
                f.write(line)
                f.write("\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return count


# --------------------------------------------------------------------------------------------------------------------
# Registry and detection


@dataclass(frozen=True)
class Format:
    """A source layout: how to recognise its first record, what it needs, and its parser."""

    name: str
    needs: str  # for messages: the keys that identify it
    matches: Callable[[Any], bool]  # given the file's top-level value
    parse: Callable[[_Source], list[EditCase]]

    def __call__(self, path: str | os.PathLike, *, skip_incomplete: bool = False) -> list[EditCase]:
        return self.parse(_load(path, skip_incomplete))


def _first(data: Any) -> dict | None:
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data[0]
    return None


def _has(*keys: str) -> Callable[[Any], bool]:
    def matches(data: Any) -> bool:
        first = _first(data)
        return first is not None and all(k in first for k in keys)

    return matches


def _rewrite_is(kind: type) -> Callable[[Any], bool]:
    def matches(data: Any) -> bool:
        first = _first(data)
        return first is not None and isinstance(first.get("requested_rewrite"), kind)

    return matches


def _is_sanitation(data: Any) -> bool:
    return isinstance(data, dict) and any(set(s) <= data.keys() for s in _SANITATION_SPLITS)


_FORMAT_LIST = [  # detection order matters: the most specific layouts first
    Format("editmem", "id, version, prompt, target_new", _has("id", "version", "prompt", "target_new"),
           _parse_editmem),
    Format("mquake", "requested_rewrite (array), questions", _rewrite_is(list), _parse_mquake),
    Format("counterfact_rome", "requested_rewrite (object)", _rewrite_is(dict), _parse_counterfact_rome),
    Format("zsre", "src, alt, answers", _has("src", "alt", "answers"), _parse_zsre),
    Format("counterfact_easyedit", "prompt, target_new, locality_prompt",
           _has("prompt", "target_new", "locality_prompt"), _parse_counterfact_easyedit),
    Format("knowedit", "prompt, target_new", _has("prompt", "target_new"), _parse_knowedit),
    Format("sanitation", "an object with success+locality or K_F+K_R", _is_sanitation, _parse_sanitation),
]
FORMATS: dict[str, Format] = {}
for _f in _FORMAT_LIST:
    if _f.name in FORMATS:
        raise RuntimeError(f"format {_f.name!r} registered twice")
    FORMATS[_f.name] = _f

# Known layouts that are not fact edits: recognised only to say so clearly.
_REJECTED = [
    (("text", "labels", "concept"), "KnowEdit WikiBio (text/labels/concept) is a long-form text-editing task, not a "
                                    "fact edit; it is not supported (yet)"),
    (("ent", "pos", "neg"), "KnowEdit ConvSent (ent/pos/neg) is a sentiment-editing task, not a fact edit; it is not "
                            "supported (yet)"),
    (("known_id", "template", "attribute"), "ROME 'knowns' (causal-tracing facts) have no target_new: not an edit "
                                            "set"),
    (("goal", "sol1", "sol2"), "PIQA (goal/sol1/sol2) is commonsense QA used as locality data, not an edit set"),
]


def _detect(src: _Source) -> str:
    data = src.data
    if isinstance(data, dict):
        if _is_sanitation(data):
            return "sanitation"
        # a single JSON object: one record (e.g. a one-line JSONL export)
        src.data, src.lines = [data], [1] if src.lines is not None else None
        data = src.data
    if not isinstance(data, list):
        raise _error(src.path, f"expected a JSON array of records, a JSON Lines file or a Sanitation object; found a "
                               f"JSON {_typename(data)}")
    if not data:
        raise _error(src.path, "the file has no records, so its format cannot be detected (name it explicitly)")
    first = src.rec(0)
    _obj(first, data[0], None)
    for fmt in _FORMAT_LIST:
        if fmt.matches(data):
            return fmt.name
    for keys, reason in _REJECTED:
        if all(k in data[0] for k in keys):
            raise _error(src.path, reason)
    tried = "; ".join(f"{f.name} ({f.needs})" for f in _FORMAT_LIST)
    raise first.fail(None, f"matches no known format. Tried: {tried}. Found keys: {sorted(data[0])}")


def detect_format(path: str | os.PathLike) -> str:
    """The name in FORMATS of the file's layout, judged from the keys of its first record (FormatError if none)."""
    return _detect(_load(path))


def read_cases(path: str | os.PathLike, format: str = "auto", *, skip_incomplete: bool = False) -> list[EditCase]:
    """Every case in the file, all validated before any is returned. ``format`` is a FORMATS name or "auto".

    ``skip_incomplete`` leaves out (and logs) records whose prompt or target is an empty string instead of failing.
    """
    if format != "auto" and format not in FORMATS:
        raise _error(str(path), f"unknown format {format!r}; known: auto, {', '.join(FORMATS)}")
    src = _load(path, skip_incomplete)
    if format == "auto":
        format = _detect(src)
    elif isinstance(src.data, dict) and format not in ("sanitation", "knowedit"):
        src.data, src.lines = [src.data], [1] if src.lines is not None else None  # a one-record file
    return FORMATS[format].parse(src)
