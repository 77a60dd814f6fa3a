"""VisionPrefer-style annotation: an LMM rates (query, image) per aspect; pairs per aspect.

    python -m jobs.annotate --config jobs/configs/annotate.yaml queries=out/world/queries \\
        embeddings=out/embeddings backend=openai openai.base_url=http://vlm:8000/v1 \\
        openai.model=Qwen/Qwen2-VL-7B-Instruct output=out/annotate
    python -m jobs.build_preferences ... extra_tables=[out/annotate]

The work is :func:`aligner.judge.annotate_run.run_annotate`; ``--help`` lists every field.
"""

from __future__ import annotations

from pathlib import Path

from aligner.judge.annotate_run import AnnotateConfig, run_annotate
from aligner.runtime.job import job_main

DEFAULT_YAML = Path(__file__).parent / "configs" / "annotate.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.annotate [--config FILE] [key=value ...]``; 2 on bad input."""
    return job_main(AnnotateConfig, argv, DEFAULT_YAML, run_annotate, _report,
                    "python -m jobs.annotate")


def _report(cfg: AnnotateConfig, m: dict) -> str:
    c = m["counts"]
    return (f"annotate: {c['ratings_ok']} ratings ({c['ratings_failed']} failed), "
            f"{c['pairs']} pairs {c['pairs_by_aspect']} (ties dropped {c['ties_by_aspect']}) "
            f"-> {Path(cfg.output)}")


if __name__ == "__main__":
    raise SystemExit(main())
