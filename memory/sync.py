"""The store's embeddings and the FAISS index that caches them: encoding, storing and loading key vectors, and keeping
one process's index in step with SQL through the change log (see memory/schema.py).

:class:`IndexSync` belongs to one :class:`memory.store.EditMemory` and reads through the store's connections. After a
write commits, the store hands the transaction to :meth:`IndexSync.after_write`, which applies the writer's own changes
without reading them back; before a search, :meth:`IndexSync.catch_up` applies what other processes logged since the
counter the index reflects. An index file that does not fit the store (uid, encoder, dimension, kind) is rebuilt from
the embeddings in SQL, computing only the missing ones.

Compaction (HNSW tombstones past :attr:`VectorIndex.needs_rebuild`), the rebuild of an HNSW graph grown well past
its build (:attr:`VectorIndex.outgrown`, off by default) and the growth of a flat ``auto`` index into HNSW run in
the background (:mod:`memory.compaction`): the write or open that crosses the threshold starts a thread and returns;
searches and writes go on against the old index, and the new one replaces it, with every change made in between
replayed onto it. ``IndexSync.background = False`` rebuilds in place instead (as before).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection

from memory.compaction import Compaction
from memory.encoder import Encoder
from memory.errors import StoreError
from memory.index import IndexHeader, VectorIndex
from memory.schema import CURRENT, OP_ADD, OP_DEL, changes, chunks, edits, embeddings, insert_ignore, meta

if TYPE_CHECKING:
    from memory.store import EditMemory, _Tx

log = logging.getLogger(__name__)

# `auto` builds HNSW from this many live edits. Measured (BENCHMARKS.md, "Store at scale", 384-dim clustered vectors,
# loaded 2-core VM, one thread): flat single-query p50 0.31 ms at 10k, 1.73 ms at 30k, 17.7 ms at 100k; HNSW 0.59 /
# 0.88 / 0.96 ms with recall@1 1.000. Flat stays within the 2 ms target to about 30k; 20k leaves a margin.
HNSW_AUTO_THRESHOLD = 20_000
# An `auto` HNSW index that a compaction shrinks stays HNSW down to this fraction of the threshold, so a store that
# hovers near the threshold is not rebuilt flat and grown back into HNSW over and over.
HNSW_AUTO_KEEP = 0.5
BACKGROUND_COMPACTION = True  # the default of IndexSync.background
ENCODE_BATCH = 256


# --- vectors ----------------------------------------------------------------------------------------------------------
def encode(encoder: Encoder, texts: list[str], *, progress: bool = False) -> np.ndarray:
    """``encoder.encode(texts)`` as contiguous float32 (n, dim), in batches of ENCODE_BATCH (with a progress bar when
    ``progress``) if there are more; StoreError if the encoder returns another shape."""
    if len(texts) <= ENCODE_BATCH:
        return _checked(encoder, encoder.encode(texts), len(texts))
    from tqdm.auto import tqdm

    out = np.empty((len(texts), encoder.dim), dtype=np.float32)  # filled in place: no list of parts to join
    with tqdm(total=len(texts), desc="encoding", unit="edit", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), ENCODE_BATCH):
            chunk = texts[start:start + ENCODE_BATCH]
            out[start:start + len(chunk)] = _checked(encoder, encoder.encode(chunk), len(chunk))
            bar.update(len(chunk))
    return out


def _checked(encoder: Encoder, vectors: np.ndarray, n: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (n, encoder.dim):
        raise StoreError(f"encoder {encoder.name} returned shape {vectors.shape}, expected {(n, encoder.dim)}")
    return vectors


def insert_vectors(conn: Connection, encoder: Encoder, row_ids: Sequence[int], vectors: np.ndarray) -> None:
    """Store the embeddings of version rows for ``encoder`` (rows that already have one keep it)."""
    name, dim = encoder.name, encoder.dim
    rows = [{"row_id": int(r), "encoder": name, "dim": dim, "vector": v.astype("<f4").tobytes()}
            for r, v in zip(row_ids, vectors)]
    conn.execute(insert_ignore(conn, embeddings), rows)


def load_vectors(conn: Connection, encoder: Encoder, row_ids: Sequence[int]) -> dict[int, np.ndarray]:
    """Row id -> stored embedding for ``encoder``, for those of ``row_ids`` that have one; StoreError if a stored one
    has another dimension than the encoder."""
    name, dim = encoder.name, encoder.dim
    out: dict[int, np.ndarray] = {}
    for chunk in chunks(row_ids):
        query = select(embeddings.c.row_id, embeddings.c.dim, embeddings.c.vector).where(
            embeddings.c.encoder == name, embeddings.c.row_id.in_(chunk))
        for row_id, row_dim, blob in conn.execute(query):
            if row_dim != dim or len(blob) != 4 * dim:
                raise StoreError(f"stored embedding of row {row_id} for encoder {name} has dimension {row_dim}, "
                                 f"the encoder has {dim}")
            out[int(row_id)] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return out


# --- the index --------------------------------------------------------------------------------------------------------
class IndexSync:
    """One store's FAISS index in this process, and how it follows SQL (see the module docstring). ``lock`` guards
    the index; hold it around a catch-up and the search that relies on it."""

    def __init__(self, store: EditMemory, store_uid: str, kind: str, path: Path | None, namespace: str = "default"):
        self._store = store
        self.namespace = namespace
        # what the index file's header names: the store's uid (plus the namespace outside the default one), so that a
        # file of another store or namespace never fits
        self.uid = store_uid if namespace == "default" else f"{store_uid}/{namespace}"
        self.kind = kind  # "auto", "flat" or "hnsw": what a rebuild makes
        self.path = path
        self.lock = threading.RLock()
        self.background = BACKGROUND_COMPACTION  # compaction / growth on a thread (False: in place, in the writer)
        self._index: VectorIndex | None = None
        self._compaction: Compaction | None = None

    @property
    def loaded(self) -> VectorIndex | None:
        """The index, or None before :meth:`load`."""
        return self._index

    @property
    def index(self) -> VectorIndex:
        """The index; StoreError if there is none."""
        if self._index is None:
            raise StoreError(f"store {self._store.url} has no index (closed?)")
        return self._index

    def load(self) -> None:
        """Load the index file if it fits the store and catch it up; otherwise rebuild it from SQL."""
        with self.lock:
            loaded = VectorIndex.load(self.path) if self.path is not None else None
            if loaded is not None and self._fits(loaded):
                self._index = loaded
                self.catch_up()
                self._maybe_compact(self.index)
            else:
                self.rebuild()

    def _fits(self, index: VectorIndex) -> bool:
        encoder = self._store.encoder
        why = None
        if index.store_uid != self.uid:
            why = "belongs to another store"
        elif index.encoder != encoder.name or index.dim != encoder.dim:
            why = f"was built with encoder {index.encoder}"
        elif self.kind != "auto" and index.kind != self.kind:
            why = f"is {index.kind}, {self.kind} requested"
        if why:
            log.info("rebuilding index: file %s %s", self.path, why)
        return why is None

    def save(self) -> None:
        """Write the index file if the index changed since it was last written (no file for in-memory stores)."""
        with self.lock:
            if self._index is not None and self._index.dirty and self.path is not None and not self._store.read_only:
                self._index.save(self.path)

    def catch_up(self) -> None:
        """Bring the index up to SQL's change counter: apply the logged changes since the counter it reflects."""
        with self.lock:
            index = self.index
            seq = self._store._change_seq()
            if seq == index.seq:
                return
            if seq < index.seq:
                log.warning("index is ahead of the store (%d > %d): rebuilding", index.seq, seq)
                self.rebuild()
                return
            with self._store._read() as conn:
                log_rows = conn.execute(select(changes.c.row_id, changes.c.op).where(
                    changes.c.seq > index.seq, changes.c.seq <= seq, changes.c.namespace == self.namespace)
                    .order_by(changes.c.seq)).all()
            adds: dict[int, None] = {}
            removes: set[int] = set()
            for row_id, op in log_rows:
                if op == OP_ADD:
                    adds[int(row_id)] = None
                else:
                    adds.pop(int(row_id), None)
                    removes.add(int(row_id))
            self._apply(index, seq, list(adds), None, removes)

    def after_write(self, tx: _Tx) -> None:
        """Apply a committed write transaction of this process (replaying the log if another wrote in between)."""
        with self.lock:
            index = self.index
            if index.seq != tx.seq - 1:  # another process wrote in between: replay the log instead
                self.catch_up()
                return
            adds = [r for r, op in tx.changed if op == OP_ADD]
            removes = {r for r, op in tx.changed if op == OP_DEL}
            vectors = tx.added_vectors(adds) if adds else None
            self._apply(index, tx.seq, adds, vectors, removes)

    def _apply(self, index: VectorIndex, seq: int, adds: list[int], vectors: np.ndarray | None,
               removes: set[int]) -> None:
        index.remove(removes)
        add_ids = np.asarray(adds, dtype=np.int64)
        add_vectors = np.zeros((0, index.dim), dtype=np.float32)
        if adds:
            add_vectors = vectors if vectors is not None else self.vectors_for(adds)
            index.add(add_ids, add_vectors)
        index.seq = seq
        index.dirty = True
        job = self._compaction
        if job is not None and job.running:  # replayed onto the new index when it is swapped in
            job.record(seq, add_ids, add_vectors, removes)
        self._maybe_compact(index)

    def _maybe_compact(self, index: VectorIndex) -> None:
        """Rebuild when HNSW tombstones pile up (``needs_rebuild``), when an HNSW graph has grown well past the size
        it was built at (``outgrown``), or, with ``auto``, when a flat index has grown to HNSW_AUTO_THRESHOLD live
        vectors (once; an HNSW index that shrinks stays HNSW until it is rebuilt); in the background unless
        ``background`` is off. One compaction at a time."""
        if index.needs_rebuild:
            why = f"{index.n_stale} stale of {index.ntotal} vectors"
        elif index.outgrown:
            why = f"{index.grown} vectors added since it was built with {index.built}"
        elif self.kind == "auto" and index.kind == "flat" and len(index) >= HNSW_AUTO_THRESHOLD:
            why = f"flat index grew to {len(index)} vectors"
        else:
            return
        if not self.background:
            log.info("rebuilding index: %s", why)
            self.rebuild()
            return
        if self._compaction is not None and self._compaction.running:
            return
        kind = self._kind_for(len(index), index.kind)
        log.info("compacting index in the background as %s: %s", kind, why)
        self._compaction = Compaction.of(index, kind, self.lock, self._swap).start()

    def _kind_for(self, n_live: int, current: str | None = None) -> str:
        """What a rebuild of ``n_live`` edits makes: the store's kind, or with ``auto`` HNSW from HNSW_AUTO_THRESHOLD
        live edits (from HNSW_AUTO_KEEP of it when the index being replaced, ``current``, is HNSW already)."""
        if self.kind != "auto":
            return self.kind
        threshold = HNSW_AUTO_THRESHOLD * (HNSW_AUTO_KEEP if current == "hnsw" else 1)
        return "hnsw" if n_live >= threshold else "flat"

    def _swap(self, index: VectorIndex) -> None:
        """Called by a finished compaction, with the lock held and its journal replayed onto ``index``."""
        self._index = index
        self._compaction = None
        try:
            self.save()
        except OSError as err:
            log.warning("could not save index %s: %s", self.path, err)
        self._maybe_compact(index)  # enough deletions during the build to need another

    @property
    def compacting(self) -> bool:
        """Whether a background compaction is running."""
        job = self._compaction
        return job is not None and job.running

    def wait_compaction(self, timeout: float | None = None) -> bool:
        """Wait until no background compaction runs (one started by a swap included); False if ``timeout`` seconds
        passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self._compaction
            if job is None or not job.running:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            job.wait(left)

    def stop_compaction(self) -> None:
        """Cancel a running compaction and wait for its thread (the live index is kept). Call without the lock."""
        job = self._compaction
        if job is not None:
            job.cancel(wait=True)
        self._compaction = None

    def rebuild(self) -> None:
        """Build the index from the current versions' embeddings in SQL (computing missing ones) and save it, now
        (a background compaction that is running is cancelled: this replaces it)."""
        with self.lock:
            if self._compaction is not None:
                self._compaction.cancel(wait=False)  # it checks under the lock before it swaps
                self._compaction = None
            encoder = self._store.encoder
            with self._store._read() as conn:
                seq = int(conn.execute(select(meta.c.change_seq).where(meta.c.id == 1)).scalar_one())
                row_ids = [int(r) for r in conn.execute(
                    select(edits.c.row_id).where(CURRENT, edits.c.namespace == self.namespace)
                    .order_by(edits.c.row_id)).scalars()]
            kind = self._kind_for(len(row_ids), self._index.kind if self._index is not None else None)
            index = VectorIndex(IndexHeader(self.uid, encoder.name, encoder.dim, kind, seq))
            for chunk in chunks(row_ids, 20_000):
                index.add(np.asarray(chunk, dtype=np.int64), self.vectors_for(chunk, progress=len(row_ids) > 20_000))
            index.built = index.ntotal
            self._index = index
            log.info("built %s index of %d vectors at change %d", kind, len(row_ids), seq)
            self.catch_up()  # changes committed while building (the log replay is idempotent)
            try:
                self.save()
            except OSError as err:
                log.warning("could not save index %s: %s", self.path, err)

    def vectors_for(self, row_ids: Sequence[int], *, progress: bool = False) -> np.ndarray:
        """Embeddings of version rows for the store's encoder, computing and storing the missing ones."""
        store, encoder = self._store, self._store.encoder
        if not row_ids:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        with store._read() as conn:
            found = load_vectors(conn, encoder, row_ids)
            missing = [r for r in row_ids if r not in found]
            prompts: dict[int, str] = {}
            for chunk in chunks(missing):
                prompts.update((int(r), p) for r, p in conn.execute(
                    select(edits.c.row_id, edits.c.prompt).where(edits.c.row_id.in_(chunk))))
        if missing:
            log.info("computing %d embeddings for encoder %s", len(missing), encoder.name)
            vectors = encode(encoder, [prompts[r] for r in missing], progress=progress)
            if not store.read_only:  # a read-only store computes them for this process only
                with store._embeddings_tx() as conn:
                    insert_vectors(conn, encoder, missing, vectors)
            found.update(zip(missing, vectors))
        return np.stack([found[r] for r in row_ids])
