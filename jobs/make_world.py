"""Generate the built-in aesthetic world (corpus, queries, hidden oracle).

    python -m jobs.make_world --config jobs/configs/make_world.yaml output=out/world n_images=10000
    python -m jobs.make_world output=out/world_divergent taste=divergent   # docs/feedback_loop.md
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aligner.runtime.config import save_config, to_dict
from aligner.runtime.job import job_main
from aligner.runtime.manifest import write_manifest
from aligner.world import WorldSpec

DEFAULT_YAML = Path(__file__).parent / "configs" / "make_world.yaml"
#: what the public config and manifest say of the taste (the full config is in eval/)
HIDDEN = "hidden (eval/taste.json)"


@dataclass
class MakeWorldConfig(WorldSpec):
    """Generate the built-in aesthetic world (the world's own fields are WorldSpec's)."""

    output: str = field(default="out/world", metadata={"help": "world directory to write"})
    workers: int = field(default=0, metadata={"help": "render processes (0: all CPUs)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def run(cfg: MakeWorldConfig) -> dict:
    """Write the world, its config and manifest; returns the generator's summary."""
    from aligner.world import generate_world, world_fingerprint

    started = time.time()
    spec = cfg.spec()
    summary = generate_world(spec, cfg.output, workers=cfg.workers or None, progress=cfg.progress)
    # the taste is the hidden human's: the full config goes to eval/, the public one hides it
    save_config(cfg, Path(cfg.output) / "eval" / "make_world.yaml")
    public = {**to_dict(cfg), "taste": HIDDEN}
    (Path(cfg.output) / "config.yaml").write_text(yaml.safe_dump(public, sort_keys=False))
    write_manifest(cfg.output, "make_world", public, started, summary=summary,
                   fingerprint=world_fingerprint(spec),
                   outputs={"corpus": "corpus/", "queries": "queries/queries.parquet",
                            "gallery images (val / test)": "galleries.parquet",
                            "oracle (evaluation only)": "eval/oracle.parquet",
                            "query truth (evaluation only)": "eval/query_truth.parquet",
                            "taste (evaluation only)": "eval/taste.json"})
    return summary


def main(argv: list[str] | None = None) -> int:
    return job_main(MakeWorldConfig, argv, DEFAULT_YAML, run,
                    _describe, "python -m jobs.make_world")


def _describe(cfg: MakeWorldConfig, s: dict) -> str:
    """The job's closing line: sizes, splits, queries and the galleries' relevant counts."""
    from aligner.world.generate import GALLERY_SPLITS

    lines = [f"world: {s['images']} images ({s['natural_images']} natural + "
             f"{s['gallery_images']} gallery) {s['splits']}, queries {s['queries']} -> "
             f"{cfg.output}"]
    for split in GALLERY_SPLITS:
        g = s["galleries"][split]
        lines.append(f"  {split} gallery: +{g['added']} images; relevant per query before "
                     f"{g['before']}, after {g['after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
