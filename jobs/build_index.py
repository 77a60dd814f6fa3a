"""Build a faiss index from embedding shards.

    python -m jobs.build_index --config jobs/configs/build_index.yaml embeddings=out/embeddings output=out/index

The index type is a ``faiss.index_factory`` string (``Flat``, ``HNSW32``, ``IVF4096,PQ64``,
``OPQ64,IVF16384,PQ64``, with a re-ranking stage ``IVF4096,PQ64x4fsr,RFlat`` ...) with the
inner-product metric (embeddings are normalised); IVF/PQ indexes are trained on
``train_sample`` rows drawn across all shards, then vectors are added in streamed record
batches, so memory holds the index plus one batch. ``shards=S`` splits the vectors over S
index files sharing one trained quantiser (one serving replica can load a subset).

By default one process adds every vector (faiss uses every core of its machine).
``parallel=true`` trains once here, then adds each shard in its own Ray task
(``cpus_per_task`` CPUs each) on the cluster the job runs on; the output equals the serial
build's. A local ``output`` must then be on a filesystem every Ray node shares:

    python -m jobs.build_index embeddings=/mnt/shared/emb output=/mnt/shared/index \
        factory="IVF16384,PQ64x4fsr,RFlat" train_sample=500000 shards=8 parallel=true \
        cpus_per_task=4 nprobe=64 k_factor=32

``embeddings`` and ``output`` may also be ``s3://`` / ``gs://`` URIs (pyarrow filesystems;
credentials and endpoint from the usual places, ``AWS_ENDPOINT_URL`` ...). The index is then
built in a local temp directory and uploaded, each file all-or-nothing and the manifest last,
so a reader never sees half an index. With ``parallel=true`` and a URI output no shared
filesystem is needed: each shard task reads the trained quantiser from the store (the
output's ``_parts/``, removed afterwards), builds its shard locally and uploads it, and with a
URI input the tasks read their rows from the store:

    python -m jobs.build_index embeddings=s3://bucket/emb output=s3://bucket/index \
        factory="IVF16384,PQ64x4fsr,RFlat" train_sample=500000 shards=8 parallel=true

``jobs.search index=s3://bucket/index`` and serving load such an index through a local cache
(``aligner.retrieval.index_store``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from aligner.data.io import Store
from aligner.retrieval.index import SearchIndex
from aligner.retrieval.index_build import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_K_FACTOR,
    DEFAULT_TRAIN_SAMPLE,
)
from aligner.runtime.config import dump_yaml, to_dict
from aligner.runtime.job import job_main

DEFAULT_YAML = Path(__file__).parent / "configs" / "build_index.yaml"


@dataclass
class IndexConfig:
    """Build a faiss index over an embeddings directory."""

    embeddings: str = field(default="out/embeddings", metadata={
        "help": "embeddings directory (jobs.embed output): local path or s3://, gs:// URI"})
    output: str = field(default="out/index", metadata={
        "help": "index directory to write: local path or s3://, gs:// URI"})
    factory: str = field(default="HNSW32", metadata={
        "help": "faiss index_factory string: Flat (exact), HNSW32 (fast, no training), "
                "IVF{n},PQ{m} (large corpora), IVF{n},PQ{m}x4fsr,RFlat (+ exact re-ranking)"})
    train_sample: int = field(default=DEFAULT_TRAIN_SAMPLE,
                              metadata={"help": "rows sampled to train IVF/PQ/OPQ"})
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "rows per streamed add"})
    shards: int = field(default=1, metadata={"help": "index shards (S files)"})
    shard_mode: str = field(default="contiguous",
                            metadata={"help": "contiguous | round_robin split over shards"})
    clamp_nlist: bool = field(default=False, metadata={
        "help": "lower the IVF list count when there are too few training vectors"})
    nprobe: int = field(default=0, metadata={"help": "IVF lists to visit (0: faiss default)"})
    ef_search: int = field(default=0, metadata={"help": "HNSW search breadth (0: default)"})
    k_factor: float = field(default=0.0, metadata={
        "help": "a refine stage (RFlat, Refine(...)) re-scores k_factor x k candidates "
                f"(0: {DEFAULT_K_FACTOR:g} when the factory has one)"})
    parallel: bool = field(default=False, metadata={
        "help": "add each shard in its own Ray task (a local output on a shared "
                "filesystem; an s3://, gs:// output needs none)"})
    cpus_per_task: float = field(default=1.0, metadata={
        "help": "CPUs (and faiss threads) per shard task of a parallel build"})
    ray_address: str = field(default="", metadata={
        "help": "Ray cluster of a parallel build (default: RAY_ADDRESS, else a local Ray)"})
    seed: int = field(default=0, metadata={"help": "seed of the training sample"})
    progress: bool = field(default=True, metadata={"help": "progress bar over added rows"})

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError("shards must be >= 1")
        if self.shard_mode not in ("contiguous", "round_robin"):
            raise ValueError("shard_mode must be contiguous or round_robin")
        if not self.factory.strip():
            raise ValueError("factory must be a faiss index_factory string")
        if self.k_factor and self.k_factor < 1:
            raise ValueError("k_factor must be 0 (default) or >= 1")
        if self.cpus_per_task <= 0:
            raise ValueError("cpus_per_task must be > 0")


def run(cfg: IndexConfig) -> SearchIndex:
    """Build the index, save its config beside it (``config.yaml``, in the object store for
    a URI output); returns it (loaded).

    Raises:
        FileNotFoundError, ValueError: as :func:`aligner.retrieval.index_build.build_index`.
    """
    from aligner.retrieval.index_build import build_index

    index = build_index(cfg.embeddings, cfg.output, cfg.factory,
                        train_sample=cfg.train_sample, batch_size=cfg.batch_size,
                        shards=cfg.shards, shard_mode=cfg.shard_mode,  # type: ignore[arg-type]
                        seed=cfg.seed, clamp_nlist=cfg.clamp_nlist,
                        nprobe=cfg.nprobe or None, ef_search=cfg.ef_search or None,
                        k_factor=cfg.k_factor or None, parallel=cfg.parallel,
                        cpus_per_task=cfg.cpus_per_task, ray_address=cfg.ray_address or None,
                        progress=cfg.progress, config=to_dict(cfg), started=time.time())
    Store(cfg.output).write_text("config.yaml", dump_yaml(cfg))
    return index


def main(argv: list[str] | None = None) -> int:
    def report(cfg: IndexConfig, index: SearchIndex) -> str:
        m = index.manifest
        return (f"index: {m.get('factory')} dim {index.dim}, {index.ntotal} vectors in "
                f"{len(m.get('shards', []))} shard(s), built in "
                f"{(m.get('timings_s') or {}).get('build', 0):.1f} s"
                f"{' by Ray tasks' if m.get('parallel') else ''} -> {cfg.output}")

    return job_main(IndexConfig, argv, DEFAULT_YAML, run, report, "python -m jobs.build_index")


if __name__ == "__main__":
    raise SystemExit(main())
