"""Evaluate the aligned retriever against the systems a user would otherwise pick; write a report.

    python -m jobs.evaluate --config jobs/configs/evaluate.yaml world=out/world \\
        base_checkpoint=out/base/checkpoint \\
        models=control=out/control/checkpoint,aligned=out/aligned/checkpoint \\
        rephrased=out/rephrase preferences=grid=out/preferences output=out/evaluate

Systems: the base, a cascade re-ranker, clip-retrieval's query shift, query-time rephrasing
and every ``models`` entry, over one gallery; held-out recall, oracle aesthetic@K,
precision@K, HPIR agreement, knob sweeps at equal relevance, teacher diagnostics
(:mod:`aligner.evaluation.run`). Knobs: ``baseline.cascade_weight=2``,
``sweep.enabled=false``, ``hpir.pool=20`` ... (``--help`` lists them). Writes
``metrics.json``, ``per_query.parquet``, ``report.html``, ``report.png``, ``config.yaml`` and
``manifest.json`` to ``output``.
"""

from __future__ import annotations

from pathlib import Path

from aligner.evaluation.config import EvaluateConfig
from aligner.runtime.job import job_main

DEFAULT_YAML = Path(__file__).parent / "configs" / "evaluate.yaml"


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation from the command line; 0 on success, 2 on bad inputs."""
    from aligner.evaluation.run import evaluate

    return job_main(EvaluateConfig, argv, DEFAULT_YAML, evaluate,
                    lambda cfg, res: f"{res.table}\nreport: {res.paths['report']}\n"
                                     f"metrics: {res.paths['metrics']}", "python -m jobs.evaluate")


if __name__ == "__main__":
    raise SystemExit(main())
