"""Embed an image corpus with the retriever's image tower and score its aesthetics (Ray Data).

    python -m jobs.embed --config jobs/configs/embed.yaml input=out/world/corpus output=out/emb
    ray job submit --working-dir . -- python -m jobs.embed input=s3://bucket/corpus output=...

The work is :func:`aligner.retrieval.embed.run_embed`; ``--help`` lists every field.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aligner.retrieval.embed import EmbedConfig, run_embed
from aligner.runtime.config import dump_yaml, load_config
from aligner.runtime.logs import setup_logging

log = logging.getLogger("jobs.embed")
DEFAULT_YAML = Path(__file__).parent / "configs" / "embed.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.embed [--config FILE] [key=value ...]``; returns the exit code."""
    setup_logging()
    cfg = load_config(EmbedConfig, argv, DEFAULT_YAML, prog="python -m jobs.embed")
    log.info("config:\n%s", dump_yaml(cfg))
    summary = run_embed(cfg)
    print(f"embed: {summary['shards_processed']} shards processed, "
          f"{summary['shards_skipped']} skipped; rows out {summary['rows_out']}, "
          f"failed {summary['rows_failed']} -> {cfg.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
