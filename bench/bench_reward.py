"""Reward-model scoring: batched (this project) vs one image at a time (ImageReward's way).

    python bench/bench_reward.py                                  # a random head on the built-in backbone
    python bench/bench_reward.py --checkpoint out/reward/checkpoint --n 512

ImageReward's ``score(prompt, images)`` encodes the prompt once, then one image per forward
pass; users asked for batching. The one-at-a-time path here does the same (the prompt encoded
once, each image decoded, encoded and scored on its own); the batched path is
``RewardModel.score(prompt, images)``. Both run on the same images (rendered world images,
PNG-encoded, as a caller would pass files), so the ratio is the batching gain alone. Prints images/s for each and the ratio, and checks the two agree; writes
``bench/reward_results.json`` (``--out``). Ratios, not absolute times, carry over to another machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def random_reward_checkpoint(directory: Path) -> Path:
    """The built-in backbone (its initial image tower) with a random ImageReward head."""
    import torch

    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint
    from aligner.reward.model import HeadSpec, Normalisation, RewardHead, save_reward_parts

    r = load_retriever(ModelSpec(), device="cpu")
    save_checkpoint(r, directory)
    torch.manual_seed(0)
    spec = HeadSpec(3 * r.embed_dim)
    save_reward_parts(directory, RewardHead(spec), spec, Normalisation(0.0, 1.0, 2))
    return directory


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="", help="reward checkpoint (default: a random head)")
    ap.add_argument("--n", type=int, default=256, help="images scored per run")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the batched path")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path (best kept)")
    ap.add_argument("--out", default=str(REPO / "bench" / "reward_results.json"),
                    help="where the JSON results go")
    args = ap.parse_args(argv)

    import torch

    from aligner.reward.model import RewardModel
    from aligner.world.render import encode_png, render, sample_factors

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else random_reward_checkpoint(
            Path(tmp) / "rm")
        rm = RewardModel.load(ckpt, device="cpu")
        images = []
        for i in range(args.n):
            rng = np.random.default_rng([7, i])
            images.append(encode_png(render(sample_factors(rng), rm.retriever.image_size, rng)))
        prompt = "two red circles on grass"
        rm.score(prompt, images[:8])  # warm up both paths
        rm.score(prompt, images[0])
        best = {"batched": float("inf"), "one_at_a_time": float("inf")}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            batched = rm.score(prompt, images, batch_size=args.batch)
            best["batched"] = min(best["batched"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            txt = rm.encode_texts([prompt])
            single = [float(rm.rewards_from_features(txt, rm.encode_images([im]))[0])
                      for im in images]
            best["one_at_a_time"] = min(best["one_at_a_time"], time.perf_counter() - t0)
        diff = float(np.max(np.abs(np.asarray(batched) - np.asarray(single))))
    rate = {k: args.n / v for k, v in best.items()}
    out = {"images": args.n, "batch": args.batch, "threads": torch.get_num_threads(),
           "images_per_s": {k: round(v, 1) for k, v in rate.items()},
           "ratio_batched_over_one_at_a_time": round(rate["batched"] / rate["one_at_a_time"], 2),
           "max_abs_difference": diff, "checkpoint": str(args.checkpoint or "random head")}
    print(f"reward scoring, {args.n} images ({out['threads']} threads): batched "
          f"{rate['batched']:.0f} img/s, one at a time {rate['one_at_a_time']:.0f} img/s, "
          f"ratio {out['ratio_batched_over_one_at_a_time']:.2f}x (max |diff| {diff:.2e})")
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
