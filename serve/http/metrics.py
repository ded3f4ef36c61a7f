"""Prometheus metrics of one server (a registry of its own, so several apps in one process do not collide):
requests by method, route and status, requests in flight, latency per route, answers by the route the memory took,
the number of live edits and the vector index's lag behind the store, per open namespace (read at scrape time), and,
when the served model follows an edited model folder (``--consolidate-every``), the edits its weights hold, the
edits answering from memory meanwhile, and the consolidations this server made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("editmem_http_requests", "HTTP requests", ["method", "path", "status"],
                                registry=self.registry)
        self.in_flight = Gauge("editmem_http_requests_in_flight", "HTTP requests being answered now",
                               registry=self.registry)
        self.latency = Histogram("editmem_http_request_seconds", "HTTP request latency", ["path"],
                                 buckets=BUCKETS, registry=self.registry)
        self.answers = Counter("editmem_answers", "answers by the route that shaped them", ["route"],
                               registry=self.registry)
        self.edits = Gauge("editmem_edits", "live edits in a store namespace", ["namespace"], registry=self.registry)
        self.index_lag = Gauge("editmem_index_lag", "changes a namespace's vector index is behind the store",
                               ["namespace"], registry=self.registry)
        self.weights_edits = Gauge("editmem_weights_edits", "edits the served model's weights hold (not gated)",
                                   registry=self.registry)
        self.memory_only_edits = Gauge("editmem_memory_only_edits", "live edits the served model's weights do not "
                                       "hold yet (answering from memory)", registry=self.registry)
        self.consolidations = Gauge("editmem_consolidations", "consolidations this server wrote into the served "
                                    "model", registry=self.registry)

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.labels(method, path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def render(self, memories: Mapping[str, Any], live: Any = None) -> bytes:
        """The metrics text, with the edit count and index lag of every namespace the server has open, and the
        served weights' counts when the model follows a folder (``live``: editors.consolidation.LiveWeights)."""
        from memory.feed import index_lag

        for namespace, memory in sorted(memories.items()):
            self.edits.labels(namespace).set(len(memory))
            self.index_lag.labels(namespace).set(index_lag(memory))
        if live is not None:
            self.weights_edits.set(len(live.held.versions()))
            self.memory_only_edits.set(live.pending())
            self.consolidations.set(live.consolidations)
        return generate_latest(self.registry)
