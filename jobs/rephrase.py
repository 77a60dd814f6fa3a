"""Rephrase search queries with explicit aesthetic expectations (Ray Data + an LLM).

    python -m jobs.rephrase --config jobs/configs/rephrase.yaml \\
        input=out/world/queries/queries.parquet output=out/rephrased backend=local style=detail
    ray job submit --working-dir . -- python -m jobs.rephrase input=... backend=vllm \\
        vllm.model=Qwen/Qwen2.5-1.5B-Instruct

The work is :func:`aligner.rephrase.run.run_rephrase`; ``--help`` lists every field.
"""

from __future__ import annotations

from pathlib import Path

from aligner.rephrase.run import RephraseConfig, run_rephrase
from aligner.runtime.job import job_main

DEFAULT_YAML = Path(__file__).parent / "configs" / "rephrase.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.rephrase [--config FILE] [key=value ...]``; 2 on bad input."""
    return job_main(RephraseConfig, argv, DEFAULT_YAML, run_rephrase, _report,
                    "python -m jobs.rephrase")


def _report(cfg: RephraseConfig, m: dict) -> str:
    return (f"rephrase: {m['rows_out']} queries -> {Path(cfg.output) / 'queries.parquet'}; "
            f"fallbacks {m['fallbacks']} {m['fallbacks_by_reason']}"
            + (" (already complete, skipped)" if m.get("skipped") else ""))


if __name__ == "__main__":
    raise SystemExit(main())
