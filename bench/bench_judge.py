"""Judgments per second of each judge back end available on this machine.

    python bench/bench_judge.py                      # every back end that can run here
    python bench/bench_judge.py --pairs 32 --k 5 --backends proxy openai

One judgment is one pair of rows judged in both orders (the LMM ranker: 4 questions x 2
orders = 8 requests; the proxies: two scorings), through :class:`aligner.judge.rows.RowJudge`
as the job and the serving deployment run it, on rows of ``k`` rendered world images
(distinct per pair, so nothing is cached across pairs). Back ends:

* ``proxy`` - scorer + similarity (the built-in retriever at its initial weights + the
  low-level scorer);
* ``proxy:reward`` - a reward model (the built-in backbone with a random ImageReward head);
* ``transformers`` - the tiny random Llava built in code (the real code path; a real 7B VLM
  is orders of magnitude slower per request, and GPU-bound);
* ``openai`` - the same ranker against a local chat-completions server that answers at once
  (the client's overhead: JSON, data URLs, threads; a real endpoint adds its model time);
* ``vllm`` - only with CUDA and the GPU stack (requirements-gpu.txt) (skipped here otherwise, and says so).

Prints a table and JSON, and writes ``bench/judge_results.json`` (``--out``). Absolute numbers belong
to this machine; the proxies' and the client's costs are what carry over.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKENDS = ("proxy", "proxy:reward", "transformers", "openai", "vllm")


def world_images(n: int, size: int = 64) -> dict[str, bytes]:
    """``n`` rendered world images as PNG, by id."""
    from aligner.world.render import encode_png, render, sample_factors

    out = {}
    for i in range(n):
        rng = np.random.default_rng([11, i])
        out[f"img{i:05d}"] = encode_png(render(sample_factors(rng), size, rng))
    return out


def make_judge(backend: str, fetch: Any, tmp: Path, stack: list) -> tuple[Any, str]:
    """A RowJudge for ``backend`` (None and the reason when it cannot run here)."""
    from aligner.judge.rows import make_row_judge

    if backend == "proxy":
        from aligner.retrieval.models import ModelSpec, load_retriever

        return make_row_judge("proxy", fetch=fetch,
                              retriever=load_retriever(ModelSpec(), device="cpu")), ""
    if backend == "proxy:reward":
        from bench_reward import random_reward_checkpoint  # bench/ is on sys.path (run as a script)

        from aligner.reward.model import RewardModel

        rm = RewardModel.load(random_reward_checkpoint(tmp / "reward"), device="cpu")
        return make_row_judge("proxy:reward", fetch=fetch, reward_model=rm), ""
    if backend == "transformers":
        from aligner.judge.lmm import LMMJudge
        from aligner.judge.rows import RowJudge
        from aligner.judge.transformers_vlm import TransformersVLM
        from tests.helpers.judge import tiny_vlm

        model, processor = tiny_vlm()
        vlm = TransformersVLM(model=model, processor=processor, device="cpu", batch_size=8,
                              name="tiny-llava")
        return RowJudge(LMMJudge(vlm, "ranker"), fetch, thumb=64), ""
    if backend == "openai":
        from tests.helpers.judge import ChatServer

        server = ChatServer().__enter__()
        stack.append(server)
        return make_row_judge("openai", fetch=fetch, thumb=64, options={
            "base_url": server.base_url, "model": "local-echo", "api_key_env": "",
            "max_concurrency": 8}), ""
    if backend == "vllm":
        try:
            import torch
            import vllm  # noqa: F401
        except ImportError:
            return None, "vllm is not installed (the GPU stack: requirements-gpu.txt)"
        if not torch.cuda.is_available():
            return None, "no CUDA GPU"
        from aligner.judge.lmm import LMMJudge
        from aligner.judge.rows import RowJudge
        from aligner.judge.vllm_vlm import VLLMVLM
        from tests.helpers.judge import save_tiny_vlm

        d = save_tiny_vlm(tmp / "tiny")
        vlm = VLLMVLM(str(d), engine_kwargs={"max_model_len": 1024, "enforce_eager": True,
                                             "gpu_memory_utilization": 0.3})
        return RowJudge(LMMJudge(vlm, "ranker"), fetch, thumb=64), ""
    raise ValueError(backend)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=24, help="pairs judged per back end")
    ap.add_argument("--k", type=int, default=5, help="images per row")
    ap.add_argument("--backends", nargs="*", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--out", default=str(REPO / "bench" / "judge_results.json"),
                    help="where the JSON results go")
    args = ap.parse_args(argv)

    import torch

    from aligner.judge.rows import RowPair

    images = world_images(2 * args.k * (args.pairs + 1))
    ids = list(images)
    pairs = [RowPair(f"q{p}", "a red circle on grass",
                     ids[2 * args.k * p: 2 * args.k * p + args.k],
                     ids[2 * args.k * p + args.k: 2 * args.k * (p + 1)])
             for p in range(args.pairs + 1)]

    def fetch(want: list[str]) -> dict[str, bytes]:
        return {i: images[i] for i in want if i in images}

    results: dict[str, Any] = {}
    stack: list = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            t0 = time.perf_counter()
            judge, why = make_judge(backend, fetch, Path(tmp), stack)
            if judge is None:
                results[backend] = {"skipped": why}
                continue
            load_s = time.perf_counter() - t0
            judge.judge_pairs(pairs[:1])  # warm up (first forward passes, threads)
            t0 = time.perf_counter()
            rows = judge.judge_pairs(pairs[1:])
            secs = time.perf_counter() - t0
            ok = sum(r["status"] == "ok" for r in rows)
            results[backend] = {"judge": judge.name, "pairs": len(rows), "ok": ok,
                                "seconds": round(secs, 3),
                                "judgments_per_s": round(len(rows) / secs, 2),
                                "load_s": round(load_s, 2),
                                "decisions": sorted({r.get("decision", "") for r in rows})}
        for s in stack:
            s.__exit__(None, None, None)
    out = {"pairs": args.pairs, "k": args.k, "torch_threads": torch.get_num_threads(),
           "results": results}
    print(f"judge back ends: {args.pairs} pairs of rows of {args.k} images, each judged in "
          f"both orders ({out['torch_threads']} torch threads)")
    print(f"{'back end':<14} {'judge':<34} {'judgments/s':>12} {'ok':>5} {'load s':>7}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<14} {'skipped: ' + r['skipped']:<34}")
        else:
            print(f"{name:<14} {r['judge']:<34} {r['judgments_per_s']:>12.2f} "
                  f"{r['ok']:>5} {r['load_s']:>7.1f}")
    print(json.dumps(out, indent=2))
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
