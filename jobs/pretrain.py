"""Pre-train the built-in retriever's image tower on the world's captions (Ray Train).

    python -m jobs.pretrain --config jobs/configs/pretrain.yaml world=out/world output=out/base \
        train.steps=500 num_workers=1

Text tower locked (LiT-style; optionally its last layers unlocked), its outputs for the
finite caption set cached, the image tower trained contrastively with ``TorchTrainer`` on
``num_workers`` workers, checkpoints every ``train.checkpoint_every`` steps (a re-run with the
same ``output`` resumes from the latest one; ``max_failures`` restarts a crashed worker group).
Afterwards the final checkpoint is evaluated on the held-out split: caption recall@K,
paraphrases in unseen words, and the rephrasing premise (does adding good look words to a
query raise the oracle score of its top 10?), written to ``metrics.json``. The config is
:class:`aligner.training.config.PretrainConfig`; the work is
:func:`aligner.training.runs.run_pretrain` plus that evaluation (:func:`run`).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from aligner.runtime.config import to_dict
from aligner.runtime.job import job_main
from aligner.training.config import PretrainConfig

log = logging.getLogger("jobs.pretrain")
DEFAULT_YAML = Path(__file__).parent / "configs" / "pretrain.yaml"


def run(cfg: PretrainConfig) -> Path:
    """Pre-train, evaluate the final checkpoint (``cfg.evaluate``) and export it as a shipped
    base (``cfg.export_to``); returns the final checkpoint directory."""
    from aligner.evaluation.checkpoint import evaluate_checkpoint
    from aligner.training.runs import run_pretrain

    evaluate = (partial(evaluate_checkpoint, world_dir=cfg.world, gallery=cfg.eval_gallery)
                if cfg.evaluate else None)
    result = run_pretrain(cfg, evaluate=evaluate)
    if cfg.evaluate:
        _log_summary(result.metrics)
    if cfg.export_to:
        from aligner.retrieval.shipped import export_base

        dest = export_base(result.output, result.checkpoint, cfg.world, to_dict(cfg),
                           cfg.export_to)
        log.info("exported the base model to %s", dest)
    return result.checkpoint


def _log_summary(m: dict) -> None:
    r = m["caption_recall_test"]
    p = m["premise"]
    log.info("test caption recall: R@1 %.3f R@5 %.3f R@10 %.3f (chance@10 %.4f)",
             r["r@1"]["mean"], r["r@5"]["mean"], r["r@10"]["mean"], r["chance@10"]["mean"])
    for key, what in (("content_queries", "caption words"), ("paraphrases", "unseen words")):
        h = m[key]
        log.info("%s queries (%s): right content in top 10 for %.2f (chance %.2f), "
                 "precision@10 %.3f (chance %.3f)", key, what, h["hit@10"]["mean"],
                 h["hit@10_chance"]["mean"], h["precision@10"]["mean"],
                 h["precision@10_chance"]["mean"])
    g, b = p["ndcg@10_gain"], p["beauty_relevant@10_gain"]
    log.info("premise: + good look words changes nDCG@10 (gain match x beauty) by %+.3f "
             "[%.3f, %.3f] and beauty among relevant results by %+.3f [%.3f, %.3f]",
             g["mean"], g["ci_low"], g["ci_high"], b["mean"], b["ci_low"], b["ci_high"])


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.pretrain [--config FILE] [key=value ...]``; 2 on bad input."""
    return job_main(PretrainConfig, argv, DEFAULT_YAML, run,
                    lambda cfg, final: f"pre-trained checkpoint: {final}\n"
                                       f"metrics: {Path(cfg.output) / 'metrics.json'}",
                    "python -m jobs.pretrain")


if __name__ == "__main__":
    raise SystemExit(main())
