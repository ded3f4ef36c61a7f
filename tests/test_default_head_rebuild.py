"""The scope head shipped in scope/default_head is what its recorded command makes: rerunning that command (from
manifest.json, on the same data file) under a fresh cache gives a head with the same calibration and the same
scores on a slice of evaluation queries."""

from __future__ import annotations

import hashlib
import json
import re
import shlex

import numpy as np
import pytest

from memory.store import EditMemory
from scope.classifier import PACKAGED_DEFAULT_FOLDER, load_scope
from scope.router import Router
from serve.cli import main


def _decisions(classifier, cases):
    """Routing decisions of each case's prompt, rephrase and locality prompt over a store of the cases' edits."""
    with EditMemory.open("sqlite://", encoder=classifier.encoder) as mem:
        mem.add_many([{"prompt": c["prompt"], "target_new": c["target_new"], "subject": c["subject"]}
                      for c in cases])
        queries = [q for c in cases for q in (c["prompt"], c["rephrase_prompt"], c["locality_prompt"])]
        return Router(mem, classifier, k=5).route(queries)


@pytest.mark.integration
def test_the_recorded_data_and_head_are_the_files_named_beside_them(data_dir):
    """The data file the command reads and the shipped head are the ones whose sha256 README.md records."""
    readme = (PACKAGED_DEFAULT_FOLDER / "README.md").read_text()
    hashes = dict(re.findall(r"`([\w./-]+\.(?:json|pt))`, sha256 `([0-9a-f]{64})`", readme))
    head = re.search(r"head\.pt sha256 `([0-9a-f]{64})`", readme)
    assert head is not None and hashes, readme
    train = data_dir / "counterfact" / "easyedit_split" / "counterfact-train.json"
    assert hashlib.sha256(train.read_bytes()).hexdigest() == hashes["counterfact/easyedit_split/counterfact-train.json"]
    assert hashlib.sha256((PACKAGED_DEFAULT_FOLDER / "head.pt").read_bytes()).hexdigest() == head.group(1)


@pytest.mark.slow
@pytest.mark.integration
def test_rebuilding_the_shipped_head_with_its_command_gives_the_same_scores(data_dir, tmp_path, monkeypatch):
    shipped_manifest = json.loads((PACKAGED_DEFAULT_FOLDER / "manifest.json").read_text())
    argv = shlex.split(shipped_manifest["command"])
    assert argv[:2] == ["editmem", "train-scope"]
    argv = argv[1:]
    at = argv.index("--data") + 1
    argv[at] = str(data_dir / "counterfact" / "easyedit_split" / "counterfact-train.json")  # the recorded file
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 0
    rebuilt = load_scope("default", root=tmp_path / "cache" / "scope")
    shipped = load_scope(str(PACKAGED_DEFAULT_FOLDER))
    assert rebuilt.threshold == pytest.approx(shipped.threshold, abs=1e-3)
    rebuilt_cal = rebuilt.info.get("calibration", {})
    for key in ("precision", "recall"):
        assert rebuilt_cal[key] == pytest.approx(shipped_manifest["calibration"][key], abs=2e-3), key

    cases = json.loads((data_dir / "counterfact" / "easyedit_split" / "counterfact-edit.json").read_text())[:25]
    a, b = _decisions(shipped, cases), _decisions(rebuilt, cases)
    scores_a = np.array([d.score if d.score is not None else -1.0 for d in a])
    scores_b = np.array([d.score if d.score is not None else -1.0 for d in b])
    np.testing.assert_allclose(scores_b, scores_a, atol=2e-3)
    assert [d.in_scope for d in a] == [d.in_scope for d in b]
