"""GPU figures: ViT-B-32 bf16 image embedding rate against the A100 anchor; faiss GPU vs CPU.

    python bench/bench_gpu.py --out gpu.json            # on a machine with CUDA
    python bench/bench_gpu.py --device cpu --batches 2 --batch-size 8 --faiss-n 0   # code check

Embedding: open_clip ``ViT-B-32`` with random weights (``pretrained=None``: nothing is
downloaded; the architecture alone sets the cost), ``torch.autocast`` bf16, ``encode_image`` on
batches of random 224x224 pixels already on the device (model time only: decoding and
resizing are CPU work that a data pipeline overlaps). Images/s is the best of ``--repeats``
timed runs of ``--batches`` batches after warm-up; it is divided by the anchor, 2,500 img/s on
one A100 (the figure issue 13 sets for this model in bf16): an anchor, not a measurement of
this run, and labelled so in the output.

faiss: the same clustered data as ``bench_index.py`` (``--faiss-n`` vectors of 512 dims),
``Flat`` and ``IVF{L},Flat`` (nprobe 32) on the CPU and on GPU 0 (``index_cpu_to_gpu``):
build seconds, QPS for one batch of 1,000 queries, and recall@10 against the exact top 10;
the ratio is GPU / CPU side by side. Skipped, with the reason, when faiss has no GPU support
(faiss-cpu) or there is no GPU.

Without CUDA (and without ``--device cpu``) it writes ``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ANCHOR = {"images_per_s": 2500.0, "what": "anchor (not measured here): ViT-B-32 bf16 image "
          "embedding on one NVIDIA A100, issue 13's reference figure"}


def embed_rate(device: str, batch_size: int, batches: int, repeats: int) -> dict[str, Any]:
    """ViT-B-32 (random weights) bf16 ``encode_image`` images/s on ``device``."""
    import open_clip
    import torch

    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model = model.to(device).eval()
    x = torch.randn(batch_size, 3, 224, 224, device=device)

    def run(n: int) -> float:
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                model.encode_image(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t

    run(min(3, batches))  # warm-up: kernels chosen, memory allocated
    best = min(run(batches) for _ in range(repeats))
    rate = batches * batch_size / best
    out = {"model": "ViT-B-32 (random weights)", "dtype": "bfloat16 autocast", "device": device,
           "batch_size": batch_size, "batches": batches, "images_per_s": rate,
           "anchor": ANCHOR, "ratio_to_anchor": rate / ANCHOR["images_per_s"]}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def faiss_gpu_vs_cpu(n: int, queries: int = 1000, k: int = 10) -> dict[str, Any]:
    """Flat and IVF-Flat on CPU and GPU 0: build s, QPS, recall@k; GPU / CPU ratios."""
    import faiss
    import numpy as np

    if not hasattr(faiss, "StandardGpuResources"):
        return {"skipped": f"faiss {faiss.__version__} has no GPU support (faiss-cpu build)"}
    if faiss.get_num_gpus() < 1:
        return {"skipped": "faiss sees no GPU"}
    from bench_index import Mixture, ivf_lists

    mix = Mixture(512)
    xb, xq = mix.sample(n, seed=1000), mix.sample(queries, seed=7)
    res = faiss.StandardGpuResources()
    lists = ivf_lists(n)
    truth = None
    rows = []
    for factory in ("Flat", f"IVF{lists},Flat"):
        row: dict[str, Any] = {"index": factory, "n": n}
        for where in ("cpu", "gpu"):
            index = faiss.index_factory(512, factory, faiss.METRIC_INNER_PRODUCT)
            t = time.perf_counter()
            if where == "gpu":
                index = faiss.index_cpu_to_gpu(res, 0, index)
            if not index.is_trained:
                index.train(xb[: min(n, 100_000)])
            index.add(xb)
            row[f"{where}_build_s"] = time.perf_counter() - t
            if factory.startswith("IVF"):
                space = faiss.GpuParameterSpace() if where == "gpu" else faiss.ParameterSpace()
                space.set_index_parameter(index, "nprobe", 32)
            index.search(xq[:16], k)
            best, pos = math.inf, None
            for _ in range(3):
                t = time.perf_counter()
                _, pos = index.search(xq, k)
                best = min(best, time.perf_counter() - t)
            row[f"{where}_qps"] = queries / best
            if truth is None:
                truth = pos  # CPU Flat: exact
            row[f"{where}_recall"] = float(np.mean([len(set(a) & set(b)) / k
                                                    for a, b in zip(pos, truth, strict=True)]))
            del index
        row["gpu_over_cpu_qps"] = row["gpu_qps"] / row["cpu_qps"]
        row["gpu_over_cpu_build"] = row["cpu_build_s"] / row["gpu_build_s"]
        rows.append(row)
    return {"faiss": faiss.__version__, "queries": queries, "k": k, "rows": rows,
            "cpu_threads": faiss.omp_get_max_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                    help="auto: CUDA when present, else skip; cpu: a check of the code path")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=20, help="batches per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (the best counts)")
    ap.add_argument("--faiss-n", type=int, default=1_000_000,
                    help="vectors of the faiss GPU vs CPU comparison (0: skip it)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "") if args.device == "auto" else args.device
    if device == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    if not device:
        out: dict[str, Any] = {"skipped": "no GPU: torch.cuda.is_available() is False",
                               "anchor": ANCHOR}
    else:
        out = {"embed": embed_rate(device, args.batch_size, args.batches, args.repeats),
               "faiss": (faiss_gpu_vs_cpu(args.faiss_n) if args.faiss_n and device == "cuda"
                         else {"skipped": "not on a CUDA device" if args.faiss_n
                               else "--faiss-n 0"}),
               "cpus": os.cpu_count()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
