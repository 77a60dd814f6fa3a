"""Simulated-rater votes for a built-in world (``jobs.rater_votes``): the training votes as a
preferences table and the held-out test pairs, each judged by two raters.

* **votes** (``preferences.parquet``): the training and validation splits' queries, each over
  images of its own split only (train queries x train images, val x val), one vote per pair
  by a rater drawn from the panel; source ``rater``, teacher ``simulated_rater:<id>``, weight 1.
  The same schema as the serving page's export (:mod:`aligner.data.preferences`), so every
  trainer that takes human votes takes these.
* **test pairs** (``test_pairs.parquet``, :func:`aligner.world.raters.test_pairs_schema`): test
  queries x test-split images, for evaluation only; two different raters judge each pair, so
  their observed agreement is measured on data no model trains on, and the first rater is the
  "single human" baseline of the reward-model evaluation.

Only natural images are drawn: the images rendered for the dense val / test galleries
(:meth:`aligner.world.World.gallery_ids`) are never voted on (docs/evaluation.md, section 1).

The panel's temperature is calibrated on the training pairs (:func:`calibrate_temperature`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from aligner.data.preferences import rows_to_table
from aligner.world.generate import World
from aligner.world.raters import (
    CONTENT_KEYS,
    PairDraw,
    calibrate_temperature,
    draw_pairs,
    expected_agreement,
    make_panel,
    observed_agreement,
    pair_utilities,
    rater_name,
    test_pairs_schema,
    vote,
)

log = logging.getLogger(__name__)
SOURCE = "rater"


@dataclass
class RaterSettings:
    """How the simulated raters are drawn and how noisy they are (defaults: docs/defaults.md)."""

    n_raters: int = 40
    rater_spread: float = 0.25
    target_agreement: float = 0.65
    relevance_weight: float = 1.0
    pairs_per_query: int = 40
    test_pairs_per_query: int = 20
    pool_full: int = 48
    pool_partial: int = 16
    mixed_fraction: float = 0.25
    seed: int = 0

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


class _Split:
    """One split's queries and its natural images (no gallery image) with what the raters see
    of them."""

    def __init__(self, world: World, split: str, oracle: pa.Table, truth: dict[str, dict],
                 gallery: set[str]) -> None:
        q = world.queries(split=split, kind="content")
        self.query_ids = q["query_id"].to_pylist()
        self.queries = q["query"].to_pylist()
        self.truths = [truth[i] for i in self.query_ids]
        ids = oracle["id"].to_pylist()
        mask = (np.asarray(oracle["split"].to_pylist()) == split) & \
            np.array([i not in gallery for i in ids], bool)
        self.image_ids = [i for i, m in zip(ids, mask, strict=True) if m]
        self.labels = {k: np.asarray(oracle[k].to_pylist())[mask] for k in CONTENT_KEYS}
        self.beauty = np.asarray(oracle["beauty"].to_pylist(), np.float64)[mask]

    def draw(self, s: RaterSettings, per_query: int, salt: int) -> tuple[PairDraw, np.ndarray]:
        d = draw_pairs(self.truths, self.labels, per_query, seed=s.seed * 1000 + salt,
                       pool_full=s.pool_full, pool_partial=s.pool_partial,
                       mixed_fraction=s.mixed_fraction)
        ua, ub = pair_utilities(d, self.truths, self.labels, self.beauty, s.relevance_weight)
        return d, ua - ub


def simulate_votes(world: World, s: RaterSettings) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """The votes table, the test pairs and the panel's statistics (module docstring).

    Raises:
        ValueError: a world whose splits give no pairs.
    """
    oracle = world.oracle()
    truth = {r["query_id"]: r for r in world.query_truth().to_pylist()}
    gallery = world.gallery_ids()
    splits = {k: _Split(world, k, oracle, truth, gallery) for k in ("train", "val", "test")}
    draws = {"train": splits["train"].draw(s, s.pairs_per_query, 1),
             "val": splits["val"].draw(s, s.pairs_per_query, 2),
             "test": splits["test"].draw(s, s.test_pairs_per_query, 3)}
    if len(draws["train"][1]) == 0 or len(draws["test"][1]) == 0:
        raise ValueError("the world gives no training or test pairs (too few images per query)")
    unit = make_panel(s.n_raters, s.rater_spread, 1.0, s.seed)
    temperature = calibrate_temperature(draws["train"][1], unit.multipliers, s.target_agreement)
    panel = make_panel(s.n_raters, s.rater_spread, temperature, s.seed)
    rng = np.random.default_rng([s.seed, 19])

    rows: list[dict[str, Any]] = []
    for salt, split in enumerate(("train", "val")):
        sp, (d, du) = splits[split], draws[split]
        raters = rng.integers(0, panel.size, len(du))
        first = vote(panel, du, raters, seed=s.seed * 1000 + 10 + salt)
        for k in range(len(du)):
            qi, a, b = int(d.query[k]), sp.image_ids[d.a[k]], sp.image_ids[d.b[k]]
            win, lose = (a, b) if first[k] else (b, a)
            rows.append({"query_id": sp.query_ids[qi], "query": sp.queries[qi],
                         "chosen_id": win, "rejected_id": lose, "source": SOURCE,
                         "weight": 1.0, "teacher": rater_name(int(raters[k]))})
    votes = rows_to_table(rows)

    sp, (d, du) = splits["test"], draws["test"]
    r1 = rng.integers(0, panel.size, len(du))
    r2 = (r1 + rng.integers(1, panel.size, len(du))) % panel.size  # a different rater
    v1 = vote(panel, du, r1, seed=s.seed * 1000 + 31)
    v2 = vote(panel, du, r2, seed=s.seed * 1000 + 32)
    test = pa.table({"query_id": [sp.query_ids[i] for i in d.query],
                     "query": [sp.queries[i] for i in d.query],
                     "image_a": [sp.image_ids[i] for i in d.a],
                     "image_b": [sp.image_ids[i] for i in d.b], "kind": d.kind,
                     "first_rater": [rater_name(int(r)) for r in r1], "first_prefers_a": v1,
                     "second_rater": [rater_name(int(r)) for r in r2], "second_prefers_a": v2},
                    schema=test_pairs_schema())
    stats = {
        "temperature": temperature,
        "target_agreement": s.target_agreement,
        "expected_agreement_train": expected_agreement(draws["train"][1], panel),
        "expected_agreement_test": expected_agreement(du, panel),
        "observed_agreement_test": observed_agreement(v1, v2),
        "pairs": {k: int(len(v[1])) for k, v in draws.items()},
        "kinds": {k: {t: int(sum(x == t for x in v[0].kind)) for t in ("full", "mixed", "partial")}
                  for k, v in draws.items()},
        "queries": {k: int(len(np.unique(v[0].query))) for k, v in draws.items()},
        "raters": panel.size,
    }
    log.info("simulated raters: T=%.3f, two raters agree %.3f (target %.2f; observed on test "
             "pairs %.3f); votes %d train + %d val, test pairs %d", temperature,
             stats["expected_agreement_train"], s.target_agreement,
             stats["observed_agreement_test"], stats["pairs"]["train"], stats["pairs"]["val"],
             stats["pairs"]["test"])
    return votes, test, stats
