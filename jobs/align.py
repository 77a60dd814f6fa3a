"""Fine-tune the retriever on preference pairs (ranked DPO + contrastive term) with Ray Train.

    python -m jobs.align --config jobs/configs/align.yaml world=out/world \
        preferences=out/preferences model.checkpoint=out/base/checkpoint output=out/aligned \
        train.steps=200 train.lr=1e-4

The starting checkpoint is also the frozen reference of the DPO loss. Pairs of training
queries train; pairs of validation queries (the queries table's ``split``) and held-out
caption recall choose the output (``train.selection``): by default the weight-space
interpolation ``start + alpha * (final - start)`` (WiSE-FT, alpha 0 included) that moved
furthest towards the teacher on held-out pairs (reward margin) among those that pass a
non-inferiority test on validation recall@10: the paired drop vs the start plus
``train.recall_z`` standard errors is at most ``train.recall_margin``. The start always passes,
so a run that cannot show non-inferiority outputs the start. ``train.pref_weight=0`` trains the
contrastive-only control with the same steps and data (``train.selection=fixed`` with
``train.wise_alphas=[alpha]`` outputs it at exactly the aligned model's alpha). Outputs: ``checkpoint/`` (the selected state),
``last/``, ``train_log.jsonl`` + ``train_log.csv``, ``training.png``, ``metrics.json``,
``config.yaml``, ``manifest.json``. A re-run on the same output resumes from its latest
checkpoint; ``max_failures`` restarts a crashed worker group from it. The inputs
(``preferences``, ``corpus``, ``queries``, ``world``) may be ``s3://`` / ``gs://`` URIs: the
driver reads them and ships the prepared arrays to the workers; ``model.checkpoint`` and
``output`` are local or shared paths. A missing input or bucket exits 2. The config is
:class:`aligner.training.config.AlignConfig`; the work is :func:`aligner.training.runs.run_align`.
"""

from __future__ import annotations

from pathlib import Path

from aligner.runtime.job import job_main
from aligner.training.config import AlignConfig

DEFAULT_YAML = Path(__file__).parent / "configs" / "align.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.align [--config FILE] [key=value ...]``; 2 on bad input."""
    from aligner.training.runs import run_align

    def report(cfg: AlignConfig, metrics: dict) -> str:
        out = Path(cfg.output)
        return (f"aligned checkpoint: {out / 'checkpoint'} (step {metrics['selected_step']}, "
                f"alpha {metrics['selected_alpha']})\nlog: {out / 'train_log.csv'}")

    return job_main(AlignConfig, argv, DEFAULT_YAML, run_align, report, "python -m jobs.align")


if __name__ == "__main__":
    raise SystemExit(main())
