"""Pairwise votes from simulated raters on a built-in world (training votes + held-out test pairs).

    python -m jobs.rater_votes world=out/world output=out/votes
    python -m jobs.train_reward votes=out/votes ...        # a reward model from them
    python -m jobs.build_preferences ... extra_tables=[out/votes]

The raters are the world's hidden taste seen through Bradley-Terry noise, calibrated so that
two raters agree about as often as real annotators do (``raters.target_agreement``); every
output names them as simulated raters. See :mod:`aligner.world.votes`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.runtime.config import save_config, to_dict
from aligner.runtime.job import job_main
from aligner.runtime.manifest import write_manifest
from aligner.world.votes import RaterSettings

DEFAULT_YAML = Path(__file__).parent / "configs" / "rater_votes.yaml"
TEST_PAIRS_FILE = "test_pairs.parquet"


@dataclass
class RaterVotesConfig:
    """Simulated-rater votes on a built-in world."""

    world: str = field(default="out/world", metadata={"help": "world directory (jobs.make_world)"})
    output: str = field(default="out/votes", metadata={"help": "output directory"})
    raters: RaterSettings = field(default_factory=RaterSettings, metadata={
        "help": "panel: n_raters, rater_spread, target_agreement, relevance_weight, "
                "pairs_per_query, test_pairs_per_query, pool_full, pool_partial, "
                "mixed_fraction, seed"})


def run(cfg: RaterVotesConfig) -> dict[str, Any]:
    """Write ``preferences.parquet`` (votes), ``test_pairs.parquet``, ``stats.json`` and the
    manifest; returns the panel's statistics."""
    from aligner.data.io import atomic_write_table
    from aligner.data.preferences import write_preferences
    from aligner.world.generate import World
    from aligner.world.votes import simulate_votes

    started = time.time()
    world = World(cfg.world)
    votes, test, stats = simulate_votes(world, cfg.raters)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    path = write_preferences(votes, out)
    atomic_write_table(test, out / TEST_PAIRS_FILE)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    save_config(cfg, out / "config.yaml")
    write_manifest(out, "rater_votes", to_dict(cfg), started, inputs={"world": cfg.world},
                   source="rater (simulated raters, not people)", stats=stats,
                   outputs={"votes": str(path.name), "test_pairs (evaluation only)":
                            TEST_PAIRS_FILE, "stats": "stats.json"},
                   counts={"votes": votes.num_rows, "test_pairs": test.num_rows})
    return stats


def main(argv: list[str] | None = None) -> int:
    return job_main(RaterVotesConfig, argv, DEFAULT_YAML, run,
                    lambda cfg, s: f"rater_votes: {s['pairs']['train']} train + "
                                   f"{s['pairs']['val']} val votes by {s['raters']} simulated "
                                   f"raters (two agree {s['expected_agreement_train']:.3f}, "
                                   f"observed {s['observed_agreement_test']:.3f} on "
                                   f"{s['pairs']['test']} test pairs) -> {cfg.output}",
                    "python -m jobs.rater_votes")


if __name__ == "__main__":
    raise SystemExit(main())
