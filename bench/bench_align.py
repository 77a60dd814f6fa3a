"""Training throughput of the preference fine-tune: plain loop vs Ray Train, 1 vs 2 workers.

    python bench/bench_align.py                      # generated world, 40 steps per setting
    python bench/bench_align.py --steps 60 --pairs 64 --captions 128

All settings run the same loop (:func:`aligner.training.align.align_loop`) on the same data
(:class:`aligner.training.align.AlignData` prepared once): the plain single-process loop calls
it as a function with every core; Ray Train runs it in ``TorchTrainer`` with 1 worker (all cores) and
2 workers (cores split, DDP over gloo). Steady-state pairs/s is the median of the per-interval
rates after the first interval; the whole-run rate (with Ray Train's start-up) is printed
beside it. Ratios are measured side by side in one run; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_inputs(work: Path, n_images: int, pairs_per_query: int) -> tuple[Path, Path, Path]:
    """A generated world, an untrained built-in start checkpoint and scorer-ordered pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aligner.aesthetics.scorer import make_scorer
    from aligner.data.images import decode_batch as decode_images
    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint
    from aligner.world import World, WorldSpec, generate_world

    world_dir = work / "world"
    generate_world(WorldSpec(n_images=n_images, n_queries=200, n_paraphrases=10), world_dir,
                   workers=1, progress=False)
    world = World(world_dir)
    start = work / "start"
    save_checkpoint(load_retriever(ModelSpec(), device="cpu"), start)
    train = world.corpus(["id", "image"], split="train")
    ids = np.array(train["id"].to_pylist())
    score = make_scorer("lowlevel").score(decode_images(train["image"].to_pylist()))
    rng = np.random.default_rng(0)
    rows = []
    q = world.queries(kind="content")
    for qid, text, split in zip(q["query_id"].to_pylist(), q["query"].to_pylist(),
                                q["split"].to_pylist(), strict=True):
        if split == "test":
            continue
        for _ in range(pairs_per_query):
            a, b = rng.choice(len(ids), 2, replace=False)
            if score[a] < score[b]:
                a, b = b, a
            rows.append({"query_id": qid, "query": text, "chosen_id": ids[a],
                         "rejected_id": ids[b], "source": "grid", "weight": 1.0})
    prefs = work / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), prefs)
    return world_dir, start, prefs


def loop_config(args):
    """The loop's defaults, without validation or intermediate checkpoints."""
    from aligner.training.config import AlignLoopConfig

    return AlignLoopConfig(steps=args.steps, pairs_per_step=args.pairs,
                           captions_per_step=args.captions, warmup=5, selection="early_stopping",
                           eval_every=0, checkpoint_every=0, log_every=args.log_every)


def steady(rates: list[float]) -> float:
    """Median of the per-interval rates after the first (warm-up) interval."""
    rest = rates[1:] or rates
    return float(np.median(rest)) if rest else float("nan")


def run_plain(args, data, model) -> dict:
    """The loop as a plain function in this process (no Ray), collecting its log lines."""
    import logging

    from aligner.training.align import align_loop
    from aligner.training.loop import LoopInputs

    rates: list[float] = []

    class Grab(logging.Handler):
        def emit(self, record):  # "step %d/%d %s" with the metrics dict as the last arg
            if record.args and isinstance(record.args[-1], dict):
                r = record.args[-1].get("pairs_per_s")
                if r:
                    rates.append(float(r))

    lg = logging.getLogger("aligner.training.loop")
    h = Grab()
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    t0 = time.time()
    try:
        align_loop(LoopInputs(loop_config(args), model, data, os.cpu_count() or 1))
    finally:
        lg.removeHandler(h)
    wall = time.time() - t0
    return {"steady_pairs_per_s": steady(rates), "whole_run_pairs_per_s": args.steps * args.pairs
            / wall, "wall_s": wall}


def run_ray(args, data, model, workers: int, storage: Path) -> dict:
    """The loop in Ray Train's TorchTrainer with ``workers`` workers (the jobs' glue)."""
    from aligner.training.align import align_loop
    from aligner.training.loop import fit_torch_trainer, read_history

    t0 = time.time()
    final = fit_torch_trainer(align_loop, loop_config(args), model, data,
                              name=f"bench-{workers}", out=storage, num_workers=workers,
                              use_gpu=False, threads_per_worker=0, max_failures=0,
                              dest=storage / f"final-{workers}")
    wall = time.time() - t0
    hist = read_history(final / "train_log.jsonl")  # rank 0's log rides in the last checkpoint
    rates = [float(h["pairs_per_s"]) for h in hist if h.get("pairs_per_s")]
    return {"steady_pairs_per_s": steady(rates),
            "whole_run_pairs_per_s": args.steps * args.pairs / wall, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=64, help="preference pairs per step (global)")
    ap.add_argument("--captions", type=int, default=128, help="caption pairs per step (global)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    from aligner.retrieval.models import ModelSpec
    from aligner.runtime.raycluster import init_ray
    from aligner.training.align_data import prepare_align_data

    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        work = Path(tmp)
        world, start, prefs = make_inputs(work, args.n_images, 24)
        spec = ModelSpec(checkpoint=str(start))
        data, counts = prepare_align_data(str(prefs), str(world / "corpus"),
                                          str(world / "queries"), spec)
        model = spec
        results = {"plain loop (1 process, all cores)": run_plain(args, data, model)}
        init_ray()
        results["Ray Train, 1 worker"] = run_ray(args, data, model, 1, work / "ray")
        results["Ray Train, 2 workers"] = run_ray(args, data, model, 2, work / "ray")
    base = results["plain loop (1 process, all cores)"]["steady_pairs_per_s"]
    one = results["Ray Train, 1 worker"]["steady_pairs_per_s"]
    print(f"\npreference fine-tune throughput ({args.pairs} pairs + {args.captions} captions "
          f"per step, {args.steps} steps, {os.cpu_count()} cores; train pairs {counts['train_pairs']})")
    print(f"{'setting':38s} {'steady pairs/s':>15s} {'vs plain':>9s} {'vs 1 worker':>12s} "
          f"{'whole run pairs/s':>18s} {'wall s':>7s}")
    for name, r in results.items():
        print(f"{name:38s} {r['steady_pairs_per_s']:15.1f} {r['steady_pairs_per_s'] / base:8.2f}x "
              f"{r['steady_pairs_per_s'] / one:11.2f}x {r['whole_run_pairs_per_s']:18.1f} "
              f"{r['wall_s']:7.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
