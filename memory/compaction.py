"""Rebuilding an index in the background while reads and writes go on (tombstone compaction, flat -> HNSW growth,
an HNSW graph that has outgrown its build).

A :class:`Compaction` starts from a snapshot of the live index's own vectors (taken under the owner's lock; no SQL is
read and nothing is encoded, so it works the same for every backend, in-memory SQLite included) and builds the new
FAISS index on a thread of its own, without the lock: searches keep using the old index, and writes keep being
applied to it. Every change applied to the old index after the snapshot is also written to the compaction's journal
(:meth:`Compaction.record`, called under the lock). When the build is done the thread takes the lock, replays the
journal onto the new index (in order, with the same ``remove``-then-``add`` steps the live index took) and hands it
to the owner's ``swap``, so nothing written during the build is lost. A compaction that was cancelled (the store
closed, or an explicit rebuild replaced the index) swaps nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from memory.index import IndexHeader, VectorIndex

log = logging.getLogger(__name__)

BUILD_CHUNK = 10_000  # vectors added per step of the build; cancellation is checked between steps


@dataclass
class _Change:
    seq: int
    adds: np.ndarray
    vectors: np.ndarray
    removes: set[int]


@dataclass
class Compaction:
    """One background rebuild of ``header.kind`` from ``ids``/``vectors`` (the live index at change ``header.seq``).

    ``lock`` is the owner's index lock; ``swap(new_index)`` is called with it held once the journal has been
    replayed, unless the compaction was cancelled first."""

    header: IndexHeader
    ids: np.ndarray
    vectors: np.ndarray
    lock: threading.RLock
    swap: Callable[[VectorIndex], None]
    journal: list[_Change] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float | None = None
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def of(cls, index: VectorIndex, kind: str, lock: threading.RLock,
           swap: Callable[[VectorIndex], None]) -> Compaction:
        """Snapshot ``index``'s live vectors (call with ``lock`` held) for a rebuild as ``kind``."""
        ids, vectors = index.live_vectors()
        header = IndexHeader(index.store_uid, index.encoder, index.dim, kind, index.seq)
        return cls(header, ids, vectors, lock, swap)

    def start(self) -> Compaction:
        self._thread = threading.Thread(target=self._run, name=f"editmem-compaction-{self.header.store_uid}",
                                        daemon=True)
        self._thread.start()
        return self

    def record(self, seq: int, adds: np.ndarray, vectors: np.ndarray, removes: set[int]) -> None:
        """A change applied to the live index after the snapshot (call with the lock held)."""
        self.journal.append(_Change(seq, np.asarray(adds, dtype=np.int64).copy(),
                                    np.array(vectors, dtype=np.float32, copy=True), set(removes)))

    def cancel(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the build (between steps) and swap nothing; with ``wait``, until the thread has ended."""
        self.cancelled.set()
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the compaction has ended (swapped, cancelled or failed) within ``timeout`` seconds."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return self.done.is_set()

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            index = VectorIndex(self.header)
            for start in range(0, len(self.ids), BUILD_CHUNK):
                if self.cancelled.is_set():
                    return
                index.add(self.ids[start:start + BUILD_CHUNK], self.vectors[start:start + BUILD_CHUNK])
            index.built = index.ntotal
            self.ids = self.vectors = np.zeros(0)  # the snapshot is no longer needed
            with self.lock:
                if self.cancelled.is_set():
                    return
                for change in self.journal:
                    index.remove(change.removes)
                    if len(change.adds):
                        index.add(change.adds, change.vectors)
                    index.seq = change.seq
                index.dirty = True
                self.seconds = time.perf_counter() - t0
                log.info("compacted %s index in the background: %d vectors, %d changes replayed, %.1f s",
                         index.kind, len(index), len(self.journal), self.seconds)
                self.journal = []
                self.swap(index)
        except BaseException as err:  # a failed compaction leaves the live index as it is
            self.error = err
            log.exception("background index compaction failed; the live index is kept")
        finally:
            self.done.set()
