"""Embed an image corpus with the retriever's image tower and score its aesthetics (Ray Data).

    python -m jobs.embed --config jobs/configs/embed.yaml input=out/world/corpus output=out/emb
    ray job submit --working-dir . -- python -m jobs.embed input=s3://bucket/corpus \
        output=s3://bucket/embeddings

The work is :func:`aligner.retrieval.embed.run_embed`; ``--help`` lists every field. The
workers write the embeddings (the driver sees only part records); inputs and outputs are local
paths or ``s3://`` / ``gs://`` URIs (``AWS_ENDPOINT_URL`` for S3-compatible stores).
"""

from __future__ import annotations

from pathlib import Path

from aligner.retrieval.embed import EmbedConfig, run_embed
from aligner.runtime.job import job_main

DEFAULT_YAML = Path(__file__).parent / "configs" / "embed.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.embed [--config FILE] [key=value ...]``; 2 on bad input."""
    return job_main(EmbedConfig, argv, DEFAULT_YAML, run_embed, _report, "python -m jobs.embed")


def _report(cfg: EmbedConfig, summary: dict) -> str:
    return (f"embed: {summary['shards_processed']} shards processed, "
            f"{summary['shards_skipped']} skipped; rows out {summary['rows_out']}, "
            f"failed {summary['rows_failed']} -> {cfg.output}")


if __name__ == "__main__":
    raise SystemExit(main())
