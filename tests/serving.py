"""A live ``editmem serve`` application on a free loopback port, in a thread of the test process, for the HTTP tests
(and the browser test): ``with live_server(app) as url: ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.cli import main
from serve.http.live import free_port as free_port  # re-exported for the tests
from serve.http.live import live_server as live_server  # re-exported for the tests
from tests.tiny import save_folder, tiny_model

EDIT = {"prompt": "The capital of Japan is", "target_new": "Lima", "subject": "Japan"}


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
