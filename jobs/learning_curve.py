"""What votes buy: nDCG@10 against the number of votes for the label-free, reward and mixed
teachers, on a prepared built-in world (docs/learning_curve.md).

    python -m jobs.quickstart workdir=out/divergent taste=divergent base=shipped   # prepare
    python -m jobs.learning_curve prepared=out/divergent output=out/curve_divergent
    python -m jobs.learning_curve prepared=out output=out/curve_default \\
        also=[out/curve_divergent] figure=docs/figures/learning_curve.png

Every point is resumable (a rerun skips what is done); ``also`` adds other worlds' finished
curves to the figure. See :mod:`aligner.feedback.curve`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.feedback.curve import CurveConfig
from aligner.runtime.job import job_main

DEFAULT_YAML = Path(__file__).parent / "configs" / "learning_curve.yaml"


@dataclass
class LearningCurveConfig(CurveConfig):
    """The learning curve of a prepared world (the curve's own fields are CurveConfig's)."""

    also: list[str] = field(default_factory=list, metadata={
        "help": "other finished curves (their output dirs) to draw beside this one"})
    figure: str = field(default="", metadata={
        "help": "also copy the figure (every curve of this run and `also`) here"})


def run(cfg: LearningCurveConfig) -> dict[str, Any]:
    """The curve, and the combined figure when ``also`` / ``figure`` ask for it."""
    from aligner.feedback.curve import plot_curves, run_curve

    summary = run_curve(cfg)
    if cfg.also or cfg.figure:
        others = [json.loads((Path(d) / "curve.json").read_text()) for d in cfg.also]
        path = plot_curves([summary, *others], Path(cfg.output) / "learning_curves.png")
        if cfg.figure:
            Path(cfg.figure).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, cfg.figure)
    return summary


def _done(cfg: LearningCurveConfig, s: dict[str, Any]) -> str:
    t = s["targets"]
    return (f"learning curve ({s['world']}): reward beats label-free from "
            f"{t['reward_beats_label_free_from']} votes; mix non-inferior at every count: "
            f"{t['mix_non_inferior_every_count']} -> {cfg.output}/learning_curve.md")


def main(argv: list[str] | None = None) -> int:
    return job_main(LearningCurveConfig, argv, DEFAULT_YAML, run, _done,
                    "python -m jobs.learning_curve")


if __name__ == "__main__":
    raise SystemExit(main())
