"""Judge two systems' result rows (base vs aligned) with an LMM or a proxy, on Ray Data.

    python -m jobs.judge --config jobs/configs/judge.yaml evaluation=out/evaluate
    python -m jobs.judge evaluation=out/evaluate backend=openai \\
        openai.base_url=http://vlm:8000/v1 openai.model=Qwen/Qwen2-VL-7B-Instruct style=scorer

The work is :func:`aligner.judge.run.run_judge`; then the evaluation's report shows the
judge's summary (:func:`aligner.evaluation.report.add_judge_summary`). ``--help`` lists every
field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from aligner.judge.run import JudgeConfig, run_judge
from aligner.runtime.job import job_main

DEFAULT_YAML = Path(__file__).parent / "configs" / "judge.yaml"
log = logging.getLogger("aligner.job")


def run(cfg: JudgeConfig) -> dict[str, Any]:
    """Judge, then show the summary in the evaluation's report when the judgments lie beside
    it (the default output) and the report exists."""
    from aligner.evaluation.report import add_judge_summary

    manifest = run_judge(cfg)
    report = Path(cfg.evaluation) / "report.html"
    if report.is_file() and cfg.out_dir().resolve().parent == report.parent.resolve():
        add_judge_summary(report.parent, cfg.out_dir())
        log.info("the judge's summary is in %s", report)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.judge [--config FILE] [key=value ...]``; 2 on bad input."""
    return job_main(JudgeConfig, argv, DEFAULT_YAML, run, _report, "python -m jobs.judge")


def _report(cfg: JudgeConfig, m: dict) -> str:
    s = m.get("summary") or {}
    return (f"judge: {s.get('sentence', '')} {m['counts']['failed']} failed -> "
            f"{cfg.out_dir() / 'judgments.parquet'}"
            + (" (already complete, skipped)" if m.get("skipped") else ""))


if __name__ == "__main__":
    raise SystemExit(main())
