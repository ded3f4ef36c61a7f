"""Second-moment statistics of MLP keys: the numbers, the on-disk cache (hit, invalidation), the no-corpus fallback and
how ROME and MEMIT report which one they used."""

from __future__ import annotations

import pytest
import torch

from editors import get_editor
from editors.lm.architectures import layer_module
from editors.lm.hooks import capture
from editors.locate.stats import (
    corpus_identity,
    editor_stats,
    identity_stats,
    mlp_key_stats,
    resolve_corpus,
    stats_path,
)
from memory.errors import ValidationError
from tests.tiny import _corpus, tiny_model

N = 300  # tokens: small, so a pass takes a fraction of a second




@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDITMEM_STATS_CORPUS", raising=False)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(line + " " + line for line in _corpus()) + "\n= Short heading =\n")
    return path


def test_mom2_is_the_mean_outer_product_of_keys(corpus):
    model, tok = tiny_model("llama")
    stats = mlp_key_stats(model, tok, [2], corpus, n_tokens=N, seq_len=16, progress=False)[2]
    assert stats.n_tokens == N and not stats.from_cache
    c = stats.mom2
    assert c.shape == (128, 128) and torch.allclose(c, c.T, atol=1e-6)
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-9
    # the same by hand, for the first line alone: its keys' mean outer product is what a 1-line corpus gives
    one = corpus.parent / "one.txt"
    line = corpus.read_text().splitlines()[0]
    one.write_text(line + "\n")
    ids = tok(line, add_special_tokens=False)["input_ids"][:16]
    module = layer_module(model, 2, "mlp_out")
    with torch.no_grad(), capture(module, "input") as k:
        model(input_ids=torch.tensor([ids]))
    keys = k.last[0].double()
    expected = (keys.T @ keys / len(ids)).float()
    got = mlp_key_stats(model, tok, [2], one, n_tokens=N, seq_len=16, progress=False)[2]
    assert got.n_tokens == len(ids)
    torch.testing.assert_close(got.mom2, expected, rtol=1e-4, atol=1e-7)


def test_cache_hit(corpus):
    model, tok = tiny_model("gpt2")
    first = mlp_key_stats(model, tok, [1], corpus, n_tokens=N, seq_len=16, progress=False)[1]
    assert not first.from_cache and first.path is not None and first.path.is_file()
    mtime = first.path.stat().st_mtime_ns
    second = mlp_key_stats(model, tok, [1], corpus, n_tokens=N, seq_len=16, progress=False)[1]
    assert second.from_cache and second.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert torch.equal(first.mom2, second.mom2) and second.source == first.source
    # a new editor instance (as the harness makes per method) reads the cache too
    editor = get_editor("rome", model, tok, stats_corpus=str(corpus), stats_tokens=N, stats_seq_len=16, layer=1)
    assert editor.layer_stats([1])[1].from_cache
    assert "corpus corpus.txt" in editor.stats_source


def test_cache_invalidation(corpus, tmp_path):
    model, tok = tiny_model("gpt2")
    base = mlp_key_stats(model, tok, [1], corpus, n_tokens=N, seq_len=16, progress=False)[1]
    other_layer = mlp_key_stats(model, tok, [1, 2], corpus, n_tokens=N, seq_len=16, progress=False)
    assert other_layer[1].from_cache and not other_layer[2].from_cache and other_layer[2].path != base.path
    fewer = mlp_key_stats(model, tok, [1], corpus, n_tokens=N // 2, seq_len=16, progress=False)[1]
    assert not fewer.from_cache and fewer.path != base.path
    changed = tmp_path / "corpus2.txt"
    changed.write_text(corpus.read_text().replace("capital", "largest city"))
    assert corpus_identity(changed) != corpus_identity(corpus)
    new_corpus = mlp_key_stats(model, tok, [1], changed, n_tokens=N, seq_len=16, progress=False)[1]
    assert not new_corpus.from_cache and new_corpus.path != base.path
    assert not torch.equal(new_corpus.mom2, base.mom2)
    other_model, _ = tiny_model("gpt2", seed=1)
    assert stats_path(other_model, 1, corpus, N, 16) != base.path


def test_layers_in_one_pass_equal_separate_passes(corpus):
    model, tok = tiny_model("qwen2")
    together = mlp_key_stats(model, tok, [1, 3], corpus, n_tokens=N, seq_len=16, progress=False)
    alone = mlp_key_stats(model, tok, [3], corpus, n_tokens=N, seq_len=32, progress=False)[3]  # other key, fresh
    assert not alone.from_cache
    assert together[1].mom2.shape == together[3].mom2.shape == (128, 128)
    torch.testing.assert_close(together[3].mom2, mlp_key_stats(model, tok, [3], corpus, n_tokens=N, seq_len=16,
                                                                progress=False)[3].mom2)


def test_identity_fallback_and_what_editors_report(corpus, monkeypatch):
    model, tok = tiny_model("llama")
    fallback = identity_stats(model, tok, 1, ["The capital of France is Paris."])
    assert fallback.source.startswith("identity (no corpus)")
    scale = fallback.mom2[0, 0].item()
    assert scale > 0 and torch.equal(fallback.mom2, torch.eye(128) * scale)
    assert resolve_corpus(None) is None
    stats = editor_stats(model, tok, [1], None, n_tokens=N, seq_len=16, fallback_texts=["Some text here."])
    assert stats[1].source.startswith("identity")
    monkeypatch.setenv("EDITMEM_STATS_CORPUS", str(corpus))
    assert resolve_corpus(None) == corpus
    editor = get_editor("memit", model, tok, stats_tokens=N, stats_seq_len=16)
    editor.layer_stats([1, 2])
    assert editor.stats_source.startswith("corpus corpus.txt")
    off = get_editor("rome", model, tok, mom2_adjustment=False)
    off.layer_stats([1])
    assert off.stats_source == "identity (mom2_adjustment off)"


def test_bad_corpus(tmp_path):
    model, tok = tiny_model("llama")
    with pytest.raises(ValidationError, match="not a file"):
        mlp_key_stats(model, tok, [1], tmp_path / "missing.txt", n_tokens=N, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("short\nlines\n")
    with pytest.raises(ValidationError, match="no line"):
        mlp_key_stats(model, tok, [1], empty, n_tokens=N, progress=False)
    with pytest.raises(ValidationError, match="layer 7 does not exist"):
        mlp_key_stats(model, tok, [7], empty, n_tokens=N, progress=False)


def test_wikitext_sample(data_dir):
    """The corpus the benchmarks use: a small sample at one layer."""
    model, tok = tiny_model("gpt_neox")
    corpus = data_dir / "text_corpus" / "wikitext-2-raw_wiki.test.raw"
    stats = mlp_key_stats(model, tok, [1], corpus, n_tokens=1000, seq_len=64, progress=False)[1]
    assert stats.n_tokens == 1000 and "wikitext-2-raw_wiki.test.raw" in stats.source
    assert torch.isfinite(stats.mom2).all() and stats.mom2.trace() > 0
