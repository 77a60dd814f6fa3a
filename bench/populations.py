"""Rater populations of a world: two-rater agreement, the best achievable accuracy and the
world taste's accuracy, for several spreads of the raters' own tastes (docs/learning_curve.md,
section 2).

    python bench/populations.py /work/exp/default/world /work/exp/divergent/world

Calibration pairs are training pairs (train queries over natural train images); the held-out
numbers are on test pairs (test queries over natural test images), which nothing trains on.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from aligner.world import World
from aligner.world.raters import RaterPopulation, RaterSettings

SPREADS = (0.0, 0.3, 0.6, 1.0)


def main(argv: list[str]) -> int:
    print("| world | taste_spread | temperature | agreement (train) | agreement (test) "
          "| best accuracy (test) | world-taste accuracy (test) |")
    print("|---|---|---|---|---|---|---|")
    for root in argv:
        w = World(root)
        for spread in SPREADS:
            s = replace(RaterSettings(), taste_spread=spread)
            pop = RaterPopulation.from_world(w, s)
            q, a, b, _ = pop.candidate_pairs("test", s.test_pairs_per_query, s.seed * 1000 + 3)
            t = pop.agreement_stats(q, a, b)
            c = pop.calibration
            print(f"| {w.taste().name} | {spread} | {c['temperature']:.3f} | "
                  f"{c['agreement']:.3f} | {t['agreement']:.3f} | {t['best_accuracy']:.3f} | "
                  f"{t['world_taste_accuracy']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
