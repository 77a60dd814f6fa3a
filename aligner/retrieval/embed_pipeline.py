"""The embedding pipeline's parts: decode/encode UDFs, actor-pool sizing, the shard writer and
the reader of finished outputs.

The pipeline (built by :func:`build_pipeline`, run by ``jobs/embed.py``)::

    read_shards (tasks, one per shard; aligner.data.corpus_shards)
      -> DecodeImages (tasks, fused with the read: decode + validate, the model's eval
         transform, the pixel-based aesthetic score)
      -> EncodeImages (actor pool: the model, loaded once per actor; embedding-based scorers)
      -> driver: ShardWriter groups rows by shard and writes each shard once it is complete

Every input row reaches the driver exactly once, either with an embedding or with a failure
``reason``; nothing is dropped on the way. That is what lets the writer know a shard is
complete (``len(rows seen) == shard_total``) and write it atomically:
``failures/<shard>.parquet`` first (if any), then ``embeddings/<shard>.parquet`` through a
temp file and ``os.replace``. The embeddings file is the shard's "done" marker: a re-run skips
shards whose file exists, and a crash leaves only temp files, removed on the next start.

Why the driver writes: per-shard files and exact done markers need one place that sees all of a
shard's rows, and the rows that reach it are small (id, caption, ``[D]`` floats: about 1 KB at
D=256; pixels and image bytes never leave the workers). One driver writes well over 10^5 rows/s,
more than the model stage produces per GPU; for bigger clusters run one job per input subset.

Output layout (``out/``): ``embeddings/*.parquet`` (``id, embedding
fixed_size_list<float32>[D], aesthetic float32, caption, source`` + kept corpus columns),
``failures/*.parquet`` (``id, source, reason, stage``), ``shards.json`` (the plan and the model
it was started with), ``config.yaml``, ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aligner.data.images import (
    DEFAULT_MAX_PIXELS,
    FAILURE_COLUMNS,
    ImageError,
    decode_image,
    to_uint8,
)

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from aligner.data.corpus_shards import Shard

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
FAILURES_DIR = "failures"
PLAN_FILE = "shards.json"
PASS_COLUMNS = ("id", "source", "row", "caption", "reason", "stage", "shard_id", "shard_total")


# --------------------------------------------------------------------------- decode (tasks)

class DecodeImages:
    """``map_batches`` UDF for CPU tasks: raw rows -> model-ready pixels + pixel-based score.

    It is passed as an *instance*, so Ray Data runs it as (fusable) tasks and ships only the
    transform (a few hundred bytes), never the model.

    Args:
        preprocess: the model's eval transform, PIL image -> ``[3, H, W]`` float tensor
            (``retriever.preprocess``).
        max_pixels: images over this many pixels become ``too_large`` failures.
        scorer: a scorer name for :func:`aligner.aesthetics.scorer.make_scorer`; scored here only if it
            needs pixels.
        score_max_side: images are downscaled (never upscaled) to this longest side before
            scoring, so the score's cost does not grow with the input resolution.

    Input batch (pyarrow): :func:`aligner.data.corpus_shards.raw_schema`. Output (numpy dict):
    ``PASS_COLUMNS`` + ``pixels [B, 3, H, W] float32`` (zeros for failed rows) +
    ``aesthetic [B] float32`` (NaN for failed rows or when the scorer needs embeddings).
    """

    def __init__(self, preprocess: Any, max_pixels: int = DEFAULT_MAX_PIXELS,
                 scorer: str = "lowlevel", score_max_side: int = 256) -> None:
        from PIL import Image

        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.scorer_name = scorer
        self.score_max_side = score_max_side
        self.pixel_shape = tuple(np.asarray(preprocess(Image.new("RGB", (32, 32)))).shape)
        self._scorer: Any = None

    def _get_scorer(self) -> Any:
        if self._scorer is None and self.scorer_name:
            from aligner.aesthetics.scorer import make_scorer

            self._scorer = make_scorer(self.scorer_name)
        return self._scorer

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        d = {c: batch.column(c).to_pylist() for c in PASS_COLUMNS}
        data = batch.column("data").to_pylist()
        n = len(data)
        pixels = np.zeros((n, *self.pixel_shape), np.float32)
        aesthetic = np.full(n, np.nan, np.float32)
        scorer = self._get_scorer()
        score_pixels = scorer is not None and scorer.needs == "pixels"
        to_score: list[np.ndarray] = []
        scored_rows: list[int] = []
        for i in range(n):
            if d["reason"][i]:
                continue
            try:
                im = decode_image(data[i] or b"", self.max_pixels)
            except ImageError as e:
                d["reason"][i], d["stage"][i] = str(e), "decode"
                continue
            try:
                pixels[i] = np.asarray(self.preprocess(im), np.float32)
            except Exception as e:  # noqa: BLE001 - one bad image must not stop the job
                d["reason"][i] = f"preprocess_error: {type(e).__name__}: {e}"
                d["stage"][i] = "preprocess"
                continue
            if score_pixels:
                to_score.append(to_uint8(im, self.score_max_side))
                scored_rows.append(i)
        if to_score:
            aesthetic[scored_rows] = scorer.score(to_score)
        out = {c: np.asarray(d[c], dtype=object) for c in PASS_COLUMNS
               if c not in ("row", "shard_total")}
        out["row"] = np.asarray(d["row"], np.int64)
        out["shard_total"] = np.asarray(d["shard_total"], np.int64)
        out["pixels"] = pixels
        out["aesthetic"] = aesthetic
        return out


# --------------------------------------------------------------------------- encode (actors)

class EncodeImages:
    """``map_batches`` UDF for an actor pool: pixels -> L2-normalised embeddings.

    Loads the model once in ``__init__`` (``aligner.retrieval.models.load_retriever``). Rows that already
    failed pass through with a zero embedding; a batch the model cannot encode turns its rows
    into ``encode`` failures instead of stopping the job.

    Input: :class:`DecodeImages` output. Output: the same without ``pixels``, plus
    ``embedding [B, D] float32``; ``aesthetic`` filled here when the scorer needs embeddings.
    """

    def __init__(self, spec: dict[str, Any], device: str = "cpu", torch_threads: int = 0,
                 batch_size: int = 256, scorer: str = "") -> None:
        t0 = time.time()
        if not logging.getLogger().handlers:  # a fresh actor process: log like the driver
            from aligner.runtime.logs import setup_logging

            setup_logging()
        import torch

        from aligner.aesthetics.scorer import make_scorer
        from aligner.retrieval.models import ModelSpec, load_retriever

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        t1 = time.time()
        self.retriever = load_retriever(ModelSpec(**spec), device=device)
        log.info("model actor ready: imports %.1f s, model load %.1f s (pid %d)", t1 - t0,
                    time.time() - t1, os.getpid())
        self.batch_size = batch_size
        scorer_obj = make_scorer(scorer) if scorer else None
        self.scorer = scorer_obj if scorer_obj is not None and scorer_obj.needs == "embedding" \
            else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        # object arrays: a fixed-width unicode array would truncate a longer reason
        reason = batch["reason"] = np.asarray(batch["reason"], dtype=object)
        batch["stage"] = np.asarray(batch["stage"], dtype=object)
        batch["aesthetic"] = np.array(batch["aesthetic"], np.float32)
        ok = np.flatnonzero(np.asarray([not r for r in reason], bool))
        emb = np.zeros((len(reason), self.retriever.embed_dim), np.float32)
        if len(ok):
            try:
                emb[ok] = self.retriever.encode_images(np.ascontiguousarray(pixels[ok]),
                                                       self.batch_size)
                if self.scorer is not None:
                    batch["aesthetic"][ok] = self.scorer.score(emb[ok])
            except Exception as e:  # noqa: BLE001 - record, do not crash the pipeline
                log.exception("encoding a batch of %d failed", len(ok))
                for i in ok:
                    reason[i] = f"encode_error: {type(e).__name__}: {e}"
                    batch["stage"][i] = "encode"
        batch["embedding"] = emb
        return batch


# --------------------------------------------------------------------------- actor pool sizing

@dataclasses.dataclass(frozen=True)
class ActorPlan:
    """How many model actors and what each asks Ray for."""

    size: int
    num_cpus: float
    num_gpus: float
    torch_threads: int
    device: str


def plan_actor_pool(resources: dict[str, float], num_actors: int = 0) -> ActorPlan:
    """Size the model's actor pool from the cluster's resources.

    - GPUs: one actor per GPU (``num_gpus=1``, 1 CPU each), at most the number of GPUs.
    - CPU only: the model shares the CPUs with the decode tasks, which must never be starved
      (an actor pool that takes every CPU hangs: RAY_ON_A_SMALL_MACHINE.md). One actor per 4
      CPUs; each asks Ray for ``0.5 * torch_threads`` logical CPUs (capped so at least one
      whole CPU always stays free for a decode task) but runs ``torch_threads = CPUs // size``
      threads: the model may use every core while the decode tasks wait on I/O, and the OS
      shares the cores when both are busy. On 2 CPUs: one actor, 2 threads, 0.5 CPU (measured
      on 10k images: 1,479 rows/s after start-up vs 668 with 1 thread; bench/bench_embed.py).

    Args:
        resources: ``ray.cluster_resources()``.
        num_actors: a fixed pool size; 0 = from the resources.
    """
    gpus = int(resources.get("GPU", 0) or 0)
    cpus = max(1.0, float(resources.get("CPU", 1) or 1))
    if gpus >= 1:
        size = min(num_actors or gpus, gpus)
        if num_actors > gpus:
            log.warning("num_actors=%d > %d GPUs: using %d GPU actors", num_actors, gpus, gpus)
        per_cpu = 1.0 if cpus - size >= 1 else max(0.1, (cpus - 1) / size)
        return ActorPlan(size, per_cpu, 1.0, max(1, int(per_cpu)), "cuda")
    size = num_actors or max(1, int(cpus // 4))
    threads = max(1, int(cpus // size))
    per_cpu = min(0.5 * threads, max(0.1, (cpus - 1) / size))
    return ActorPlan(size, round(per_cpu, 3), 0.0, threads, "cpu")


def build_pipeline(shards: list[Shard], preprocess: Any, spec: dict[str, Any], plan: ActorPlan,
                   batch_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS,
                   scorer: str = "lowlevel", batch_rows: int = 64) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: read -> decode/preprocess/score -> encode.

    Args:
        shards: the pending shards.
        preprocess: the model's eval transform (``retriever.preprocess``).
        spec: ``dataclasses.asdict(ModelSpec)`` for the actors.
        plan: from :func:`plan_actor_pool`.
        batch_size: images per model call.
        max_pixels: decode limit.
        scorer: aesthetic scorer name.
        batch_rows: rows per read/decode batch (bounds a task's memory).
    """
    import ray.data

    from aligner.data.corpus_shards import read_shards

    ds = read_shards(shards, batch_rows)
    decode = DecodeImages(preprocess, max_pixels, scorer)
    # Ray Data buffers a task's output up to target_max_block_size (128 MB) before emitting a
    # block: a whole shard of pixels would then reach the model at once, at the end of the
    # task. Blocks of about one decode batch keep the pipeline streaming within a shard.
    row_bytes = 4 * int(np.prod(decode.pixel_shape)) + 512
    ds.context.target_max_block_size = max(1 << 20, row_bytes * batch_rows)
    ds = ds.map_batches(decode, batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
    return ds.map_batches(
        EncodeImages, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.size),
        fn_constructor_kwargs={"spec": spec, "device": plan.device,
                               "torch_threads": plan.torch_threads, "batch_size": batch_size,
                               "scorer": scorer},
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)


# --------------------------------------------------------------------------- output / resume

def _atomic_write_table(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def embeddings_schema(dim: int, extra: pa.Schema | None = None) -> pa.Schema:
    """``id, embedding fixed_size_list<float32>[dim], aesthetic, caption, source`` + extras."""
    import pyarrow as pa

    fields = [("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
              ("aesthetic", pa.float32()), ("caption", pa.string()), ("source", pa.string())]
    schema = pa.schema(fields)
    for f in extra or []:
        if f.name not in schema.names:
            schema = schema.append(f)
    return schema


def done_shards(out_dir: str | Path) -> set[str]:
    """Ids of the shards whose embeddings file exists (finished, possibly with 0 rows)."""
    d = Path(out_dir) / EMBEDDINGS_DIR
    return {p.stem for p in d.glob("*.parquet") if not p.name.startswith(".")} \
        if d.is_dir() else set()


def clean_partial(out_dir: str | Path, pending: list[str]) -> int:
    """Remove temp files and the failure files of unfinished shards; returns how many."""
    n = 0
    for sub in (EMBEDDINGS_DIR, FAILURES_DIR):
        d = Path(out_dir) / sub
        if not d.is_dir():
            continue
        for p in d.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    fail_dir = Path(out_dir) / FAILURES_DIR
    for sid in pending:
        p = fail_dir / f"{sid}.parquet"
        if p.exists():
            p.unlink()
            n += 1
    return n


@dataclasses.dataclass
class _ShardBuffer:
    chunks: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    rows: set[int] = dataclasses.field(default_factory=set)
    total: int = -1

    def complete(self) -> bool:
        return self.total >= 0 and len(self.rows) >= self.total


class ShardWriter:
    """Driver-side sink: groups streamed rows by shard, writes each shard once complete.

    Args:
        out_dir: the job's output directory.
        shards: the shards this run processes (by id).
        dim: embedding size D.
        keep_columns: corpus columns to carry into the output (Parquet corpora; read back from
            the corpus by row position at write time, so they never travel through Ray).
    """

    def __init__(self, out_dir: str | Path, shards: list[Shard], dim: int,
                 keep_columns: tuple[str, ...] = ()) -> None:
        self.out = Path(out_dir)
        (self.out / EMBEDDINGS_DIR).mkdir(parents=True, exist_ok=True)
        (self.out / FAILURES_DIR).mkdir(parents=True, exist_ok=True)
        self.shards = {s.shard_id: s for s in shards}
        self.dim = dim
        self.keep_columns = tuple(c for c in keep_columns if c != "caption")
        self.buffers: dict[str, _ShardBuffer] = {}
        self.written: set[str] = set()
        self.rows_in = self.rows_out = self.rows_failed = 0
        self.failure_reasons: dict[str, int] = {}

    def add(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Take one streamed batch; returns the ids of shards written because of it."""
        sids = batch["shard_id"]
        finished = []
        for sid in dict.fromkeys(sids.tolist()):
            if sid in self.written:
                continue  # a late duplicate from a retried task
            m = sids == sid
            part = {k: v[m] for k, v in batch.items()}
            buf = self.buffers.setdefault(sid, _ShardBuffer())
            buf.chunks.append(part)
            buf.rows.update(part["row"].tolist())
            totals = part["shard_total"]
            if (totals >= 0).any():
                buf.total = int(totals[totals >= 0][0])
            if buf.complete():
                self._write(sid)
                finished.append(sid)
        return finished

    def pending(self) -> list[str]:
        """Shards that started streaming but are not complete."""
        return sorted(self.buffers)

    def _write(self, sid: str) -> None:
        import pyarrow as pa

        buf = self.buffers.pop(sid)
        cols = {k: np.concatenate([c[k] for c in buf.chunks]) for k in buf.chunks[0]}
        order = np.argsort(cols["row"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        keep = np.ones(len(order), bool)
        keep[1:] = cols["row"][1:] != cols["row"][:-1]  # retried rows: same position
        cols = {k: v[keep] for k, v in cols.items()}
        reason = cols["reason"].astype(object)
        stage = cols["stage"].astype(object)
        seen: set[str] = set()
        for i, id_ in enumerate(cols["id"]):  # ids must be unique: later copies fail
            if not reason[i] and id_ in seen:
                reason[i], stage[i] = f"duplicate_id: {id_!r} already in this shard", "read"
            seen.add(id_)
        bad = np.asarray([bool(r) for r in reason], bool)
        ok = ~bad
        shard = self.shards.get(sid)
        if bad.any():
            fail = pa.table({"id": pa.array(cols["id"][bad].tolist(), pa.string()),
                             "source": pa.array(cols["source"][bad].tolist(), pa.string()),
                             "reason": pa.array(reason[bad].tolist(), pa.string()),
                             "stage": pa.array(stage[bad].tolist(), pa.string())})
            assert tuple(fail.column_names) == FAILURE_COLUMNS
            _atomic_write_table(fail, self.out / FAILURES_DIR / f"{sid}.parquet")
            for r in reason[bad]:
                code = str(r).split(":", 1)[0]
                self.failure_reasons[code] = self.failure_reasons.get(code, 0) + 1
        emb = np.ascontiguousarray(cols["embedding"][ok], np.float32).reshape(-1, self.dim)
        captions = [c if c else None for c in cols["caption"][ok].tolist()]
        table = pa.table({
            "id": pa.array(cols["id"][ok].tolist(), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()),
                                                           self.dim),
            "aesthetic": pa.array(cols["aesthetic"][ok], pa.float32()),
            "caption": pa.array(captions, pa.string()),
            "source": pa.array(cols["source"][ok].tolist(), pa.string()),
        })
        if self.keep_columns and shard is not None:
            from aligner.data.corpus_shards import read_shard_columns

            extra = read_shard_columns(shard, list(self.keep_columns))
            if extra is not None:
                rows = pa.array(cols["row"][ok], pa.int64())
                for name in extra.column_names:
                    table = table.append_column(name, extra.column(name).take(rows))
        _atomic_write_table(table, self.out / EMBEDDINGS_DIR / f"{sid}.parquet")
        self.written.add(sid)
        self.rows_in += int(len(reason))
        self.rows_out += int(ok.sum())
        self.rows_failed += int(bad.sum())


def write_plan(out_dir: str | Path, shards: list[Shard], model: dict[str, Any],
               input_uri: str, checkpoint_hash: str | None = None) -> None:
    """Record the shard plan and the model an output was started with (``shards.json``)."""
    from aligner.runtime.manifest import atomic_write_text

    atomic_write_text(Path(out_dir) / PLAN_FILE, json.dumps({
        "input": input_uri, "model": model, "checkpoint_hash": checkpoint_hash,
        "shards": [{"shard_id": s.shard_id, "what": s.describe(), "num_rows": s.num_rows}
                   for s in shards]}, indent=1))


def read_plan(out_dir: str | Path) -> dict[str, Any] | None:
    """``shards.json`` of an output, or None."""
    p = Path(out_dir) / PLAN_FILE
    return json.loads(p.read_text()) if p.is_file() else None


# --------------------------------------------------------------------------- reading outputs

def _embedding_files(out_dir: str | Path) -> list[Path]:
    d = Path(out_dir) / EMBEDDINGS_DIR
    if not d.is_dir():
        raise FileNotFoundError(f"no {EMBEDDINGS_DIR}/ in {out_dir}: not an embed job output")
    return sorted(p for p in d.glob("*.parquet") if not p.name.startswith("."))


def read_embeddings(out_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All embeddings of an embed job output as one Arrow table (no images are read).

    Args:
        out_dir: the job's output directory (holding ``embeddings/``).
        columns: a subset (e.g. ``["id", "embedding"]``); default all.

    Returns:
        A table with ``embedding: fixed_size_list<float32>[D]``; see :func:`embedding_matrix`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _embedding_files(out_dir)
    tables = [pq.read_table(p, columns=columns) for p in files]
    tables = [t for t in tables if t.num_rows] or tables[:1]
    if not tables:
        raise FileNotFoundError(f"{out_dir}/{EMBEDDINGS_DIR} holds no shards")
    return pa.concat_tables(tables, promote_options="permissive")


def iter_embeddings(out_dir: str | Path, batch_size: int = 65_536,
                    columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream an output's embeddings as record batches (bounded memory, for huge corpora)."""
    import pyarrow.parquet as pq

    for p in _embedding_files(out_dir):
        yield from pq.ParquetFile(p).iter_batches(batch_size=batch_size, columns=columns)


def embedding_matrix(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``embedding`` column as a ``[N, D]`` float32 array (zero-copy where possible)."""
    import pyarrow as pa

    col = table.column("embedding")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(
        np.float32, copy=False)


def output_counts(out_dir: str | Path) -> dict[str, int]:
    """Rows in the output's embeddings and failures (Parquet footers only)."""
    import pyarrow.parquet as pq

    out = {"rows_out": 0, "rows_failed": 0, "shards_done": 0}
    for sub, key in ((EMBEDDINGS_DIR, "rows_out"), (FAILURES_DIR, "rows_failed")):
        d = Path(out_dir) / sub
        for p in sorted(d.glob("*.parquet")) if d.is_dir() else []:
            if p.name.startswith("."):
                continue
            out[key] += pq.ParquetFile(p).metadata.num_rows
            if sub == EMBEDDINGS_DIR:
                out["shards_done"] += 1
    out["rows_in"] = out["rows_out"] + out["rows_failed"]
    return out


def throughput(rows: int, seconds: float) -> float:
    """rows / seconds, 0 when no time passed."""
    return rows / seconds if seconds > 0 and math.isfinite(seconds) else 0.0


class Progress:
    """Rate-limited INFO lines while the driver consumes the stream."""

    def __init__(self, total_shards: int, every_s: float = 10.0) -> None:
        self.total = total_shards
        self.every = every_s
        self.t0 = time.time()
        self.first_row_at: float | None = None
        self.last = 0.0

    def update(self, writer: ShardWriter, rows_seen: int) -> None:
        now = time.time()
        if self.first_row_at is None and rows_seen:
            self.first_row_at = now
            log.info("first rows after %.1f s (start-up: actors loading the model, workers "
                     "importing torch)", now - self.t0)
        if now - self.last >= self.every:
            self.last = now
            log.info("shards %d/%d written, rows out %d, failed %d, %.0f rows/s",
                     len(writer.written), self.total, writer.rows_out, writer.rows_failed,
                     throughput(rows_seen, now - self.t0))
