"""Encoders: the hashing encoder's contract, the registry, and (integration) the real all-MiniLM-L6-v2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memory import EditMemory, ValidationError
from memory.encoder import DEFAULT_ENCODER, Encoder, HashingEncoder, SentenceEncoder, get_encoder
from tests.test_store_fixtures import FACTS


def test_hashing_encoder_is_deterministic_normalised_and_overlap_sensitive() -> None:
    enc = HashingEncoder(128)
    assert (enc.name, enc.dim) == ("hashing-128", 128)
    texts = ["The capital of France is", "the CAPITAL of france is", "Apple was founded by", ""]
    v = enc.encode(texts)
    assert v.dtype == np.float32 and v.shape == (4, 128)
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-5)
    assert not v[3].any()  # no words: the zero vector
    np.testing.assert_array_equal(v, HashingEncoder(128).encode(texts))
    np.testing.assert_allclose(v[0], v[1])  # case-insensitive
    assert v[0] @ v[0] > v[0] @ v[2]
    assert enc.encode([]).shape == (0, 128)


def test_get_encoder_by_name() -> None:
    assert get_encoder("hashing-256").name == "hashing-256"
    default = get_encoder()
    assert isinstance(default, SentenceEncoder) and default.name == DEFAULT_ENCODER and default.dim == 384
    enc = HashingEncoder(16)
    assert get_encoder(enc) is enc and isinstance(enc, Encoder)
    for bad in ("hashing-abc", "bert", "hashing-2"):
        with pytest.raises(ValidationError):
            get_encoder(bad)
    with pytest.raises(ValidationError):
        get_encoder(42)  # type: ignore[arg-type]


def test_default_encoder_does_not_load_the_model_until_first_encode() -> None:
    enc = SentenceEncoder()
    assert enc._model is None and enc.dim == 384 and enc._model is None


@pytest.mark.integration
def test_minilm_encodes_offline_and_ranks_paraphrases() -> None:
    enc = get_encoder(DEFAULT_ENCODER)
    v = enc.encode(["The capital of Australia is", "Which city is the capital of Australia?",
                    "The tallest mountain on Earth is"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > 0.7 > v[0] @ v[2]


@pytest.mark.integration
def test_store_with_the_default_encoder(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with EditMemory.open(url) as mem:
        assert mem.encoder.name == DEFAULT_ENCODER
        mem.add_many(FACTS)
        hits = mem.search("Which city is the capital of France?", k=2)
        assert hits[0].edit.subject == "France" and hits[0].score > 0.6
        mem.verify()
    with EditMemory.open(url) as mem:
        assert mem.encoder.name == DEFAULT_ENCODER
        assert mem.search("Who founded Apple?", k=1)[0].edit.subject == "Apple"


def test_memo_encoder_encodes_each_text_once_and_keeps_a_cache(tmp_path: Path) -> None:
    from memory.encoder import MemoEncoder

    inner = get_encoder("hashing-64")
    memo = MemoEncoder(inner, tmp_path / "memo.npz")
    assert (memo.name, memo.dim) == (inner.name, inner.dim)
    first = memo.encode(["a b", "c d", "a b"])
    assert memo.encoded == 2 and np.allclose(first, inner.encode(["a b", "c d", "a b"]))
    memo.encode(["c d"])
    assert memo.encoded == 2 and memo.encode([]).shape == (0, 64)
    memo.save()
    again = MemoEncoder(inner, tmp_path / "memo.npz")
    assert np.allclose(again.encode(["c d", "a b"]), first[[1, 0]]) and again.encoded == 0
