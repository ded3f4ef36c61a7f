"""The FAISS index over version-row embeddings: a cache of SQL that can always be rebuilt from it.

FAISS ids are SQL version row ids. ``flat`` is ``IndexIDMap2(IndexFlatIP)`` (exact; removes in place). ``hnsw`` is
``IndexIDMap2(IndexHNSWFlat, inner product)``: HNSW cannot remove vectors, so removed ids are kept in a ``stale``
set, excluded at search time with an ID selector, and the owner rebuilds once they pile up (``needs_rebuild``; in
the background, from ``live_vectors``: :mod:`memory.compaction`). With ``GROWN_FRACTION`` set (off by default) the
owner also rebuilds an HNSW graph that has grown well past the size it was built at (``outgrown``).

File format (written atomically: temp file in the same folder, then ``os.replace``)::

    b"EDITMEM-FAISS\\n"  8-byte little-endian header length  JSON header  faiss.serialize_index bytes

The header holds ``format``, ``store_uid``, ``encoder``, ``dim``, ``kind``, ``seq`` (the change counter the index
reflects), ``stale`` (HNSW's removed ids) and ``built`` (how many vectors its last build held; a file without it
counts as built with all it holds). A file whose header does not match the store is ignored and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"EDITMEM-FAISS\n"
FILE_FORMAT = 1
KINDS = ("flat", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# recall@1 vs exact (BENCHMARKS.md, Store at scale): 1M random vectors 0.982 at 128, 0.999 at 256. 1M stored MiniLM
# embeddings (harder), graphs built in one batch, search over the encoder p50: round 8 0.980 at 224 (+1.70 ms), 0.982
# at 256 (+2.02); round 13, twice, quiet, paired by query: 0.983 at 224 (+1.80 / +1.82 ms), 0.985 at 256 (+2.42 /
# +2.01). 224 meets issue 17's "recall@1 >= 0.98 within 2 ms" in all three, 256 in none (750k after a compaction,
# loaded, round 11: 0.979 at 224). Routing searches deeper (scope.router.ROUTE_EF_SEARCH).
HNSW_EF_SEARCH = 224
STALE_MIN = 1000
STALE_FRACTION = 0.25
# With GROWN_FRACTION set, an HNSW graph is rebuilt once the vectors added since its build pass max(GROWN_MIN,
# GROWN_FRACTION x what it was built with) (0.5: a store that only grows is rebuilt at about 70k, 105k, 160k, ...
# 800k, 1.2M edits, each in the background). Off (None) by default: measured, a grown graph's recall@1 is not
# consistently below a rebuilt one's (1M: 0.978 vs 0.982, round 8; 1M a quarter grown: 0.984 vs 0.985; 150k a third
# grown: 0.968 vs 0.962, round 13), so the rebuilds' CPU buys nothing shown.
GROWN_MIN = 50_000
GROWN_FRACTION: float | None = None  # e.g. 0.5
SMALL_BATCH = 20  # fewer queries than this are searched single-threaded


@dataclass(frozen=True)
class IndexHeader:
    store_uid: str
    encoder: str
    dim: int
    kind: str
    seq: int


class VectorIndex:
    """FAISS index plus what it reflects: store, encoder, change counter. Not thread-safe on its own."""

    def __init__(self, header: IndexHeader, faiss_index: Any = None, stale: Iterable[int] = ()):
        import faiss

        if header.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {header.kind!r}")
        self.store_uid = header.store_uid
        self.encoder = header.encoder
        self.dim = header.dim
        self.kind = header.kind
        self.seq = header.seq
        self.ef_search = HNSW_EF_SEARCH  # HNSW search depth: higher is more exact and slower
        self.dirty = True
        self._index = faiss_index if faiss_index is not None else _new_faiss(header.kind, header.dim)
        self._ids: set[int] = set(int(i) for i in faiss.vector_to_array(self._index.id_map)) \
            if self._index.ntotal else set()
        self._stale: set[int] = set(int(i) for i in stale) & self._ids
        # vectors the last build held (set by the builder after its bulk add; for a loaded file, from its header)
        self.built = self.ntotal
        self._selector: Any = None  # the search filter excluding _stale (built on the first search after a change)

    # --- contents -------------------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def n_stale(self) -> int:
        return len(self._stale)

    def ids(self) -> set[int]:
        """The ids a search can return (for HNSW: without the stale ones)."""
        return self._ids - self._stale

    def __len__(self) -> int:
        return len(self._ids) - len(self._stale)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under ``ids``; ids already present are skipped, so replaying a change is harmless."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        keep = np.fromiter((int(i) not in self._ids for i in ids), dtype=bool, count=len(ids))
        if not keep.all():  # (a bulk add of new ids is passed on without a copy)
            ids, vectors = ids[keep], vectors[keep]
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(ids) == 0:
            return
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vector dimension {vectors.shape[1]} does not match index dimension {self.dim}")
        self._index.add_with_ids(vectors, ids)
        self._ids.update(int(i) for i in ids)
        self.dirty = True

    def remove(self, ids: Iterable[int]) -> None:
        """Remove ids (absent ones are ignored). HNSW only marks them stale."""
        present = [int(i) for i in ids if int(i) in self._ids and int(i) not in self._stale]
        if not present:
            return
        if self.kind == "hnsw":
            self._stale.update(present)
            self._selector = None
        else:
            self._index.remove_ids(np.asarray(present, dtype=np.int64))
            self._ids.difference_update(present)
        self.dirty = True

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the live (not stale) entries, copied out of FAISS, in storage order."""
        import faiss

        n = self.ntotal
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = np.ascontiguousarray(self._index.index.reconstruct_n(0, n), dtype=np.float32)
        if self._stale:
            keep = ~np.isin(ids, np.fromiter(self._stale, dtype=np.int64, count=len(self._stale)))
            ids, vectors = ids[keep], vectors[keep]
        return ids, vectors

    @property
    def needs_rebuild(self) -> bool:
        """Whether HNSW tombstones have piled up past the compaction threshold."""
        return self.kind == "hnsw" and len(self._stale) > max(STALE_MIN, STALE_FRACTION * len(self._ids))

    @property
    def grown(self) -> int:
        """Vectors added since the last build."""
        return max(0, self.ntotal - self.built)

    @property
    def outgrown(self) -> bool:
        """Whether an HNSW graph has grown past its rebuild threshold (see GROWN_MIN / GROWN_FRACTION; never while
        GROWN_FRACTION is None, the default)."""
        return (GROWN_FRACTION is not None and self.kind == "hnsw"
                and self.grown > max(GROWN_MIN, GROWN_FRACTION * self.built))

    # --- search ---------------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row, best first; missing slots have id -1. ``ef_search``: this search's HNSW
        depth instead of :attr:`ef_search` (ignored by a flat index)."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n_live = len(self)
        if n_live == 0 or k <= 0:
            return (np.zeros((len(queries), max(k, 0)), dtype=np.float32),
                    np.full((len(queries), max(k, 0)), -1, dtype=np.int64))
        k_eff = min(k, n_live)
        params = None
        if self.kind == "hnsw":
            # faiss exports SearchParametersHNSW (swigfaiss) but its bundled __init__.pyi omits it
            depth = self.ef_search if ef_search is None else ef_search
            params = faiss.SearchParametersHNSW(efSearch=max(depth, 2 * k_eff))  # type: ignore[attr-defined]
            if self._stale:
                params.sel = self._stale_selector()
        scores, ids = _search(self._index, queries, k_eff, params)
        if k_eff < k:
            pad = k - k_eff
            scores = np.pad(scores, ((0, 0), (0, pad)))
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    def _stale_selector(self) -> Any:
        """An ID selector that rejects the stale ids, kept until the next ``remove``: building it walks every
        tombstone (about 10 ms per search with 100,000 of them, when it was built for each search)."""
        import faiss

        if self._selector is None:
            batch = faiss.IDSelectorBatch(np.fromiter(self._stale, dtype=np.int64, count=len(self._stale)))
            self._selector = (batch, faiss.IDSelectorNot(batch))  # IDSelectorNot does not own ``batch``: keep both
        return self._selector[1]

    # --- persistence ----------------------------------------------------------------------------------------------
    def header_dict(self) -> dict[str, Any]:
        return {"format": FILE_FORMAT, "store_uid": self.store_uid, "encoder": self.encoder, "dim": self.dim,
                "kind": self.kind, "seq": self.seq, "stale": sorted(self._stale), "built": self.built}

    def save(self, path: Path) -> None:
        """Write the index to ``path`` atomically."""
        import faiss

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps(self.header_dict()).encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                f.write(len(header).to_bytes(8, "little"))
                f.write(header)
                # streamed to the file: no second, serialised copy of the index in memory (1.8 GB at 1M edits)
                faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))  # type: ignore[attr-defined]
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.dirty = False
        log.debug("saved index %s (%d vectors, seq %d)", path, self.ntotal, self.seq)

    @classmethod
    def load(cls, path: Path) -> VectorIndex | None:
        """The index saved at ``path``, or None when there is none or it cannot be read (the caller rebuilds)."""
        import faiss

        path = Path(path)
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    raise ValueError("not an editmem index file")
                n = int.from_bytes(f.read(8), "little")
                raw = json.loads(f.read(n).decode("utf-8"))
                if raw.get("format") != FILE_FORMAT:
                    raise ValueError(f"unknown index file format {raw.get('format')!r}")
                header = IndexHeader(store_uid=str(raw["store_uid"]), encoder=str(raw["encoder"]),
                                     dim=int(raw["dim"]), kind=str(raw["kind"]), seq=int(raw["seq"]))
                # read from the file as FAISS asks: the file's bytes are not held in memory beside the index
                faiss_index = faiss.read_index(faiss.PyCallbackIOReader(f.read))  # type: ignore[attr-defined]
            if faiss_index.d != header.dim:
                raise ValueError("index dimension does not match its header")
            index = cls(header, faiss_index, stale=raw.get("stale", ()))
            index.built = min(int(raw.get("built", index.ntotal)), index.ntotal)
        except Exception as err:  # a damaged cache file is not an error: SQL can rebuild it
            log.warning("ignoring unreadable index file %s: %s", path, err)
            return None
        index.dirty = False
        return index


def _search(index: Any, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """Search; a few queries run on this thread alone. FAISS parallelises a handful of queries poorly, and on a busy
    machine the idle OpenMP workers' spinning slowed single-query search about 8x. ``omp_set_num_threads`` sets the
    calling thread's OpenMP setting only, and it is restored."""
    import faiss

    if len(queries) >= SMALL_BATCH:
        return index.search(queries, k, params=params)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(threads)


def _new_faiss(kind: str, dim: int) -> Any:
    import faiss

    inner: faiss.Index
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner = hnsw
    else:
        inner = faiss.IndexFlatIP(dim)
    return faiss.IndexIDMap2(inner)  # faiss keeps a reference to ``inner`` in the wrapper
