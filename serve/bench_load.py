"""`editmem bench load`: a bounded load and fault test of ``editmem serve`` on loopback (issue 13).

``clients`` threads mix chat completions, searches and writes (new edits) against a server process for ``duration``
seconds: p50/p99 latency per kind and every status counted (the target is zero 5xx). Then a second bounded run, and the
server process is killed with SIGKILL ``kill_after`` seconds into it; the clients keep going (connection errors are
counted, not 5xx) and the server is restarted on the same store. Checked after the restart: every write acknowledged
with a 2xx is in the store with the fields sent, every edit's versions are 1..n with one current row at most (no
half-written edit), ``verify()`` passes (index and SQL agree), ``/readyz`` says the index caught up, and a search for
each acknowledged write's prompt finds it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["The capital of Japan is", "Marie Curie was born in", "The largest ocean is", "Water boils at"]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3


def start_server(store: str, model: str, port: int, *, scope: str = "cosine") -> subprocess.Popen[str]:
    """``editmem serve`` as a child process, once it answers ``/healthz``."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "--store", store, "serve", "--model", model,
                             "--scope", scope, "--port", str(port), "--threads", "1"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


class _Load:
    """The clients of one bounded run and what they saw."""

    def __init__(self, url: str, model: str, clients: int, tag: str):
        self.url, self.model, self.clients, self.tag = url, model, clients, tag
        self.latency: dict[str, list[float]] = {"chat": [], "search": [], "write": []}
        self.status: dict[str, int] = {}
        self.acked: list[tuple[int, str, str]] = []  # (id, prompt, target) of writes answered 2xx
        self.conn_errors = 0
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def _one(self, client: Any, worker: int, n: int) -> None:
        import httpx

        kind = ("chat", "search", "write")[(worker + n) % 3]
        prompt, target = f"Load fact {self.tag}-{worker}-{n} is about", f"thing {self.tag}-{worker}-{n}"
        t0 = time.perf_counter()
        try:
            if kind == "chat":
                r = client.post("/v1/chat/completions", json={"model": self.model, "max_tokens": 4, "messages": [
                    {"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]})
            elif kind == "search":
                r = client.get("/v1/edits/search", params={"q": QUESTIONS[n % len(QUESTIONS)], "k": 5})
            else:
                r = client.post("/v1/edits", json={"prompt": prompt, "target_new": target})
        except httpx.HTTPError:
            with self._lock:
                self.conn_errors += 1
            time.sleep(0.05)
            return
        took = time.perf_counter() - t0
        with self._lock:
            self.status[str(r.status_code)] = self.status.get(str(r.status_code), 0) + 1
            self.latency[kind].append(took)
            if kind == "write" and 200 <= r.status_code < 300:
                self.acked.append((int(r.json()["id"]), prompt, target))

    def _worker(self, worker: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                self._one(client, worker, n)
                n += 1

    def run(self, seconds: float, during: Any = None) -> None:
        threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        if during is None:
            self.stop.wait(seconds)
        else:
            during()
        self.stop.set()
        for t in threads:
            t.join(120)

    def summary(self, seconds: float) -> dict[str, Any]:
        every = [x for v in self.latency.values() for x in v]
        return {"requests": len(every), "rps": len(every) / seconds, "status": dict(sorted(self.status.items())),
                "5xx": sum(n for s, n in self.status.items() if s.startswith("5")),
                "connection_errors": self.conn_errors, "acknowledged_writes": len(self.acked),
                "p50_ms": _pct(every, 0.5), "p99_ms": _pct(every, 0.99),
                **{f"{k}_p50_ms": _pct(v, 0.5) for k, v in self.latency.items()},
                **{f"{k}_p99_ms": _pct(v, 0.99) for k, v in self.latency.items()}}


def check_store(store: str, acked: list[tuple[int, str, str]]) -> dict[str, Any]:
    """What survived: acknowledged writes present, versions consistent, index and SQL agreeing, each write found."""
    from memory.errors import NotFoundError
    from memory.store import EditMemory

    missing, wrong, bad_versions, not_found = 0, 0, 0, 0
    with EditMemory.open(store, create=False) as mem:
        mem.verify()
        for edit_id, prompt, target in acked:
            try:
                rec = mem.get(edit_id)
            except NotFoundError:
                missing += 1
                continue
            if (rec.prompt, rec.target_new) != (prompt, target):
                wrong += 1
        for rec in mem.list(limit=len(mem) + 1, include_deleted=True):
            versions = [h.version for h in mem.history(rec.id)]
            if versions != list(range(1, len(versions) + 1)):
                bad_versions += 1
        for edit_id, prompt, _ in acked:
            hits = mem.search(prompt, 1)
            if not hits or hits[0].edit.id != edit_id:
                not_found += 1
        stored = len(mem)
    return {"stored_edits": stored, "acknowledged_missing": missing, "acknowledged_changed": wrong,
            "edits_with_bad_versions": bad_versions, "acknowledged_not_found_by_search": not_found,
            "verify": "passed"}


def run_load_bench(store: str, model: str, *, clients: int = 16, duration: float = 60.0, kill_after: float = 5.0,
                   port: int | None = None) -> dict[str, Any]:
    """The bounded run, then the SIGKILL run and the checks (module docstring). ``store`` must exist."""
    import httpx

    from serve.http.live import free_port

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    name = Path(model).name
    proc = start_server(store, model, port)
    try:
        steady = _Load(url, name, clients, "a")
        t0 = time.perf_counter()
        steady.run(duration)
        steady_s = time.perf_counter() - t0
        faulty = _Load(url, name, clients, "b")

        def kill_and_restart() -> None:
            nonlocal proc
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            time.sleep(0.5)  # clients see connection errors meanwhile
            proc = start_server(store, model, port)
            time.sleep(min(2.0, kill_after))  # the restarted server under load too

        faulty.run(0, during=kill_and_restart)
        ready = httpx.get(f"{url}/readyz", timeout=60).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    checks = check_store(store, steady.acked + faulty.acked)
    return {"clients": clients, "duration_s": round(steady_s, 1), "steady": steady.summary(steady_s),
            "kill_after_s": kill_after, "fault": faulty.summary(kill_after + 2.5),
            "readyz_after_restart": {k: ready.get(k) for k in ("ready", "index_caught_up", "change", "index")},
            "checks": checks}
