"""The live index: the file saved beside the store is loaded on open (not rebuilt) and answers exactly as a rebuild
does; deleted edits never come back; HNSW's tombstones are compacted past the threshold and the compacted index
answers as exact search over the live edits does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import memory.index as index_mod
from memory import EditMemory
from memory.sync import IndexSync

ENC = "hashing-64"
QUERIES = [f"fact {i} about topic {i % 7}" for i in range(0, 120, 3)] + ["topic 3", "fact about nothing"]


def _fill(mem: EditMemory, n: int) -> list[int]:
    return [r.id for r in mem.add_many({"prompt": f"fact {i} about topic {i % 7} and item {i * 13 % 29}",
                                        "target_new": str(i)} for i in range(n))]


def _results(mem: EditMemory, k: int = 5) -> list[list[tuple[int, float]]]:
    return [[(h.edit.id, round(h.score, 5)) for h in row] for row in mem.search_many(QUERIES, k)]


def _same(a: list[list[tuple[int, float]]], b: list[list[tuple[int, float]]]) -> bool:
    """Equal scores row for row, and equal ids except among ties at a row's last score (either may be cut off)."""
    for ra, rb in zip(a, b, strict=True):
        if [s for _, s in ra] != [s for _, s in rb]:
            return False
        if ra and {i for i, s in ra if s > ra[-1][1]} != {i for i, s in rb if s > rb[-1][1]}:
            return False
    return True


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_saved_index_is_loaded_and_equals_a_rebuild(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with EditMemory.open(url, encoder=ENC, index=kind) as mem:
        ids = _fill(mem, 150)
        for i in ids[:20]:
            mem.delete(i)
        for i in ids[20:30]:
            mem.update(i, prompt=f"updated prompt {i}")
    assert (tmp_path / "s.db.faiss").is_file()

    def no_rebuild(self: IndexSync) -> None:
        raise AssertionError("the saved index should have been loaded, not rebuilt")

    with monkeypatch.context() as m:
        m.setattr(IndexSync, "rebuild", no_rebuild)
        mem = EditMemory.open(url, index=kind)
    with mem:
        assert mem.index_kind == kind
        loaded = _results(mem)
        mem.verify()
        mem.rebuild_index()
        assert _same(_results(mem), loaded)
        assert not {i for row in loaded for i, _ in row} & set(ids[:20])


def test_index_behind_the_store_catches_up_from_the_log(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with EditMemory.open(url, encoder=ENC, index="flat") as mem:
        ids = _fill(mem, 50)
    saved = (tmp_path / "s.db.faiss").read_bytes()
    with EditMemory.open(url, index="flat") as mem:
        mem.delete(ids[0])
        extra = mem.add("fact 0 about topic 0 and item 0 again", "new")
    (tmp_path / "s.db.faiss").write_bytes(saved)  # an index file from before those two changes
    with EditMemory.open(url, index="flat") as mem:
        found = {h.edit.id for h in mem.search("fact 0 about topic 0 and item 0", k=50)}
        assert ids[0] not in found and extra.id in found
        mem.verify()


def _exact(mem: EditMemory, k: int) -> list[list[tuple[int, float]]]:
    """Brute force over the live edits' stored key vectors: (edit id, cosine) best first."""
    from sqlalchemy import select

    from memory.schema import CURRENT, edits

    with mem._read() as conn:
        query = select(edits.c.row_id, edits.c.edit_id).where(CURRENT)
        pairs = sorted((int(r), int(e)) for r, e in conn.execute(query))
    keys = mem._index_sync.vectors_for([r for r, _ in pairs])
    scores = mem._encode(QUERIES) @ keys.T
    return [[(pairs[j][1], round(float(row[j]), 5)) for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def test_hnsw_tombstones_are_compacted_and_results_stay_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(index_mod, "STALE_MIN", 10)
    monkeypatch.setattr(index_mod, "STALE_FRACTION", 0.1)
    url = f"sqlite:///{tmp_path / 's.db'}"
    swaps = []
    real = IndexSync._swap

    def counting(self: IndexSync, index: index_mod.VectorIndex) -> None:
        swaps.append(self.index.n_stale)  # the tombstones of the index being replaced
        real(self, index)

    monkeypatch.setattr(IndexSync, "_swap", counting)
    with EditMemory.open(url, encoder=ENC, index="hnsw") as mem:
        ids = _fill(mem, 200)
        swaps.clear()
        deleted = ids[::3]
        for i in deleted:
            mem.delete(i)
            assert mem.wait_for_index(30)  # compaction runs in the background (tests/test_compaction.py)
            assert mem._index.n_stale <= max(10, 0.1 * mem._index.ntotal) + 1
        assert swaps and all(n > 10 for n in swaps)  # compacted on the threshold
        got = _results(mem)
        assert not {i for row in got for i, _ in row} & set(deleted)
        assert _same(got, _exact(mem, 5))
        mem.verify()


def test_hnsw_tombstone_filter_follows_every_removal(tmp_path: Path) -> None:
    """The filter that hides tombstones is kept between searches; each removal (and a reload) must renew it."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = index_mod.VectorIndex(index_mod.IndexHeader("u", "e", 16, "hnsw", 0))
    index.add(np.arange(1, 201), vectors)

    def top(i: int) -> int:
        return int(index.search(vectors[i - 1][None, :], 1)[1][0, 0])

    assert top(5) == 5 and top(9) == 9
    index.remove([5])
    assert top(5) != 5 and top(9) == 9  # the filter was built here ...
    index.remove([9])
    assert top(9) != 9 and top(5) != 5  # ... and renewed by the next removal
    index.save(tmp_path / "i.faiss")
    index = index_mod.VectorIndex.load(tmp_path / "i.faiss")  # type: ignore[assignment]
    assert index is not None and index.n_stale == 2 and top(5) not in (5, 9) and top(9) not in (5, 9)


def test_index_file_cut_short_is_ignored(tmp_path: Path) -> None:
    """The payload is read from the file as FAISS asks for it (not read whole first); a file cut short (a full
    disk, a copy interrupted) is still refused, so the store rebuilds from SQL."""
    index = index_mod.VectorIndex(index_mod.IndexHeader("u", "e", 8, "hnsw", 3))
    index.add(np.arange(1, 101), np.eye(8, dtype=np.float32)[np.arange(100) % 8])
    index.remove([4])
    path = tmp_path / "i.faiss"
    index.save(path)
    loaded = index_mod.VectorIndex.load(path)
    assert loaded is not None and loaded.ntotal == 100 and loaded.n_stale == 1 and loaded.seq == 3
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        assert index_mod.VectorIndex.load(path) is None


def test_a_search_depth_per_call_reaches_the_hnsw_index_and_the_router_passes_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``search_many(..., ef_search=N)`` searches the HNSW index at depth N for that call only (the index's own
    depth is untouched); at a depth past the store's size the results are exact search's. The router searches at
    its ``ef_search``; a bad depth is refused."""
    from memory.errors import ValidationError
    from scope.classifier import CosineScope
    from scope.router import ROUTE_EF_SEARCH, Router

    depths: list[int | None] = []
    real = index_mod.VectorIndex.search

    def spy(self, queries, k, *, ef_search=None):
        depths.append(ef_search)
        return real(self, queries, k, ef_search=ef_search)

    monkeypatch.setattr(index_mod.VectorIndex, "search", spy)
    with EditMemory.open("sqlite://", encoder=ENC, index="hnsw") as hnsw, \
            EditMemory.open("sqlite://", encoder=ENC, index="flat") as flat:
        _fill(hnsw, 400)
        _fill(flat, 400)
        hnsw.wait_for_index()
        default = hnsw._index_sync.index.ef_search
        deep = [[(h.edit.id, round(h.score, 5)) for h in row] for row in hnsw.search_many(QUERIES, 5, ef_search=1000)]
        assert depths[-1] == 1000 and hnsw._index_sync.index.ef_search == default
        assert _same(deep, _results(flat))
        hnsw.search_many(QUERIES[:2], 5)
        assert depths[-1] is None
        for bad in (0, -3, 2.5, True, "256"):
            with pytest.raises(ValidationError, match="ef_search"):
                hnsw.search_many(QUERIES[:1], 5, ef_search=bad)
        Router(hnsw, CosineScope(0.5, None)).route(["fact 3 about topic 3"])
        assert depths[-1] == ROUTE_EF_SEARCH
        Router(hnsw, CosineScope(0.5, None), ef_search=64).route(["fact 3 about topic 3"])
        assert depths[-1] == 64
        with pytest.raises(ValidationError, match="ef_search"):
            Router(hnsw, CosineScope(0.5, None), ef_search=0)


def test_the_index_file_keeps_what_its_build_held(tmp_path: Path) -> None:
    """``built`` (vectors of the last build) round-trips; a file written before it existed counts as fully built."""
    import json

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    index = index_mod.VectorIndex(index_mod.IndexHeader("u", "e", 8, "hnsw", 3))
    index.add(np.arange(1, 21), vectors[:20])
    index.built = index.ntotal
    index.add(np.arange(21, 31), vectors[20:])
    assert (index.built, index.grown) == (20, 10)
    index.save(tmp_path / "i.faiss")
    again = index_mod.VectorIndex.load(tmp_path / "i.faiss")
    assert again is not None and (again.built, again.grown) == (20, 10)
    # the same file with a header lacking "built", as an earlier editmem wrote it
    raw = (tmp_path / "i.faiss").read_bytes()
    start = len(index_mod.MAGIC) + 8
    n = int.from_bytes(raw[len(index_mod.MAGIC):start], "little")
    header = json.loads(raw[start:start + n])
    del header["built"]
    old = json.dumps(header).encode()
    (tmp_path / "old.faiss").write_bytes(index_mod.MAGIC + len(old).to_bytes(8, "little") + old + raw[start + n:])
    loaded = index_mod.VectorIndex.load(tmp_path / "old.faiss")
    assert loaded is not None and (loaded.built, loaded.grown) == (30, 0)
