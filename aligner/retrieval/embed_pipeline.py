"""The embedding pipeline's parts: decode/encode UDFs, the worker-side writer, actor-pool
settings.

The pipeline (built by :func:`build_pipeline`, run by ``jobs/embed.py``)::

    read_shards (tasks, one per shard; aligner.data.corpus_shards)
      -> DecodeImages (tasks, fused with the read: decode + validate, the model's eval
         transform, the pixel-based aesthetic score)
      -> EncodeImages (actor pool: the model, loaded once per actor; embedding-based scorers;
         actors restart and their batches are retried when a process dies)
      -> WriteParts (tasks: each block's rows -> one part file per shard, in the output)
      -> driver: small part records only (shard, row ranges, the shard's total); a shard whose
         rows are all written is finalised by a Ray task (aligner.data.embedding_parts)

Why the workers write: the rows never pass through the driver, so the driver's memory and
network stay flat however many actors there are, and the job scales past one machine (and
past one driver's write bandwidth) without one job per input subset. The embeddings land in
the output directory, local or ``s3://`` / ``gs://`` (:class:`aligner.data.io.Store`), from
whichever node encoded them.

Exactly once: every input row leaves the encode stage exactly once, with an embedding or a
failure ``reason``; nothing is dropped on the way. A part's file name is a function of the
row positions it holds, so a batch replayed after an actor died (or a write task retried)
overwrites its own part instead of adding a copy, and writes are all-or-nothing (temp file +
rename locally; an object-store upload is visible only once complete). The driver counts
distinct row positions per shard from the part records and finalises a shard when they reach
``shard_total``; the finaliser (a Ray task) merges the parts sorted by position, keeps one row
per position, checks that exactly ``shard_total`` positions are there, and writes
``failures/<shard>.parquet`` (if any) then ``embeddings/<shard>.parquet``, the shard's "done"
marker. A re-run skips done shards and deletes the parts of unfinished ones, which are redone
whole. The price: every vector is written twice (part, then merged file).

Output layout (``out/``): ``embeddings/*.parquet`` (``id, embedding
fixed_size_list<float32>[D], aesthetic float32, caption, source`` + kept corpus columns),
``failures/*.parquet`` (``id, source, reason, stage``), ``shards.json`` (the plan and the model
it was started with), ``config.yaml``, ``manifest.json``; ``_parts/`` only while shards are in
flight.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from aligner.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_image,
    to_uint8,
)

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray.data

    from aligner.data.corpus_plan import Shard
    from aligner.data.io import Store
    from aligner.runtime.raycluster import ActorPlan

log = logging.getLogger(__name__)

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
            aesthetic[scored_rows] = score_each_safely(scorer, to_score)
        out = {c: np.asarray(d[c], dtype=object) for c in PASS_COLUMNS
               if c not in ("row", "shard_total")}
        out["row"] = np.asarray(d["row"], np.int64)
        out["shard_total"] = np.asarray(d["shard_total"], np.int64)
        out["pixels"] = pixels
        out["aesthetic"] = aesthetic
        return out


def score_each_safely(scorer: Any, images: list[np.ndarray]) -> np.ndarray:
    """``scorer.score(images)``; if the batch call fails (an odd size a scorer cannot handle),
    each image alone, and NaN (unscored, logged) for one that still fails: a score is a
    property of the row, never a reason to lose the row's embedding."""
    try:
        return np.asarray(scorer.score(images), np.float32)
    except Exception:  # noqa: BLE001 - fall back to one image at a time
        out = np.full(len(images), np.nan, np.float32)
        for i, im in enumerate(images):
            try:
                out[i] = float(np.asarray(scorer.score([im]))[0])
            except Exception as e:  # noqa: BLE001
                log.warning("scorer %s cannot score an image of shape %s: %s",
                            getattr(scorer, "name", scorer), im.shape, e)
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


# --------------------------------------------------------------------------- write (tasks)

class WriteParts:
    """``map_batches`` UDF for tasks: encoded rows -> part files in the output, part records out.

    Passed as an instance (tasks; ships the output store, a few hundred bytes). Input:
    :class:`EncodeImages` output. Output: the records of
    :func:`aligner.data.embedding_parts.write_parts` (no embeddings).
    """

    def __init__(self, store: Store, dim: int) -> None:
        self.store = store
        self.dim = dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from aligner.data.embedding_parts import write_parts

        return write_parts(self.store, batch, self.dim)


def build_pipeline(shards: list[Shard], preprocess: Any, spec: dict[str, Any], plan: ActorPlan,
                   store: Store, dim: int, batch_size: int = 256,
                   max_pixels: int = DEFAULT_MAX_PIXELS, scorer: str = "lowlevel",
                   batch_rows: int = 64, input_fs: pafs.FileSystem | None = None,
                   actor_restarts: int = 4) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: read -> decode/preprocess/score -> encode -> write parts.

    Args:
        shards: the pending shards.
        preprocess: the model's eval transform (``retriever.preprocess``).
        spec: ``dataclasses.asdict(ModelSpec)`` for the actors.
        plan: from :func:`aligner.runtime.raycluster.plan_model_actors`.
        store: the job's output directory (parts go to its ``_parts/``).
        dim: embedding size D.
        batch_size: images per model call.
        max_pixels: decode limit.
        scorer: aesthetic scorer name.
        batch_rows: rows per read/decode batch (bounds a task's memory).
        input_fs: the corpus's filesystem, shipped to the read tasks.
        actor_restarts: how often a model actor whose process died is restarted, and how
            often its unfinished batches are retried on the new one.

    Returns:
        A dataset of part records (:data:`aligner.data.embedding_parts.PART_RECORD_COLUMNS`).
    """
    import ray.data

    from aligner.data.corpus_shards import read_shards

    ds = read_shards(shards, batch_rows, input_fs)
    decode = DecodeImages(preprocess, max_pixels, scorer)
    # Ray Data buffers a task's output up to target_max_block_size (128 MB) before emitting a
    # block: a whole shard of pixels would then reach the model at once, at the end of the
    # task. Blocks of about one decode batch keep the pipeline streaming within a shard.
    row_bytes = 4 * int(np.prod(decode.pixel_shape)) + 512
    ds.context.target_max_block_size = max(1 << 20, row_bytes * batch_rows)
    ds = ds.map_batches(decode, batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
    # Ray 2.60 takes actor restarts and task retries only as extra remote args (deprecated
    # for 2.64, without a named replacement yet). Its own default is -1 (forever), which would
    # replay a batch that kills its process forever; a bound turns that into a failed job.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ds.map_batches(
            EncodeImages, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan.size),
            fn_constructor_kwargs={"spec": spec, "device": plan.device,
                                   "torch_threads": plan.threads, "batch_size": batch_size,
                                   "scorer": scorer},
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
            max_restarts=actor_restarts, max_task_retries=actor_restarts)
        # Writing is I/O: a small CPU share, so write tasks never wait behind the model actors.
        return ds.map_batches(WriteParts(store, dim), batch_size=None, batch_format="numpy",
                              num_cpus=WRITE_TASK_CPUS, max_retries=actor_restarts)


WRITE_TASK_CPUS = 0.25
