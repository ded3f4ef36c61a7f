"""`editmem serve` as a process: it starts on the port given, logs one line per request to stderr, and on SIGTERM
finishes the request in flight before it exits (uvicorn's graceful shutdown)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.serving import free_port, new_store, tiny_model_folder

httpx = pytest.importorskip("httpx")
REPO = Path(__file__).resolve().parent.parent


def test_serve_process_logs_requests_and_finishes_in_flight_work_on_sigterm(tmp_path):
    store = new_store(tmp_path / "cli.db", {"prompt": "The capital of Japan is", "target_new": "Lima"})
    folder = tiny_model_folder(tmp_path / "tiny-llama")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "--store", store, "serve", "--model", str(folder),
                             "--scope", "cosine", "--port", str(port), "--threads", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        answers: list[tuple[httpx.Response, float]] = []

        def ask() -> None:
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": folder.name, "prompt": "The capital of Japan is", "max_tokens": 120, "n": 8})
            answers.append((r, time.monotonic()))

        slow = threading.Thread(target=ask)
        slow.start()
        while not answers and _in_flight(url) < 2:  # the slow request and this scrape
            time.sleep(0.01)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        slow.join(120)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal once it has shut down
    assert answers, "the request in flight got no answer"
    answer, answered = answers[0]
    assert answer.status_code == 200 and answer.json()["editmem"]["edit_id"] == 1, answer.text
    assert answered > signalled  # it was still being answered when the signal came
    assert f"on http://127.0.0.1:{port}/" in out
    assert "GET /healthz 200" in err and "POST /v1/completions 200" in err


def _in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("editmem_http_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no editmem_http_requests_in_flight")
