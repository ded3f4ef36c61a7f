"""Property test: random add/update/delete/rollback/reopen sequences, some of them written through a second handle on
the same store (as another process would), keep SQL, the FAISS index and search in agreement after every step."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memory import EditMemory, NotFoundError, ValidationError

WORDS = ("capital", "France", "tower", "Paris", "apple", "founded", "language", "Brazil", "river", "longest",
         "born", "city", "CEO", "Acme", "moon")
phrases = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)


class StoreMachine(RuleBasedStateMachine):
    """The model: edit id -> (number of versions, deleted, current target, current prompt)."""

    index_kind = "flat"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="editmem-prop-"))
        self.url = f"sqlite:///{self.dir / 's.db'}"
        self.mem = EditMemory.open(self.url, encoder="hashing-64", index=self.index_kind)
        self.other: EditMemory | None = None
        self.model: dict[int, dict] = {}

    def teardown(self) -> None:
        for handle in (self.mem, self.other):
            if handle is not None:
                handle.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def writer(self, use_other: bool) -> EditMemory:
        if use_other:
            if self.other is None:
                self.other = EditMemory.open(self.url, index=self.index_kind)
            return self.other
        return self.mem

    def live(self) -> list[int]:
        return sorted(i for i, m in self.model.items() if not m["deleted"])

    @rule(prompt=phrases, answer=phrases, other=st.booleans())
    def add(self, prompt: str, answer: str, other: bool) -> None:
        rec = self.writer(other).add(prompt, answer)
        assert rec.id not in self.model and rec.version == 1
        self.model[rec.id] = {"versions": [(prompt, answer)], "deleted": False, "n": 1}

    @rule(items=st.lists(st.tuples(phrases, phrases), min_size=1, max_size=4))
    def add_many(self, items: list[tuple[str, str]]) -> None:
        recs = self.mem.add_many([{"prompt": p, "target_new": t} for p, t in items])
        for rec, (p, t) in zip(recs, items):
            self.model[rec.id] = {"versions": [(p, t)], "deleted": False, "n": 1}

    @precondition(lambda self: self.live())
    @rule(data=st.data(), prompt=st.one_of(st.none(), phrases), answer=phrases, other=st.booleans())
    def update(self, data: st.DataObject, prompt: str | None, answer: str, other: bool) -> None:
        edit_id = data.draw(st.sampled_from(self.live()))
        m = self.model[edit_id]
        new = (prompt or m["versions"][-1][0], answer)
        fields = {"target_new": answer} if prompt is None else {"prompt": prompt, "target_new": answer}
        rec = self.writer(other).update(edit_id, **fields)
        if new != m["versions"][-1]:
            m["versions"].append(new)
            m["n"] += 1
        assert (rec.version, (rec.prompt, rec.target_new)) == (m["n"], new)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), other=st.booleans())
    def delete(self, data: st.DataObject, other: bool) -> None:
        edit_id = data.draw(st.sampled_from(self.live()))
        tomb = self.writer(other).delete(edit_id)
        m = self.model[edit_id]
        m["n"] += 1
        m["deleted"] = True
        m["versions"].append(None)
        assert tomb.deleted and tomb.version == m["n"]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), other=st.booleans())
    def rollback(self, data: st.DataObject, other: bool) -> None:
        edit_id = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model[edit_id]
        version = data.draw(st.integers(1, m["n"]))
        content = m["versions"][version - 1]
        if content is None:
            with pytest.raises(ValidationError):
                self.writer(other).rollback(edit_id, version)
            return
        rec = self.writer(other).rollback(edit_id, version)
        if m["deleted"] or content != m["versions"][-1]:
            m["n"] += 1
            m["versions"].append(content)
            m["deleted"] = False
        assert (rec.version, (rec.prompt, rec.target_new), rec.deleted) == (m["n"], content, False)

    @rule(other=st.booleans())
    def reopen(self, other: bool) -> None:
        if other and self.other is not None:
            self.other.close()
            self.other = None
        else:
            self.mem.close()
            self.mem = EditMemory.open(self.url, index=self.index_kind)

    @rule()
    def unknown_id(self) -> None:
        with pytest.raises(NotFoundError):
            self.mem.get(max(self.model, default=0) + 1)

    @invariant()
    def sql_index_and_search_agree(self) -> None:
        for handle in (self.mem, self.other):
            if handle is None:
                continue
            assert handle.index_ids() == handle.current_row_ids()
            assert len(handle) == len(self.live())
            for text in ("capital France", "apple founded", "moon river"):
                for hit in handle.search(text, k=4):
                    m = self.model[hit.edit.id]
                    assert not m["deleted"] and hit.edit.is_current and hit.edit.version == m["n"]
                    assert (hit.edit.prompt, hit.edit.target_new) == m["versions"][-1]
            current = {r.id: (r.version, r.prompt, r.target_new) for r in handle.list()}
            assert current == {i: (self.model[i]["n"], *self.model[i]["versions"][-1]) for i in self.live()}


class HNSWStoreMachine(StoreMachine):
    index_kind = "hnsw"


SETTINGS = settings(max_examples=30, stateful_step_count=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestStoreProperties = StoreMachine.TestCase
TestStoreProperties.settings = SETTINGS
TestStoreHNSWProperties = HNSWStoreMachine.TestCase
TestStoreHNSWProperties.settings = settings(SETTINGS, max_examples=12)
