"""What each ``--scale`` of the benchmark suite runs: one command line per step.

``tiny`` is a smoke run of the assembler (no Ray: the embedding series is timed with the plain
loop; seconds on an idle machine); ``small`` is the default (about 15-20 minutes on 2 cores);
``full`` uses the issue's sizes (embedding 1k / 10k / 100k images; index 100k / 1M / 10M
vectors). Up to 1M the Flat reference is held beside each index (1M x 512 float32: 2 GiB
each); 10M is above ``bench_index.py --stream-above`` (2M): the ground truth is one exact
scan of the files, Flat's QPS is timed on 1M vectors in RAM and scaled, and only the
factories whose memory fits are built (at 10M x 512 the float16 refine stage needs 10 GiB;
``RFlat``, IVF-Flat and HNSW need 20 GiB each and are reported as skipped on a smaller
machine). The 10M vectors take 20 GiB of disk, the largest index file 10 GiB.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
STEPS = ("embed", "index", "align", "serve", "reward", "judge", "gpu")


@dataclass(frozen=True)
class Scale:
    """Sizes of one scale; every field is passed to a benchmark's command line."""

    embed_n: int
    embed_series: tuple[int, ...]
    embed_repeat: int
    embed_batch: int
    embed_ray: bool
    index_n: tuple[int, ...]
    index_dim: int
    index_queries: int
    index_factories: str
    index_nprobe: str
    index_k_factor: str
    index_train_sample: int = 100_000
    align_images: int = 2000
    align_steps: int = 40
    serve_images: int = 1000
    serve_seconds: float = 10.0
    serve_concurrency: str = "1,4,16,32"
    reward_n: int = 256
    judge_pairs: int = 16
    gpu_faiss_n: int = 1_000_000
    steps: tuple[str, ...] = STEPS
    notes: dict[str, str] = field(default_factory=dict)


SCALES: dict[str, Scale] = {
    "tiny": Scale(
        embed_n=128, embed_series=(64, 128), embed_repeat=1, embed_batch=64, embed_ray=False,
        index_n=(2000, 5000), index_dim=64, index_queries=100,
        index_factories="HNSW32,IVF{L}_Flat", index_nprobe="4,16", index_k_factor="4",
        reward_n=32, gpu_faiss_n=20_000, steps=("embed", "index", "gpu"),
        notes={"embed": "plain loop only (no Ray)", "align": "not run at scale tiny",
               "serve": "not run at scale tiny", "reward": "not run at scale tiny",
               "judge": "not run at scale tiny"}),
    "small": Scale(
        embed_n=10_000, embed_series=(1000, 10_000), embed_repeat=1, embed_batch=256,
        embed_ray=True, index_n=(20_000, 100_000), index_dim=512, index_queries=1000,
        index_factories="HNSW32,IVF{L}_Flat,IVF{L}_PQ64_RFlat",
        index_nprobe="16,64", index_k_factor="8,32", align_steps=30, serve_seconds=8.0,
        judge_pairs=8, gpu_faiss_n=200_000),
    "full": Scale(
        embed_n=10_000, embed_series=(1000, 10_000, 100_000), embed_repeat=2, embed_batch=256,
        embed_ray=True, index_n=(100_000, 1_000_000, 10_000_000), index_dim=512,
        index_queries=1000,
        index_factories="HNSW32,IVF{L}_Flat,IVF{L}_PQ64,IVF{L}_PQ64_RFlat,IVF{L}_PQ64x4fsr_RFlat,"
                        "IVF{L}_PQ64x4fsr_Refine(SQfp16)",
        index_train_sample=640_000,  # 39 points per list at IVF16384 (10M), faiss' minimum
        index_nprobe="16,64", index_k_factor="8,32,64", align_steps=60, serve_seconds=15.0,
        judge_pairs=24),
}


def commands(scale: Scale, work: Path, raw: Path, index_dim: int | None = None,
             serve_workdir: str = "") -> dict[str, list[list[str]]]:
    """Per step, the command lines to run in order (each writes its JSON under ``raw``)."""
    py = sys.executable
    dim = index_dim or scale.index_dim
    series = ",".join(str(n) for n in scale.embed_series)
    embed = [py, str(BENCH / "bench_embed.py"), "--n", str(scale.embed_n), "--mem-n", series,
             "--repeat", str(scale.embed_repeat), "--batch-size", str(scale.embed_batch),
             "--workdir", str(work / "embed"), "--json", str(raw / "embed.json")]
    if not scale.embed_ray:
        embed.append("--no-ray")
    index = [py, str(BENCH / "bench_index.py"), "--n", ",".join(str(n) for n in scale.index_n),
             "--dim", str(dim), "--queries", str(scale.index_queries),
             "--factories", scale.index_factories, "--nprobe", scale.index_nprobe,
             "--k-factor", scale.index_k_factor, "--build-threads", "1",
             "--train-sample", str(scale.index_train_sample),
             "--workdir", str(work / "index"), "--json", str(raw / "index.json")]
    serve_dir = serve_workdir or str(work / "serve_world")
    serve = [[py, str(BENCH / "bench_serve.py"), "--workdir", serve_dir,
              "--seconds", str(scale.serve_seconds), "--concurrency", scale.serve_concurrency,
              "--variants", "before,after", "--out", str(raw / "serve.json")]]
    if not serve_workdir:
        serve.insert(0, [py, str(BENCH / "serve_world.py"), "--out", serve_dir,
                         "--n-images", str(scale.serve_images)])
    return {
        "embed": [embed],
        "index": [index],
        "align": [[py, str(BENCH / "bench_align.py"), "--n-images", str(scale.align_images),
                   "--steps", str(scale.align_steps), "--out", str(raw / "align.json")]],
        "serve": serve,
        "reward": [[py, str(BENCH / "bench_reward.py"), "--n", str(scale.reward_n),
                    "--out", str(raw / "reward.json")]],
        "judge": [[py, str(BENCH / "bench_judge.py"), "--pairs", str(scale.judge_pairs),
                   "--out", str(raw / "judge.json")]],
        "gpu": [[py, str(BENCH / "bench_gpu.py"), "--faiss-n", str(scale.gpu_faiss_n),
                 "--out", str(raw / "gpu.json")]],
    }
