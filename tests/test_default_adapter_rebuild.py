"""The chat adapter shipped in editors/retrieval/default_adapter is what its recorded command makes: the data files it
names are the ones whose sha256 meta.json records, it loads onto SmolLM2 as SERAC's default counterfactual model, and
rerunning the command (slow) gives the same held-out validation curve."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from editors.retrieval.chat_adapter import SHIPPED_DIR, file_sha256
from serve.cli import main
from tests.tiny import smollm2

META = json.loads((SHIPPED_DIR / "meta.json").read_text())


def _local(data_dir: Path, recorded: str) -> Path:
    """The shared data file a recorded path names (recorded relative to the checkout, e.g. ../shared/data/...)."""
    parts = Path(recorded).parts
    return data_dir.joinpath(*parts[parts.index("data") + 1:])


@pytest.mark.integration
def test_the_recorded_data_files_are_the_ones_named(data_dir):
    assert META["data"]
    for item in META["data"]:
        assert file_sha256(_local(data_dir, item["path"])) == item["sha256"], item["path"]


@pytest.mark.integration
def test_the_shipped_adapter_is_serac_s_default_on_smollm2():
    from editors.retrieval.setup import load_counterfactual_model

    model, tok = smollm2()
    cf, template, chat_context = load_counterfactual_model("default", model, tok)
    assert cf is not None and cf is not model and template is None and chat_context == META["chat_context"]


@pytest.mark.slow
@pytest.mark.integration
def test_rebuilding_the_shipped_adapter_with_its_command_gives_the_same_scores(data_dir, tmp_path, monkeypatch):
    argv = shlex.split(META["command"])
    assert argv[:2] == ["editmem", "train-chat-adapter"]
    argv = argv[1:]
    for at, flag in enumerate(argv):
        if flag == "--data":
            argv[at + 1] = str(_local(data_dir, argv[at + 1]))
    argv[argv.index("--name") + 1] = str(tmp_path / "rebuilt")
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 0
    rebuilt = json.loads((tmp_path / "rebuilt" / "meta.json").read_text())
    assert rebuilt["best_step"] == META["best_step"]
    for point, shipped in zip(rebuilt["curve"], META["curve"]):
        assert point["step"] == shipped["step"]
        for kind in ("copy", "update", "retain"):
            assert point[kind] == pytest.approx(shipped[kind], abs=0.05), (point["step"], kind)
