"""The relation reranker shipped in scope/default_relations: it loads on a fresh machine, it is the file whose
fingerprint its README records, it is calibrated behind the shipped scope head, and SERAC and `editmem eval-scope`
route with it by default behind that head only."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from scope.rerank import DEFAULT_RERANKER, PACKAGED_RERANKER, RelationReranker

README = PACKAGED_RERANKER.parent / "README.md"


def _shipped_head(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from scope.classifier import load_scope

    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))  # nothing trained here: the packaged head
    return load_scope("default")


def test_the_shipped_reranker_is_the_recorded_file_and_sits_behind_the_shipped_head(monkeypatch, tmp_path):
    text = README.read_text()
    recorded = re.search(r"relations\.npz sha256 `([0-9a-f]{64})`", text)
    assert recorded is not None, text
    assert hashlib.sha256(PACKAGED_RERANKER.read_bytes()).hexdigest() == recorded.group(1)
    assert PACKAGED_RERANKER.stat().st_size < 1_000_000
    reranker = RelationReranker.load(PACKAGED_RERANKER)
    assert reranker.encoder == "all-MiniLM-L6-v2" and reranker.dim == 384 and len(reranker.relations) > 30
    assert "train-relation-rerank" in reranker.info["command"] and "--in-store" in reranker.info["command"]
    head = _shipped_head(monkeypatch, tmp_path)
    behind = reranker.threshold_for(head)
    assert behind is not None and behind == reranker.info["behind"]["threshold"] and 0 < behind < head.threshold
    assert reranker.info["behind"]["in_store"]["sweep"]["met"]
    assert f"{behind:.4f}" in text  # the README quotes the threshold the file holds


def test_load_rerankers_gives_the_shipped_one_behind_the_shipped_head_only(monkeypatch, tmp_path):
    from editors.retrieval.setup import load_rerankers
    from scope.classifier import CosineScope

    head = _shipped_head(monkeypatch, tmp_path)
    own = head.threshold
    relation, cross = load_rerankers(DEFAULT_RERANKER, None, classifier=head, keep_threshold=True)
    assert relation is not None and cross is None and head.threshold == own  # a threshold the user set stays
    relation, _ = load_rerankers(DEFAULT_RERANKER, None, classifier=head)
    assert head.threshold == relation.info["behind"]["threshold"]
    cosine = CosineScope(0.8, "all-MiniLM-L6-v2", {"name": "cosine"})
    assert load_rerankers(DEFAULT_RERANKER, None, classifier=cosine) == (None, None) and cosine.threshold == 0.8
    other = _shipped_head(monkeypatch, tmp_path)
    other.info["created"] = "2026-12-31T00:00:00+00:00"  # a head trained here under the same name
    other_threshold = other.threshold
    assert load_rerankers(DEFAULT_RERANKER, None, classifier=other)[0] is None
    assert other.threshold == other_threshold
    assert load_rerankers(None, None, classifier=head) == (None, None)


@pytest.mark.integration
def test_serac_routes_with_the_shipped_reranker_by_default_behind_the_shipped_head(monkeypatch, tmp_path):
    """With every default (the shipped head on MiniLM), SERAC's router holds the shipped reranker and the threshold
    calibrated behind it: the edit's prompt and its rephrases are routed, a question about the edited subject that
    asks another relation scores far lower than without the reranker (here below the threshold for one, not for the
    other), an unrelated subject not at all. ``reranker=None`` turns it off; a scope on another encoder never gets
    it."""
    from editors import get_editor
    from tests.tiny import tiny_model

    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama")
    serac = get_editor("serac", model, tok)
    router = serac.model.router
    assert router.reranker is not None and router.reranker.relations == RelationReranker.load(
        PACKAGED_RERANKER).relations
    assert router.classifier.threshold == router.reranker.info["behind"]["threshold"]
    plain = get_editor("serac", model, tok, reranker=None)
    assert plain.model.router.reranker is None and plain.model.router.classifier.threshold > 0.7
    queries = ["The mother tongue of Tom Fletcher is", "Tom Fletcher's native language is",
               "Tom Fletcher is a native speaker of", "Tom Fletcher is a citizen of", "Tom Fletcher was born in",
               "The mother tongue of Ada Berg is"]
    decided = {}
    for name, editor in (("ranked", serac), ("plain", plain)):
        editor.memory.add("The mother tongue of Tom Fletcher is", "French", subject="Tom Fletcher")
        decided[name] = editor.model.route(queries)
    ranked, unranked = decided["ranked"], decided["plain"]
    assert [d.in_scope for d in ranked[:3]] == [True, True, True]
    assert not ranked[3].in_scope and not ranked[5].in_scope
    for other in (3, 4):  # other relations of the edited subject
        assert ranked[other].score < 0.3 * unranked[other].score, (queries[other], ranked[other], unranked[other])
    hashed = get_editor("serac", model, tok, scope="cosine", encoder="hashing-256", threshold=0.8)
    assert hashed.model.router.reranker is None


@pytest.mark.integration
def test_eval_scope_routes_with_the_shipped_reranker_unless_told_none(monkeypatch, tmp_path, capsys):
    from serve.cli import main

    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    cases = [{"prompt": f"{name}'s mother tongue is", "target_new": "English", "subject": name,
              "rephrase_prompt": f"The native language of {name} is",
              "locality_prompt": f"{other} was born in the city of", "locality_ground_truth": "Paris"}
             for name, other in (("Danielle Darrieux", "Marc Dufour"), ("Lars Nilsson", "Ines Alves"))]
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(cases))
    reports = {}
    for flag in ("default", "none"):
        out = tmp_path / f"{flag}.json"
        assert main(["eval-scope", "--data", str(data), "--reranker", flag, "--json", str(out)]) == 0
        reports[flag] = json.loads(out.read_text())
    capsys.readouterr()
    assert reports["default"]["threshold"] < reports["none"]["threshold"]
    assert reports["default"]["threshold"] == pytest.approx(
        RelationReranker.load(PACKAGED_RERANKER).info["behind"]["threshold"])


@pytest.mark.slow
@pytest.mark.integration
def test_rebuilding_the_shipped_reranker_with_its_command_gives_the_same_routing_threshold(data_dir, tmp_path,
                                                                                         monkeypatch):
    """The recorded command, rerun on the recorded data under a fresh cache (about 6 minutes on 2 cores), gives a
    reranker whose in-store threshold and relation predictions match the shipped one's."""
    from serve.cli import main

    shipped = RelationReranker.load(PACKAGED_RERANKER)
    argv = shlex.split(shipped.info["command"])[1:]
    argv[argv.index("--data") + 1] = str(data_dir / "counterfact" / "easyedit_split" / "counterfact-train.json")
    argv[argv.index("--out") + 1] = str(tmp_path / "rebuilt.npz")
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 0
    rebuilt = RelationReranker.load(tmp_path / "rebuilt.npz")
    assert rebuilt.relations == shipped.relations
    assert rebuilt.info["behind"]["threshold"] == pytest.approx(shipped.info["behind"]["threshold"], abs=5e-3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, shipped.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    agree = np.mean(np.array(shipped.predict(x)) == np.array(rebuilt.predict(x)))
    assert agree > 0.9, agree
