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
from typing import Any

import numpy as np
import pyarrow as pa

from aligner.data.preferences import rows_to_table
from aligner.world.generate import World
from aligner.world.raters import (
    RaterPopulation,
    RaterSettings,
    confidences,
    observed_agreement,
    rater_name,
    test_pairs_schema,
    vote,
)

log = logging.getLogger(__name__)
SOURCE = "rater"


def simulate_votes(world: World, s: RaterSettings) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """The votes table, the test pairs and the population's statistics (module docstring).

    The raters are a :class:`~aligner.world.raters.RaterPopulation` (their own tastes when
    ``s.taste_spread`` > 0); with the default settings the votes are those the panel gave
    before populations existed, vote for vote.

    Raises:
        ValueError: a world whose splits give no pairs.
    """
    pop = RaterPopulation.from_world(world, s)
    draws = {"train": pop.candidate_pairs("train", s.pairs_per_query, s.seed * 1000 + 1),
             "val": pop.candidate_pairs("val", s.pairs_per_query, s.seed * 1000 + 2),
             "test": pop.candidate_pairs("test", s.test_pairs_per_query, s.seed * 1000 + 3)}
    if not draws["train"][0] or not draws["test"][0]:
        raise ValueError("the world gives no training or test pairs (too few images per query)")
    rng = np.random.default_rng([s.seed, 19])
    crng = np.random.default_rng([s.seed, 29])  # confidences: a stream of their own

    def cast(d: tuple[list[str], list[str], list[str], list[str]], raters: np.ndarray,
             salt: int) -> tuple[np.ndarray, np.ndarray]:
        du = pop.assigned_du(pop.rater_du(d[0], d[1], d[2]), raters)
        first = vote(pop.panel, du, raters, seed=s.seed * 1000 + salt)
        p = pop.panel.p_first(du, raters)
        return first, confidences(np.where(first, p, 1 - p), s.confidence, crng)

    rows: list[dict[str, Any]] = []
    confidence_counts = np.zeros(5, np.int64)
    for salt, split in enumerate(("train", "val")):
        d = draws[split]
        raters = rng.integers(0, pop.size, len(d[0]))
        first, conf = cast(d, raters, 10 + salt)
        confidence_counts += np.bincount(conf - 1, minlength=5)
        for k, (q, a, b) in enumerate(zip(d[0], d[1], d[2], strict=True)):
            win, lose = (a, b) if first[k] else (b, a)
            rows.append({"query_id": q, "query": pop.queries[q], "chosen_id": win,
                         "rejected_id": lose, "source": SOURCE,
                         "weight": float(conf[k]) / 5 if s.weigh_by_confidence else 1.0,
                         "teacher": rater_name(int(raters[k]))})
    votes = rows_to_table(rows)

    q, a, b, kinds = draws["test"]
    r1 = rng.integers(0, pop.size, len(q))
    r2 = (r1 + rng.integers(1, pop.size, len(q))) % pop.size  # a different rater
    v1, _ = cast(draws["test"], r1, 31)
    v2, _ = cast(draws["test"], r2, 32)
    test = pa.table({"query_id": q, "query": [pop.queries[i] for i in q],
                     "image_a": a, "image_b": b, "kind": kinds,
                     "first_rater": [rater_name(int(r)) for r in r1], "first_prefers_a": v1,
                     "second_rater": [rater_name(int(r)) for r in r2], "second_prefers_a": v2},
                    schema=test_pairs_schema())
    on_test = pop.agreement_stats(q, a, b)
    stats = {
        "temperature": pop.panel.temperature,
        "target_agreement": s.target_agreement,
        "expected_agreement_train": pop.calibration["agreement"],
        "expected_agreement_test": on_test["agreement"],
        "observed_agreement_test": observed_agreement(v1, v2),
        "best_accuracy_test": on_test["best_accuracy"],
        "world_taste_accuracy_test": on_test["world_taste_accuracy"],
        "pairs": {k: int(len(v[0])) for k, v in draws.items()},
        "kinds": {k: {t: int(sum(x == t for x in v[3])) for t in ("full", "mixed", "partial")}
                  for k, v in draws.items()},
        "queries": {k: int(len(set(v[0]))) for k, v in draws.items()},
        "raters": pop.size,
        "taste": pop.taste.name,
        "taste_spread": s.taste_spread,
        "confidence": s.confidence,
        "confidence_counts": {str(i + 1): int(c) for i, c in enumerate(confidence_counts)},
    }
    log.info("simulated raters: T=%.3f, two raters agree %.3f (target %.2f; observed on test "
             "pairs %.3f; best achievable accuracy %.3f); votes %d train + %d val, test pairs "
             "%d", pop.panel.temperature, stats["expected_agreement_train"], s.target_agreement,
             stats["observed_agreement_test"], stats["best_accuracy_test"],
             stats["pairs"]["train"], stats["pairs"]["val"], stats["pairs"]["test"])
    return votes, test, stats
