"""The store's CLI verbs through ``serve.cli.main``: output, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve.cli import main
from tests.test_store_fixtures import FACTS, write_knowedit

pytestmark = pytest.mark.usefixtures("editmem_cache")  # PostgreSQL index files go to tmp_path


@pytest.fixture
def cli(store_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run ``editmem --store URL ...`` on an initialised store; returns (exit code, stdout, stderr)."""
    monkeypatch.delenv("EDITMEM_STORE", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--store", store_url, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("init", "--encoder", "hashing-256")
    assert code == 0 and "encoder hashing-256" in out and "0 edits" in out
    return run


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("editmem: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_add_list_show_query(cli) -> None:
    code, out, _ = cli("add", "--prompt", "The capital of France is", "--target", "Lyon", "--subject", "France",
                       "--ground-truth", "Paris", "--rephrase", "France's capital is", "--rephrase", "Capital: France")
    assert code == 0 and out.strip() == "added edit 1 (version 1)"
    cli("add", "--prompt", "Apple was founded by", "--target", "Bill Gates")
    code, out, _ = cli("list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "VER", "STATE", "SUBJECT", "PROMPT", "TARGET"]
    assert len(lines) == 3 and "Lyon" in lines[1] and "Bill Gates" in lines[2]
    code, out, _ = cli("list", "--json", "--limit", "1")
    assert code == 0 and json.loads(out)["target_new"] == "Lyon" and len(out.splitlines()) == 1
    code, out, _ = cli("show", "1")
    assert code == 0 and "ground_truth: Paris" in out and out.count("rephrase:") == 2
    code, out, _ = cli("show", "1", "--json")
    assert json.loads(out)["rephrases"] == ["France's capital is", "Capital: France"]
    code, out, _ = cli("query", "capital of France", "-k", "1")
    assert code == 0 and len(out.splitlines()) == 2 and "Lyon" in out.splitlines()[1]
    code, out, _ = cli("query", "capital of France", "--json")
    hits = json.loads(out)
    assert code == 0 and hits[0]["id"] == 1 and hits[0]["score"] >= hits[1]["score"]


def test_update_delete_rollback_history(cli) -> None:
    cli("add", "--prompt", "The capital of France is", "--target", "Lyon")
    code, out, _ = cli("update", "1", "--target", "Nice")
    assert code == 0 and out.strip() == "updated edit 1: version 2"
    code, out, _ = cli("update", "1", "--target", "Nice")
    assert code == 0 and "unchanged" in out
    code, out, _ = cli("delete", "1")
    assert code == 0 and "rollback 1 2" in out
    code, out, _ = cli("list")
    assert out.strip() == "no edits"
    code, out, _ = cli("list", "--all")
    assert "deleted" in out
    code, out, _ = cli("rollback", "1", "1")
    assert code == 0 and "version 4" in out
    code, out, _ = cli("history", "1")
    rows = [line.split()[:2] for line in out.splitlines()[1:]]
    assert rows == [["1", "superseded"], ["2", "superseded"], ["3", "deleted"], ["4", "current"]]
    code, out, _ = cli("show", "1")
    assert "target_new:   Lyon" in out
    code, out, _ = cli("history", "1", "--json")
    assert [json.loads(line)["version"] for line in out.splitlines()] == [1, 2, 3, 4]


def test_delete_several_in_one_change(cli) -> None:
    for town in ("Lyon", "Nice", "Lille"):
        cli("add", "--prompt", f"The best town for {town} fans is", "--target", town)
    code, _, err = cli("delete", "1", "3", "7")
    assert code == 2 and "no edit with id 7" in err
    code, out, _ = cli("list")
    assert len(out.strip().splitlines()) == 4  # nothing deleted: a header and three edits
    code, out, _ = cli("delete", "1", "3")
    assert code == 0 and "deleted 2 edits" in out
    code, out, _ = cli("list", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [2]


def test_import_export(cli, tmp_path: Path) -> None:
    data = write_knowedit(tmp_path / "facts.json", FACTS)
    code, out, _ = cli("import", str(data))
    assert code == 0 and out.startswith("imported 5 edits")
    code, out, _ = cli("import", str(data))
    assert code == 0 and out.startswith("imported 0 edits")
    exported = tmp_path / "out.jsonl"
    code, out, _ = cli("export", str(exported))
    assert code == 0 and out.strip() == f"exported 5 edits to {exported}"
    assert len(exported.read_text().splitlines()) == 5
    code, out, _ = cli("export", str(tmp_path / "all.jsonl"), "--history")
    assert code == 0 and "5 versions" in out


def test_errors_are_one_line_with_exit_2(cli, tmp_path: Path) -> None:
    cli("add", "--prompt", "The capital of France is", "--target", "Lyon")
    for argv, needle in [
        (("show", "9"), "no edit with id 9"),
        (("show", "1", "--version", "4"), "has no version 4"),
        (("history", "9"), "no edit with id 9"),
        (("update", "9", "--target", "x"), "no edit with id 9"),
        (("delete", "9"), "no edit with id 9"),
        (("rollback", "1", "3"), "has no version 3"),
        (("add", "--prompt", "  ", "--target", "x"), "prompt: must not be empty"),
        (("update", "1"), "nothing to update"),
        (("import", str(tmp_path / "missing.json")), "no such file"),
    ]:
        code, out, err = cli(*argv)
        assert code == 2 and out == "", argv
        assert needle in _error_line(err), (argv, err)
    bad = write_knowedit(tmp_path / "bad.json", [FACTS[0], {"prompt": "p"}])
    code, _, err = cli("import", str(bad))
    assert code == 2 and "bad.json" in _error_line(err) and "target_new" in err
    code, out, _ = cli("list")
    assert len(out.splitlines()) == 2  # unchanged by the failed import


@pytest.mark.parametrize("url, needle", [
    ("editmem.db", "malformed store URL"),
    ("mysql://u@h/db", "unsupported store URL scheme"),
    ("postgresql+psycopg://u@127.0.0.1:1/db", "127.0.0.1:1"),
])
def test_bad_store_url(url: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--store", url, "list"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in _error_line(err)


def test_read_commands_do_not_create_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITMEM_STORE", f"sqlite:///{tmp_path / 'none.db'}")
    for argv in (["list"], ["show", "1"], ["query", "x"], ["export", str(tmp_path / "x.jsonl")]):
        assert main(argv) == 2
        assert "editmem init" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "none.db").exists()


def test_store_url_from_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITMEM_STORE", f"sqlite:///{tmp_path / 'env.db'}")
    assert main(["init", "--encoder", "hashing-64"]) == 0
    assert main(["add", "--prompt", "The sky is", "--target", "green"]) == 0
    capsys.readouterr()
    assert main(["query", "sky", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["target_new"] == "green"
    assert (tmp_path / "env.db").is_file()
