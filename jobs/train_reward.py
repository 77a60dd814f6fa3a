"""Train an ImageReward-style reward model from pairwise preferences, on Ray Train.

    python -m jobs.rater_votes world=out/world output=out/votes
    python -m jobs.train_reward votes=out/votes world=out/world \\
        model.checkpoint=out/base/checkpoint output=out/reward

Then, in Python (ImageReward's API, batched)::

    from aligner.reward.model import RewardModel
    rm = RewardModel.load("out/reward/checkpoint")
    rm.score("two red circles on grass", ["a.png", "b.png"])        # normalised rewards
    ranks, rewards = rm.inference_rank("two red circles on grass", images)

The votes can be any preferences table: simulated raters (``jobs.rater_votes``), the serving
page's export, LMM labels. On a built-in world with the votes' held-out test pairs, the job
also writes ``reward_eval.md`` / ``reward_eval.png``: preference accuracy against the hidden
taste for CLIP similarity, the aesthetic scorer, the contrast teacher, a single simulated rater
and the reward model (:mod:`aligner.evaluation.reward_eval`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aligner.runtime.job import job_main
from aligner.training.reward import TrainRewardConfig

DEFAULT_YAML = Path(__file__).parent / "configs" / "train_reward.yaml"


def run(cfg: TrainRewardConfig) -> dict[str, Any]:
    """Train (and, on a built-in world with test pairs, evaluate) the reward model."""
    from aligner.training.reward import run_train_reward

    evaluate = None
    if cfg.evaluate:
        if not (Path(cfg.votes) / "test_pairs.parquet").is_file():
            raise FileNotFoundError(f"{cfg.votes}/test_pairs.parquet does not exist: evaluation "
                                    "needs jobs.rater_votes output (or evaluate=false)")
        from aligner.evaluation.reward_eval import evaluate_reward_checkpoint

        def evaluate(ckpt: Path) -> dict[str, Any]:
            return evaluate_reward_checkpoint(ckpt, cfg.world, cfg.votes, cfg.model,
                                              cfg.rephrased, cfg.output)
    return run_train_reward(cfg, evaluate)


def _report(cfg: TrainRewardConfig, m: dict[str, Any]) -> str:
    line = (f"train_reward: {m['train_pairs']} pairs, {m['steps']} steps in {m['fit_seconds']} s, "
            f"validation agreement with the votes {m['val_acc_vs_votes']:.3f}")
    ev = m.get("evaluation")
    if ev:
        acc = {k: r["accuracy"]["mean"] for k, r in ev["rows"].items()}
        line += "; held-out accuracy vs the hidden taste: " + ", ".join(
            f"{k} {v:.3f}" for k, v in acc.items())
    return line + f" -> {cfg.output}/checkpoint"


def main(argv: list[str] | None = None) -> int:
    return job_main(TrainRewardConfig, argv, DEFAULT_YAML, run, _report,
                    "python -m jobs.train_reward")


if __name__ == "__main__":
    raise SystemExit(main())
