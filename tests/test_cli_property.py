"""A systematic guard for issue 14: the CLI driven in-process (``serve.cli.main``) with generated arguments and data
files (huge and negative numbers, odd unicode, lone surrogates, NUL bytes, empty and oversize strings, wrong types
in every field of a zsRE, CounterFact, KnowEdit or editmem record). Each run must end with exit 0 or 2, never an
uncaught exception, and a run that fails (exit 2) must leave the store's dump byte for byte as it was.

The default suite runs a bounded number of examples; the ``slow`` variant runs many more."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory import EditMemory
from memory.backup import dump
from serve.cli import main

# --- values -----------------------------------------------------------------------------------------------------------
odd_text = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(exclude_categories=[]), max_size=12),  # includes lone surrogates
    st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "bad \udcff byte", "é", "\u202e", "\n", "-x", "--help",
                     "0", "-1", "capital"]),
    st.text(min_size=2000, max_size=3000).map(lambda t: t or "x" * 2000),  # oversize
)
odd_int = st.one_of(st.integers(-3, 5), st.integers(min_value=-(10**30), max_value=10**30),
                    st.sampled_from([2**63 - 1, 2**63, -(2**63), 10**26]))
number_text = st.one_of(odd_int.map(str), odd_text)
junk = st.one_of(st.none(), st.booleans(), odd_int, st.floats(allow_nan=True), odd_text,
                 st.lists(st.one_of(odd_text, odd_int, st.none()), max_size=3),
                 st.dictionaries(st.text(max_size=5), odd_text, max_size=2))

BASE_RECORDS: dict[str, dict[str, Any]] = {
    "zsre": {"subject": "France", "src": "What is the capital of France?", "alt": "Lyon", "answers": ["Paris"],
             "rephrase": "France's capital is?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"},
    "counterfact_rome": {"case_id": 0, "requested_rewrite": {
        "prompt": "The capital of {} is", "subject": "France", "relation_id": "P36",
        "target_new": {"str": "Lyon", "id": "Q1"}, "target_true": {"str": "Paris", "id": "Q2"}},
        "paraphrase_prompts": ["France's capital is"], "neighborhood_prompts": ["The capital of Spain is"]},
    "knowedit": {"prompt": "The capital of France is", "target_new": "Lyon", "subject": "France",
                 "ground_truth": "Paris", "rephrase_prompt": "France's capital is"},
    "editmem": {"id": 1, "version": 1, "prompt": "The capital of France is", "target_new": "Lyon",
                "subject": "France", "ground_truth": None, "rephrases": [], "metadata": {}, "deleted": False},
}


@st.composite
def bad_record_file(draw: st.DrawFn) -> tuple[str, str]:
    """(format, file text): a valid record of a format with one field (possibly nested) set to junk or removed."""
    fmt = draw(st.sampled_from(sorted(BASE_RECORDS)))
    record = copy.deepcopy(BASE_RECORDS[fmt])
    target = record
    if fmt == "counterfact_rome" and draw(st.booleans()):
        target = record["requested_rewrite"]
        if draw(st.booleans()):
            target = target[draw(st.sampled_from(["target_new", "target_true"]))]
    key = draw(st.sampled_from(sorted(target)))
    if draw(st.integers(0, 4)) == 0:
        del target[key]
    else:
        target[key] = draw(junk)
    records = [record, copy.deepcopy(BASE_RECORDS[fmt])]
    if fmt == "editmem":
        records[1]["id"] = 2
        return fmt, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return fmt, json.dumps(records, ensure_ascii=False)


@st.composite
def command(draw: st.DrawFn, folder: str) -> list[str]:
    """One generated `editmem` argument list (after ``--store URL``)."""
    kind = draw(st.sampled_from(["show", "delete", "history", "rollback", "list", "query", "add", "update",
                                 "import", "export", "init", "verify", "dump", "raw"]))
    n = number_text
    if kind in ("show", "delete", "history"):
        return [kind, draw(n)] + (["--version", draw(n)] if kind == "show" and draw(st.booleans()) else [])
    if kind == "rollback":
        return [kind, draw(n), draw(n)]
    if kind == "list":
        return [kind, draw(st.sampled_from(["--limit", "--offset"])), draw(n)]
    if kind == "query":
        return [kind, draw(odd_text), "-k", draw(n)]
    if kind in ("add", "update"):
        head = ["add"] if kind == "add" else ["update", draw(n)]
        args = [*head, "--prompt", draw(odd_text), "--target", draw(odd_text)]
        if draw(st.booleans()):
            args += ["--subject", draw(odd_text)]
        if draw(st.booleans()):
            args += ["--rephrase", draw(odd_text)]
        return args
    if kind == "import":
        return ["import", f"{folder}/data.json", "--format", draw(st.sampled_from(["auto", *sorted(BASE_RECORDS)]))]
    if kind == "export":
        return ["export", draw(st.sampled_from([folder, f"{folder}/out.jsonl", f"{folder}/no/such/out.jsonl",
                                                 "/proc/no-such"]))]
    if kind == "init":
        return ["init", "--encoder", draw(st.sampled_from(["hashing-256", "hashing-3", "nope", folder, "/"]))]
    if kind == "dump":
        return ["dump", draw(st.sampled_from([folder, f"{folder}/d.jsonl"]))]
    if kind == "verify":
        return ["verify"]
    return draw(st.lists(odd_text, min_size=1, max_size=4))


def _snapshot(url: str, folder: Path) -> bytes:
    with EditMemory.open(url, create=False) as mem:
        dump(mem, folder / "snapshot.jsonl")
    return (folder / "snapshot.jsonl").read_bytes()


def _check(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 's.db'}"
        with EditMemory.open(url, encoder="hashing-256") as mem:
            mem.add("The capital of France is", "Lyon", subject="France")
            mem.add("The capital of Spain is", "Porto", subject="Spain")
            mem.delete(2)
        _, text = data.draw(bad_record_file(), label="data file")
        (folder / "data.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        argv = data.draw(command(str(folder)), label="argv")
        before = _snapshot(url, folder)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--store", url, *argv])
        assert code in (0, 2), (argv, code, err.getvalue())
        if code == 2:
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            assert lines and "error" in lines[-1], err.getvalue()
            assert _snapshot(url, folder) == before, f"a failed {argv[:1]} changed the store"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_cli_ends_in_exit_0_or_2_and_failures_change_nothing(data: st.DataObject) -> None:
    _check(data)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_cli_ends_in_exit_0_or_2_and_failures_change_nothing_long(data: st.DataObject) -> None:
    _check(data)
