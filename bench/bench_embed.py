"""Benchmark: the Ray Data embedding job vs a plain single-process loop; peak memory vs N.

    python bench/bench_embed.py --n 10000                     # throughput table
    python bench/bench_embed.py --n 10000 --mem-n 50000       # + memory at 10k vs 50k
    python bench/bench_embed.py --n 10000 --mem-n 1000,100000 --json out.json   # a series
    python bench/bench_embed.py --n 500 --mem-n 200 --no-ray  # plain loop only (no Ray)

Both sides embed the same generated corpus (64x64 PNGs of coloured shapes, Parquet files of
5,000 rows) with the same model (``builtin`` unless ``--model``) and batch size:

- plain: one process reads the Parquet files in batches and does decode -> the model's eval
  transform -> low-level aesthetic score -> ``encode_images`` per batch (torch uses all cores).
  Also timed without the score, the loop as the task brief defines it.
- ray: ``jobs.embed.run`` on a fresh local Ray with all CPUs (read/decode tasks + one model
  actor pool + the driver's shard writer, output written). Ray's own start (``ray.init``) is
  reported apart; the job's start-up is the time until the first rows reach the driver
  (driver model load, workers importing torch, actors loading the model); steady-state is the
  rest.

Scaling: ``--n`` and every ``--mem-n`` size make one series (each size its own Ray job in
its own subprocess): the job's wall time, the time after its first rows, and peak memory per
N; ``--json`` writes it with the throughput table. ``--no-ray`` times the series with the
plain loop instead (same sampler, no Ray: a smoke run that needs no cluster).

Memory: every 0.25 s the sum over the driver and all its descendants (raylet, GCS, every
worker and actor) of PSS (proportional set size, from /proc/<pid>/smaps_rollup: shared pages,
such as the object store's, are split between the processes that map them, so they are
counted once) and of RSS (shared pages counted in every process: an upper bound). The peak of
each is reported. Each memory run is its own subprocess with its own Ray, so N=10k and N=50k
start from the same state.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_corpus(out: Path, n: int, rows_per_file: int = 5000, seed: int = 0) -> Path:
    """``n`` 64x64 PNGs (a shape on a background) as Parquet files under ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    if (out / "_n").is_file() and (out / "_n").read_text() == str(n):
        return out
    rng = np.random.default_rng(seed)
    for lo in range(0, n, rows_per_file):
        ids, data = [], []
        for i in range(lo, min(n, lo + rows_per_file)):
            im = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
            x, y = (int(v) for v in rng.integers(2, 32, 2))
            s = int(rng.integers(10, 30))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            ImageDraw.Draw(im).ellipse([x, y, x + s, y + s], fill=fill)
            buf = io.BytesIO()
            im.save(buf, "PNG", compress_level=1)
            ids.append(f"img{i:07d}")
            data.append(buf.getvalue())
        pq.write_table(pa.table({"id": ids, "image": data}), out / f"part-{lo // rows_per_file:05d}.parquet")
    (out / "_n").write_text(str(n))
    return out


class MemorySampler:
    """Samples summed PSS and RSS of this process and all its descendants in a thread."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every = every_s
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def sample(self) -> tuple[int, int]:
        import psutil

        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        pss = rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                continue
            pss += self._pss(p.pid)
        return pss, rss

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, rss = self.sample()
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(corpus: Path, model: str, batch_size: int, score: bool) -> dict:
    """Single process: Parquet batches -> decode -> preprocess (-> score) -> encode_images."""
    import pyarrow.parquet as pq
    import torch

    from aligner.aesthetics.scorer import LowLevelScorer
    from aligner.data.images import decode_image, to_uint8
    from aligner.retrieval.models import ModelSpec, load_retriever

    t0 = time.perf_counter()
    retriever = load_retriever(ModelSpec(name=model), device="cpu")
    load_s = time.perf_counter() - t0
    scorer = LowLevelScorer()
    n = 0
    t = time.perf_counter()
    for path in sorted(corpus.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["image"]):
            ims = [decode_image(b) for b in batch.column("image").to_pylist()]
            pixels = torch.stack([retriever.preprocess(im) for im in ims])
            if score:
                scorer.score([to_uint8(im) for im in ims])
            retriever.encode_images(pixels, batch_size)
            n += len(ims)
    wall = time.perf_counter() - t
    return {"rows": n, "load_s": load_s, "loop_s": wall, "rows_per_s": n / wall}


def ray_job(corpus: Path, out: Path, model: str, batch_size: int, rows_per_shard: int) -> dict:
    """``jobs.embed.run`` on a fresh local Ray; returns the job summary + Ray start time."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from aligner.retrieval.embed import EmbedConfig
    from aligner.retrieval.embed import run_embed as run
    from aligner.retrieval.models import ModelSpec
    from aligner.runtime.logs import setup_logging
    from aligner.runtime.raycluster import init_ray

    setup_logging("WARNING")
    t = time.perf_counter()
    init_ray(progress_bars=False)
    ray_init_s = time.perf_counter() - t
    cfg = EmbedConfig(input=str(corpus), output=str(out), model=ModelSpec(name=model),
                      batch_size=batch_size, rows_per_shard=rows_per_shard, progress=False,
                      overwrite=True)
    t = time.perf_counter()
    summary = run(cfg)
    summary["job_s"] = time.perf_counter() - t
    summary["ray_init_s"] = ray_init_s
    ray.shutdown()
    return summary


def one_run(args: argparse.Namespace) -> dict:
    """Child mode: one run over a corpus of ``args.n`` images, with memory sampling: the Ray
    job (its seconds include its start-up) or, with ``--no-ray``, the plain loop (its
    seconds exclude the model load)."""
    work = Path(args.workdir)
    corpus = make_corpus(work / f"corpus-{args.n}", args.n)
    with MemorySampler() as mem:
        if args.no_ray:
            res = plain_loop(corpus, args.model, args.batch_size, score=True)
            res.update(rows_in=res["rows"], rows_out=res["rows"], rows_failed=0,
                       pipeline_s=res["loop_s"], startup_s=0.0,
                       steady_rows_per_s=res["rows_per_s"], job_s=res["load_s"] + res["loop_s"])
        else:
            res = ray_job(corpus, work / f"out-{args.n}", args.model, args.batch_size,
                          args.rows_per_shard)
    res.update(peak_pss_mb=mem.peak_pss / 2**20, peak_rss_mb=mem.peak_rss / 2**20, n=args.n)
    return res


def child(args: argparse.Namespace, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--workdir", args.workdir,
           "--model", args.model, "--batch-size", str(args.batch_size),
           "--rows-per-shard", str(args.rows_per_shard)] + (["--no-ray"] if args.no_ray else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"child run n={n} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def series_row(r: dict) -> dict:
    """One point of the scaling series: N, seconds (whole run; after the first rows), peak
    memory (PSS; RSS)."""
    return {"n": r["n"], "rows_out": r["rows_out"], "rows_failed": r["rows_failed"],
            "seconds": r["pipeline_s"], "after_first_rows_s": r["pipeline_s"] - r["startup_s"],
            "startup_s": r["startup_s"], "rows_per_s": r["rows_in"] / r["pipeline_s"],
            "steady_rows_per_s": r["steady_rows_per_s"], "peak_pss_mb": r["peak_pss_mb"],
            "peak_rss_mb": r["peak_rss_mb"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="images for the throughput comparison")
    p.add_argument("--mem-n", default="",
                   help="comma-separated further sizes of the scaling series (time, memory)")
    p.add_argument("--model", default="builtin")
    p.add_argument("--repeat", type=int, default=2, help="plain-loop runs (the best counts)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rows-per-shard", type=int, default=2_000)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "bench_embed"))
    p.add_argument("--no-ray", action="store_true",
                   help="plain loop only: the series is timed with it (no Ray cluster)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(args), default=str))
        return 0
    sizes = sorted({args.n, *(int(float(v)) for v in args.mem_n.split(",") if v.strip())})
    if min(sizes) < 1:
        p.error("sizes must be positive")

    work = Path(args.workdir)
    t = time.perf_counter()
    corpus = make_corpus(work / f"corpus-{args.n}", args.n)
    print(f"corpus: {args.n} images in {time.perf_counter() - t:.1f} s ({work})", flush=True)
    # best of --repeat runs: the first pass in a fresh process pays one-off warm-up costs
    plain = max((plain_loop(corpus, args.model, args.batch_size, score=True)
                 for _ in range(args.repeat)), key=lambda r: r["rows_per_s"])
    plain_ns = max((plain_loop(corpus, args.model, args.batch_size, score=False)
                    for _ in range(args.repeat)), key=lambda r: r["rows_per_s"])
    runs = {n: child(args, n) for n in sizes}  # each its own process (and Ray)
    ray_res = runs[args.n]
    runner = "plain loop" if args.no_ray else "ray job"

    rows = ray_res["rows_in"]
    overall = rows / ray_res["pipeline_s"]
    steady = ray_res["steady_rows_per_s"]
    print(f"\nembedding throughput, N={args.n}, model={args.model}, batch={args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':44s}{'rows/s':>10s}{'seconds':>10s}{'vs plain':>10s}")
    line = "{:44s}{:>10.0f}{:>10.1f}{:>10s}"
    print(line.format("plain loop (decode+preprocess+score+encode)", plain["rows_per_s"],
                      plain["loop_s"], "1.00x"))
    print(line.format("plain loop without the score", plain_ns["rows_per_s"], plain_ns["loop_s"],
                      f"{plain_ns['rows_per_s'] / plain['rows_per_s']:.2f}x"))
    if not args.no_ray:
        print(line.format("ray job, whole pipeline (incl. start-up)", overall,
                          ray_res["pipeline_s"], f"{overall / plain['rows_per_s']:.2f}x"))
        print(line.format("ray job, steady state (after first rows)", steady,
                          rows / steady if steady else float("nan"),
                          f"{steady / plain['rows_per_s']:.2f}x"))
        print(f"start-up: ray.init {ray_res['ray_init_s']:.1f} s; job until first rows "
              f"{ray_res['startup_s']:.1f} s; plain model load {plain['load_s']:.1f} s; "
              f"job total {ray_res['job_s']:.1f} s")
    print(f"{runner} rows in/out/failed: {ray_res['rows_in']}/{ray_res['rows_out']}/"
          f"{ray_res['rows_failed']}")
    print(f"\npeak memory, {runner}: driver + all its child processes (PSS sum; RSS sum in "
          "brackets)")
    for r in runs.values():
        print(f"  N={r['n']:>7d}: {r['peak_pss_mb']:8.0f} MB  ({r['peak_rss_mb']:.0f} MB)  "
              f"{r['rows_in'] / r['pipeline_s']:.0f} rows/s overall, "
              f"{r['steady_rows_per_s']:.0f} steady, {r['pipeline_s']:.1f} s")
    lo, hi = runs[sizes[0]], runs[sizes[-1]]
    if len(sizes) > 1:
        print(f"  ratio N={hi['n']} / N={lo['n']}: "
              f"{hi['peak_pss_mb'] / lo['peak_pss_mb']:.2f}x (PSS), "
              f"{hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x (RSS)")
    if args.json:
        out = {"n": args.n, "model": args.model, "batch_size": args.batch_size,
               "cpus": os.cpu_count(), "runner": runner,
               "plain": plain, "plain_no_score": plain_ns,
               "job": {k: v for k, v in ray_res.items() if isinstance(v, int | float | str)},
               "series": [series_row(runs[n]) for n in sizes]}
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
