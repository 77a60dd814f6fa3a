"""A small, self-contained workdir for ``bench_serve.py``: world, two models, their indexes.

    python bench/serve_world.py --out /tmp/serve-world --n-images 1000

Built through the jobs, as the quickstart builds its own: ``jobs.make_world`` (a generated
world of ``--n-images``), the embedding job (Ray Data) and ``jobs.build_index`` for each of two
models, so the serving benchmark can deploy the real application without a quickstart run.
The two models are named for what they are, not "base" and "aligned": ``shipped`` (the base
checkpoint the repository ships) and ``initial`` (the built-in model at its seeded initial
weights). Serving latency does not depend on the weights, only on the architecture, and the
application needs two models to compare. Writes ``serve_world.json`` (what
``bench_serve.py --workdir`` reads); a directory that already holds one for the same settings
is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEC_FILE = "serve_world.json"


def build(out: Path, n_images: int, factory: str = "HNSW32") -> dict[str, Any]:
    """Build (or reuse) the world, both models' embeddings and indexes under ``out``.

    Returns:
        The spec written to ``out / serve_world.json``: corpus, queries and per model its
        checkpoint and index.
    """
    spec_path = out / SPEC_FILE
    settings = {"n_images": n_images, "factory": factory}
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text())
        if spec.get("settings") == settings:
            return spec
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from aligner.retrieval.embed import EmbedConfig, run_embed
    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint
    from aligner.retrieval.shipped import install_shipped_base
    from aligner.runtime.raycluster import init_ray
    from jobs import build_index, make_world

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    make_world.run(replace(make_world.MakeWorldConfig(), output=str(world), n_images=n_images,
                           n_queries=60, n_paraphrases=12, progress=False))
    checkpoints = {"shipped": install_shipped_base(out / "shipped"),
                   "initial": save_checkpoint(load_retriever(ModelSpec(), device="cpu"),
                                              out / "initial")}
    init_ray(progress_bars=False)
    models = {}
    for name, ckpt in checkpoints.items():
        ec = EmbedConfig(input=str(world / "corpus"), output=str(out / f"emb_{name}"),
                         model=ModelSpec(checkpoint=str(ckpt)), progress=False, batch_size=128,
                         overwrite=True)
        run_embed(ec)
        ic = replace(build_index.IndexConfig(), embeddings=ec.output,
                     output=str(out / f"index_{name}"), factory=factory, progress=False)
        build_index.run(ic)
        models[name] = {"checkpoint": str(ckpt), "index": ic.output}
    spec = {"settings": settings, "corpus": str(world / "corpus"),
            "queries": str(world / "queries" / "queries.parquet"), "models": models,
            "default": "shipped", "build_s": round(time.perf_counter() - t0, 1)}
    spec_path.write_text(json.dumps(spec, indent=1))
    return spec


def main(argv: list[str] | None = None) -> int:
    """``python bench/serve_world.py --out DIR [--n-images N] [--factory F]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory to build in (reused when complete)")
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--factory", default="HNSW32", help="faiss index factory of both indexes")
    args = ap.parse_args(argv)
    spec = build(Path(args.out).resolve(), args.n_images, args.factory)
    print(json.dumps(spec, indent=1))
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
