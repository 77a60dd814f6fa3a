"""Metrics that judge results with the world's oracle: aesthetic@K, HPIR-style row agreement,
and how often a teacher's preference pairs agree with the oracle.

Pure numpy over arrays the caller gets from :class:`aligner.evaluation.oracle.WorldEval` (the only
module that reads the oracle); nothing here reads files.

HPIR-style agreement (the paper's human test, with the oracle as the human): for each query,
pairs of result rows are drawn from a fixed candidate pool (the base model's top 50); the
oracle's utility of a row is ``mean_i(match_i * b'_i)`` (``match``: the image has the content
the query asks for; ``b'``: beauty min-max normalised into [0.1, 1], so any relevant image
beats any irrelevant one); pairs whose utilities differ by less than ``tie`` are dropped. A
system prefers the row with the higher mean ranking score of its images; agreement is the
fraction of pairs where it prefers the oracle's row (a tie in the system's scores counts 1/2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

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


def paired_difference(a: np.ndarray, b: np.ndarray, groups: np.ndarray | None = None,
                      **kw) -> dict[str, float]:
    """Mean of ``a - b`` paired over rows with a bootstrap CI (rows with a NaN are dropped);
    with ``groups`` (each row's query) the CI resamples queries, not rows."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    ok = np.isfinite(d)
    if groups is not None:
        return cluster_ci_dict(d[ok], np.asarray(groups)[ok], **kw)
    return ci_dict(d[ok], **kw)


class RowPairs(NamedTuple):
    """Pairs of result rows for HPIR-style agreement (``M`` pairs of ``R`` images each).

    Attributes:
        query: ``[M]`` the query (row of the pool) each pair belongs to.
        a, b: ``[M, R]`` positions into that query's pool row.
        util_a, util_b: ``[M]`` the oracle's utility of each row.
        drawn: pairs drawn before dropping ties.
    """

    query: np.ndarray
    a: np.ndarray
    b: np.ndarray
    util_a: np.ndarray
    util_b: np.ndarray
    drawn: int

    @property
    def oracle_prefers_a(self) -> np.ndarray:
        return self.util_a > self.util_b


def row_utility(match: np.ndarray, beauty01: np.ndarray) -> np.ndarray:
    """``mean(match * b')`` over the last axis (an irrelevant image is worth 0)."""
    return (np.asarray(match, np.float64) * np.asarray(beauty01, np.float64)).mean(-1)


def draw_row_pairs(utility: np.ndarray, pairs_per_query: int = 4, row_size: int = 5,
                   tie: float = 0.02, seed: int = 0) -> RowPairs:
    """Draw row pairs from each query's pool and keep those the oracle does not call a tie.

    Args:
        utility: ``[Q, P]`` per pool image ``match * b'`` (see :func:`row_utility`).
        pairs_per_query: pairs drawn per query; the two rows of a pair share no image.
        row_size: images per row (at most ``P // 2``).
        tie: pairs with ``|util_a - util_b| < tie`` are dropped.
        seed: the same seed draws the same rows for every system.
    """
    u = np.asarray(utility, np.float64)
    q_n, p = u.shape
    r = min(row_size, p // 2)
    if r < 1:
        raise ValueError(f"a pool of {p} images cannot hold two disjoint rows")
    rng = np.random.default_rng([seed, 7])
    qs, a, b = [], [], []
    for qi in range(q_n):
        for _ in range(pairs_per_query):
            pos = rng.choice(p, 2 * r, replace=False)
            qs.append(qi)
            a.append(pos[:r])
            b.append(pos[r:])
    qs_a = np.asarray(qs, np.int64)
    a_a = np.asarray(a, np.int64).reshape(-1, r)
    b_a = np.asarray(b, np.int64).reshape(-1, r)
    ua = u[qs_a[:, None], a_a].mean(1) if len(qs_a) else np.zeros(0)
    ub = u[qs_a[:, None], b_a].mean(1) if len(qs_a) else np.zeros(0)
    keep = np.abs(ua - ub) >= tie
    return RowPairs(qs_a[keep], a_a[keep], b_a[keep], ua[keep], ub[keep], len(qs_a))


def pair_agreement(pairs: RowPairs, scores: np.ndarray) -> np.ndarray:
    """Per pair: 1 if a system with pool scores ``[Q, P]`` prefers the oracle's row, 0 if the
    other, 1/2 if its row scores tie."""
    s = np.asarray(scores, np.float64)
    sa = s[pairs.query[:, None], pairs.a].mean(1)
    sb = s[pairs.query[:, None], pairs.b].mean(1)
    pref_a = np.where(sa > sb, 1.0, np.where(sa < sb, 0.0, 0.5))
    return np.where(pairs.oracle_prefers_a, pref_a, 1.0 - pref_a)


def hpir_agreement(pairs: RowPairs, scores: np.ndarray, **kw) -> dict[str, float]:
    """:func:`pair_agreement` as a bootstrap CI dict (queries resampled), with the pair
    counts."""
    agree = pair_agreement(pairs, scores)
    return {**cluster_ci_dict(agree, pairs.query, **kw), "pairs_drawn": pairs.drawn,
            "ties_dropped": pairs.drawn - len(agree)}


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
           "ties": int((bc[known] == br[known]).sum()),
           "agreement": ci_dict(agree),
           "agreement_weighted": weighted_bootstrap_ci(agree, w[known]),
           "beauty_margin": ci_dict(bc[known] - br[known])}
    if queries is not None:
        g = np.asarray(list(queries), object)[known]
        out["agreement"] = cluster_ci_dict(agree, g)
        out["agreement_weighted"] = cluster_ci_dict(agree, g, w[known])
        out["beauty_margin"] = cluster_ci_dict(bc[known] - br[known], g)
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
