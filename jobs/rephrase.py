"""Rephrase search queries with explicit aesthetic expectations (Ray Data + an LLM).

    python -m jobs.rephrase --config jobs/configs/rephrase.yaml \\
        input=out/world/queries/queries.parquet output=out/rephrased backend=local style=detail
    ray job submit --working-dir . -- python -m jobs.rephrase input=... backend=vllm \\
        vllm.model=Qwen/Qwen2.5-1.5B-Instruct

The work is :func:`aligner.rephrase.run.run_rephrase`; ``--help`` lists every field.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aligner.rephrase.run import RephraseConfig, run_rephrase
from aligner.runtime.config import dump_yaml, load_config
from aligner.runtime.logs import setup_logging

log = logging.getLogger("jobs.rephrase")
DEFAULT_YAML = Path(__file__).parent / "configs" / "rephrase.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.rephrase [--config FILE] [key=value ...]``; returns the exit code."""
    setup_logging()
    cfg = load_config(RephraseConfig, argv, DEFAULT_YAML, prog="python -m jobs.rephrase")
    log.info("config:\n%s", dump_yaml(cfg))
    m = run_rephrase(cfg)
    print(f"rephrase: {m['rows_out']} queries -> {Path(cfg.output) / 'queries.parquet'}; "
          f"fallbacks {m['fallbacks']} {m['fallbacks_by_reason']}"
          + (" (already complete, skipped)" if m.get("skipped") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
