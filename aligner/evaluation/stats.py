"""Statistics of the evaluation: bootstrap confidence intervals, paired differences and rank
correlation (numpy only)."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap CI of the mean: ``(mean, lo, hi)``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(1)
    return (float(v.mean()), float(np.quantile(means, alpha / 2)),
            float(np.quantile(means, 1 - alpha / 2)))


def ci_dict(values: np.ndarray, **kw) -> dict[str, float]:
    """:func:`bootstrap_ci` as ``{"mean", "ci_low", "ci_high", "n"}`` (for metrics.json)."""
    m, lo, hi = bootstrap_ci(values, **kw)
    return {"mean": m, "ci_low": lo, "ci_high": hi, "n": int(np.asarray(values).size)}


def finite_ci_dict(values: np.ndarray, **kw) -> dict[str, float]:
    """:func:`ci_dict` over the finite values only; ``undefined`` counts the others (e.g. a
    query whose top 10 holds no relevant image has no beauty among relevant results)."""
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    out = ci_dict(v[ok], **kw)
    if not ok.all():
        out["undefined"] = int((~ok).sum())
    return out


def cluster_ci_dict(values: np.ndarray, groups: np.ndarray, weights: np.ndarray | None = None,
                    n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """(Weighted) mean of ``values`` with a percentile bootstrap CI that resamples whole
    ``groups`` (queries), not rows: rows of one query are correlated (row pairs drawn from the
    same pool, pairs of one grid), so resampling rows gives intervals that are too narrow.

    Returns:
        ``{"mean", "ci_low", "ci_high", "n", "clusters", "resampled": "clusters"}`` (NaN
        when there are no rows or the weights sum to 0).
    """
    v = np.asarray(values, np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
    g = np.asarray(groups)
    nan = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
           "n": int(v.size), "clusters": 0, "resampled": "clusters"}
    if v.size == 0 or w.sum() <= 0:
        return nan
    if g.shape != v.shape:
        raise ValueError(f"groups {g.shape} and values {v.shape} differ")
    _, inv = np.unique(g, return_inverse=True)
    n_g = int(inv.max()) + 1
    ws = np.bincount(inv, weights=w, minlength=n_g)
    wv = np.bincount(inv, weights=w * v, minlength=n_g)
    idx = np.random.default_rng(seed).integers(0, n_g, (n_boot, n_g))
    den = ws[idx].sum(1)
    means = np.where(den > 0, wv[idx].sum(1) / np.maximum(den, 1e-300), np.nan)
    means = means[np.isfinite(means)]
    return {"mean": float(wv.sum() / ws.sum()), "ci_low": float(np.quantile(means, alpha / 2)),
            "ci_high": float(np.quantile(means, 1 - alpha / 2)), "n": int(v.size),
            "clusters": n_g, "resampled": "clusters"}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty_like(order, dtype=np.float64)
        r[order] = np.arange(len(x), dtype=np.float64)
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def weighted_bootstrap_ci(values: np.ndarray, weights: np.ndarray, n_boot: int = 2000,
                          alpha: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Weighted mean ``sum(w v) / sum(w)`` with a percentile bootstrap CI (rows resampled).

    Returns:
        ``{"mean", "ci_low", "ci_high", "n"}`` like :func:`ci_dict` (NaN when the weights sum
        to 0 or there are no rows).
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    nan = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": int(v.size)}
    if v.size == 0 or w.sum() <= 0:
        return nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, (n_boot, v.size))
    ws = w[idx].sum(1)
    means = np.where(ws > 0, (w[idx] * v[idx]).sum(1) / np.maximum(ws, 1e-300), np.nan)
    means = means[np.isfinite(means)]
    return {"mean": float((w * v).sum() / w.sum()),
            "ci_low": float(np.quantile(means, alpha / 2)),
            "ci_high": float(np.quantile(means, 1 - alpha / 2)), "n": int(v.size)}
