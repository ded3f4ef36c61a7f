"""Micro-batching of generate calls: one worker thread runs every model call of a :class:`MemoryService`; the greedy,
single-answer requests for the same model that are waiting when it starts a call go through that model as one
left-padded batch, instead of queueing one by one. A request that arrives alone runs at once. Before a call starts,
it waits (at most ``max_wait`` seconds) for two kinds of request that are sure to come soon:

- announced ones (:meth:`MicroBatcher.announce`: checked and being routed, so about to be submitted);
- the returning clients of the last call: under load, clients send their next request as soon as an answer comes
  back. A call that started with only the requests queued meanwhile would leave the returning ones to the next call,
  and 8 clients would settle into two alternating calls of 4 (measured: 32 requests in 8 calls). So a call waits
  until as many requests have come in since the last call ended as that call answered, or until ``max_wait`` after
  its end. A lone client is its own returning client: it never waits.

Sampled requests and requests with ``n > 1`` run on their own (their rows share a call already), and so do streamed
ones (their tokens are handed over one by one as they are generated, :class:`TokenStreamer`).

A row's greedy continuation in a padded batch equals its unbatched one up to float rounding of the padded attention
(so it can differ where two tokens are within rounding of each other)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from editors.lm.tokens import pad_rows


@dataclass
class _Job:
    lm: Any
    seq: list[int]
    max_tokens: int
    kwargs: dict[str, Any]  # generation settings (sampling); empty for greedy
    n: int
    streamer: Any = None  # a TokenStreamer: the job runs alone and hands over each token as it is generated
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    rows: list[list[int]] | None = None
    error: BaseException | None = None

    @property
    def batchable(self) -> bool:
        return not self.kwargs and self.n == 1 and self.streamer is None


class TokenStreamer:
    """What ``generate(streamer=...)`` feeds (transformers' streamer protocol): the new token ids, one queue item
    each, then None at the end. The first ``put`` (the prompt) is skipped."""

    def __init__(self) -> None:
        self.tokens: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        self.tokens.put(None)


class MicroBatcher:
    """Runs generate calls on one worker thread, batching the greedy ones that wait together (module docstring)."""

    def __init__(self, pad: int, *, max_batch: int = 8, max_wait: float = 0.2):
        self.pad = pad
        self.max_batch = max_batch
        self.max_wait = max_wait  # seconds a call waits at most for requests sure to come (module docstring)
        self._announced = 0
        self._count_lock = threading.Lock()
        self._last_end = float("-inf")  # when the last batched call ended, and how many requests it answered
        self._last_jobs = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        # Held for the whole of every generate call: whoever changes a model's weights in place between calls
        # (editors.consolidation.LiveWeights) takes it, so no generation runs on half-written weights.
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="editmem-generate", daemon=True)
        self._thread.start()
        self.calls = 0  # model calls made (a batch counts once)
        self.rows = 0  # request rows answered

    def generate(self, lm: Any, seq: list[int], max_tokens: int, n: int = 1,
                 sampling: dict[str, Any] | None = None) -> list[list[int]]:
        """``n`` continuations of ``seq`` by ``lm`` (new tokens only, at most ``max_tokens`` each)."""
        return self.wait(self.submit(lm, seq, max_tokens, n, sampling))

    def submit(self, lm: Any, seq: list[int], max_tokens: int, n: int = 1, sampling: dict[str, Any] | None = None,
               streamer: TokenStreamer | None = None, *, announced: bool = False) -> _Job:
        """Queue a generate call and return at once; :meth:`wait` gives its rows. ``announced``: the caller
        announced it (:meth:`announce`); submitting ends the announcement."""
        job = _Job(lm, list(seq), max_tokens, dict(sampling or {}), n, streamer)
        self._queue.put(job)
        if announced:
            self.withdraw()
        return job

    def announce(self) -> None:
        """Say a request will be submitted soon (it is being routed): a call starting now waits for it (at most
        ``max_wait``). Each announce is ended by ``submit(..., announced=True)`` or :meth:`withdraw`."""
        with self._count_lock:
            self._announced += 1

    def withdraw(self) -> None:
        """End an announcement (the request was submitted, or failed before it was)."""
        with self._count_lock:
            self._announced = max(0, self._announced - 1)

    @property
    def announced(self) -> int:
        return self._announced

    @staticmethod
    def wait(job: _Job) -> list[list[int]]:
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.rows is not None
        return job.rows

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            announced_until = time.monotonic() + self.max_wait
            returning_until = self._last_end + self.max_wait
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    now = time.monotonic()
                    returned = sum(1 for job in jobs if job.submitted >= self._last_end)
                    waiting = first.batchable and (
                        (self._announced > 0 and now < announced_until)
                        or (returned < self._last_jobs and now < returning_until))
                    if not waiting:
                        break
                    try:
                        nxt = self._queue.get(timeout=0.002)
                    except queue.Empty:
                        continue
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            groups: dict[tuple[int, bool], list[_Job]] = {}
            singles = []
            for job in jobs:
                if job.batchable:
                    groups.setdefault((id(job.lm), True), []).append(job)
                else:
                    singles.append([job])
            for group in [*groups.values(), *singles]:
                self._run(group)

    @torch.no_grad()
    def _run(self, jobs: list[_Job]) -> None:
        try:
            lm = jobs[0].lm
            seqs = [job.seq for job in jobs for _ in range(job.n)]
            ids, mask = pad_rows(seqs, self.pad, side="left")
            device = next(lm.parameters()).device
            width = ids.shape[1]
            kwargs = dict(jobs[0].kwargs) or {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            seed = kwargs.pop("seed", None)
            if seed is not None:
                torch.manual_seed(seed)
            if jobs[0].streamer is not None:
                kwargs["streamer"] = jobs[0].streamer
            with self.lock:
                out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=self.pad,
                                  max_new_tokens=max(job.max_tokens for job in jobs), **kwargs)[:, width:].tolist()
            self.calls += 1
            self.rows += len(seqs)
            at = 0
            for job in jobs:
                job.rows = [row[:job.max_tokens] for row in out[at:at + job.n]]
                at += job.n
        except BaseException as err:  # handed to the waiting request threads
            for job in jobs:
                job.error = err
        finally:
            if jobs[0].batchable:  # before any answer is handed over: a returning client submits after this
                self._last_end, self._last_jobs = time.monotonic(), len(jobs)
            for job in jobs:
                if job.streamer is not None:
                    job.streamer.end()  # again after an error: the reader must not wait forever
                job.done.set()
