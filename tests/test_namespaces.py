"""Namespaces: two handles on one store in different namespaces never see each other's edits (search, list, history,
get, len, import, export, the change feed, the index), and a random sequence of operations over two namespaces never
leaks across (a Hypothesis state machine). The default namespace behaves as before namespaces."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memory import EditMemory, NotFoundError, ValidationError
from serve.cli import main

ENC = "hashing-64"
WORDS = ("capital", "France", "tower", "Paris", "apple", "founded", "language", "Brazil", "river", "born", "CEO")
phrases = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)
NAMESPACES = ("default", "tenant-b")


def test_two_namespaces_are_separate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with EditMemory.open(url, encoder=ENC) as a, EditMemory.open(url, namespace="tenant-b") as b:
        ea = a.add("The capital of France is", "Lyon")
        eb = b.add("The capital of France is", "Marseille")  # same content: not a duplicate across namespaces
        assert ea.id != eb.id
        assert [h.edit.id for h in a.search("capital of France", k=5)] == [ea.id]
        assert [h.edit.id for h in b.search("capital of France", k=5)] == [eb.id]
        assert len(a) == len(b) == 1
        for handle, foreign in ((a, eb.id), (b, ea.id)):
            for call in (lambda h=handle, i=foreign: h.get(i), lambda h=handle, i=foreign: h.history(i),
                         lambda h=handle, i=foreign: h.update(i, target_new="x"),
                         lambda h=handle, i=foreign: h.delete(i), lambda h=handle, i=foreign: h.rollback(i, 1)):
                with pytest.raises(NotFoundError):
                    call()
        assert {r for _, r, _ in a.changes()} == a.current_row_ids()
        assert {r for _, r, _ in b.changes()} == b.current_row_ids()
        assert a.namespaces() == ["default", "tenant-b"]
        a.verify(), b.verify()
        assert a.index_path is not None and b.index_path is not None and a.index_path != b.index_path
        assert a.index_path.name == "s.db.faiss" and b.index_path.name == "s.db.ns-tenant-b.faiss"


def test_import_export_per_namespace(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"fact {i} is", "target_new": str(i)}) + "\n" for i in range(3)))
    with EditMemory.open(url, encoder=ENC) as a, EditMemory.open(url, namespace="b") as b:
        assert a.import_file(data) == 3
        assert b.import_file(data) == 3  # skipping existing edits looks in this namespace only
        assert a.import_file(data) == 0
        b.delete(b.list()[0].id)
        assert b.export(tmp_path / "b.jsonl") == 2 and a.export(tmp_path / "a.jsonl") == 3
        assert b.export(tmp_path / "bh.jsonl", include_history=True) == 4


def test_bad_namespace_is_refused() -> None:
    for bad in ("", "a/b", "../x", " x", "x" * 65, 3):
        with pytest.raises(ValidationError, match="namespace"):
            EditMemory.open("sqlite://", encoder=ENC, namespace=bad)  # type: ignore[arg-type]


def test_index_files_reload_per_namespace(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with EditMemory.open(url, encoder=ENC, namespace="x") as x, EditMemory.open(url, namespace="y") as y:
        ex = x.add("alpha beta", "1")
        ey = y.add("alpha beta gamma", "2")
    with EditMemory.open(url, namespace="x") as x, EditMemory.open(url, namespace="y") as y:
        assert x.index_ids() == {r for _, r, _ in x.changes()} and [h.edit.id for h in x.search("alpha")] == [ex.id]
        assert [h.edit.id for h in y.search("alpha")] == [ey.id]


def test_cli_namespace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["--store", store, "init", "--encoder", ENC]) == 0
    assert main(["--store", store, "--namespace", "n1", "add", "--prompt", "The capital of France is",
                 "--target", "Lyon"]) == 0
    capsys.readouterr()
    assert main(["--store", store, "list"]) == 0
    assert "Lyon" not in capsys.readouterr().out
    assert main(["--store", store, "--namespace", "n1", "list"]) == 0
    assert "Lyon" in capsys.readouterr().out
    assert main(["--store", store, "--namespace", "bad/name", "list"]) == 2


class TwoNamespaces(RuleBasedStateMachine):
    """Random writes into two namespaces of one store (through two handles); after every step each handle sees
    exactly its own namespace's model, and the other's ids are NotFoundError."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="editmem-ns-"))
        url = f"sqlite:///{self.dir / 's.db'}"
        self.mem = {"default": EditMemory.open(url, encoder=ENC, index="flat")}
        self.mem["tenant-b"] = EditMemory.open(url, namespace="tenant-b", index="flat")
        self.model: dict[str, dict[int, dict]] = {ns: {} for ns in NAMESPACES}

    def teardown(self) -> None:
        for m in self.mem.values():
            m.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def live(self, ns: str) -> list[int]:
        return sorted(i for i, m in self.model[ns].items() if not m["deleted"])

    @rule(ns=st.sampled_from(NAMESPACES), prompt=phrases, answer=phrases)
    def add(self, ns: str, prompt: str, answer: str) -> None:
        rec = self.mem[ns].add(prompt, answer)
        self.model[ns][rec.id] = {"prompt": prompt, "target": answer, "deleted": False, "n": 1}

    @precondition(lambda self: any(self.live(ns) for ns in NAMESPACES))
    @rule(data=st.data(), answer=phrases)
    def update(self, data: st.DataObject, answer: str) -> None:
        ns = data.draw(st.sampled_from([n for n in NAMESPACES if self.live(n)]))
        i = data.draw(st.sampled_from(self.live(ns)))
        rec = self.mem[ns].update(i, target_new=answer)
        m = self.model[ns][i]
        if answer != m["target"]:
            m["target"], m["n"] = answer, m["n"] + 1
        assert rec.version == m["n"]

    @precondition(lambda self: any(self.live(ns) for ns in NAMESPACES))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        ns = data.draw(st.sampled_from([n for n in NAMESPACES if self.live(n)]))
        i = data.draw(st.sampled_from(self.live(ns)))
        self.mem[ns].delete(i)
        self.model[ns][i]["deleted"], self.model[ns][i]["n"] = True, self.model[ns][i]["n"] + 1

    @rule(ns=st.sampled_from(NAMESPACES), prompt=phrases)
    def search(self, ns: str, prompt: str) -> None:
        hits = self.mem[ns].search(prompt, k=10)
        assert {h.edit.id for h in hits} <= set(self.live(ns))
        assert len(hits) == min(10, len(self.live(ns)))

    @invariant()
    def isolated(self) -> None:
        for ns in NAMESPACES:
            mem, other = self.mem[ns], self.model[next(n for n in NAMESPACES if n != ns)]
            assert [r.id for r in mem.list()] == self.live(ns)
            assert len(mem) == len(self.live(ns))
            for i, m in self.model[ns].items():
                assert len(mem.history(i)) == m["n"]
            for i in list(other)[:5]:
                with pytest.raises(NotFoundError):
                    mem.get(i)
                with pytest.raises(NotFoundError):
                    mem.history(i)
            assert mem.index_ids() == mem.current_row_ids()


TestTwoNamespaces = TwoNamespaces.TestCase
TestTwoNamespaces.settings = settings(max_examples=25, stateful_step_count=12, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
