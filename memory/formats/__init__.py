"""Edit data sets in, the store's JSONL out: one parser per source layout, each producing :class:`EditCase`.

This package: :mod:`~memory.formats.reading` (loading a file, locating records, field checks),
:mod:`~memory.formats.benchmarks` (the benchmark layouts), :mod:`~memory.formats.jsonl` (the store's own JSONL and the
EditCase <-> metadata mapping); here, the registry ``FORMATS``, detection and ``read_cases``.

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

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memory.formats.benchmarks import (
    _SANITATION_SPLITS,
    _parse_counterfact_easyedit,
    _parse_counterfact_rome,
    _parse_knowedit,
    _parse_mquake,
    _parse_sanitation,
    _parse_zsre,
)
from memory.formats.jsonl import (
    _parse_editmem,
    case_from_record,
    case_to_metadata,
    read_records,
    record_to_json,
    write_jsonl,
)
from memory.formats.reading import _error, _load, _obj, _Source, _typename
from memory.records import EditCase

__all__ = [
    "FORMATS", "Format", "case_from_record", "case_to_metadata", "detect_format", "read_cases", "read_records",
    "record_to_json", "write_jsonl",
]

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
