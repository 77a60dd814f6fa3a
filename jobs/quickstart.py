"""The end-to-end quickstart on the built-in world (the README's first command).

    python -m jobs.quickstart                       # out/ : world -> base model -> embed -> index -> search
    python -m jobs.quickstart workdir=/tmp/qs n_images=2000 steps=100   # smaller and faster

Each stage is one of the jobs, called in-process with its own config, so every output has its
manifest; a stage whose output is already complete is skipped (``fresh=true`` redoes all).
At the end it prints what each stage measured and where to look.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from aligner.config import dump_yaml, load_config, save_config, to_dict
from aligner.logs import setup_logging
from aligner.manifest import write_manifest

log = logging.getLogger("jobs.quickstart")
DEFAULT_YAML = Path(__file__).parent / "configs" / "quickstart.yaml"


@dataclass
class QuickstartConfig:
    """Run the whole pipeline on the built-in world."""

    workdir: str = field(default="out", metadata={"help": "where every stage writes"})
    n_images: int = field(default=10_000, metadata={"help": "world size"})
    seed: int = field(default=0, metadata={"help": "world seed"})
    steps: int = field(default=500, metadata={"help": "pre-training steps"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers for pre-training"})
    index_factory: str = field(default="HNSW32", metadata={"help": "faiss index factory string"})
    queries: list[str] = field(default_factory=lambda: [
        "two red circles on grass",
        "a crisp, well-lit, vivid photo of two red circles on grass, centred, with warm golden tones",
        "a gloomy picture of three crimson discs"],
        metadata={"help": "queries to search at the end"})
    k: int = field(default=10, metadata={"help": "results per query"})
    fresh: bool = field(default=False, metadata={"help": "redo stages whose output exists"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster (default: local)"})

    def __post_init__(self) -> None:
        if self.n_images < 200:
            raise ValueError("n_images must be at least 200 for a meaningful quickstart")


def _done(out: Path) -> bool:
    return (out / "manifest.json").is_file()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = load_config(QuickstartConfig, argv, DEFAULT_YAML, prog="python -m jobs.quickstart")
    from jobs import build_index, embed, make_world, pretrain, search

    started = time.time()
    log.info("config:\n%s", dump_yaml(cfg))
    work = Path(cfg.workdir)
    if cfg.fresh and work.exists():
        for sub in ("world", "base", "embeddings", "index", "search"):
            shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    save_config(cfg, work / "quickstart.yaml")
    world, base, emb, index, results = (work / s for s in ("world", "base", "embeddings",
                                                            "index", "search"))
    ray_arg = [f"ray_address={cfg.ray_address}"] if cfg.ray_address else []
    timings: dict[str, float] = {}

    def stage(name: str, out: Path, fn, argv: list[str]) -> None:
        if _done(out):
            log.info("[%s] output %s is complete: skipped", name, out)
            return
        t = time.time()
        log.info("[%s] starting", name)
        rc = fn(argv)
        if rc != 0:
            raise SystemExit(f"stage {name} failed with exit code {rc}")
        timings[name] = round(time.time() - t, 1)

    stage("world", world, make_world.main,
          [f"output={world}", f"n_images={cfg.n_images}", f"seed={cfg.seed}"])
    stage("pretrain", base, pretrain.main,
          [f"world={world}", f"output={base}", f"steps={cfg.steps}",
           f"num_workers={cfg.num_workers}", *ray_arg])
    stage("embed", emb, embed.main,
          [f"input={world / 'corpus'}", f"output={emb}", f"model.checkpoint={base / 'checkpoint'}",
           *ray_arg])
    stage("index", index, build_index.main,
          [f"embeddings={emb}", f"output={index}", f"factory={cfg.index_factory}"])
    t = time.time()
    rc = search.main([f"index={index}", f"output={results}", f"k={cfg.k}",
                      "query=" + json.dumps(cfg.queries)])
    if rc != 0:
        raise SystemExit(f"search failed with exit code {rc}")
    timings["search"] = round(time.time() - t, 1)
    summary = _summary(world, base, emb, index, results)
    write_manifest(work, "quickstart", to_dict(cfg), started, timings_s=timings, summary=summary)
    _print(summary, timings, time.time() - started)
    return 0


def _summary(world: Path, base: Path, emb: Path, index: Path, results: Path) -> dict:
    def read(p: Path) -> dict:
        return json.loads(p.read_text()) if p.is_file() else {}

    m = read(base / "metrics.json")
    em = read(emb / "manifest.json")
    im = read(index / "manifest.json")
    return {"world": read(world / "manifest.json").get("summary", {}),
            "pretrain": {k: m.get(k) for k in ("caption_recall_test", "content_queries",
                                                "paraphrases", "premise")},
            "embed": {k: em.get(k) for k in ("rows_in", "rows_out", "rows_failed", "counts",
                                             "wall_time_s") if k in em},
            "index": {k: im.get(k) for k in ("factory", "ntotal", "dim", "build_seconds")
                      if k in im},
            "search_outputs": sorted(str(p) for p in results.glob("*.png"))}


def _fmt(d: dict | None, key: str) -> str:
    if not d or key not in d:
        return "n/a"
    v = d[key]
    if "ci_low" in v:
        return f"{v['mean']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
    return f"{v['mean']:.3f}"


def _print(s: dict, timings: dict, total: float) -> None:
    p = s["pretrain"]
    r, para, cont, prem = (p.get("caption_recall_test"), p.get("paraphrases"),
                           p.get("content_queries"), p.get("premise"))
    lines = [
        "", "=" * 78, "quickstart: built-in world -> base model -> embeddings -> index -> search",
        "=" * 78,
        f"world            {s['world'].get('images')} images, splits {s['world'].get('splits')}",
        f"base model       test caption recall@10 {_fmt(r, 'r@10')} (chance {_fmt(r, 'chance@10')})",
        f"                 content queries: right content in top 10 {_fmt(cont, 'hit@10')} "
        f"(chance {_fmt(cont, 'hit@10_chance')})",
        f"                 paraphrases in unseen words: {_fmt(para, 'hit@10')} "
        f"(chance {_fmt(para, 'hit@10_chance')})",
        f"premise          + good look words: oracle aesthetic@10 {_fmt(prem, 'aesthetic@10_plain')}"
        f" -> {_fmt(prem, 'aesthetic@10_good_looks')}",
        f"                 gain {_fmt(prem, 'aesthetic@10_gain')} (95% CI)",
        f"embeddings       {json.dumps(s['embed'])}",
        f"index            {json.dumps(s['index'])}",
        f"search grids     {', '.join(s['search_outputs']) or 'n/a'}",
        f"stage seconds    {json.dumps(timings)}   total {total:.0f} s",
        "=" * 78,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
