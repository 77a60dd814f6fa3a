"""Simulated raters on the built-in world: pairwise votes from the hidden taste, with human noise.

Real deployments collect votes from people (the serving page does); the built-in world needs
the same kind of data to train and test reward models offline. A **simulated rater** is the
world's hidden "human" seen through noise, and everything that reads these votes names them
as simulated (source ``rater``, teacher ``simulated_rater:<id>``). This module, like the
evaluation, reads the oracle: a rater *is* the human of this world.

The rater model:

* a rater sees a query and two images and values each by
  ``u = beauty + relevance_weight * relevance`` (:func:`utility`), where ``beauty`` is the
  oracle's score (about [-1, 1]) and ``relevance`` the fraction of the content the query asks
  for that the image shows (shape, colour and, where the query names them, count and
  background): wrong content loses whatever it looks like;
* the choice is Bradley-Terry: ``P(A over B) = sigmoid((u_A - u_B) / (T * m_r))`` with one
  temperature ``T`` for the panel and a per-rater multiplier ``m_r = exp(rater_spread * z)``
  (some raters are noisier than others);
* ``T`` is set (:func:`calibrate_temperature`) so that two raters drawn from the panel agree on
  a pair as often as ``target_agreement`` says, in expectation over the drawn pairs. The
  default 0.65 is about the agreement of real annotators on text-to-image preferences
  (ImageReward reports a single annotator at about 65% against the others).

Pairs (:func:`draw_pairs`) come from one image split and the queries of one split: per query,
a pool of images showing its full content (up to ``pool_full``) and some near misses (part of
the content, up to ``pool_partial``); most pairs compare two full matches (an aesthetic
judgement), the rest mix in a near miss (a relevance judgement).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

CONTENT_KEYS = ("shape", "colour", "count", "background")


def relevance(truth: Mapping[str, object], labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """Fraction of the query's content each image shows: ``[N]`` in [0, 1].

    ``truth``: a row of ``eval/query_truth.parquet`` (``count`` 0 and ``background`` "" mean
    the query does not ask for them); ``labels``: the oracle's content columns as arrays.
    """
    asked = [k for k in CONTENT_KEYS if truth[k] not in (0, "", None)]
    if not asked:
        return np.ones(len(labels["shape"]))
    hits = sum((np.asarray(labels[k]) == truth[k]).astype(np.float64) for k in asked)
    return hits / len(asked)


def utility(beauty: np.ndarray, rel: np.ndarray, relevance_weight: float) -> np.ndarray:
    """A rater's noise-free value of images: ``beauty + relevance_weight * relevance``."""
    return np.asarray(beauty, np.float64) + relevance_weight * np.asarray(rel, np.float64)


@dataclass(frozen=True)
class RaterPanel:
    """The panel's noise: a temperature and one multiplier per rater."""

    temperature: float
    multipliers: np.ndarray

    @property
    def size(self) -> int:
        return len(self.multipliers)

    def p_first(self, du: np.ndarray, raters: np.ndarray) -> np.ndarray:
        """P(rater prefers the first image) for utility differences ``du``."""
        z = np.asarray(du, np.float64) / (self.temperature * self.multipliers[raters])
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def make_panel(n_raters: int, rater_spread: float, temperature: float,
               seed: int) -> RaterPanel:
    """A panel of ``n_raters`` with multipliers ``exp(rater_spread * z)``, z ~ N(0, 1)."""
    if n_raters < 2:
        raise ValueError(f"a panel needs at least 2 raters, got {n_raters}")
    rng = np.random.default_rng([seed, 11])
    return RaterPanel(float(temperature), np.exp(rater_spread * rng.standard_normal(n_raters)))


def expected_agreement(du: np.ndarray, panel: RaterPanel) -> float:
    """Probability that two different raters of the panel make the same choice, averaged
    over pairs (``du``) and over rater pairs."""
    du = np.asarray(du, np.float64)
    if du.size == 0:
        raise ValueError("no pairs to measure agreement on")
    p = np.stack([panel.p_first(du, np.full(len(du), r)) for r in range(panel.size)])  # [R, P]
    s1, s2 = p.sum(0), (p * p).sum(0)
    q1, q2 = (1 - p).sum(0), ((1 - p) ** 2).sum(0)
    n = panel.size
    same = (s1 ** 2 - s2 + q1 ** 2 - q2) / (n * (n - 1))  # over ordered pairs r != r'
    return float(same.mean())


def calibrate_temperature(du: np.ndarray, multipliers: np.ndarray, target: float,
                          lo: float = 1e-4, hi: float = 1e3, iters: int = 60) -> float:
    """The panel temperature at which :func:`expected_agreement` equals ``target``.

    Raises:
        ValueError: a target outside what the pairs allow (0.5 when every pair is a tie).
    """
    if not 0.5 < target < 1:
        raise ValueError(f"target_agreement must be in (0.5, 1), got {target}")

    def agree(t: float) -> float:
        return expected_agreement(du, RaterPanel(t, multipliers))

    if not agree(hi) <= target <= agree(lo):
        raise ValueError(f"agreement {target} is out of reach on these pairs "
                         f"({agree(hi):.3f}..{agree(lo):.3f})")
    a, b = np.log(lo), np.log(hi)
    for _ in range(iters):  # agreement falls as the temperature rises
        m = (a + b) / 2
        a, b = (m, b) if agree(float(np.exp(m))) > target else (a, m)
    return float(np.exp((a + b) / 2))


@dataclass
class PairDraw:
    """Drawn pairs: ``query`` indexes the queries given, ``a`` / ``b`` the images given."""

    query: np.ndarray
    a: np.ndarray
    b: np.ndarray
    kind: list[str]


def draw_pairs(truths: Sequence[Mapping[str, object]], labels: Mapping[str, np.ndarray],
               pairs_per_query: int, seed: int, pool_full: int = 48, pool_partial: int = 16,
               mixed_fraction: float = 0.25) -> PairDraw:
    """Pairs of distinct images per query (see the module docstring).

    Args:
        truths: per query, what it asks for.
        labels: the candidate images' content columns (one split of the corpus).
        pairs_per_query: pairs per query (fewer when its pool is small; none below 2 images).
        seed: the draw's seed.
        pool_full, pool_partial: pool sizes of full matches and near misses.
        mixed_fraction: share of pairs with a near miss on one side (when there are some).
    """
    rng = np.random.default_rng([seed, 13])
    qs, a_s, b_s, kinds = [], [], [], []
    for qi, truth in enumerate(truths):
        rel = relevance(truth, labels)
        full = np.flatnonzero(rel >= 1.0)
        part = np.flatnonzero((rel > 0) & (rel < 1.0))
        full = rng.permutation(full)[:pool_full]
        part = rng.permutation(part)[:pool_partial]
        seen: set[tuple[int, int]] = set()
        for _ in range(pairs_per_query * 4):
            if len(seen) >= pairs_per_query:
                break
            mixed = len(part) > 0 and len(full) > 0 and rng.random() < mixed_fraction
            if mixed:
                x, y, kind = int(rng.choice(full)), int(rng.choice(part)), "mixed"
            elif len(full) >= 2:
                x, y = (int(v) for v in rng.choice(full, 2, replace=False))
                kind = "full"
            elif len(part) >= 2:
                x, y = (int(v) for v in rng.choice(part, 2, replace=False))
                kind = "partial"
            else:
                break
            if rng.random() < 0.5:
                x, y = y, x
            key = (min(x, y), max(x, y))
            if key in seen:
                continue
            seen.add(key)
            qs.append(qi)
            a_s.append(x)
            b_s.append(y)
            kinds.append(kind)
    return PairDraw(np.asarray(qs, np.int64), np.asarray(a_s, np.int64),
                    np.asarray(b_s, np.int64), kinds)


def pair_utilities(draw: PairDraw, truths: Sequence[Mapping[str, object]],
                   labels: Mapping[str, np.ndarray], beauty: np.ndarray,
                   relevance_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free utilities ``(u_a, u_b)`` of drawn pairs."""
    ua = np.zeros(len(draw.query))
    ub = np.zeros(len(draw.query))
    for qi in np.unique(draw.query):
        m = draw.query == qi
        u = utility(beauty, relevance(truths[qi], labels), relevance_weight)
        ua[m], ub[m] = u[draw.a[m]], u[draw.b[m]]
    return ua, ub


def vote(panel: RaterPanel, du: np.ndarray, raters: np.ndarray, seed: int) -> np.ndarray:
    """Simulated choices: True where the rater prefers the first image."""
    rng = np.random.default_rng([seed, 17])
    return rng.random(len(du)) < panel.p_first(du, raters)


def rater_name(r: int) -> str:
    """The ``teacher`` value of a simulated rater's votes."""
    return f"simulated_rater:r{r:03d}"


def observed_agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Share of pairs on which two raters made the same choice."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    return float((first == second).mean()) if len(first) else float("nan")


def test_pairs_schema() -> pa.Schema:
    """``test_pairs.parquet``: held-out pairs, each judged by two different simulated raters
    (``first_prefers_a`` / ``second_prefers_a``); for evaluation only."""
    s, b = pa.string(), pa.bool_()
    return pa.schema([("query_id", s), ("query", s), ("image_a", s), ("image_b", s),
                      ("kind", s), ("first_rater", s), ("first_prefers_a", b),
                      ("second_rater", s), ("second_prefers_a", b)])
