"""Routing as the store stood at an earlier change number or time (``editmem.as_of``): the edits live then
(:func:`memory.feed.records_at`) in an in-memory store with the same encoder, routed with the same classifier, and the
decision's edit mapped back to the stored record (its real id and version). Snapshots are kept (a few) per state."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any

from memory.feed import parse_as_of, records_at
from memory.records import EditRecord
from scope.router import Decision, Router


class _Snapshot:
    def __init__(self, memory: Any, wrapper: Any, change: int | None, when: Any):
        from memory.store import EditMemory

        records = records_at(memory, change, when)
        self.memory = EditMemory.open("sqlite://", encoder=memory.encoder)
        added: list[EditRecord] = self.memory.add_many([
            {"prompt": r.prompt, "target_new": r.target_new, "subject": r.subject, "ground_truth": r.ground_truth}
            for r in records])
        self.originals: dict[int, EditRecord] = {a.id: r for a, r in zip(added, records)}
        self.router = Router(self.memory, wrapper.scope, k=wrapper.router.k, reranker=wrapper.router.reranker,
                             cross=wrapper.router.cross, ef_search=wrapper.router.ef_search)

    def route(self, text: str) -> Decision:
        d = self.router.route([text])[0]
        if d.edit is None:
            return d
        return dataclasses.replace(d, edit=self.originals[d.edit.id])


class Snapshots:
    """Routers over earlier states of one editor's store, built on first use and kept (``size`` of them)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._cache: OrderedDict[tuple[Any, ...], _Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def route(self, editor: Any, as_of: int | str, text: str) -> Decision:
        change, when = parse_as_of(as_of)
        key = (editor.name, editor.memory.namespace, change, when)
        with self._lock:
            snap = self._cache.get(key)
            if snap is None:
                snap = _Snapshot(editor.memory, editor.model, change, when)
                self._cache[key] = snap
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)[1].memory.close()
            self._cache.move_to_end(key)
            return snap.route(text)

    def close(self) -> None:
        with self._lock:
            for snap in self._cache.values():
                snap.memory.close()
            self._cache.clear()
