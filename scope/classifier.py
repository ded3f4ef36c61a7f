"""Scope classifiers: score (query, edit) pairs; a pair is in scope when its score reaches the threshold.

Saved classifiers live under ``$EDITMEM_CACHE/scope/<name>/v<N>/`` (default cache ``~/.cache/editmem``): a JSON
``manifest.json`` (format version, kind, encoder name and dimension, feature spec, threshold, calibration, metrics,
training settings, creation time) and, for a trained head, ``head.pt`` (a plain state dict). Every save under a name
writes the next version; ``load_scope(name)`` loads the newest unless a version is given. A classifier trained for
another encoder than the store's is refused (:meth:`ScopeClassifier.check_encoder`), since its features would mean
nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory.errors import EditmemError, ValidationError
from memory.paths import cache_subdir
from memory.records import EditRecord, Hit
from scope.features import FEATURE_SPEC, lexical_many, n_features, pair_features

log = logging.getLogger(__name__)

FORMAT = "editmem-scope"
# The scope head shipped inside the package (scope/default_head/README.md says how it was made): what
# ``load_scope("default")`` gives on a machine where no classifier named ``default`` has been trained.
PACKAGED_DEFAULT = "default"
PACKAGED_DEFAULT_FOLDER = Path(__file__).resolve().parent / "default_head"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ScopeError(EditmemError):
    """A scope classifier that cannot be used: not found, corrupt, or made for another encoder."""


def scope_root() -> Path:
    """Where saved classifiers live: ``$EDITMEM_CACHE/scope`` (default ``~/.cache/editmem/scope``)."""
    return cache_subdir("scope")


class ScopeClassifier(ABC):
    """Scores (query, edit) pairs; ``score >= threshold`` means the query is inside the edit's scope."""

    kind: str = ""
    needs_vectors: bool = True  # whether score_hits reads the query and key embeddings

    def __init__(self, threshold: float, encoder: str | None, info: Mapping[str, Any] | None = None):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            raise ValidationError(f"scope threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)
        self.encoder = encoder  # None: works with any encoder (an uncalibrated cosine threshold)
        self.info: dict[str, Any] = dict(info or {})  # name, version, calibration, metrics, training

    @abstractmethod
    def score(self, queries: Sequence[str], u: np.ndarray, edits: Sequence[EditRecord], v: np.ndarray) -> np.ndarray:
        """Scores (n,) of n pairs: query texts and their embeddings ``u`` (n, dim), edits and their key embeddings
        ``v`` (n, dim), unit rows from the encoder this classifier was made for."""

    def score_hits(self, queries: Sequence[str], hits: Sequence[Hit], u: np.ndarray | None,
                   v: np.ndarray | None) -> np.ndarray:
        """Scores (n,) of n (query, search hit) pairs. ``u`` and ``v`` are the queries' and the hits' key embeddings
        as in :meth:`score`; they may be None for a classifier whose :attr:`needs_vectors` is false."""
        if u is None or v is None:
            raise ValueError(f"the {self.kind} scope classifier scores from embeddings: pass the query and key vectors")
        return self.score(queries, u, [h.edit for h in hits], v)

    def check_encoder(self, encoder_name: str) -> None:
        """Raise :class:`ScopeError` unless this classifier can score embeddings of ``encoder_name``."""
        if self.encoder is not None and self.encoder != encoder_name:
            label = self.info.get("name", self.kind)
            raise ScopeError(f"scope classifier {label!r} was trained for encoder {self.encoder!r}, but the store "
                             f"uses {encoder_name!r}; train one for it (editmem train-scope --encoder "
                             f"{encoder_name}) or open the store with encoder {self.encoder!r}")

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "encoder": self.encoder,
                "threshold": self.threshold, **{k: v for k, v in self.info.items() if k not in ("name", "version")}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold:.4f}, encoder={self.encoder!r})"


class CosineScope(ScopeClassifier):
    """Level 1: the cosine similarity of query and edit key (no training)."""

    kind = "cosine"
    needs_vectors = False  # a search hit's score is already the cosine of query and key

    def __init__(self, threshold: float = 0.8, encoder: str | None = None, info: Mapping[str, Any] | None = None):
        super().__init__(threshold, encoder, info)

    def score(self, queries: Sequence[str], u: np.ndarray, edits: Sequence[EditRecord], v: np.ndarray) -> np.ndarray:
        return np.einsum("nd,nd->n", np.asarray(u, dtype=np.float32), np.asarray(v, dtype=np.float32))

    def score_hits(self, queries: Sequence[str], hits: Sequence[Hit], u: np.ndarray | None,
                   v: np.ndarray | None) -> np.ndarray:
        return np.asarray([h.score for h in hits], dtype=np.float32)


class ScopeHead(torch.nn.Module):
    """MLP over pair features (``hidden=0``: logistic regression); outputs a logit."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        n = n_features(dim)
        self.net = torch.nn.Sequential(torch.nn.Linear(n, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)) \
            if hidden else torch.nn.Linear(n, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class HeadScope(ScopeClassifier):
    """Level 2: a trained head over frozen encoder embeddings (:mod:`scope.features`); scores are probabilities."""

    kind = "head"

    def __init__(self, head: ScopeHead, dim: int, hidden: int, threshold: float, encoder: str,
                 info: Mapping[str, Any] | None = None):
        super().__init__(threshold, encoder, info)
        self.head = head.eval()
        self.dim = dim
        self.hidden = hidden

    @torch.no_grad()
    def score(self, queries: Sequence[str], u: np.ndarray, edits: Sequence[EditRecord], v: np.ndarray) -> np.ndarray:
        if len(queries) == 0:
            return np.zeros(0, dtype=np.float32)
        lex = lexical_many(queries, [e.prompt for e in edits], [e.subject for e in edits])
        return self.score_arrays(u, v, lex)

    @torch.no_grad()
    def score_arrays(self, u: np.ndarray, v: np.ndarray, lex: np.ndarray, batch: int = 8192) -> np.ndarray:
        """Scores from precomputed arrays (training and bulk evaluation)."""
        out = []
        for start in range(0, len(u), batch):
            feats = pair_features(torch.as_tensor(u[start:start + batch]), torch.as_tensor(v[start:start + batch]),
                                  torch.as_tensor(lex[start:start + batch]))
            out.append(torch.sigmoid(self.head(feats)).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def manifest(self) -> dict[str, Any]:
        return {**super().manifest(), "encoder_dim": self.dim, "feature_spec": FEATURE_SPEC, "hidden": self.hidden}


# --- saving and loading -----------------------------------------------------------------------------------------------
def check_name(name: str) -> str:
    """``name`` if it can name a saved classifier (a folder name, no path); ValidationError otherwise."""
    return _check_name(name)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValidationError(f"scope classifier name must be letters, digits, '_', '-' or '.', got {name!r}")
    return name


def _versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name))


def save_scope(classifier: ScopeClassifier, name: str, *, root: str | os.PathLike[str] | None = None) -> Path:
    """Save ``classifier`` as the next version of ``name``; returns its folder. The folder appears complete or not
    at all (written to a temporary name, then renamed)."""
    base = Path(root) if root is not None else scope_root()
    folder = base / _check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    version = (_versions(folder) or [0])[-1] + 1
    tmp = folder / f".tmp-v{version}-{os.getpid()}"
    tmp.mkdir()
    manifest = {**classifier.manifest(), "name": name, "version": version,
                "created": datetime.now(UTC).isoformat(timespec="seconds")}
    if isinstance(classifier, HeadScope):
        torch.save(classifier.head.state_dict(), tmp / "head.pt")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    final = folder / f"v{version}"
    tmp.rename(final)
    classifier.info.update(name=name, version=version)
    log.info("saved scope classifier %s v%d to %s", name, version, final)
    return final


def list_scopes(*, root: str | os.PathLike[str] | None = None) -> dict[str, list[int]]:
    """Saved classifier names and their versions."""
    base = Path(root) if root is not None else scope_root()
    if not base.is_dir():
        return {}
    return {p.name: _versions(p) for p in sorted(base.iterdir()) if _versions(p)}


def load_scope(name: str, version: int | None = None, *, encoder: str | None = None,
               root: str | os.PathLike[str] | None = None) -> ScopeClassifier:
    """Load a saved classifier by name (newest version unless ``version``) or from a folder path holding a
    manifest. With ``encoder``, refuse one trained for another encoder."""
    path = Path(name)
    if (path / "manifest.json").is_file():
        folder = path
    else:
        base = Path(root) if root is not None else scope_root()
        versions = _versions(base / _check_name(name))
        if not versions and name == PACKAGED_DEFAULT and version is None \
                and (PACKAGED_DEFAULT_FOLDER / "manifest.json").is_file():
            log.info("no scope classifier %r in %s: using the one shipped with editmem (%s)", name, base,
                     PACKAGED_DEFAULT_FOLDER)
            return load_scope(str(PACKAGED_DEFAULT_FOLDER), encoder=encoder)
        if not versions:
            known = ", ".join(list_scopes(root=root)) or "none"
            raise ScopeError(f"no scope classifier named {name!r} in {base} (saved: {known}); train one with "
                             f"`editmem train-scope --data FILE --name {name}`, or use the untrained cosine scope "
                             "(--scope cosine; in eval, --set METHOD.scope=cosine)")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise ScopeError(f"scope classifier {name!r} has no version {version} (versions: {versions})")
        folder = base / name / f"v{version}"
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ScopeError(f"{folder / 'manifest.json'}: cannot read the manifest: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ScopeError(f"{folder}: not an editmem scope classifier of format version {FORMAT_VERSION} "
                         f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r})")
    info = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "kind", "encoder", "threshold",
                                                           "encoder_dim", "feature_spec", "hidden")}
    kind = manifest.get("kind")
    if kind == "cosine":
        clf: ScopeClassifier = CosineScope(manifest["threshold"], manifest.get("encoder"), info)
    elif kind == "head":
        if manifest.get("feature_spec") != FEATURE_SPEC:
            raise ScopeError(f"{folder}: made with features {manifest.get('feature_spec')!r}; this version of "
                             f"editmem builds {FEATURE_SPEC!r}; retrain it")
        dim, hidden = int(manifest["encoder_dim"]), int(manifest["hidden"])
        head = ScopeHead(dim, hidden)
        try:
            head.load_state_dict(torch.load(folder / "head.pt", map_location="cpu", weights_only=True))
        except (OSError, RuntimeError) as err:
            raise ScopeError(f"{folder / 'head.pt'}: cannot load the trained head: {err}") from None
        clf = HeadScope(head, dim, hidden, manifest["threshold"], manifest["encoder"], info)
    else:
        raise ScopeError(f"{folder}: unknown classifier kind {kind!r}")
    if encoder is not None:
        clf.check_encoder(encoder)
    return clf
