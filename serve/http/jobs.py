"""Long work started over HTTP (a consolidation loads a model and edits its weights: minutes, not a request's
seconds): a job runs on one background thread, one job at a time, and its state is read back by id.

A job is ``queued``, ``running``, then ``succeeded`` (with its ``result``) or ``failed`` (with a one-line ``error``;
editmem's own errors give their message, anything else its type and message, and the traceback goes to the log).
The last ``keep`` jobs are remembered; a server restart forgets them (what a job wrote is in the store)."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memory.errors import EditmemError, NotFoundError

log = logging.getLogger("editmem.jobs")


@dataclass
class Job:
    id: int
    kind: str
    params: dict[str, Any]
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"object": "job", "id": self.id, "kind": self.kind, "status": self.status, "params": self.params,
                "created": self.created, "started": self.started, "finished": self.finished,
                "result": self.result, "error": self.error}


class JobRunner:
    """One worker thread running submitted jobs in order (started on the first submit)."""

    def __init__(self, keep: int = 100):
        self.keep = keep
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._work: queue.Queue[tuple[Job, Callable[[], dict[str, Any]]] | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, kind: str, params: dict[str, Any], run: Callable[[], dict[str, Any]]) -> Job:
        with self._lock:
            job = Job(next(self._ids), kind, params)
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                oldest = next(iter(self._jobs.values()))
                if oldest.status in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="editmem-jobs", daemon=True)
                self._thread.start()
        self._work.put((job, run))
        return job

    def get(self, job_id: int) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job with id {job_id}")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._work.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            job, run = item
            job.status, job.started = "running", time.time()
            try:
                job.result = run()
                job.status = "succeeded"
            except EditmemError as err:
                job.error, job.status = str(err), "failed"
            except Exception as err:  # a job's failure is its state, not the worker's end
                log.exception("job %d (%s) failed", job.id, job.kind)
                job.error, job.status = f"{type(err).__name__}: {err}", "failed"
            finally:
                job.finished = time.time()
