"""The main job (`editmem demo`) runs end to end on a tiny model saved as a local folder, with the real encoder."""

from __future__ import annotations

import pytest

from serve.cli import main
from tests.tiny import save_folder, tiny_model


@pytest.mark.integration
def test_demo_runs_and_answers_follow_the_store(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDITMEM_STORE", raising=False)
    folder = save_folder(*tiny_model("llama"), tmp_path / "tiny-llama")
    assert main(["demo", "--model", str(folder), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "base model: no edit in scope" in out          # before any edit, and for unrelated questions
    assert "[edit #1 v1, score 1.00]" in out              # the edit prompt itself routes to its edit
    assert "[edit #1 v2," in out and "[edit #1 v3," in out  # the answer follows the update and the rollback
    assert "v3 [current]" in out
    assert not list(tmp_path.glob("*.db"))                # the default demo store lives in a temporary folder
