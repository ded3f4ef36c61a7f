"""A live ``editmem serve`` application on a free loopback port, in a thread of the test process, for the HTTP tests
(and the browser test): ``with live_server(app) as url: ...``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serve.cli import main
from tests.tiny import save_folder, tiny_model

EDIT = {"prompt": "The capital of Japan is", "target_new": "Lima", "subject": "Japan"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in a daemon thread; yields its base URL; stops it gracefully."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_model_folder(folder: Path) -> Path:
    """A tiny random llama saved as a local model folder (what ``--model`` takes)."""
    if not (folder / "config.json").exists():
        save_folder(*tiny_model("llama"), folder)
    return folder


def new_store(path: Path, *edits: dict[str, str]) -> str:
    """A fresh SQLite store with the hashing-256 encoder holding ``edits``, made with the CLI."""
    store = f"sqlite:///{path}"
    assert main(["--store", store, "init", "--encoder", "hashing-256"]) == 0
    for e in edits:
        args = ["--store", store, "add", "--prompt", e["prompt"], "--target", e["target_new"]]
        if e.get("subject"):
            args += ["--subject", e["subject"]]
        assert main(args) == 0
    return store


def settings(store: str, model: Path | str, **overrides: Any) -> Any:
    from serve.http.app import ServerSettings

    return ServerSettings(store=store, model=str(model), scope="cosine", **overrides)
