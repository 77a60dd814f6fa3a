"""The grid and its partial order (steps 4-6 of building pairs; the paper's Fig. 2).

4. **grid** (:func:`sample_grid`): the pool sorted by semantic score is cut into ``u``
   consecutive rows of ``v * stride`` candidates (so the grid uses the top ``u * v * stride``
   by semantics); within a row, candidates sorted by aesthetic score are taken at positions
   ``0, stride, ..., (v - 1) * stride``. A pool too small for that shrinks the grid
   (:func:`fit_grid`: stride first, then the longer side), and the builder counts it;
5. **partial order** (:func:`dominance_pairs`): cell (i, j) beats (i', j') when i <= i',
   j <= j' and the cells differ: sum_{i,j} (u - i)(v - j) - uv pairs (84 for 4 x 4);
6. **weights** (:func:`pair_weights`): ``uniform`` (1) or ``margin`` (grid distance
   (i' - i) + (j' - j), normalised to mean 1 over the grid's pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

WEIGHTINGS = ("uniform", "margin")


class GridShape(NamedTuple):
    """Rows (semantic groups), columns (aesthetic picks) and the column stride."""

    u: int
    v: int
    stride: int


def fit_grid(n: int, u: int, v: int, stride: int) -> GridShape | None:
    """The largest grid a pool of ``n`` candidates allows, shrinking gracefully.

    ``u * v * stride <= n`` is needed. The stride shrinks first (down to 1); then the longer
    of u / v loses one at a time (v on ties). ``None`` when fewer than 2 cells fit.
    """
    if u < 1 or v < 1 or stride < 1:
        raise ValueError(f"u, v and stride must be >= 1, got {u}, {v}, {stride}")
    stride = max(1, min(stride, n // max(1, u * v)))
    while u * v > n:
        if v >= u and v > 1:
            v -= 1
        else:
            u -= 1
    if u * v < 2:
        return None
    return GridShape(u, v, stride)


def sample_grid(sem: np.ndarray, aes: np.ndarray, shape: GridShape) -> np.ndarray:
    """Pool indices of the grid's cells: ``[u, v]`` int64 (rows best semantic first, columns
    best aesthetic first). The pool must hold ``u * v * stride`` candidates (:func:`fit_grid`).

    Ties are broken by pool order (stable sorts), so the result is deterministic.
    """
    u, v, stride = shape
    group = v * stride
    if len(sem) < u * group:
        raise ValueError(f"a pool of {len(sem)} is too small for grid {shape}")
    by_sem = np.argsort(-np.asarray(sem, np.float64), kind="stable")
    cells = np.empty((u, v), np.int64)
    a = np.asarray(aes, np.float64)
    for i in range(u):
        members = by_sem[i * group:(i + 1) * group]
        ranked = members[np.argsort(-a[members], kind="stable")]
        cells[i] = ranked[np.arange(v) * stride]
    return cells


def dominance_pairs(u: int, v: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every ``((i, j), (i2, j2))`` with ``i <= i2``, ``j <= j2`` and distinct cells: the first
    cell is preferred (at least as good on both axes, better on one). Row-major order."""
    cells = [(i, j) for i in range(u) for j in range(v)]
    return [(a, b) for a in cells for b in cells
            if a != b and a[0] <= b[0] and a[1] <= b[1]]


def pair_weights(pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]],
                 weighting: str = "uniform") -> np.ndarray:
    """``[P]`` float32: ``uniform`` ones, or ``margin`` = grid distance normalised to mean 1."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r}: one of {list(WEIGHTINGS)}")
    if weighting == "uniform" or not pairs:
        return np.ones(len(pairs), np.float32)
    d = np.array([(b[0] - a[0]) + (b[1] - a[1]) for a, b in pairs], np.float64)
    return (d / d.mean()).astype(np.float32)


