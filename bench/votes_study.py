"""Votes used well: which pairs to ask about, and whether a vote's confidence should weigh it.

    python bench/votes_study.py world=out/world output=out/votes_study
    python bench/votes_study.py --help                       # every field

On a built-in world, with the world's simulated people (:class:`RaterPopulation`), for each
seed and vote count, a reward model (:mod:`aligner.reward.head_fit`: ImageReward's head on
the frozen base, seconds per fit) is fitted on the votes and scored on held-out test pairs
(test queries over test-split natural images, which no vote ever names) by

* (a) **taste accuracy**: the share of pairs where it prefers the image the world's noise-free
  taste prefers (pairs the taste calls a tie, ``|du| < tie``, left out): what matters;
* (b) **rater agreement**: the share where it agrees with a rater's vote (a simulated person
  who did not vote in training): what a human-labelled test set would measure (its ceiling
  is the population's ``best_accuracy``, printed with the results).

Arms, compared at the same numbers of votes (each seed draws one pool of candidate pairs the
way :func:`aligner.world.raters.draw_pairs` does, over the train and val queries and their own
split's natural images, and one vote per candidate, so every arm that asks about a pair gets
the same answer):

* ``random``: the first ``n`` pairs of a seeded random order (the counts are nested), loss
  unweighted (weight 1);
* ``weighted``: the same pairs and votes, each weighing its informative confidence / 5 (the
  serving export's mapping; an informative rater is surer where the choice is clearer to them);
* ``weighted_randconf``: the same pairs and choices, weighing a random (uninformative)
  confidence / 5: what weighting costs when confidence says nothing;
* ``active``: sequential rounds; the first ``counts[0]`` votes are ``random``'s, then each round
  fits an ensemble (``ensemble`` heads: one on every vote, the others on bootstrap resamples)
  and asks about the candidates its heads disagree on most (:mod:`aligner.feedback.active`,
  ``disagreement``, at most ``cap_factor`` x the round's mean per query);
* ``uncertain``: the same rounds, asking where the ensemble's mean P(a preferred) is nearest 1/2;
* ``between``: the same rounds, asking about pairs between two systems' rows: one image from the
  base retriever's top ``rows_k`` of the query's candidates, the other from the current reward
  model's top ``rows_k`` (random among them, then random candidates if too few);
* ``active_weighted``: ``active``'s choice with ``weighted``'s loss (do the two add up?).

The evaluated model of every arm is the head fitted on all its votes with the same settings and
seed (the active arms' ensemble head 0), so at ``counts[0]`` all unweighted arms coincide.
CIs: a two-level percentile bootstrap resamples seeds and test queries (clusters of pairs;
:func:`two_level_ci`), so they cover both which votes a seed drew and which test pairs were
drawn; differences to ``random`` are paired (same seeds, same test pairs). ``results.json``
also has the query-only CIs (``*_queries_only``) and every seed's own number. Writes
``results.json``, ``summary.md``, ``votes_study.png``, ``per_pair.npz``, ``config.yaml`` and
the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aligner.reward.head_fit import HeadFitSettings  # noqa: E402
from aligner.world.raters import RaterSettings  # noqa: E402

log = logging.getLogger("bench.votes_study")
_COMMAND = ["python bench/votes_study.py"]
ARMS = ("random", "weighted", "weighted_randconf", "active", "uncertain", "between",
        "active_weighted")
SEQUENTIAL = {"active": "disagreement", "uncertain": "uncertain", "between": "between",
              "active_weighted": "disagreement"}
WEIGHTED = {"weighted", "active_weighted"}
DEFAULT_BASE = REPO / "aligner" / "assets" / "builtin_base" / "checkpoint"


def _raters() -> RaterSettings:
    return RaterSettings(pairs_per_query=100, test_pairs_per_query=20)


def _head() -> HeadFitSettings:
    return HeadFitSettings(val_fraction=0.0)


@dataclass
class VotesStudyConfig:
    """Random vs active pairs, confidence-weighted vs unweighted loss, at equal vote counts."""

    world: str = field(default="out/world", metadata={"help": "built-in world (jobs.make_world)"})
    output: str = field(default="out/votes_study", metadata={"help": "output directory"})
    base: str = field(default="", metadata={
        "help": "frozen backbone checkpoint (default: the shipped base)"})
    counts: list[int] = field(default_factory=lambda: [250, 500, 1000, 2000, 4000, 8000],
                              metadata={"help": "vote counts (increasing)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={
        "help": "seeds: candidate pool, votes, head initialisation"})
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={
        "help": f"arms to run, of {list(ARMS)}"})
    raters: RaterSettings = field(default_factory=_raters, metadata={
        "help": "the simulated people (pairs_per_query: candidate pairs per query, "
                "test_pairs_per_query: held-out pairs per test query); confidence is set per arm"})
    head: HeadFitSettings = field(default_factory=_head, metadata={
        "help": "the reward head's fit (aligner.reward.head_fit.HeadFitSettings)"})
    ensemble: int = field(default=4, metadata={
        "help": "heads of the active arms' ensemble (head 0 on every vote, the rest bootstrap)"})
    max_round: int = field(default=1000, metadata={
        "help": "the active arms ask at most this many pairs per round"})
    cap_factor: float = field(default=3.0, metadata={
        "help": "per-query cap of a round: this x the round's mean pairs per query (0: none)"})
    rows_k: int = field(default=8, metadata={"help": "the between arm: rows of this length"})
    tie: float = field(default=0.02, metadata={
        "help": "test pairs with |du| below this are ties, left out of taste accuracy"})
    test_seed: int = field(default=1000, metadata={"help": "the held-out test pairs' seed"})
    threads: int = field(default=1, metadata={"help": "torch threads (0: leave as is)"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})

    def __post_init__(self) -> None:
        if not self.counts or any(c < 2 for c in self.counts) or \
                list(self.counts) != sorted(set(self.counts)):
            raise ValueError(f"counts must be increasing numbers >= 2, got {self.counts}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"unknown arms {bad}; choose from {list(ARMS)}")
        if self.ensemble < 2 and "active" in self.arms:
            raise ValueError("the active arm needs ensemble >= 2")
        if self.max_round < 1 or self.cap_factor < 0 or self.rows_k < 1:
            raise ValueError("max_round and rows_k must be >= 1, cap_factor >= 0")


# --------------------------------------------------------------------------- the world's data

@dataclass
class Pool:
    """One seed's candidate pairs with one vote each (every arm that asks gets that answer)."""

    query_ids: list[str]
    a: list[str]
    b: list[str]
    prefers_a: np.ndarray
    conf_informative: np.ndarray
    conf_random: np.ndarray
    order: np.ndarray  # the random arms' order


def draw_pool(pops: dict[str, Any], s: RaterSettings, seed: int) -> Pool:
    """Candidates over train and val (each over its own split's natural images) and their votes;
    the informative and the random population give the same choices, other confidences."""
    q, a, b = [], [], []
    for k, split in enumerate(("train", "val")):
        qs, as_, bs, _ = pops["informative"].candidate_pairs(split, s.pairs_per_query,
                                                             seed * 1000 + 101 + k)
        q, a, b = q + qs, a + as_, b + bs
    vi = pops["informative"].image_votes(q, a, b, np.random.default_rng([seed, 53]))
    vr = pops["random"].image_votes(q, a, b, np.random.default_rng([seed, 53]))
    if not np.array_equal(vi.prefers_a, vr.prefers_a):
        raise RuntimeError("the two confidence kinds changed the choices (the rater model "
                           "draws confidence before the choice?)")
    order = np.random.default_rng([seed, 59]).permutation(len(q))
    return Pool(q, a, b, vi.prefers_a, vi.confidence, vr.confidence, order)


@dataclass
class TestPairs:
    query_ids: list[str]
    a: list[str]
    b: list[str]
    du: np.ndarray
    rater_prefers_a: np.ndarray
    kind: list[str]


def draw_test(pop: Any, s: RaterSettings, seed: int) -> TestPairs:
    q, a, b, kind = pop.candidate_pairs("test", s.test_pairs_per_query, seed)
    v = pop.image_votes(q, a, b, np.random.default_rng([seed, 61]))
    return TestPairs(q, a, b, np.asarray(v.du, np.float64), np.asarray(v.prefers_a, bool), kind)


# --------------------------------------------------------------------------- one arm

class Fitter:
    """Fits heads on chosen candidates of a pool and scores them on the test pairs."""

    def __init__(self, feats: Any, queries: dict[str, str], test: TestPairs,
                 head: HeadFitSettings) -> None:
        self.feats, self.queries, self.test, self.head = feats, queries, test, head
        self.seconds: list[float] = []
        self._test_rows = (feats.text_rows([queries[q] for q in test.query_ids]),
                           feats.image_rows(test.a), feats.image_rows(test.b))

    def pairs(self, pool: Pool, rows: np.ndarray, weights: np.ndarray):
        from aligner.reward.head_fit import PairIndex

        qr = self.feats.text_rows([self.queries[pool.query_ids[i]] for i in rows])
        ar = self.feats.image_rows([pool.a[i] for i in rows])
        br = self.feats.image_rows([pool.b[i] for i in rows])
        first = pool.prefers_a[rows]
        return PairIndex(qr, np.where(first, ar, br), np.where(first, br, ar),
                         np.asarray(weights, np.float32))

    def fit(self, pool: Pool, rows: np.ndarray, weights: np.ndarray, seed: int,
            ensemble: int = 1):
        from aligner.reward.head_fit import train_heads

        t0 = time.time()
        s = replace(self.head, seed=seed, ensemble=ensemble,
                    weighted=bool(np.any(weights != 1)))
        ens = train_heads(self.feats, self.pairs(pool, rows, weights), s)
        self.seconds.append((time.time() - t0) / ensemble)
        return ens

    def score(self, ens: Any) -> np.ndarray:
        """``[P]`` head 0's ``r_a - r_b`` on the test pairs."""
        q, a, b = self._test_rows
        t = self.feats.text_emb[q]
        return ens.raw(t, self.feats.image_emb[a])[0] - ens.raw(t, self.feats.image_emb[b])[0]


def _results(diff: np.ndarray, test: TestPairs) -> dict[str, np.ndarray]:
    """Per test pair: 1 / 0 / 0.5 (tie) against the taste and against the rater."""
    pick = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return {"taste": np.where(test.du > 0, pick, 1.0 - pick),
            "rater": np.where(test.rater_prefers_a, pick, 1.0 - pick)}


def run_random_arms(arms: list[str], pool: Pool, counts: list[int], fitter: Fitter,
                    seed: int) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """``random``, ``weighted``, ``weighted_randconf``: nested prefixes of the random order."""
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for arm in arms:
        out[arm] = {}
        for n in counts:
            rows = pool.order[:n]
            w = {"random": np.ones(n),
                 "weighted": pool.conf_informative[rows] / 5.0,
                 "weighted_randconf": pool.conf_random[rows] / 5.0}[arm]
            ens = fitter.fit(pool, rows, w, seed)
            out[arm][n] = _results(fitter.score(ens), fitter.test)
            log.info("seed %d %s n=%d: taste accuracy %.3f", seed, arm, n,
                     _acc(out[arm][n]["taste"], fitter.test))
    return out


def _acc(v: np.ndarray, test: TestPairs, tie: float = 0.02) -> float:
    keep = np.abs(test.du) >= tie
    return float(v[keep].mean()) if keep.any() else float("nan")


def _rounds(counts: list[int], max_round: int) -> list[int]:
    """The vote totals after each round: every count, with big gaps split into rounds of at
    most ``max_round``."""
    out = [counts[0]]
    for n in counts[1:]:
        while out[-1] < n:
            out.append(min(n, out[-1] + max_round))
    return out


def run_sequential_arm(arm: str, pool: Pool, counts: list[int], fitter: Fitter, seed: int,
                       cfg: VotesStudyConfig, base_scores: Any = None
                       ) -> dict[int, dict[str, np.ndarray]]:
    """``active`` / ``uncertain`` / ``between``: fit on what is there, ask where it teaches."""
    from aligner.feedback.active import choose_pairs

    strategy = SEQUENTIAL[arm]
    ens_size = cfg.ensemble if strategy != "between" else 1
    n_cand = len(pool.query_ids)
    chosen = list(pool.order[:counts[0]])
    taken = np.zeros(n_cand, bool)
    taken[chosen] = True
    out: dict[int, dict[str, np.ndarray]] = {}
    n_queries = len(set(pool.query_ids))
    rounds = _rounds(counts, cfg.max_round)
    for k, total in enumerate(rounds):
        rows = np.asarray(chosen, np.int64)
        w = pool.conf_informative[rows] / 5.0 if arm in WEIGHTED else np.ones(len(rows))
        ens = fitter.fit(pool, rows, w, seed, ensemble=ens_size)
        if total in counts:
            out[total] = _results(fitter.score(ens), fitter.test)
            log.info("seed %d %s n=%d: taste accuracy %.3f", seed, arm, total,
                     _acc(out[total]["taste"], fitter.test))
        if k + 1 == len(rounds):
            break
        m = rounds[k + 1] - total
        cap = math.ceil(cfg.cap_factor * m / n_queries) if cfg.cap_factor else 0
        qtexts = [fitter.queries[q] for q in pool.query_ids]
        logits = ens.pair_logits(fitter.feats, qtexts, pool.a, pool.b)
        rs = np.random.default_rng([seed, 67, k])
        if strategy == "between":
            mask = _between_mask(pool, fitter, ens, base_scores, cfg.rows_k) & ~taken
            pick = list(choose_pairs(pool.query_ids, m, "random", seed=int(rs.integers(2**31)),
                                     per_query_cap=cap, allowed=mask))
            if len(pick) < m:
                rest = ~taken
                rest[pick] = False
                pick += list(choose_pairs(pool.query_ids, m - len(pick), "random",
                                          seed=int(rs.integers(2**31)), allowed=rest))
        else:
            pick = list(choose_pairs(pool.query_ids, m, strategy, logits, per_query_cap=cap,
                                     seed=int(rs.integers(2**31)), allowed=~taken))
        taken[pick] = True
        chosen += pick
    return out


def _between_mask(pool: Pool, fitter: Fitter, ens: Any, base_scores: Any, k: int) -> np.ndarray:
    """Candidates with one image from the base retriever's row and one from the reward
    model's row (each a top ``k`` of the query's candidate images)."""
    from aligner.feedback.active import between_rows_mask, top_k_rows

    qs, ims = base_scores["query_ids"], base_scores["image_ids"]
    feats = fitter.feats
    t = feats.text_emb[feats.text_rows([fitter.queries[q] for q in qs])]
    reward = ens.raw(t, feats.image_emb[feats.image_rows(ims)])[0]
    rows_base = top_k_rows(qs, ims, base_scores["cosine"], k)
    rows_reward = top_k_rows(qs, ims, reward, k)
    return between_rows_mask(pool.query_ids, pool.a, pool.b, rows_base, rows_reward)


def _base_scores(pool: Pool, fitter: Fitter) -> dict[str, Any]:
    """Every (query, candidate image) of the pool with the base retriever's cosine."""
    seen = sorted({(q, i) for q, a, b in zip(pool.query_ids, pool.a, pool.b, strict=True)
                   for i in (a, b)})
    qs, ims = [q for q, _ in seen], [i for _, i in seen]
    f = fitter.feats
    cos = (f.text_emb[f.text_rows([fitter.queries[q] for q in qs])]
           * f.image_emb[f.image_rows(ims)]).sum(1)
    return {"query_ids": qs, "image_ids": ims, "cosine": cos}


# --------------------------------------------------------------------------- summary

def two_level_ci(values: np.ndarray, groups: np.ndarray, weights: np.ndarray | None = None,
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Weighted mean of ``values [S, P]`` (seeds x test pairs) with a percentile bootstrap CI
    that resamples seeds AND test queries (clusters of pairs): it covers both the training
    randomness (which votes, which initialisation) and the test-pair sampling."""
    v = np.atleast_2d(np.asarray(values, np.float64))
    w = np.ones(v.shape[1]) if weights is None else np.asarray(weights, np.float64)
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    n_g, n_s = int(inv.max()) + 1, v.shape[0]
    ws = np.bincount(inv, weights=w, minlength=n_g)                       # [G]
    wv = np.stack([np.bincount(inv, weights=w * x, minlength=n_g) for x in v])  # [S, G]
    rng = np.random.default_rng(seed)
    cg = np.stack([np.bincount(r, minlength=n_g) for r in rng.integers(0, n_g, (n_boot, n_g))])
    cs = np.stack([np.bincount(r, minlength=n_s) for r in rng.integers(0, n_s, (n_boot, n_s))])
    num = np.einsum("bs,sg,bg->b", cs.astype(np.float64), wv, cg.astype(np.float64))
    den = n_s * (cg @ ws)
    means = num[den > 0] / den[den > 0]
    return {"mean": float(wv.sum() / (n_s * ws.sum())),
            "ci_low": float(np.quantile(means, alpha / 2)),
            "ci_high": float(np.quantile(means, 1 - alpha / 2)), "n": int(v.shape[1]),
            "clusters": n_g, "seeds": n_s, "resampled": "seeds and clusters"}


def summarise(per: dict[str, dict[int, list[dict[str, np.ndarray]]]], test: TestPairs,
              tie: float, n_boot: int) -> dict[str, Any]:
    """Levels and paired differences to ``random`` (same seeds, same test pairs), with CIs
    that resample seeds and test queries (:func:`two_level_ci`; ``*_queries_only``: test
    queries only, the seeds' per-pair results averaged first)."""
    from aligner.evaluation.stats import cluster_ci_dict

    groups = np.asarray(test.query_ids)
    keep = (np.abs(test.du) >= tie).astype(np.float64)
    rows: list[dict[str, Any]] = []
    for arm, by_n in per.items():
        for n, seeds in sorted(by_n.items()):
            row: dict[str, Any] = {"arm": arm, "votes": n, "seeds": len(seeds)}
            for key, w in (("taste", keep), ("rater", None)):
                vs = np.stack([s[key] for s in seeds])
                row[key] = two_level_ci(vs, groups, w, n_boot=n_boot)
                row[f"{key}_queries_only"] = cluster_ci_dict(vs.mean(0), groups, w, n_boot=n_boot)
                row[f"{key}_per_seed"] = [float(np.average(s[key], weights=w)) for s in seeds]
                base = per.get("random", {}).get(n)
                if arm != "random" and base is not None and len(base) == len(seeds):
                    d = vs - np.stack([s[key] for s in base])
                    row[f"{key}_minus_random"] = two_level_ci(d, groups, w, n_boot=n_boot)
                    row[f"{key}_minus_random_queries_only"] = cluster_ci_dict(
                        d.mean(0), groups, w, n_boot=n_boot)
                    row[f"{key}_minus_random_per_seed"] = [
                        float(np.average(s[key] - b[key], weights=w))
                        for s, b in zip(seeds, base, strict=True)]
            rows.append(row)
    return {"rows": rows, "test_pairs": len(test.query_ids),
            "test_pairs_not_ties": int(keep.sum()), "test_queries": len(set(test.query_ids))}


def _cell(d: dict[str, float] | None, signed: bool = False) -> str:
    if not d:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(d['mean'])} [{f.format(d['ci_low'])}, {f.format(d['ci_high'])}]"


def random_equivalent(rows: list[dict[str, Any]], arm: str, n: int, key: str = "taste"
                      ) -> str:
    """How many votes the ``random`` arm needs for ``arm``'s accuracy at ``n`` (linear in
    log(votes) between the two random counts that bracket it; ``>`` / ``<`` outside)."""
    curve = sorted((r["votes"], r[key]["mean"]) for r in rows if r["arm"] == "random")
    mine = [r[key]["mean"] for r in rows if r["arm"] == arm and r["votes"] == n]
    if not curve or not mine:
        return "-"
    v = mine[0]
    if v < curve[0][1]:
        return f"<{curve[0][0]}"
    for (c0, m0), (c1, m1) in zip(curve, curve[1:], strict=False):
        if m0 <= v <= m1 and m1 > m0:
            t = (v - m0) / (m1 - m0)
            return f"{math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0))):.0f}"
    return f">{curve[-1][0]}" if v > curve[-1][1] else "-"


def _diff_cell(row: dict[str, Any], key: str) -> str:
    d = row.get(f"{key}_minus_random")
    if not d:
        return "-"
    seeds = " ".join(f"{x:+.3f}" for x in row.get(f"{key}_minus_random_per_seed", []))
    return f"{_cell(d, True)} ({seeds})"


def report_markdown(result: dict[str, Any], command: str) -> str:
    s = result["summary"]
    arms = list(dict.fromkeys(r["arm"] for r in s["rows"]))
    counts = sorted({r["votes"] for r in s["rows"]})
    at = {(r["arm"], r["votes"]): r for r in s["rows"]}
    lines = [f"Command: `{command}`", "",
             f"World `{result['world']}`, seeds {result['seeds']}, {s['test_pairs']} held-out "
             f"test pairs ({s['test_pairs_not_ties']} not ties) over {s['test_queries']} test "
             f"queries; candidate pool {result['pool_sizes']} pairs per seed. Raters: "
             f"{result['population']['raters']} simulated people, two agree "
             f"{result['population']['agreement']:.3f}; the best possible agreement with a "
             f"rater on the test pairs is {result['test_best_accuracy']:.3f}. Head fit "
             f"{result['seconds_per_fit']:.1f} s per head (median, "
             f"{result['head']['steps']} steps, lr {result['head']['lr']}). 95% CIs resample seeds "
             "and test queries (a two-level bootstrap); with few seeds the seed part is crude.",
             ""]
    for key, title in (("taste", "taste accuracy (a): vs the world's noise-free taste"),
                       ("rater", "rater agreement (b): vs a held-out rater's vote")):
        lines += [f"**{title}**", "", "| votes | " + " | ".join(arms) + " |",
                  "|---|" + "---|" * len(arms)]
        for n in counts:
            lines.append(f"| {n} | " + " | ".join(_cell(at.get((a, n), {}).get(key))
                                                  for a in arms) + " |")
        lines.append("")
        others = [a for a in arms if a != "random"]
        if "random" in arms and others:
            lines += [f"*{key}: arm minus random (paired)*", "",
                      "| votes | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
            for n in counts:
                lines.append(f"| {n} | " + " | ".join(
                    _diff_cell(at.get((a, n), {}), key) for a in others) + " |")
            lines += ["", "(per seed, in brackets after the CI: each seed's own difference)", ""]
    if "random" in arms and len(arms) > 1:
        others = [a for a in arms if a != "random"]
        lines += ["*taste accuracy: the votes random pairs with the unweighted loss need for the "
                  "same accuracy (interpolated on the random curve)*", "",
                  "| votes | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for n in counts:
            lines.append(f"| {n} | " + " | ".join(random_equivalent(s["rows"], a, n)
                                                  for a in others) + " |")
        lines.append("")
    return "\n".join(lines)


def _votes_axis(ax: Any, counts: list[int]) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("votes")
    ax.grid(alpha=0.3)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]["rows"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    color = {a: f"C{k}" for k, a in enumerate(arms)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, key, title in ((axes[0], "taste", "(a) accuracy vs the world's taste"),
                           (axes[1], "rater", "(b) agreement with a held-out rater")):
        for arm in arms:
            rr = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["votes"])
            x = [r["votes"] for r in rr]
            m = [r[key]["mean"] for r in rr]
            ax.plot(x, m, marker="o", label=arm, color=color[arm])
            ax.fill_between(x, [r[key]["ci_low"] for r in rr], [r[key]["ci_high"] for r in rr],
                            alpha=0.12, color=color[arm])
        _votes_axis(ax, result["counts"])
        ax.set(title=title, ylabel="share of test pairs")
    axes[1].axhline(result["test_best_accuracy"], color="grey", ls=":", lw=1)
    axes[1].annotate("best possible (the raters' majority)", (0.02, result["test_best_accuracy"]),
                     xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="grey")
    axes[0].legend(fontsize=8)
    ax = axes[2]
    for k, arm in enumerate(arms):
        rr = sorted((r for r in rows if r["arm"] == arm and "taste_minus_random" in r),
                    key=lambda r: r["votes"])
        if not rr:
            continue
        x = [r["votes"] * 1.05 ** (k - len(arms) / 2) for r in rr]  # side by side
        ax.errorbar(x, [r["taste_minus_random"]["mean"] for r in rr],
                    yerr=[[r["taste_minus_random"]["mean"] - r["taste_minus_random"]["ci_low"]
                           for r in rr],
                          [r["taste_minus_random"]["ci_high"] - r["taste_minus_random"]["mean"]
                           for r in rr]], marker="o", capsize=3, label=arm,
                    color=color[arm])
    ax.axhline(0, color="grey", lw=0.8)
    _votes_axis(ax, result["counts"])
    ax.set(title="(a) minus random, paired 95% CI", ylabel="difference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the job

def _seed_key(cfg: VotesStudyConfig) -> str:
    """What a seed's results depend on (not the seeds, the output or the bootstrap)."""
    import hashlib

    from aligner.runtime.config import to_dict

    d = {k: v for k, v in to_dict(cfg).items()
         if k not in ("seeds", "output", "n_boot", "threads", "arms")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seed_path(out: Path, seed: int) -> Path:
    return out / "seeds" / f"seed_{seed}.npz"


def _save_seed(out: Path, seed: int, key: str, res: dict[str, dict[int, dict[str, np.ndarray]]],
               seconds: list[float]) -> None:
    from aligner.data.io import atomic_write

    path = _seed_path(out, seed)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, key=np.asarray(key), seconds=np.asarray(seconds), **{
                f"{arm}/{n}/{k}": v for arm, by_n in res.items() for n, r in by_n.items()
                for k, v in r.items()})


def _load_seed(out: Path, seed: int, key: str, cfg: VotesStudyConfig
               ) -> tuple[dict[str, dict[int, dict[str, np.ndarray]]], list[float]]:
    """A seed's results from an earlier run with the same settings: the arms it has at every
    count (any arm, not only those asked for now, so that a save keeps them), and the
    seconds of its fits; ``({}, [])`` when there is none."""
    path = _seed_path(out, seed)
    if not path.is_file():
        return {}, []
    with np.load(path) as z:
        if str(z["key"]) != key:
            return {}, []
        names = set(z.files)
        arms = {f.split("/")[0] for f in names if "/" in f}
        res = {arm: {n: {k: z[f"{arm}/{n}/{k}"] for k in ("taste", "rater")}
                     for n in cfg.counts}
               for arm in arms if all(f"{arm}/{n}/{k}" in names for n in cfg.counts
                                      for k in ("taste", "rater"))}
        return res, [float(x) for x in z["seconds"]] if "seconds" in z else []


def run(cfg: VotesStudyConfig) -> dict[str, Any]:
    import torch

    from aligner.reward.head_fit import load_features
    from aligner.runtime.config import save_config, to_dict
    from aligner.runtime.manifest import write_manifest
    from aligner.world.generate import World
    from aligner.world.raters import RaterPopulation

    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    world = World(cfg.world)
    base = Path(cfg.base) if cfg.base else DEFAULT_BASE
    pops = {c: RaterPopulation.from_world(world, replace(cfg.raters, confidence=c,
                                                         weigh_by_confidence=False))
            for c in ("informative", "random")}
    pop = pops["informative"]
    test = draw_test(pop, cfg.raters, cfg.test_seed)
    test_stats = pop.agreement_stats(test.query_ids, test.a, test.b)
    pools = {seed: draw_pool(pops, cfg.raters, seed) for seed in cfg.seeds}
    if max(cfg.counts) > min(len(p.query_ids) for p in pools.values()):
        raise ValueError(f"counts up to {max(cfg.counts)} need a bigger candidate pool "
                         f"({min(len(p.query_ids) for p in pools.values())}; raise "
                         "raters.pairs_per_query)")
    voted = {i for p in pools.values() for i in p.a + p.b}
    test_imgs = set(test.a) | set(test.b)
    if voted & test_imgs:
        raise RuntimeError("a candidate pair names a test image")
    qids = {q for p in pools.values() for q in p.query_ids} | set(test.query_ids)
    queries = {q: pop.queries[q] for q in qids}
    feats = load_features(world.corpus_dir, base, sorted(voted | test_imgs),
                          sorted(set(queries.values())))
    fitter = Fitter(feats, queries, test, cfg.head)
    per: dict[str, dict[int, list[dict[str, np.ndarray]]]] = {a: {} for a in cfg.arms}
    random_arms = [a for a in cfg.arms if a not in SEQUENTIAL]
    key = _seed_key(cfg)
    for seed in cfg.seeds:
        pool = pools[seed]
        res, seconds = _load_seed(out, seed, key, cfg)
        fitter.seconds += seconds
        missing = [a for a in cfg.arms if a not in res]
        if res:
            log.info("seed %d: %s read back from %s", seed, sorted(res), _seed_path(out, seed))
        if missing:
            before = len(fitter.seconds)
            res.update(run_random_arms([a for a in random_arms if a in missing], pool,
                                       list(cfg.counts), fitter, seed))
            base_scores = _base_scores(pool, fitter) if "between" in missing else None
            for arm in (a for a in missing if a in SEQUENTIAL):
                res[arm] = run_sequential_arm(arm, pool, list(cfg.counts), fitter, seed, cfg,
                                              base_scores)
            _save_seed(out, seed, key, res, seconds + fitter.seconds[before:])
        res = {a: res[a] for a in cfg.arms}
        for arm, by_n in res.items():
            for n, r in by_n.items():
                per[arm].setdefault(n, []).append(r)
        log.info("seed %d done (%.0f s so far)", seed, time.time() - started)
    summary = summarise(per, test, cfg.tie, cfg.n_boot)
    np.savez_compressed(out / "per_pair.npz", **{
        f"{arm}/{n}/{k}": np.stack([s[k] for s in seeds])
        for arm, by_n in per.items() for n, seeds in by_n.items() for k in ("taste", "rater")},
        du=test.du, query_ids=np.asarray(test.query_ids))
    result = {"world": str(cfg.world), "seeds": list(cfg.seeds), "arms": list(cfg.arms),
              "counts": list(cfg.counts), "summary": summary,
              "population": pop.stats(), "test_agreement": test_stats,
              "test_best_accuracy": test_stats["best_accuracy"],
              "pool_sizes": [len(p.query_ids) for p in pools.values()],
              "seconds_per_fit": float(np.median(fitter.seconds)) if fitter.seconds
              else float("nan"),
              "fits": len(fitter.seconds), "head": asdict(cfg.head),
              "wall_seconds": round(time.time() - started, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    result["command"] = _COMMAND[0]
    (out / "summary.md").write_text(report_markdown(result, _COMMAND[0]) + "\n")
    plot(result, out / "votes_study.png")
    write_manifest(out, "votes_study", to_dict(cfg), started,
                   inputs={"world": cfg.world, "base": str(base)},
                   source="simulated raters (not people)",
                   outputs={"results": "results.json", "summary": "summary.md",
                            "plot": "votes_study.png", "per_pair": "per_pair.npz",
                            "config": "config.yaml"},
                   counts={"fits": len(fitter.seconds), "test_pairs": len(test.query_ids),
                           "pool": result["pool_sizes"]})
    return result


def main(argv: list[str] | None = None) -> int:
    from aligner.runtime.job import job_main

    args = sys.argv[1:] if argv is None else list(argv)
    _COMMAND[0] = " ".join(["python bench/votes_study.py", *args])
    return job_main(VotesStudyConfig, args, None, run,
                    lambda cfg, r: report_markdown(r, r["command"]) + f"\n-> {cfg.output}",
                    "python bench/votes_study.py")


if __name__ == "__main__":
    raise SystemExit(main())
