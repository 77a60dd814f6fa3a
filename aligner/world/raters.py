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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from aligner.world.taste import Taste
from aligner.world.vocab import FACTORS

CONTENT_KEYS = ("shape", "colour", "count", "background")
CONFIDENCE_KINDS = ("informative", "random")


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


def choice_probabilities(du: np.ndarray, panel: RaterPanel) -> np.ndarray:
    """``[R, P]``: P(rater r prefers the first image of pair p). ``du`` is ``[P]`` or ``[1, P]``
    (every rater values the pairs alike) or ``[R, P]`` (each rater with their own taste)."""
    du = np.asarray(du, np.float64)
    if du.shape[-1] == 0:
        raise ValueError("no pairs to measure agreement on")
    if du.ndim == 2 and du.shape[0] == 1:
        du = du[0]
    rows = du if du.ndim == 2 else np.broadcast_to(du, (panel.size, du.shape[0]))
    if rows.shape[0] != panel.size:
        raise ValueError(f"{rows.shape[0]} rows of utility differences for {panel.size} raters")
    return np.stack([panel.p_first(rows[r], np.full(rows.shape[1], r))
                     for r in range(panel.size)])


def expected_agreement(du: np.ndarray, panel: RaterPanel) -> float:
    """Probability that two different raters of the panel make the same choice, averaged
    over pairs (``du``: ``[P]``, or ``[R, P]`` per rater) and over rater pairs."""
    p = choice_probabilities(du, panel)  # [R, P]
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
    if np.asarray(du).size == 0:
        raise ValueError("no pairs to calibrate the raters on")

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
class RaterSettings:
    """How the simulated raters are drawn and how noisy they are (defaults: docs/defaults.md).

    ``rater_spread``: the spread of the raters' noise multipliers; ``taste_spread``: the spread
    of their own tastes around the world's (each factor's weight times ``exp(taste_spread *
    z)``; 0: every rater has the world's taste); ``confidence``: ``informative`` (a rater is
    surer where the choice is clearer to them) or ``random`` (uniform 1..5, says nothing);
    ``weigh_by_confidence``: votes weigh ``confidence / 5``, as the serving export does
    (default: weight 1).
    """

    n_raters: int = field(default=40, metadata={"help": "people in the panel"})
    rater_spread: float = field(default=0.25, metadata={
        "help": "spread of the raters' noise: multipliers exp(spread * z)"})
    target_agreement: float = field(default=0.65, metadata={
        "help": "two raters choose alike this often (calibrates the panel's temperature)"})
    relevance_weight: float = field(default=1.0, metadata={
        "help": "a rater's value: beauty + this x the share of the asked-for content shown"})
    pairs_per_query: int = field(default=40, metadata={"help": "vote pairs per query"})
    test_pairs_per_query: int = field(default=20, metadata={
        "help": "held-out pairs per test query (evaluation only)"})
    pool_full: int = field(default=48, metadata={
        "help": "per query, images with its full content the pairs are drawn from"})
    pool_partial: int = field(default=16, metadata={
        "help": "per query, near misses (part of its content) the pairs are drawn from"})
    mixed_fraction: float = field(default=0.25, metadata={
        "help": "share of pairs with a near miss on one side"})
    seed: int = field(default=0, metadata={"help": "same seed, same panel and votes"})
    taste_spread: float = field(default=0.0, metadata={
        "help": "spread of the raters' own tastes around the world's: each factor's weight "
                "times exp(taste_spread * z) (0: everyone has the world's taste)"})
    confidence: str = field(default="informative", metadata={
        "help": "informative (surer where the choice is clearer to the rater) | random "
                "(uniform 1..5)"})
    weigh_by_confidence: bool = field(default=False, metadata={
        "help": "votes weigh confidence / 5, as the serving export does (default: 1)"})

    def __post_init__(self) -> None:
        if self.n_raters < 2:
            raise ValueError(f"n_raters must be >= 2, got {self.n_raters}")
        if not 0.5 < self.target_agreement < 1:
            raise ValueError(f"target_agreement must be in (0.5, 1), got {self.target_agreement}")
        if self.rater_spread < 0 or self.relevance_weight < 0:
            raise ValueError("rater_spread and relevance_weight must be >= 0")
        if min(self.pairs_per_query, self.test_pairs_per_query) < 1:
            raise ValueError("pairs_per_query and test_pairs_per_query must be >= 1")
        if min(self.pool_full, self.pool_partial) < 0 or self.pool_full + self.pool_partial < 2:
            raise ValueError("pool_full + pool_partial must be >= 2")
        if not 0 <= self.mixed_fraction <= 1:
            raise ValueError(f"mixed_fraction must be in [0, 1], got {self.mixed_fraction}")
        if not 0 <= self.taste_spread <= 3:
            raise ValueError(f"taste_spread must be in [0, 3], got {self.taste_spread}")
        if self.confidence not in CONFIDENCE_KINDS:
            raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got "
                             f"{self.confidence!r}")


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


# ----------------------------------------------------------------------------- population

def rater_tastes(taste: Taste, n_raters: int, spread: float, seed: int) -> list[Taste]:
    """``n_raters`` tastes around ``taste``: each factor's weight times ``exp(spread * z)``,
    z ~ N(0, 1) per rater and factor; the preferred ends are the world's (spread 0: all equal
    to ``taste``)."""
    rng = np.random.default_rng([seed, 23])
    z = rng.standard_normal((n_raters, len(FACTORS)))
    return [taste.with_weights({k: float(np.exp(spread * z[r, j]))
                                for j, k in enumerate(FACTORS)}, name=f"r{r:03d}")
            for r in range(n_raters)]


def confidences(p_choice: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A rater's stated confidence, 1..5, for choices they made with probability ``p_choice``
    of picking the first item.

    ``informative``: ``1 + 4 |2p - 1|`` plus N(0, 0.5) noise, rounded and clipped: a clear
    choice (p near 0 or 1) gets a 4 or 5, a coin flip a 1 or 2. ``random``: uniform 1..5 (what
    a confidence that says nothing looks like).
    """
    p = np.asarray(p_choice, np.float64)
    if kind == "random":
        return rng.integers(1, 6, len(p)).astype(np.int64)
    if kind != "informative":
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {kind!r}")
    c = 1.0 + 4.0 * np.abs(2.0 * p - 1.0) + rng.normal(0.0, 0.5, len(p))
    return np.clip(np.rint(c), 1, 5).astype(np.int64)


def row_weights(n: int) -> np.ndarray:
    """Position weights of a row of ``n`` results, ``1 / log2(rank + 1)`` (DCG's), summing
    to 1: a person looks at the first results most."""
    w = 1.0 / np.log2(np.arange(n) + 2.0)
    return w / w.sum()


@dataclass
class ImageVotes:
    """Simulated votes on image pairs (:meth:`RaterPopulation.image_votes`).

    ``prefers_a``: the rater's choice; ``confidence`` 1..5; ``rater``: who voted; ``p_a``: the
    population's average P(a over b) (the best any predictor can know); ``du``: the noise-free
    utility difference a - b under the world's taste."""

    prefers_a: np.ndarray
    confidence: np.ndarray
    rater: np.ndarray
    p_a: np.ndarray
    du: np.ndarray


class RaterPopulation:
    """The simulated people of a world: each with a taste around the world's, a noise level and
    a way of stating confidence (:class:`RaterSettings`), calibrated so that two of them agree
    on a training pair ``target_agreement`` of the time.

    Made by :meth:`from_world`, which reads the hidden oracle: like the evaluation, a simulated
    rater *is* the world's human. A rater sees only a query and the images shown (ids), never
    which model produced them.
    """

    def __init__(self, ids: Sequence[str], labels: Mapping[str, np.ndarray],
                 beauty: np.ndarray, world_beauty: np.ndarray,
                 truths: Mapping[str, Mapping[str, object]], taste: Taste,
                 tastes: list[Taste], panel: RaterPanel, settings: RaterSettings,
                 splits: np.ndarray, natural: np.ndarray, queries: pa.Table) -> None:
        self.ids = list(ids)
        self.index = {i: k for k, i in enumerate(self.ids)}
        self.labels = {k: np.asarray(v) for k, v in labels.items()}
        self.beauty = np.asarray(beauty, np.float64)  # [R, N] or [1, N] (all raters alike)
        self.world_beauty = np.asarray(world_beauty, np.float64)
        self.truths = dict(truths)
        qid = queries["query_id"].to_pylist()
        self.queries = dict(zip(qid, queries["query"].to_pylist(), strict=True))
        self.query_splits = dict(zip(qid, queries["split"].to_pylist(), strict=True))
        self.kinds = dict(zip(qid, queries["kind"].to_pylist(), strict=True))
        self.taste = taste
        self.tastes = tastes
        self.panel = panel
        self.settings = settings
        self.splits = np.asarray(splits)
        self.natural = np.asarray(natural, bool)
        self._rel: dict[str, np.ndarray] = {}
        self.calibration: dict[str, float] = {}

    @property
    def size(self) -> int:
        return self.panel.size

    # -- construction

    @classmethod
    def from_world(cls, world: Any, settings: RaterSettings) -> RaterPopulation:
        """The population of ``world`` (an :class:`aligner.world.World`), its temperature
        calibrated on training-split pairs (train queries over natural train images)."""
        oracle = world.oracle()
        ids = oracle["id"].to_pylist()
        cols = {c: np.asarray(oracle[c].to_pylist()) for c in oracle.column_names
                if c in FACTORS or c in CONTENT_KEYS}
        taste = world.taste()
        tastes = rater_tastes(taste, settings.n_raters, settings.taste_spread, settings.seed)
        stored = np.asarray(oracle["beauty"].to_pylist(), np.float64)
        if settings.taste_spread == 0:  # the world's own numbers, as stored
            beauty = stored[None, :]
        else:
            beauty = np.stack([t.beauty(cols) for t in tastes])
        truth = {r["query_id"]: r for r in world.query_truth().to_pylist()}
        q = world.queries()
        gallery = world.gallery_ids()
        pop = cls(ids, {k: cols[k] for k in CONTENT_KEYS}, beauty, stored, truth, taste,
                  tastes, make_panel(settings.n_raters, settings.rater_spread, 1.0,
                                     settings.seed), settings,
                  np.asarray(oracle["split"].to_pylist()),
                  np.array([i not in gallery for i in ids], bool), q)
        qs, a, b, _ = pop.candidate_pairs("train", settings.pairs_per_query,
                                          settings.seed * 1000 + 1)
        if not len(qs):
            raise ValueError("the world gives no training pairs to calibrate the raters on")
        pop.calibrate(qs, a, b)
        return pop

    def calibrate(self, query_ids: Sequence[str], a_ids: Sequence[str],
                  b_ids: Sequence[str]) -> float:
        """Set the panel's temperature so that two raters agree ``target_agreement`` of the
        time on these pairs; returns it and keeps the population's statistics on them."""
        du = self.rater_du(query_ids, a_ids, b_ids)
        t = calibrate_temperature(du, self.panel.multipliers, self.settings.target_agreement)
        self.panel = RaterPanel(t, self.panel.multipliers)
        self.calibration = {"temperature": t, **self.agreement_stats(query_ids, a_ids, b_ids)}
        return t

    # -- utilities

    def _relevance(self, query_id: str) -> np.ndarray:
        if query_id not in self._rel:
            if query_id not in self.truths:
                raise KeyError(f"no query {query_id!r} in this world")
            self._rel[query_id] = relevance(self.truths[query_id], self.labels)
        return self._rel[query_id]

    def _idx(self, ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self.index[i] for i in ids), np.int64, len(ids))
        except KeyError as e:
            raise KeyError(f"image {e.args[0]!r} is not in this world") from None

    def _rel_pairs(self, query_ids: Sequence[str], a: np.ndarray,
                   b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qa = np.asarray(query_ids, object)
        ra, rb = np.zeros(len(a)), np.zeros(len(a))
        for q in dict.fromkeys(query_ids):
            m = qa == q
            rel = self._relevance(q)
            ra[m], rb[m] = rel[a[m]], rel[b[m]]
        return ra, rb

    def rater_du(self, query_ids: Sequence[str], a_ids: Sequence[str],
                 b_ids: Sequence[str]) -> np.ndarray:
        """``[R, P]`` (``[1, P]`` when all raters share the world's taste): each rater's
        noise-free utility difference a - b."""
        a, b = self._idx(a_ids), self._idx(b_ids)
        ra, rb = self._rel_pairs(query_ids, a, b)
        w = self.settings.relevance_weight
        return (self.beauty[:, a] - self.beauty[:, b]) + w * (ra - rb)[None, :]

    def world_du(self, query_ids: Sequence[str], a_ids: Sequence[str],
                 b_ids: Sequence[str]) -> np.ndarray:
        """``[P]``: the utility difference a - b under the world's taste (no noise)."""
        a, b = self._idx(a_ids), self._idx(b_ids)
        ra, rb = self._rel_pairs(query_ids, a, b)
        return (self.world_beauty[a] - self.world_beauty[b]) + \
            self.settings.relevance_weight * (ra - rb)

    @staticmethod
    def assigned_du(du: np.ndarray, raters: np.ndarray) -> np.ndarray:
        """``[P]``: from each rater's differences ``[R, P]`` (or ``[1, P]``), pair p's as
        valued by ``raters[p]``."""
        return du[raters, np.arange(du.shape[1])] if du.shape[0] > 1 else du[0]

    # -- votes

    def image_votes(self, query_ids: Sequence[str], a_ids: Sequence[str],
                    b_ids: Sequence[str], rng: np.random.Generator) -> ImageVotes:
        """One vote per pair, each by a rater drawn from the population."""
        n = len(a_ids)
        du = self.rater_du(query_ids, a_ids, b_ids)
        raters = rng.integers(0, self.size, n)
        p = self.panel.p_first(self.assigned_du(du, raters), raters)
        first = rng.random(n) < p
        conf = confidences(np.where(first, p, 1 - p), self.settings.confidence, rng)
        p_all = choice_probabilities(du, self.panel)
        return ImageVotes(first, conf, raters, p_all.mean(0),
                          self.world_du(query_ids, a_ids, b_ids))

    def row_vote(self, query_id: str, left_ids: Sequence[str], right_ids: Sequence[str],
                 rng: np.random.Generator) -> tuple[str, int, int]:
        """A rater drawn from the population compares two rows of results for a query, as on
        the serving page: ``(preferred, confidence, rater)``, preferred ``left``, ``right`` or
        ``tie`` (the same images in the same order).

        A row is worth its images' utilities weighted by position (:func:`row_weights`); the
        choice is Bradley-Terry on the difference, with the rater's own noise.
        """
        if not len(left_ids) or not len(right_ids):
            raise ValueError("a row vote needs two non-empty rows")
        r = int(rng.integers(0, self.size))
        if list(left_ids) == list(right_ids):
            return "tie", int(confidences(np.array([1.0]), self.settings.confidence, rng)[0]), r
        rel = self._relevance(query_id)
        b = self.beauty[r] if self.beauty.shape[0] > 1 else self.beauty[0]
        w = self.settings.relevance_weight

        def value(ids: Sequence[str]) -> float:
            i = self._idx(ids)
            return float(row_weights(len(i)) @ (b[i] + w * rel[i]))

        du = value(left_ids) - value(right_ids)
        p = float(self.panel.p_first(np.array([du]), np.array([r]))[0])
        left = bool(rng.random() < p)
        conf = confidences(np.array([p if left else 1 - p]), self.settings.confidence, rng)
        return ("left" if left else "right"), int(conf[0]), r

    # -- pairs and statistics

    def candidate_pairs(self, split: str, per_query: int, seed: int
                        ) -> tuple[list[str], list[str], list[str], list[str]]:
        """Pairs of one split's natural images for that split's content queries
        (:func:`draw_pairs` with the settings' pools): ``(query_ids, a_ids, b_ids, kinds)``."""
        s = self.settings
        qids = [q for q, sp in self.query_splits.items()
                if sp == split and self.kinds.get(q) == "content" and q in self.truths]
        mask = (self.splits == split) & self.natural
        cand = np.flatnonzero(mask)
        labels = {k: v[cand] for k, v in self.labels.items()}
        d = draw_pairs([self.truths[q] for q in qids], labels, per_query, seed=seed,
                       pool_full=s.pool_full, pool_partial=s.pool_partial,
                       mixed_fraction=s.mixed_fraction)
        return ([qids[i] for i in d.query], [self.ids[cand[i]] for i in d.a],
                [self.ids[cand[i]] for i in d.b], d.kind)

    def agreement_stats(self, query_ids: Sequence[str], a_ids: Sequence[str],
                        b_ids: Sequence[str]) -> dict[str, float]:
        """On these pairs: ``agreement`` (two different raters choose alike, in expectation),
        ``best_accuracy`` (the best any predictor can do at guessing a random rater's vote:
        the population's majority side, ``mean max(p, 1 - p)`` of the population's average
        ``p``) and ``world_taste_accuracy`` (the noise-free world taste as that predictor)."""
        du = self.rater_du(query_ids, a_ids, b_ids)
        p = choice_probabilities(du, self.panel).mean(0)
        wdu = self.world_du(query_ids, a_ids, b_ids)
        world = np.where(wdu > 0, p, np.where(wdu < 0, 1 - p, 0.5))
        return {"agreement": expected_agreement(du, self.panel),
                "best_accuracy": float(np.maximum(p, 1 - p).mean()),
                "world_taste_accuracy": float(world.mean()), "pairs": int(len(a_ids))}

    def stats(self) -> dict[str, Any]:
        """The population's settings and its calibration statistics."""
        s = self.settings
        return {"raters": self.size, "taste": self.taste.name, "taste_spread": s.taste_spread,
                "rater_spread": s.rater_spread, "target_agreement": s.target_agreement,
                "confidence": s.confidence, **self.calibration}
