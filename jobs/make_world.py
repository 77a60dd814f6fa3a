"""Generate the built-in aesthetic world (corpus, queries, hidden oracle).

    python -m jobs.make_world --config jobs/configs/make_world.yaml output=out/world n_images=10000
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from aligner.runtime.config import dump_yaml, load_config, save_config, to_dict
from aligner.runtime.logs import setup_logging
from aligner.runtime.manifest import write_manifest

log = logging.getLogger("jobs.make_world")
DEFAULT_YAML = Path(__file__).parent / "configs" / "make_world.yaml"


@dataclass
class MakeWorldConfig:
    """Generate the built-in aesthetic world."""

    output: str = field(default="out/world", metadata={"help": "world directory to write"})
    n_images: int = field(default=10_000, metadata={"help": "number of images"})
    image_size: int = field(default=64, metadata={"help": "image side in pixels"})
    seed: int = field(default=0, metadata={"help": "same seed, same world"})
    val_fraction: float = field(default=0.05, metadata={"help": "validation share of images"})
    test_fraction: float = field(default=0.15, metadata={"help": "test share of images"})
    n_queries: int = field(default=600, metadata={"help": "content queries (60/10/30 split)"})
    n_paraphrases: int = field(default=120, metadata={"help": "held-out-word test queries"})
    p_look: float = field(default=0.8, metadata={"help": "share of captions with look phrases"})
    rows_per_file: int = field(default=2000, metadata={"help": "corpus rows per Parquet file"})
    workers: int = field(default=0, metadata={"help": "render processes (0: all CPUs)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_look <= 1.0:
            raise ValueError("p_look must be in [0, 1]")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = load_config(MakeWorldConfig, argv, DEFAULT_YAML, prog="python -m jobs.make_world")
    from aligner.world import WorldSpec, generate_world, world_fingerprint

    started = time.time()
    log.info("config:\n%s", dump_yaml(cfg))
    spec = WorldSpec(n_images=cfg.n_images, image_size=cfg.image_size, seed=cfg.seed,
                     val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                     n_queries=cfg.n_queries, n_paraphrases=cfg.n_paraphrases, p_look=cfg.p_look,
                     rows_per_file=cfg.rows_per_file)
    summary = generate_world(spec, cfg.output, workers=cfg.workers or None, progress=cfg.progress)
    save_config(cfg, Path(cfg.output) / "config.yaml")
    write_manifest(cfg.output, "make_world", to_dict(cfg), started, summary=summary,
                   fingerprint=world_fingerprint(spec),
                   outputs={"corpus": "corpus/", "queries": "queries/queries.parquet",
                            "oracle (evaluation only)": "eval/oracle.parquet",
                            "query truth (evaluation only)": "eval/query_truth.parquet"})
    print(f"world: {summary['images']} images {summary['splits']}, queries {summary['queries']} "
          f"-> {cfg.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
