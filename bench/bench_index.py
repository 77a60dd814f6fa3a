"""Benchmark: Flat vs HNSW32 vs IVF-Flat vs IVF-PQ with and without a refine (re-ranking)
stage, built by ``aligner.retrieval.index_build.build_index``.

    python bench/bench_index.py --n 100000,1000000
    python bench/bench_index.py --quick                  # N=20k, 200 queries: a smoke run

For each N the data are generated once, in chunks, and written in the embed job's layout
(``embeddings/part-*.parquet`` with ``id, embedding fixed_size_list<float32>[D], aesthetic,
caption, source``, an empty ``failures/``, ``manifest.json``) into a temp dir, so every index is
built through the streamed path the build job uses (training sample drawn across the files,
record-batch adds).

Data: a mixture of 1,000 Gaussians in a 32-dim subspace of R^512, plus a little isotropic
noise, normalised: ``x = (c_label + sigma z) W + eps e`` with ``c, z ~ N(0, I_32)``, ``W`` 32
orthonormal rows, ``e ~ N(0, I_512)``; sigma 1.0, eps 0.05. Queries are drawn the same way with
another seed. Like real image embeddings, the data have a low intrinsic dimension and clusters
that overlap (mean cosine to the nearest neighbour ~0.73, between random pairs ~0), so IVF
recall depends on nprobe (isotropic clusters in 512 dims are so far apart that any nprobe
finds everything, which measures nothing).

Per index: build wall time (and its train / add parts from the manifest), size on disk of the
faiss shard, QPS for one batch of ``--queries`` queries through ``SearchIndex.search`` with
faiss on all threads and on one thread (``faiss.omp_set_num_threads(1)``), and recall@10
against the Flat index's results from the same run (Flat itself is checked against
``aligner.retrieval.index.exact_topk`` over the Parquet files on 100 queries). Flat stays
loaded and is timed again, on the same batch, right after each other index is built; each
row's QPS ratio divides by that neighbouring Flat time, so a change of machine load between
indexes does not skew the ratios. (Flat's QPS depends on the batch: 100 queries ran 10-20x
slower per query than 1,000 here, so the re-timing uses the same batch.)

Parameters per N: ``IVF{L}`` with ``L = 2**round(log2(4 sqrt(N)))`` lists (512 at 20k, 1024 at
100k, 4096 at 1M), ``PQ64`` (one byte per 8 dims: 64 bytes per vector instead of 2,048) or
``PQ64x4fsr`` (4-bit fast scan, 32 bytes), refine stages ``RFlat`` (exact vectors) and
``Refine(SQfp16)``, ``train_sample = min(N, --train-sample)`` (100k, the build job's default;
at 1M that is 24 points per list, below the 39 faiss asks for, which it warns about); IVF rows
are reported for each ``--nprobe`` and, with a refine stage, each ``--k-factor`` (one build);
HNSW32 with faiss' efConstruction 40 (the factory string cannot set it) and ``--ef-search``.
Above ``--hnsw-max-n`` rows (default 300k) HNSW is skipped and reported as skipped, with a time
estimate from a smaller N of the same run (HNSW build time grows about as N log N).

Measured on 2 shared cores (other sessions' jobs kept the load average at 4-6), ``--n 1000000
--factories "IVF{L}_PQ64,IVF{L}_PQ64_RFlat,IVF{L}_PQ64x4fsr_RFlat,IVF{L}_PQ64x4fsr_Refine(SQfp16)"
--nprobe 32,64 --k-factor 8,32,64 --build-threads 1``: 21 min with the data already generated.
One thread, relative to Flat (114-119 q/s): IVF4096,PQ64 0.63 recall@10 at 33x whatever
nprobe; with RFlat at nprobe 32, k_factor 8: 0.920 at 30x; PQ64x4fsr + RFlat at nprobe 32,
k_factor 32: 0.905 at 57x, nprobe 64, k_factor 64: 0.946 at 31x; Refine(SQfp16) the same recall
in half the bytes. Full table: docs/scale.md. Two-thread ratios are printed too but were not
stable on that machine (Flat's two-thread QPS swung between 16 and 227 q/s between runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DIM = 512
CHUNK = 50_000  # rows generated and written per Parquet file
CENTRES = 1000
LATENT = 32
SIGMA = 1.0
EPS = 0.05


# ----------------------------------------------------------------------------- data


class Mixture:
    """Gaussian mixture in a ``LATENT``-dim subspace of R^dim (see the module docstring)."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = rng.standard_normal((CENTRES, LATENT), dtype=np.float32)
        q, _ = np.linalg.qr(rng.standard_normal((dim, LATENT)))
        self.basis = np.ascontiguousarray(q.T, dtype=np.float32)  # [LATENT, dim], orthonormal

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``[n, dim]`` float32 unit vectors."""
        rng = np.random.default_rng(seed)
        z = self.centres[rng.integers(0, CENTRES, n)]
        z += SIGMA * rng.standard_normal(z.shape, dtype=np.float32)
        x = z @ self.basis
        x += EPS * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def write_embeddings(root: Path, n: int, mix: Mixture) -> Path:
    """Write ``n`` clustered vectors in the embed job's layout (skipped if already there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aligner.data.embeddings import embeddings_schema
    from aligner.runtime.manifest import write_manifest

    done = root / "manifest.json"
    if done.is_file() and json.loads(done.read_text()).get("rows") == n:
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "embeddings").mkdir(parents=True)
    (root / "failures").mkdir()
    dim = mix.dim
    schema, t = embeddings_schema(dim), time.time()
    for f, lo in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - lo)
        x = mix.sample(m, seed=1000 + f)
        pq.write_table(pa.table({
            "id": [f"v{i:08d}" for i in range(lo, lo + m)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
            "aesthetic": pa.array(np.zeros(m, np.float32)),
            "caption": pa.nulls(m, pa.string()), "source": pa.nulls(m, pa.string())},
            schema=schema), root / "embeddings" / f"part-{f:05d}.parquet")
    write_manifest(root, "embed", config={"input": "synthetic"}, rows=n,
                   model={"name": "synthetic", "embed_dim": dim},
                   data={"centres": CENTRES, "latent": LATENT, "sigma": SIGMA, "eps": EPS})
    print(f"  wrote {n:,} x {dim} vectors in {time.time() - t:.1f} s -> {root}", flush=True)
    return root


def exact_from_files(root: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k positions, reading the Parquet files in stream order (no index)."""
    from aligner.data.embeddings import inspect_embeddings, iter_embedding_batches
    from aligner.retrieval.index import merge_topk

    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_p = np.full((len(queries), k), -1, np.int64)
    pos = 0
    for b in iter_embedding_batches(inspect_embeddings(root), 65_536):
        s = queries @ b.vectors.T
        p = np.broadcast_to(np.arange(pos, pos + len(b.vectors)), s.shape)
        best_s, best_p = merge_topk([best_s, s], [best_p, p], k)
        pos += len(b.vectors)
    return best_p


def exact_streamed(root: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Exact top-k positions of all queries by one scan of the Parquet files, timed: (top-k
    positions, seconds of scoring and top-k merging only, seconds in all with the reads). Each
    batch is scored by ``faiss.knn`` (the kernel of an IndexFlatIP), so the scoring part is
    what an in-memory Flat index does."""
    import faiss

    from aligner.data.embeddings import inspect_embeddings, iter_embedding_batches
    from aligner.retrieval.index import merge_topk

    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_p = np.full((len(queries), k), -1, np.int64)
    pos, compute, t0 = 0, 0.0, time.perf_counter()
    for b in iter_embedding_batches(inspect_embeddings(root), 65_536):
        t = time.perf_counter()
        s, p = faiss.knn(queries, np.ascontiguousarray(b.vectors), k,
                         metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_p = merge_topk([best_s, s], [best_p, p + pos], k)
        compute += time.perf_counter() - t
        pos += len(b.vectors)
    return best_p, compute, time.perf_counter() - t0


# ----------------------------------------------------------------------------- measuring


def ivf_lists(n: int) -> int:
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def dir_bytes(d: Path, pattern: str = "shard-*.faiss") -> int:
    return sum(f.stat().st_size for f in d.glob(pattern))


def time_search(index, queries: np.ndarray, k: int, threads: int, min_s: float = 1.0) -> float:
    """Queries per second for one batch: best of up to 3 runs (fewer if a run takes > min_s)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index.search(queries[:8], k)  # warm-up (page-in, lazy allocations)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        index.search(queries, k)
        best = min(best, time.perf_counter() - t)
        if best > min_s:
            break
    return len(queries) / best


def run_one(emb: Path, out: Path, factory: str, queries: np.ndarray, k: int, all_threads: int,
            train_sample: int, nprobes: list[int], ef_search: int, truth: np.ndarray | None,
            build_threads: int, k_factors: list[float] | None = None, reference=None,
            ref_queries: int = 1000) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Build one index, then per search setting: QPS (all threads, one thread) and recall@k
    against ``truth``. ``reference`` (the Flat index) is timed again right after the build,
    on ``ref_queries`` queries, so each row's "x Flat" compares QPS measured minutes apart at
    most, under the same machine load."""
    import faiss

    from aligner.retrieval.index_build import build_index
    from aligner.retrieval.metrics import neighbour_recall

    faiss.omp_set_num_threads(build_threads)
    t = time.time()
    index = build_index(emb, out, factory, train_sample=train_sample,
                        ef_search=ef_search if factory.startswith("HNSW") else None)
    build_s = time.time() - t
    m = index.manifest
    ivf, refine = bool(m["ivf"]), bool(m.get("refine"))
    base = {"index": factory, "n": index.ntotal, "build_s": build_s,
            "train_s": m["timings_s"]["train"], "add_s": m["timings_s"]["add"],
            "train_rows": m["train_sample"]["used"], "bytes": dir_bytes(out)}
    if reference is not None:
        # best of 3 whatever a run takes: on a shared machine one slow run is the norm
        base["flat_qps_all"] = time_search(reference, queries[:ref_queries], k, all_threads,
                                           min_s=math.inf)
        base["flat_qps_1"] = time_search(reference, queries[:ref_queries], k, 1, min_s=math.inf)
        print(f"  (Flat again: QPS {base['flat_qps_all']:.0f} / {base['flat_qps_1']:.0f} "
              f"(1 thr) on {ref_queries} queries)", flush=True)
    rows, positions = [], None
    settings = [(p, kf) for p in (nprobes if ivf else [None])
                for kf in ((k_factors or [None]) if refine else [None])]
    for nprobe, k_factor in settings:
        params = {}
        if ivf or refine:
            params = index.set_params(nprobe=nprobe, k_factor=k_factor)
        elif factory.startswith("HNSW"):
            params = {"efSearch": ef_search}
        faiss.omp_set_num_threads(all_threads)
        res = index.search(queries, k)
        row = dict(base, params=" ".join(f"{a}={b:g}" for a, b in params.items()) or "-",
                   qps_all=time_search(index, queries, k, all_threads),
                   qps_1=time_search(index, queries, k, 1),
                   recall=neighbour_recall(res.positions, truth) if truth is not None else 1.0)
        row.setdefault("flat_qps_all", row["qps_all"])  # the Flat row is its own reference
        row.setdefault("flat_qps_1", row["qps_1"])
        rows.append(row)
        positions = res.positions
        print(f"  {factory:<26} {row['params']:<20} build {build_s:7.1f} s  "
              f"QPS {row['qps_all']:9.0f} / {row['qps_1']:9.0f} (1 thr)  "
              f"recall@{k} {row['recall']:.3f}", flush=True)
    del index
    gc.collect()
    faiss.omp_set_num_threads(all_threads)
    return rows, positions


def needs(n: int, dim: int) -> dict[str, float]:
    """Bytes one size needs at its peak: RAM for the Flat reference plus one more index with
    full vectors (an ``RFlat`` refine or IVF-Flat), held together while that index is timed;
    disk for the Parquet vectors (float32 does not compress) plus both index files."""
    vectors = n * dim * 4
    return {"ram": 2 * vectors, "disk": 3 * vectors}


def check_resources(n: int, dim: int, work: Path) -> None:
    """Fail before generating data, with the numbers, when N x dim cannot fit this machine.

    Raises:
        SystemExit: not enough available memory or free disk under ``work``.
    """
    import psutil

    need = needs(n, dim)
    have = {"ram": psutil.virtual_memory().available, "disk": shutil.disk_usage(work).free}
    have["disk"] += dir_bytes(work / f"emb-{n}" / "embeddings", "*.parquet")  # reused data
    short = [k for k in need if need[k] > have[k]]
    if short:
        gb = 2**30
        raise SystemExit(
            f"N={n:,} x dim {dim} float32 needs about {need['ram'] / gb:.1f} GiB of RAM (the Flat "
            f"reference and one full-vector index, {n * dim * 4 / gb:.1f} GiB each) and "
            f"{need['disk'] / gb:.1f} GiB of disk under {work}; this machine has "
            f"{have['ram'] / gb:.1f} GiB available and {have['disk'] / gb:.1f} GiB free. Use a "
            f"smaller --dim (bench/run_all.py --index-dim), a --stream-above below N (no Flat "
            f"index held; only the factories that fit are built) or a bigger machine.")


def factory_ram(factory: str, n: int, dim: int) -> float:
    """Bytes an index needs in RAM while it is built and searched: full vectors for IVF-Flat,
    HNSW and ``RFlat``, half for ``Refine(SQfp16)``, a quarter for ``SQ8`` refines, else the
    codes (at most ``dim / 8`` bytes a vector for the PQ strings used here) and ids."""
    f = factory.replace(" ", "")
    if re.search(r"(^|,)(Flat|HNSW\d*)($|,)", f) or "RFlat" in f or "Refine(Flat)" in f:
        per = dim * 4
    elif "SQfp16" in f:
        per = dim * 2
    elif "SQ8" in f:
        per = dim
    else:
        per = 0
    return n * (per + dim / 8 + 8)


def flat_streamed(emb: Path, n: int, queries: np.ndarray, k: int, all_threads: int,
                  block: int) -> tuple[dict[str, Any], np.ndarray]:
    """The Flat row above ``--stream-above``: no Flat index is held (its vectors would not
    fit beside another index). Ground truth is an exact scan of the Parquet files; Flat's QPS
    is measured on a ``block`` of the vectors held in RAM (the same GEMM + top-k an IndexFlat
    runs, best of 3, all threads and one thread) and scaled by ``n / block``: exact search
    costs exactly linear in N. The scan's own scoring time is printed as a cross-check."""
    import faiss

    from aligner.data.embeddings import inspect_embeddings, iter_embedding_batches

    truth, compute_s, scan_s = exact_streamed(emb, queries, k)
    print(f"  exact scan of {n:,} vectors for {len(queries)} queries: {scan_s:.0f} s "
          f"({compute_s:.0f} s scoring: {len(queries) / compute_s:.1f} q/s)", flush=True)
    parts, got = [], 0
    for b in iter_embedding_batches(inspect_embeddings(emb), 65_536):
        parts.append(b.vectors[:block - got])
        got += len(parts[-1])
        if got >= block:
            break
    flat = faiss.IndexFlatIP(queries.shape[1])
    flat.add(np.ascontiguousarray(np.concatenate(parts)))
    del parts
    scale = n / flat.ntotal
    qps_all = time_search(flat, queries, k, all_threads, min_s=math.inf) / scale
    qps_1 = time_search(flat, queries, k, 1, min_s=math.inf) / scale
    faiss.omp_set_num_threads(all_threads)
    print(f"  Flat on {flat.ntotal:,} vectors in RAM, scaled to {n:,}: QPS {qps_all:.1f} / "
          f"{qps_1:.1f} (1 thr)", flush=True)
    # an IndexFlat's build is one read of the vectors: the scan's time outside the scoring
    row = {"index": "Flat", "n": n, "build_s": scan_s - compute_s, "train_s": 0.0, "add_s": 0.0,
           "train_rows": 0, "bytes": n * queries.shape[1] * 4, "params": "exact scan",
           "qps_all": qps_all, "qps_1": qps_1, "flat_qps_all": qps_all, "flat_qps_1": qps_1,
           "recall": 1.0, "streamed": {"block": int(flat.ntotal), "scan_s": scan_s,
                                       "scan_scoring_qps": len(queries) / compute_s}}
    return row, truth


def bench_n(n: int, args, work: Path, hnsw_rate: dict[int, float]) -> list[dict[str, Any]]:
    k, dim = 10, args.dim
    streamed = n > args.stream_above
    if streamed:
        check_stream_resources(n, dim, work)
    else:
        check_resources(n, dim, work)
    lists = ivf_lists(n)
    train = min(n, args.train_sample)
    print(f"\nN = {n:,}  (dim {dim}, IVF{lists}, train_sample {train:,}, "
          f"{args.queries} queries, k={k})", flush=True)
    mix = Mixture(dim)
    emb = write_embeddings(work / f"emb-{n}", n, mix)
    queries = mix.sample(args.queries, seed=7)
    all_threads = os.cpu_count() or 1

    build_threads = args.build_threads or all_threads
    if streamed:
        return bench_streamed(n, args, work, emb, queries, lists, train, all_threads,
                              build_threads)
    rows, truth = run_one(emb, work / f"idx-{n}-flat", "Flat", queries, k, all_threads,
                          train, [], args.ef_search, None, build_threads)
    check = exact_from_files(emb, queries[:100], k)
    from aligner.retrieval.metrics import neighbour_recall

    flat_ok = neighbour_recall(truth[:100], check)
    print(f"  Flat vs exact_topk over the files (100 queries): recall {flat_ok:.4f}", flush=True)
    if flat_ok < 1.0:
        raise SystemExit("Flat disagrees with exact search: the benchmark's ground truth is wrong")
    from aligner.retrieval.index import SearchIndex

    reference = SearchIndex.load(work / f"idx-{n}-flat")  # timed again beside every index

    for factory in args.factories:
        fac = factory.replace("{L}", str(lists))
        if fac.startswith("HNSW") and n > args.hnsw_max_n:
            est = ""
            if hnsw_rate:
                n0, s0 = max(hnsw_rate.items())
                est = (f"; est. {s0 * n * math.log(n) / (n0 * math.log(n0)) / 60:.0f} min from "
                       f"{s0:.0f} s at N={n0:,}")
            reason = f"N={n:,} > --hnsw-max-n {args.hnsw_max_n:,}{est}"
            print(f"  {fac:<14} skipped: {reason}", flush=True)
            rows.append({"index": fac, "n": n, "skipped": reason})
            continue
        got, _ = run_one(emb, work / f"idx-{n}", fac, queries, k, all_threads, train,
                         args.nprobe, args.ef_search, truth, build_threads, args.k_factor,
                         reference, args.ref_queries or args.queries)
        if fac.startswith("HNSW"):
            hnsw_rate[n] = got[0]["build_s"]
        rows += got
        shutil.rmtree(work / f"idx-{n}", ignore_errors=True)
    del reference
    gc.collect()
    shutil.rmtree(work / f"idx-{n}-flat", ignore_errors=True)
    return rows


def check_stream_resources(n: int, dim: int, work: Path) -> None:
    """Above ``--stream-above`` only the vectors on disk (float32 Parquet) and the largest
    index file must fit; RAM is checked per factory (:func:`factory_ram`).

    Raises:
        SystemExit: not enough free disk under ``work``.
    """
    have = shutil.disk_usage(work).free + dir_bytes(work / f"emb-{n}" / "embeddings",
                                                     "*.parquet")
    need = n * dim * 4 * 1.55  # the vectors, and an index with float16 refine vectors
    if need > have:
        raise SystemExit(f"N={n:,} x dim {dim} needs about {need / 2**30:.1f} GiB of disk under "
                         f"{work} (float32 vectors and one index file); {have / 2**30:.1f} GiB "
                         f"are free")


def bench_streamed(n: int, args, work: Path, emb: Path, queries: np.ndarray, lists: int,
                   train: int, all_threads: int, build_threads: int) -> list[dict[str, Any]]:
    """One N above ``--stream-above``: the Flat row from :func:`flat_streamed`, then every
    factory whose RAM (:func:`factory_ram`) fits in 85% of the available memory; the others
    are reported as skipped with the bytes they would need."""
    import psutil

    k = 10
    flat, truth = flat_streamed(emb, n, queries, k, all_threads, args.flat_block)
    rows = [flat]
    for factory in args.factories:
        fac = factory.replace("{L}", str(lists))
        need, have = factory_ram(fac, n, args.dim), psutil.virtual_memory().available
        if fac.startswith("HNSW") and n > args.hnsw_max_n:
            need = math.inf
        if need > 0.85 * have:
            reason = (f"needs about {need / 2**30:.1f} GiB of RAM at N={n:,}, "
                      f"{have / 2**30:.1f} GiB available" if need < math.inf
                      else f"N={n:,} > --hnsw-max-n {args.hnsw_max_n:,}")
            print(f"  {fac:<14} skipped: {reason}", flush=True)
            rows.append({"index": fac, "n": n, "skipped": reason})
            continue
        got, _ = run_one(emb, work / f"idx-{n}", fac, queries, k, all_threads, train,
                         args.nprobe, args.ef_search, truth, build_threads, args.k_factor)
        for r in got:  # against the streamed Flat row, not the row itself
            r["flat_qps_all"], r["flat_qps_1"] = flat["qps_all"], flat["qps_1"]
        rows += got
        shutil.rmtree(work / f"idx-{n}", ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'N':>9}  {'index':<27} {'params':<20} {'build s':>8} {'(train':>7} {'add)':>6} "
            f"{'x Flat':>7} {'size MB':>8} {'x Flat':>6} {'QPS all':>9} {'QPS 1thr':>9} "
            f"{'x Flat':>7} {'x Flat 1':>8} {'recall@10':>9}")
    out = [head, "-" * len(head)]
    flat = {r["n"]: r for r in rows if r["index"] == "Flat"}
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['n']:>9,}  {r['index']:<27} skipped: {r['skipped']}")
            continue
        f = flat[r["n"]]
        out.append(
            f"{r['n']:>9,}  {r['index']:<27} {r['params']:<20} {r['build_s']:8.1f} "
            f"{r['train_s']:7.1f} {r['add_s']:6.1f} {r['build_s'] / f['build_s']:7.1f} "
            f"{r['bytes'] / 1e6:8.1f} {r['bytes'] / f['bytes']:6.3f} {r['qps_all']:9.0f} "
            f"{r['qps_1']:9.0f} {r['qps_all'] / r['flat_qps_all']:7.1f} "
            f"{r['qps_1'] / r['flat_qps_1']:8.1f} {r['recall']:9.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="100000", help="comma-separated corpus sizes")
    p.add_argument("--quick", action="store_true", help="N=20k, 200 queries (smoke run)")
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--train-sample", type=int, default=100_000,
                   help="rows to train IVF/PQ on (capped at N)")
    p.add_argument("--factories",
                   default="HNSW32,IVF{L}_Flat,IVF{L}_PQ64,IVF{L}_PQ64_RFlat,IVF{L}_PQ64x4fsr_RFlat",
                   help="besides Flat; '_' for ',' inside a factory, {L} = the IVF list count")
    p.add_argument("--nprobe", default="16,64", help="IVF nprobe values (one row each)")
    p.add_argument("--k-factor", default="8,32,64",
                   help="refine k_factor values (one row each, with every nprobe)")
    p.add_argument("--ef-search", type=int, default=64, help="HNSW efSearch")
    p.add_argument("--ref-queries", type=int, default=0,
                   help="queries of the Flat re-timing beside every other index (0: all "
                        "--queries; Flat's QPS depends on the batch: 100 queries ran 10-20x "
                        "slower per query than 1,000 here)")
    p.add_argument("--hnsw-max-n", type=int, default=300_000,
                   help="skip HNSW above this N (its build is the slowest; reported as skipped)")
    p.add_argument("--build-threads", type=int, default=0,
                   help="faiss threads while building (0: all). On a machine shared with other "
                        "busy processes one thread can build IVF-PQ several times faster: "
                        "OpenMP barriers wait for descheduled threads")
    p.add_argument("--stream-above", type=int, default=2_000_000,
                   help="above this N no Flat index is held: exact ground truth by a scan of "
                        "the files, Flat's QPS from --flat-block vectors in RAM scaled by N, "
                        "and only factories that fit the RAM are built (see bench_streamed)")
    p.add_argument("--flat-block", type=int, default=1_000_000,
                   help="vectors Flat's QPS is timed on above --stream-above")
    p.add_argument("--workdir", default="", help="where data and indexes go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    sizes = [20_000] if args.quick else [int(float(s)) for s in args.n.split(",") if s]
    if args.quick:
        args.queries = min(args.queries, 200)
    args.factories = [f.strip().replace("_", ",") for f in args.factories.split(",") if f.strip()]
    args.nprobe = [int(v) for v in args.nprobe.split(",") if v]
    args.k_factor = [float(v) for v in args.k_factor.split(",") if v]

    import faiss

    logging_quiet()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"faiss {faiss.__version__}, {os.cpu_count()} CPUs, build threads "
          f"{args.build_threads or os.cpu_count()}, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}, workdir {work}", flush=True)
    rows: list[dict[str, Any]] = []
    hnsw_rate: dict[int, float] = {}
    t0 = time.time()
    try:
        for n in sizes:
            rows += bench_n(n, args, work, hnsw_rate)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{table(rows)}\n")
    print(f"QPS: one batch of {args.queries} queries, k=10, through SearchIndex.search; 'all' = "
          f"faiss on {os.cpu_count()} threads. x Flat: build time and size relative to Flat at "
          f"the same N; QPS (all threads, then one thread) relative to Flat timed again right "
          f"after that index was built. recall@10: overlap with Flat's top 10. Total "
          f"{time.time() - t0:.0f} s; load average now "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def logging_quiet() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    raise SystemExit(main())
