"""Background compaction of the live index (memory/compaction.py): while the new index is being built, searches answer
from the old one and writes go on; every write made during the build is in the new index once it is swapped in; a
rebuild or a close during the build wins over it.

The build is held at a gate (the compaction module's VectorIndex is replaced by one whose ``add`` waits for an
event), so "during the compaction" is a fact of the test, not a race."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import memory.compaction as compaction_mod
import memory.index as index_mod
import memory.sync as sync_mod
from memory import EditMemory
from tests.test_index_persist import _exact, _fill, _results, _same

ENC = "hashing-64"


class _Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Gate]:
    g = _Gate()

    class GatedIndex(index_mod.VectorIndex):
        def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
            g.entered.set()
            assert g.release.wait(30), "the test never opened the gate"
            super().add(ids, vectors)

    monkeypatch.setattr(compaction_mod, "VectorIndex", GatedIndex)
    yield g
    g.release.set()  # never leave a compaction thread waiting


@pytest.fixture(params=["file", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 's.db'}" if request.param == "file" else "sqlite://"


def _top(mem: EditMemory, prompt: str) -> int:
    return mem.search(prompt, k=1)[0].edit.id


def test_writes_during_a_compaction_are_found_after_it_and_searches_answer_during_it(
        url: str, gate: _Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "STALE_MIN", 10)
    monkeypatch.setattr(index_mod, "STALE_FRACTION", 0.1)
    with EditMemory.open(url, encoder=ENC, index="hnsw") as mem:
        ids = _fill(mem, 200)
        deleted = ids[:25]
        for i in deleted:  # past 20 tombstones the compaction starts, and waits at the gate
            mem.delete(i)
        assert gate.entered.wait(30) and mem.index_compacting
        old = mem._index
        # writes during the build: adds, deletes, updates
        added = [r.id for r in mem.add_many({"prompt": f"written during compaction {j}", "target_new": str(j)}
                                            for j in range(30))]
        for i in ids[25:40]:
            mem.delete(i)
        deleted += ids[25:40]
        for i in ids[40:45]:
            mem.update(i, prompt=f"updated during compaction {i}")
        # searches during the build answer, from the old index, with every write so far and no deleted edit
        assert mem.index_compacting and mem._index is old
        during = _results(mem)
        assert all(during) and not {i for row in during for i, _ in row} & set(deleted)
        assert [_top(mem, f"written during compaction {j}") for j in range(30)] == added
        seq, live = old.seq, mem.current_row_ids()
        gate.release.set()
        assert mem.wait_for_index(30) and not mem.index_compacting
        assert mem._index is not old  # swapped
        assert mem._index.n_stale < old.n_stale
        # the journal replayed the build's writes: current at once, before any search's catch-up from the log
        assert mem._index.seq == seq and mem._index.ids() == live
        # every write of the build is in the new index; deletions stay out; results are exact search's
        assert [_top(mem, f"written during compaction {j}") for j in range(30)] == added
        assert [_top(mem, f"updated during compaction {i}") for i in ids[40:45]] == ids[40:45]
        after = _results(mem)
        assert not {i for row in after for i, _ in row} & set(deleted)
        assert _same(after, _exact(mem, 5))
        mem.verify()
    if url != "sqlite://":
        with EditMemory.open(url, index="hnsw") as mem:  # the swapped-in index was saved
            mem.verify()
            assert _same(_results(mem), after)


def test_a_flat_index_grows_into_hnsw_in_the_background(url: str, gate: _Gate,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_mod, "HNSW_AUTO_THRESHOLD", 50)
    with EditMemory.open(url, encoder=ENC) as mem:
        ids = _fill(mem, 60)
        assert gate.entered.wait(30) and mem.index_kind == "flat"
        assert mem.search("fact 7 about topic 0 and item 4", k=1)[0].edit.id == ids[7]  # flat still answers
        more = [r.id for r in mem.add_many({"prompt": f"late {j}", "target_new": "x"} for j in range(20))]
        mem.delete(ids[0])
        seq, live = mem._index.seq, mem.current_row_ids()
        gate.release.set()
        assert mem.wait_for_index(30)
        assert mem.index_kind == "hnsw"
        assert mem._index.seq == seq and mem._index.ids() == live  # no catch-up needed
        assert [_top(mem, f"late {j}") for j in range(20)] == more
        assert ids[0] not in {h.edit.id for h in mem.search("fact 0 about topic 0 and item 0", k=10)}
        mem.verify()


def test_an_auto_hnsw_index_compacted_near_the_threshold_stays_hnsw(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_mod, "HNSW_AUTO_THRESHOLD", 50)
    monkeypatch.setattr(sync_mod, "BACKGROUND_COMPACTION", False)
    monkeypatch.setattr(index_mod, "STALE_MIN", 10)
    monkeypatch.setattr(index_mod, "STALE_FRACTION", 0.1)
    with EditMemory.open(f"sqlite:///{tmp_path / 's.db'}", encoder=ENC) as mem:
        ids = _fill(mem, 60)
        assert mem.index_kind == "hnsw"
        mem.delete_many(ids[:20])  # 40 live, 20 tombstones: compacted, below the threshold but above half of it
        assert mem.index_kind == "hnsw" and mem._index.n_stale == 0
        mem.delete_many(ids[20:40])  # 20 live: compacted into a flat index
        assert mem.index_kind == "flat" and mem._index.ids() == mem.current_row_ids()
        assert _top(mem, "fact 45 about topic 3 and item 5") == ids[45]
        mem.verify()


def test_an_explicit_rebuild_during_a_compaction_wins(tmp_path: Path, gate: _Gate,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_mod, "HNSW_AUTO_THRESHOLD", 50)
    with EditMemory.open(f"sqlite:///{tmp_path / 's.db'}", encoder=ENC) as mem:
        _fill(mem, 60)
        assert gate.entered.wait(30)
        mem.rebuild_index("flat")  # synchronous, from SQL; the background build is cancelled
        rebuilt = mem._index
        gate.release.set()
        assert mem.wait_for_index(30)
        assert mem._index is rebuilt and mem.index_kind == "flat"
        mem.verify()


def test_close_during_a_compaction_keeps_a_consistent_index(tmp_path: Path, gate: _Gate,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "STALE_MIN", 10)
    monkeypatch.setattr(index_mod, "STALE_FRACTION", 0.1)
    url = f"sqlite:///{tmp_path / 's.db'}"
    mem = EditMemory.open(url, encoder=ENC, index="hnsw")
    ids = _fill(mem, 200)
    for i in ids[:25]:
        mem.delete(i)
    assert gate.entered.wait(30)
    threading.Timer(0.2, gate.release.set).start()  # close cancels, then waits for the thread to end
    mem.close()
    assert not mem.index_compacting
    with EditMemory.open(url, index="hnsw") as again:
        again.verify()
        assert not {h.edit.id for h in again.search("fact 1 about topic 1 and item 13", k=20)} & set(ids[:25])


def test_bench_compaction_reports_the_build_and_finds_its_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.bench_compaction import run

    monkeypatch.setattr(sync_mod, "HNSW_AUTO_THRESHOLD", 60)
    out = run("hashing-64", n_queries=10, write_every=1)
    assert (out["kind_before"], out["kind_after"]) == ("flat", "hnsw")
    assert out["writes_during_found_after"] == out["writes_during"]
    assert out["search_before"]["n"] == out["search_after"]["n"] == 10


def test_an_hnsw_graph_that_outgrows_its_build_is_rebuilt_in_the_background(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "GROWN_MIN", 40)
    monkeypatch.setattr(index_mod, "GROWN_FRACTION", 0.5)
    builds: list[int] = []
    real = sync_mod.IndexSync._swap

    def counting(self: sync_mod.IndexSync, index: index_mod.VectorIndex) -> None:
        builds.append(index.built)
        real(self, index)

    monkeypatch.setattr(sync_mod.IndexSync, "_swap", counting)
    with EditMemory.open(url, encoder=ENC, index="hnsw") as mem:
        assert mem._index.built == 0
        _fill(mem, 40)  # 40 added since the (empty) build: not past max(40, 0.5 x 0)
        assert mem.wait_for_index(30) and builds == [] and mem._index.grown == 40
        mem.add("the forty-first edit", "x")
        assert mem.wait_for_index(30) and builds == [41]  # rebuilt from the 41 live vectors
        assert (mem._index.built, mem._index.grown) == (41, 0)
        ids = [r.id for r in mem.add_many({"prompt": f"later edit {j}", "target_new": str(j)} for j in range(40))]
        assert mem.wait_for_index(30) and builds == [41]  # 40 more: not past max(40, 20.5)
        mem.delete(ids[0])  # a deletion adds nothing: still not outgrown
        mem.add("one more", "y")
        assert mem.wait_for_index(30) and builds == [41, 81]  # 41 grown > 40: rebuilt without the deleted one
        assert _same(_results(mem), _exact(mem, 5))
        mem.verify()


def test_a_flat_index_is_never_outgrown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "GROWN_MIN", 5)
    monkeypatch.setattr(index_mod, "GROWN_FRACTION", 0.5)
    with EditMemory.open("sqlite://", encoder=ENC, index="flat") as mem:
        _fill(mem, 30)
        assert mem._index.grown == 30 and not mem._index.outgrown and not mem.index_compacting


def test_growth_alone_rebuilds_nothing_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """GROWN_FRACTION is None by default (a grown graph measured no worse than a rebuilt one): no rebuild starts."""
    assert index_mod.GROWN_FRACTION is None
    monkeypatch.setattr(index_mod, "GROWN_MIN", 5)
    with EditMemory.open("sqlite://", encoder=ENC, index="hnsw") as mem:
        _fill(mem, 60)
        assert mem._index.grown == 60 and not mem._index.outgrown and not mem.index_compacting
