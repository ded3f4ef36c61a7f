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


# --- routing-level calibration: one threshold, two precision targets ----------------------------------------------
REPHRASE, NO_SUBJECT, NAMED_SUBJECT = 0, 1, 2  # the groups of routed queries (see scope.evaluate)


@dataclass(frozen=True)
class RoutingPoint:
    """What routing at ``threshold`` gives on a set of recorded routings (relation-aware labels)."""

    threshold: float
    recall: float
    precision_no_subject: float
    precision_named_subject: float
    routed: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def routing_points(scores: Sequence[float] | np.ndarray, groups: Sequence[int] | np.ndarray,
                   right: Sequence[int | bool] | np.ndarray) -> list[RoutingPoint]:
    """Recall and the two precisions at every cut between distinct scores, highest threshold first.

    One entry per routed query: ``scores`` its best candidate's score (NaN: no candidate), ``groups`` one of
    :data:`REPHRASE`, :data:`NO_SUBJECT` (a locality prompt that names no stored edit's subject),
    :data:`NAMED_SUBJECT` (one that does), ``right`` whether the best candidate is the query's edit (a rephrase's own
    edit; for a named-subject locality prompt, an edit whose subject it names and whose relation it asks; never for a
    no-subject prompt). A query is routed to its best candidate exactly when the score reaches the threshold, as
    :class:`scope.router.Router` decides without a cross-encoder. Precisions follow
    :func:`scope.evaluate.routing_report`'s relation-aware ones: ``TP / (TP + wrong edit + that group's locality
    FP)``, the named group's TP including its right routings; recall is over every rephrase."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    y = np.asarray(right).reshape(-1).astype(bool)
    if not (s.shape == g.shape == y.shape):
        raise ValidationError(f"{s.size} scores, {g.size} groups and {y.size} labels")
    if not np.isin(g, (REPHRASE, NO_SUBJECT, NAMED_SUBJECT)).all():
        raise ValidationError("groups must be REPHRASE, NO_SUBJECT or NAMED_SUBJECT")
    n_rephrases = int((g == REPHRASE).sum())
    if n_rephrases == 0:
        raise ValidationError("routing calibration needs at least one rephrase")
    keep = np.isfinite(s)  # a query without candidates is never routed
    s, g, y = s[keep], g[keep], y[keep]
    order = np.argsort(-s, kind="stable")
    s, g, y = s[order], g[order], y[order]
    tp = np.cumsum((g == REPHRASE) & y)
    wrong = np.cumsum((g == REPHRASE) & ~y)
    fp_none = np.cumsum(g == NO_SUBJECT)
    tp_named = np.cumsum((g == NAMED_SUBJECT) & y)
    fp_named = np.cumsum((g == NAMED_SUBJECT) & ~y)
    cuts = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.array([], dtype=int)
    points = []
    for c in cuts.tolist():
        below = s[c + 1] if c + 1 < s.size else s[c] - 1.0
        threshold = float((s[c] + below) / 2)
        den_none = tp[c] + wrong[c] + fp_none[c]
        good_named = tp[c] + tp_named[c]
        den_named = good_named + wrong[c] + fp_named[c]
        points.append(RoutingPoint(threshold, float(tp[c] / n_rephrases),
                                   float(tp[c] / den_none) if den_none else 1.0,
                                   float(good_named / den_named) if den_named else 1.0, int(c + 1)))
    return points


def calibrate_routing(scores: Sequence[float] | np.ndarray, groups: Sequence[int] | np.ndarray,
                      right: Sequence[int | bool] | np.ndarray, target_no_subject: float = 0.99,
                      target_named_subject: float = 0.95) -> tuple[RoutingPoint | None, bool]:
    """The threshold with the highest recall whose precisions reach both targets on these routings (see
    :func:`routing_points`), and True; when no threshold reaches both, the one whose worse shortfall is smallest,
    and False. None when nothing has a candidate."""
    return choose_routing_point(routing_points(scores, groups, right), target_no_subject, target_named_subject)


def choose_routing_point(points: Sequence[RoutingPoint], target_no_subject: float = 0.99,
                         target_named_subject: float = 0.95) -> tuple[RoutingPoint | None, bool]:
    """:func:`calibrate_routing`'s choice among points :func:`routing_points` already gave (for a caller that also
    keeps the curve)."""
    for name, value in (("target_no_subject", target_no_subject), ("target_named_subject", target_named_subject)):
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ValidationError(f"{name} must be in (0, 1], got {value!r}")
    if not points:
        return None, False
    ok = [p for p in points if p.precision_no_subject >= target_no_subject
          and p.precision_named_subject >= target_named_subject]
    if ok:
        return max(ok, key=lambda p: (p.recall, p.threshold)), True
    return max(points, key=lambda p: (min(p.precision_no_subject - target_no_subject,
                                          p.precision_named_subject - target_named_subject), p.recall)), False

