"""Threshold calibration: the lowest threshold whose precision on held-out pairs reaches a target.

Decisions are ``score >= threshold``. Among the cut points between distinct scores, the one with the highest recall
whose precision is at least ``target_precision`` is chosen; the threshold is placed midway between the last score
kept and the next one below it, so scores equal to a calibration score are decided the same way as in calibration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from memory.errors import ValidationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """A chosen threshold and what it achieves on the pairs it was chosen on."""

    threshold: float
    target_precision: float
    precision: float
    recall: float
    n_positive: int
    n_negative: int
    met: bool  # False when no threshold reaches the target precision (the most precise one is given instead)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check(scores: Sequence[float] | np.ndarray,
           labels: Sequence[int | bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValidationError(f"{s.size} scores but {y.size} labels")
    if s.size == 0:
        raise ValidationError("no pairs to calibrate on")
    if not np.isfinite(s).all():
        raise ValidationError("scores must be finite")
    return s, y


def precision_recall(scores: Sequence[float] | np.ndarray, labels: Sequence[int | bool] | np.ndarray,
                     threshold: float) -> tuple[float, float]:
    """Precision and recall of ``score >= threshold`` (precision 1.0 when nothing is predicted positive)."""
    s, y = _check(scores, labels)
    pred = s >= threshold
    tp = int((pred & y).sum())
    n_pred, n_pos = int(pred.sum()), int(y.sum())
    return (tp / n_pred if n_pred else 1.0), (tp / n_pos if n_pos else 0.0)


def calibrate_threshold(scores: Sequence[float] | np.ndarray, labels: Sequence[int | bool] | np.ndarray,
                        target_precision: float = 0.98) -> Calibration:
    """The threshold with the highest recall at precision >= ``target_precision`` on these pairs."""
    if not (isinstance(target_precision, (int, float)) and 0 < target_precision <= 1):
        raise ValidationError(f"target precision must be in (0, 1], got {target_precision!r}")
    s, y = _check(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0:
        raise ValidationError("calibration needs at least one positive pair")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    n_pred = np.arange(1, s.size + 1)
    # only cut after the last of a run of equal scores
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    cuts = np.flatnonzero(last_of_run)
    precision = tp[cuts] / n_pred[cuts]
    recall = tp[cuts] / n_pos
    ok = precision >= target_precision
    if ok.any():
        best = cuts[np.flatnonzero(ok)[np.argmax(recall[ok])]]
        met = True
    else:
        best = cuts[int(np.argmax(precision))]
        met = False
        log.warning("no threshold reaches precision %.3f on %d pairs; using the most precise one", target_precision,
                    s.size)
    kept = s_sorted[best]
    below = s_sorted[best + 1] if best + 1 < s.size else kept - 1.0
    threshold = float((kept + below) / 2)
    if not math.isfinite(threshold):
        threshold = float(kept)
    p, r = precision_recall(s, y, threshold)
    return Calibration(threshold=threshold, target_precision=float(target_precision), precision=p, recall=r,
                       n_positive=n_pos, n_negative=n_neg, met=met)
