"""The null-space projection of preserved knowledge (AlphaEdit, Fang et al. ICLR 2025, "AlphaEdit: Null-Space
Constrained Knowledge Editing for Language Models", section 3.2), from the same key statistics as ROME and MEMIT.

For a layer whose MLP output projection sees the preserved keys ``K_0`` (the keys of ordinary text), AlphaEdit
projects every update onto the null space of ``K_0 K_0^T``: an update ``Delta P`` with ``P K_0 = 0`` leaves the
layer's output on every preserved key unchanged. ``K_0 K_0^T`` is estimated by the second moment
``C = E[k k^T]`` (:mod:`editors.locate.stats`), which has the same eigenvectors; its eigen-decomposition
``C = U diag(s) U^T`` (float64, :func:`torch.linalg.eigh`) gives ``P = U_0 U_0^T`` over the eigenvectors whose
eigenvalue is below ``threshold`` (the paper's code keeps singular values below 2e-2, on its models' key scale).

Cache: beside the statistics file, ``layer<L>-null<threshold>.pt`` (written atomically), so a projection is computed
once per model, layer, corpus and threshold; identity statistics (no corpus) have no file and are projected in
memory each time an editor first needs them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from editors.locate.stats import LayerStats

log = logging.getLogger(__name__)

PROJECTION_FORMAT = 1


@dataclass(frozen=True)
class Projection:
    """``matrix``: ``P`` (d, d) float64; ``kept``: the null space's dimension; ``seconds``: the time to compute it
    (0 when read from the cache)."""

    layer: int
    matrix: torch.Tensor
    kept: int
    threshold: float
    seconds: float
    from_cache: bool = False


def projection_path(stats: LayerStats, threshold: float) -> Path | None:
    if stats.path is None:
        return None
    return stats.path.with_name(f"{stats.path.stem}-null{threshold:.6g}.pt")


def null_space_projection(stats: LayerStats, threshold: float) -> Projection:
    """``P`` onto the eigenvectors of ``stats.mom2`` with eigenvalue below ``threshold`` (see the module docstring)."""
    path = projection_path(stats, threshold)
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("format") == PROJECTION_FORMAT:
                return Projection(stats.layer, blob["matrix"], int(blob["kept"]), threshold, 0.0, from_cache=True)
        except Exception as err:  # an unreadable cache file is recomputed
            log.warning("ignoring unreadable projection cache %s (%s)", path, err)
    t0 = time.perf_counter()
    values, vectors = torch.linalg.eigh(stats.mom2.double())
    null = vectors[:, values < threshold]
    matrix = null @ null.T
    seconds = time.perf_counter() - t0
    result = Projection(stats.layer, matrix, int(null.shape[1]), threshold, seconds)
    log.info("null-space projection at layer %d: %d of %d directions below %.3g (%.2f s)", stats.layer,
             result.kept, matrix.shape[0], threshold, seconds)
    if path is not None:
        _save(path, result)
    return result


def _save(path: Path, projection: Projection) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": PROJECTION_FORMAT, "matrix": projection.matrix, "kept": projection.kept,
                    "threshold": projection.threshold, "seconds": projection.seconds}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
