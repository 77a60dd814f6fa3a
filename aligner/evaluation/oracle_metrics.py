"""Metrics that judge results with the world's oracle (``docs/evaluation.md`` defines them):
nDCG@K with graded gain ``match x beauty`` (the primary metric), beauty among the relevant
results, aesthetic@K (a diagnostic: it averages over wrong-content results too), and how often
a teacher's preference pairs agree with the oracle. HPIR per aspect lives in
:mod:`aligner.evaluation.hpir`.

Pure numpy over arrays the caller gets from :class:`aligner.evaluation.oracle.WorldEval` (the only
module that reads the oracle); nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from aligner.evaluation.stats import ci_dict, cluster_ci_dict, weighted_bootstrap_ci

BY_CONSTRUCTION = "by construction"


def aesthetic_at_k(values: np.ndarray, top: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``values [N]`` over each query's first ``k`` results ``top [Q, >=k]``: ``[Q]``.

    NaN values (unknown scores) are left out of a query's mean.
    """
    v = np.asarray(values, np.float64)[np.asarray(top)[:, :k]]
    with np.errstate(invalid="ignore"):
        n = np.isfinite(v).sum(1)
        return np.where(n > 0, np.nansum(v, 1) / np.maximum(n, 1), np.nan)


def minmax01(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(values - lo) / (hi - lo)`` clipped to [0, 1] (all 0 when ``hi <= lo``)."""
    v = np.asarray(values, np.float64)
    if not hi > lo:
        return np.zeros_like(v)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def dcg(gains: np.ndarray, k: int) -> np.ndarray:
    """Discounted cumulative gain of ``gains [Q, >=k]`` (rank order): ``sum_r g_r / log2(r + 1)``
    over the first ``k`` ranks, ``[Q]``. Linear gains."""
    g = np.asarray(gains, np.float64)[:, :k]
    return (g / np.log2(np.arange(2, g.shape[1] + 2))).sum(1)


def ideal_dcg(relevant_gains: list[np.ndarray], k: int) -> np.ndarray:
    """DCG@k of the ideal ranking per query: its relevant images' gains sorted, best first.

    Args:
        relevant_gains: per query, the gains of every relevant image of the gallery (any
            order); an empty array gives 0 (nDCG undefined).
    """
    out = np.zeros(len(relevant_gains))
    for i, g in enumerate(relevant_gains):
        top = np.sort(np.asarray(g, np.float64))[::-1][:k]
        out[i] = float((top / np.log2(np.arange(2, len(top) + 2))).sum())
    return out


def ndcg_at_k(gains: np.ndarray, idcg: np.ndarray, k: int) -> np.ndarray:
    """nDCG@k ``[Q]`` from each query's ranked gains ``[Q, >=k]`` and ideal DCG ``[Q]``; NaN
    where the ideal is 0 (no relevant image, or every relevant image has gain 0)."""
    d = dcg(gains, k)
    i = np.asarray(idcg, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(i > 0, d / np.where(i > 0, i, 1.0), np.nan)


def beauty_among_relevant(beauty_top: np.ndarray, match_top: np.ndarray) -> np.ndarray:
    """Mean beauty of the relevant results per query (``[Q, k]`` each): ``[Q]``, NaN for a
    query whose results hold no relevant image."""
    b = np.asarray(beauty_top, np.float64)
    m = np.asarray(match_top, bool)
    n = m.sum(1)
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, (b * m).sum(1) / np.maximum(n, 1), np.nan)


def paired_difference(a: np.ndarray, b: np.ndarray, groups: np.ndarray | None = None,
                      **kw) -> dict[str, float]:
    """Mean of ``a - b`` paired over rows with a bootstrap CI (rows with a NaN are dropped);
    with ``groups`` (each row's query) the CI resamples queries, not rows."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    ok = np.isfinite(d)  # e.g. beauty among relevant: undefined where a top k holds none
    if groups is not None:
        return cluster_ci_dict(d[ok], np.asarray(groups)[ok], **kw)
    return ci_dict(d[ok], **kw)


def preference_agreement(chosen: Sequence[str], rejected: Sequence[str], weights: np.ndarray,
                         beauty_of: Callable[[list[str]], np.ndarray],
                         queries: Sequence[str] | None = None) -> dict:
    """How often a preference table's chosen image is more beautiful than the rejected one.

    Pairs with a degraded copy (an id ``"<id>~<kind>"``, not in the oracle) agree by
    construction (the original is the undegraded image); they are counted, not scored.
    Pairs with another id the oracle does not know are counted as ``unknown_ids``. A pair of
    equal beauty does not agree (counted in ``ties``).

    Returns:
        ``pairs``, ``oracle_pairs``, ``degraded_pairs`` (+ ``degraded_agreement``: "by
        construction"), ``unknown_ids``, ``ties``, ``agreement`` and ``agreement_weighted``
        (bootstrap CIs over the oracle pairs; with ``queries``, each pair's query id, the
        CIs resample queries, since one query's pairs are correlated), ``beauty_margin``
        (chosen minus rejected).
    """
    chosen, rejected = list(chosen), list(rejected)
    w = np.asarray(weights, np.float64)
    degraded = np.array([("~" in c) or ("~" in r) for c, r in zip(chosen, rejected, strict=True)],
                        bool)
    bc, br = beauty_of(chosen), beauty_of(rejected)
    known = ~degraded & np.isfinite(bc) & np.isfinite(br)
    agree = (bc[known] > br[known]).astype(float)
    out = {"pairs": len(chosen), "oracle_pairs": int(known.sum()),
           "degraded_pairs": int(degraded.sum()),
           "unknown_ids": int((~degraded & ~known).sum()),
           "ties": int((bc[known] == br[known]).sum())}
    if queries is None:
        out.update(agreement=ci_dict(agree),
                   agreement_weighted=weighted_bootstrap_ci(agree, w[known]),
                   beauty_margin=ci_dict(bc[known] - br[known]))
    else:  # one query's pairs are correlated: resample queries (the codes once, not per CI)
        _, g = np.unique(np.asarray(list(queries), object)[known], return_inverse=True)
        out.update(agreement=cluster_ci_dict(agree, g),
                   agreement_weighted=cluster_ci_dict(agree, g, w[known]),
                   beauty_margin=cluster_ci_dict(bc[known] - br[known], g))
    if degraded.any():
        out["degraded_agreement"] = BY_CONSTRUCTION
    return out


def teacher_diagnostics(chosen: Sequence[str], rejected: Sequence[str], weights: np.ndarray,
                        sources: Sequence[str],
                        beauty_of: Callable[[list[str]], np.ndarray],
                        queries: Sequence[str] | None = None) -> dict:
    """:func:`preference_agreement` over all pairs (``all``) and per ``source`` (with
    ``queries``, CIs resample queries)."""
    src = np.asarray(list(sources), object)
    chosen, rejected = np.asarray(list(chosen), object), np.asarray(list(rejected), object)
    w = np.asarray(weights, np.float64)
    q = None if queries is None else np.asarray(list(queries), object)
    out = {"all": preference_agreement(list(chosen), list(rejected), w, beauty_of, q),
           "by_source": {}}
    for s in sorted(set(src.tolist())):
        m = src == s
        out["by_source"][str(s)] = preference_agreement(
            list(chosen[m]), list(rejected[m]), w[m], beauty_of, None if q is None else q[m])
    return out
