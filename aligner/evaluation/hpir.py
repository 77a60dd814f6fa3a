"""HPIR per aspect: the paper's human row comparison, one aspect at a time.

People in the paper compared two rows of retrieved images and said which they preferred. Here
the world's oracle (and a panel of simulated raters) plays the human. Per held-out query the
rows come from a fixed candidate pool (the base model's top ``P`` over the gallery); every
system scores the same rows and prefers the row with the higher mean of its own ranking score
(a tie of its scores counts 1/2). Agreement is the share of pairs where it prefers the
labelled row.

Why per aspect: the former single utility ``mean(match x b')`` over a row mixed both aspects,
and with sparse galleries a row's utility was decided by how many relevant images it held, so
HPIR was a relevance test by construction (beauty decided a few percent of pairs). Each
aspect now holds the other one fixed:

* **aesthetics**: both rows show the *same* number ``r >= 1`` of relevant images (the rest
  wrong-content), so relevance is held equal; a row's value is the mean oracle beauty of its
  images, what a person comparing the two rows for looks sees (the system's preference is the
  mean of its scores over the same images); pairs closer than ``tie`` are ties and dropped;
* **accuracy**: the rows show *different* numbers of relevant images; a row's value is that
  number (no ties).

Labels come from the noise-free oracle (``value_a > value_b``) and from simulated raters
(:mod:`aligner.world.raters`): Bradley-Terry on the value difference with per-rater noise, the
temperature calibrated per aspect so that two raters agree on ``target_agreement`` of the
aspect's pairs, one random rater per pair, and a confidence ``|2p - 1|``. The oracle's own
agreement with the raters is the ceiling. CIs resample queries, not pairs
(:func:`aligner.evaluation.stats.cluster_ci_dict`).

Pure numpy over arrays the caller builds (``match`` and ``beauty`` from
:class:`aligner.evaluation.oracle.WorldEval`); nothing here reads files.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from aligner.evaluation.stats import cluster_ci_dict
from aligner.world.raters import RaterPanel, calibrate_temperature, expected_agreement, make_panel

ASPECTS = ("aesthetics", "accuracy")


class AspectPairs(NamedTuple):
    """Row pairs of one aspect (``M`` pairs of ``R`` images each).

    Attributes:
        query: ``[M]`` the query (row of the pool arrays) each pair belongs to.
        a, b: ``[M, R]`` pool positions of the two rows (disjoint).
        value_a, value_b: ``[M]`` the aspect's oracle value of each row.
        aspect: ``"aesthetics"`` or ``"accuracy"``.
        drawn: pairs drawn before ties were dropped.
        skipped_queries: number of queries whose pool cannot hold such a pair.
    """

    query: np.ndarray
    a: np.ndarray
    b: np.ndarray
    value_a: np.ndarray
    value_b: np.ndarray
    aspect: str
    drawn: int
    skipped_queries: int

    @property
    def oracle_prefers_a(self) -> np.ndarray:
        """``[M]`` the noise-free label."""
        return self.value_a > self.value_b


class RaterLabels(NamedTuple):
    """One simulated rater's choice per pair.

    Attributes:
        prefers_a: ``[M]`` the rater chose row ``a``.
        confidence: ``[M]`` ``|2p - 1|`` in [0, 1], ``p`` the rater's probability of its choice.
        rater: ``[M]`` the rater (index into the panel).
        temperature: the panel temperature calibrated on this aspect's pairs (NaN: no pairs).
        expected_agreement: the two-rater agreement it gives (``target_agreement``).
    """

    prefers_a: np.ndarray
    confidence: np.ndarray
    rater: np.ndarray
    temperature: float
    expected_agreement: float


def _feasible(aspect: str, n_rel: int, n_irr: int, r: int) -> list[tuple[int, int]]:
    """Relevant counts ``(r_a, r_b)`` of two disjoint rows of ``r`` images that a pool with
    ``n_rel`` relevant and ``n_irr`` irrelevant images can hold (``r_a <= r_b``)."""
    if aspect == "aesthetics":
        return [(k, k) for k in range(1, r + 1) if 2 * k <= n_rel and 2 * (r - k) <= n_irr]
    return [(i, j) for i in range(r + 1) for j in range(i + 1, r + 1)
            if i + j <= n_rel and 2 * r - i - j <= n_irr]


def draw_aspect_pairs(match: np.ndarray, beauty: np.ndarray, aspect: str,
                      pairs_per_query: int = 4, row_size: int = 5, tie: float = 0.02,
                      seed: int = 0) -> AspectPairs:
    """Draw pairs of disjoint rows per query for one aspect (see the module docstring).

    Args:
        match: ``[Q, P]`` bool, the pool image shows the asked-for content.
        beauty: ``[Q, P]`` the oracle's beauty of each pool image (about [-1, 1]).
        aspect: ``"aesthetics"`` (equal relevant counts ``r`` drawn uniformly from the feasible
            ones, value = mean beauty of the row's images) or ``"accuracy"``
            (different counts drawn uniformly from the feasible distinct pairs, value = count).
        pairs_per_query: pairs drawn per query (independently; two pairs may share images).
        row_size: images per row ``R``.
        tie: aesthetics pairs with ``|value_a - value_b| < tie`` (or equal) are dropped.
        seed: the draw depends only on ``match``, ``beauty`` and ``seed``, so every system
            scores the same pairs.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    if row_size < 1 or pairs_per_query < 1:
        raise ValueError("row_size and pairs_per_query must be >= 1")
    m = np.asarray(match).astype(bool)
    bt = np.asarray(beauty, np.float64)
    if m.shape != bt.shape or m.ndim != 2:
        raise ValueError(f"match {m.shape} and beauty {bt.shape} must be the same [Q, P]")
    rng = np.random.default_rng([seed, 31, ASPECTS.index(aspect)])
    r = row_size
    qs, rows_a, rows_b, skipped = [], [], [], 0
    for qi in range(m.shape[0]):
        rel, irr = np.flatnonzero(m[qi]), np.flatnonzero(~m[qi])
        options = _feasible(aspect, len(rel), len(irr), r)
        if not options:
            skipped += 1
            continue
        for _ in range(pairs_per_query):
            ka, kb = options[rng.integers(len(options))]
            pr = rng.choice(rel, ka + kb, replace=False)
            pi = rng.choice(irr, 2 * r - ka - kb, replace=False)
            row_a = rng.permutation(np.concatenate([pr[:ka], pi[:r - ka]]))
            row_b = rng.permutation(np.concatenate([pr[ka:], pi[r - ka:]]))
            if rng.random() < 0.5:
                row_a, row_b = row_b, row_a
            qs.append(qi)
            rows_a.append(row_a)
            rows_b.append(row_b)
    q = np.asarray(qs, np.int64)
    a = np.asarray(rows_a, np.int64).reshape(-1, r)
    b = np.asarray(rows_b, np.int64).reshape(-1, r)

    def value(rows: np.ndarray) -> np.ndarray:
        rel = m[q[:, None], rows]
        if aspect == "accuracy":
            return rel.sum(1).astype(np.float64)
        return bt[q[:, None], rows].mean(1)

    va, vb = value(a), value(b)
    keep = (np.abs(va - vb) >= tie) & (va != vb)
    return AspectPairs(q[keep], a[keep], b[keep], va[keep], vb[keep], aspect, len(q), skipped)


def rater_labels(pairs: AspectPairs, target_agreement: float = 0.65, n_raters: int = 40,
                 rater_spread: float = 0.25, seed: int = 0) -> RaterLabels:
    """Simulated rater labels with a confidence, one random rater of the panel per pair.

    Args:
        pairs: the aspect's pairs; a rater values a row by the aspect's value.
        target_agreement: two raters of the panel agree on this share of the pairs, in
            expectation (the temperature is calibrated on these pairs, so per aspect).
        n_raters, rater_spread: the panel (:func:`aligner.world.raters.make_panel`).
        seed: the panel, the rater of each pair and the sampled choices.
    """
    n = len(pairs.query)
    panel = make_panel(n_raters, rater_spread, 1.0, seed)
    if n == 0:
        return RaterLabels(np.zeros(0, bool), np.zeros(0), np.zeros(0, np.int64),
                           float("nan"), float("nan"))
    du = pairs.value_a - pairs.value_b
    t = calibrate_temperature(du, panel.multipliers, target_agreement)
    panel = RaterPanel(t, panel.multipliers)
    rng = np.random.default_rng([seed, 37, ASPECTS.index(pairs.aspect)])
    rater = rng.integers(0, n_raters, n)
    p_a = panel.p_first(du, rater)
    prefers_a = rng.random(n) < p_a
    p = np.where(prefers_a, p_a, 1.0 - p_a)
    return RaterLabels(prefers_a, np.abs(2.0 * p - 1.0), rater, t, expected_agreement(du, panel))


def system_agreement(pairs: AspectPairs, scores: np.ndarray,
                     labels: RaterLabels | None = None) -> np.ndarray:
    """Per pair ``[M]``: 1 when a system with pool scores ``[Q, P]`` prefers the labelled row
    (higher mean score over the row's images), 0 when the other, 1/2 on a tie of its scores.

    ``labels``: None for the oracle's labels (``value_a > value_b``), else the raters'.
    """
    s = np.asarray(scores, np.float64)
    sa = s[pairs.query[:, None], pairs.a].mean(1)
    sb = s[pairs.query[:, None], pairs.b].mean(1)
    pref_a = np.where(sa > sb, 1.0, np.where(sa < sb, 0.0, 0.5))
    label_a = pairs.oracle_prefers_a if labels is None else np.asarray(labels.prefers_a, bool)
    return np.where(label_a, pref_a, 1.0 - pref_a)


def hpir_aspects(match: np.ndarray, beauty: np.ndarray, systems_scores: dict[str, np.ndarray],
                 pairs_per_query: int = 4, row_size: int = 5, tie: float = 0.02,
                 seed: int = 0, target_agreement: float = 0.65) -> dict:
    """HPIR per aspect for every system, on the same pairs and labels.

    Args:
        match: ``[Q, P]`` bool, pool image shows the asked-for content.
        beauty: ``[Q, P]`` oracle beauty of each pool image.
        systems_scores: system name -> ``[Q, P]`` its ranking score of each pool image.
        pairs_per_query, row_size, tie, seed: see :func:`draw_aspect_pairs`.
        target_agreement: the raters' two-rater agreement (:func:`rater_labels`).

    Returns:
        Per aspect (``"aesthetics"``, ``"accuracy"``): ``draw`` (:class:`AspectPairs`),
        ``labels`` (:class:`RaterLabels`), ``pairs``, ``pairs_drawn``, ``ties_dropped``,
        ``skipped_queries``, ``temperature``, ``rater_agreement`` (expected two-rater
        agreement), ``ceiling`` (CI of the oracle's agreement with the raters),
        ``ceiling_weighted`` (confidence-weighted), ``systems``: name -> ``{"oracle",
        "raters", "raters_weighted"}`` CI dicts, and ``per_pair``: name -> ``[M]`` agreement
        with the oracle's labels (for :func:`paired_aspect_difference`). CIs resample queries.
    """
    out: dict = {}
    for aspect in ASPECTS:
        pairs = draw_aspect_pairs(match, beauty, aspect, pairs_per_query, row_size, tie, seed)
        labels = rater_labels(pairs, target_agreement, seed=seed)
        g, w = pairs.query, labels.confidence
        ceiling = (pairs.oracle_prefers_a == labels.prefers_a).astype(np.float64)
        res = {"draw": pairs, "labels": labels, "pairs": len(g), "pairs_drawn": pairs.drawn,
               "ties_dropped": pairs.drawn - len(g), "skipped_queries": pairs.skipped_queries,
               "temperature": labels.temperature, "rater_agreement": labels.expected_agreement,
               "ceiling": cluster_ci_dict(ceiling, g),
               "ceiling_weighted": cluster_ci_dict(ceiling, g, w), "systems": {},
               "per_pair": {}}
        for name, scores in systems_scores.items():
            vs_oracle = system_agreement(pairs, scores)
            vs_raters = system_agreement(pairs, scores, labels)
            res["per_pair"][name] = vs_oracle
            res["systems"][name] = {"oracle": cluster_ci_dict(vs_oracle, g),
                                    "raters": cluster_ci_dict(vs_raters, g),
                                    "raters_weighted": cluster_ci_dict(vs_raters, g, w)}
        out[aspect] = res
    return out


def paired_aspect_difference(result: dict, aspect: str, a: str, b: str) -> dict:
    """Agreement with the oracle of system ``a`` minus system ``b`` on one aspect, paired over
    the same pairs, with a CI that resamples queries (``result`` from :func:`hpir_aspects`)."""
    res = result[aspect]
    d = res["per_pair"][a] - res["per_pair"][b]
    return cluster_ci_dict(d, res["draw"].query)


def hpir_summary(result: dict) -> dict:
    """:func:`hpir_aspects`'s result without its arrays and tuples (``draw``, ``labels``,
    ``per_pair``), ready for metrics.json."""
    drop = ("draw", "labels", "per_pair")
    return {aspect: {k: v for k, v in res.items() if k not in drop}
            for aspect, res in result.items()}
