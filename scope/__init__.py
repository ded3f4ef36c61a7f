"""Scope: is query q inside the scope of stored edit e?

Candidates come from the store's index (top-k), a classifier scores each (query, edit) pair, and a threshold
calibrated on held-out pairs for a target precision decides. Two levels are built:

- :class:`scope.classifier.CosineScope`: the store's own cosine similarity against a threshold (no training);
- :class:`scope.classifier.HeadScope`: a small MLP over frozen encoder embeddings and a few lexical features
  (:mod:`scope.features`), trained by :mod:`scope.train` from edit data.

A cross-encoder is not built: see notes/memory_editing.md for why the trained head is enough here.
:class:`scope.router.Router` puts the pieces together for a store. Nothing here imports ``editors``.
"""

from scope.calibrate import Calibration, calibrate_threshold, precision_recall
from scope.classifier import CosineScope, HeadScope, ScopeClassifier, ScopeError, load_scope, save_scope
from scope.router import Decision, Router

__all__ = [
    "Calibration", "CosineScope", "Decision", "HeadScope", "Router", "ScopeClassifier", "ScopeError",
    "calibrate_threshold", "load_scope", "precision_recall", "save_scope",
]
