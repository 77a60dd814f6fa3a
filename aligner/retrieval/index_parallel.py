"""The parallel path of :func:`aligner.retrieval.index_build.build_index` (``parallel=True``).

The template is trained once, on the driver, before this module is called. Then two rounds
of Ray tasks:

1. *scan*, one task per embeddings file: stream the file, drop the rows that cannot be
   indexed (the same checks as the serial build, :func:`aligner.data.embeddings.
   iter_embedding_batches`), write the valid rows' ``id, aesthetic[, caption]`` to a part
   file (``<output>/_parts/``) and return the counts and failures. The driver concatenates
   the parts, in file order, into ``ids.parquet``; a file's first position is the number of
   valid rows before it.
2. *shard*, one task per shard: deserialise the trained template, stream the files that hold
   the shard's positions (``contiguous``: the files that overlap its range; ``round_robin``:
   every file, so the input is read S times), add its rows in position order and write
   ``shard-NN.faiss`` all-or-nothing.

Both rounds see the same valid rows in the same order as the serial build, so positions,
shard contents, ``ids.parquet`` and the manifest are the serial build's. The tasks write into
the output (a :class:`aligner.data.io.Store`). A local output directory must be on a
filesystem every Ray node shares (a missing part or shard file after a task succeeded is
reported as exactly that); the template travels through Ray's object store. An ``s3://`` /
``gs://`` output needs no shared filesystem: the template is uploaded to ``_parts/`` and each
shard task reads it from there, writes its shard to a local temp file and uploads it; the
embedding files are read from wherever they are (a URI input is read from the store by each
task). Memory per shard task: the template, its shard and one record batch. Failed tasks are
retried by Ray; every file is written to a temp name and renamed (or uploaded in one piece),
so a retry never leaves half a file. ``_parts/`` is removed at the end, also after a failure.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from aligner.data.embeddings import NORM_TOL, ShardInfo, iter_embedding_batches
from aligner.data.io import Store, atomic_write, join_path
from aligner.retrieval.index import IDS_FILE, ShardMode, _faiss
from aligner.retrieval.index_build import Added, shard_bounds, shard_file, shard_mask

log = logging.getLogger(__name__)

PARTS_DIR = "_parts"
TEMPLATE_FILE = "template.faiss"
SHARED_FS = ("the output directory must be on a filesystem that every Ray node shares "
             "(NFS, a mounted bucket) for a parallel build, or an s3:// / gs:// URI")


class FileScan(NamedTuple):
    """What the scan task found in one embeddings file."""

    valid: int                      # rows that can be indexed
    failures: list[dict[str, Any]]  # rows that cannot, with the reason
    not_normalised: int
    part: str                       # the ids part file it wrote (in the parts store)


class StoredTemplate(NamedTuple):
    """The trained template as a file in a store (an object-store output's ``_parts/``)."""

    store: Store
    name: str

    def read(self) -> np.ndarray:
        """The ``faiss.serialize_index`` bytes."""
        return np.frombuffer(self.store.read_bytes(self.name), np.uint8)


def scan_file(info: ShardInfo, dim: int, batch_size: int, caption: bool, schema: pa.Schema,
              parts: Store, part: str) -> FileScan:
    """(Ray task) Check one file's rows and write the valid ones' ids part to ``parts``.

    Raises:
        ValueError: vectors of another size than ``dim``.
    """
    valid = off_norm = 0
    failures: list[dict[str, Any]] = []
    with parts.writing(part) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in iter_embedding_batches([info], batch_size, caption):
            failures += batch.failures
            x = batch.vectors
            if not len(x):
                continue
            if x.shape[1] != dim:
                raise ValueError(f"embeddings of size {x.shape[1]} in {info.path} among "
                                 f"embeddings of size {dim}")
            writer.write_table(batch.table.cast(schema))
            off_norm += int((np.abs(np.linalg.norm(x, axis=1) - 1) > NORM_TOL).sum())
            valid += len(x)
    return FileScan(valid, failures, off_norm, part)


def build_shard(template: np.ndarray | StoredTemplate, files: list[tuple[ShardInfo, int]],
                shard: int, shards: int, mode: ShardMode, bounds: np.ndarray, batch_size: int,
                out: Store, name: str, threads: int) -> int:
    """(Ray task) Add shard ``shard``'s positions into a copy of the template; write it.

    Args:
        template: the trained, empty index, ``faiss.serialize_index`` bytes, or where in
            the output store they are.
        files: ``(file, first position)`` of every file that may hold the shard's rows, in
            stream order.
        shard, shards, mode, bounds: which positions are this shard's (``shard_mask``).
        batch_size: rows per streamed ``add``.
        out, name: the output and the shard file's name in it (written all-or-nothing).
        threads: faiss (OpenMP) threads, the task's CPUs.

    Returns:
        The vectors the shard holds.
    """
    faiss = _faiss()
    faiss.omp_set_num_threads(threads)
    if isinstance(template, StoredTemplate):
        template = template.read()
    index = faiss.deserialize_index(template)
    for info, start in files:
        pos = start
        for batch in iter_embedding_batches([info], batch_size, caption=False):
            x, n = batch.vectors, len(batch.vectors)
            if not n:
                continue
            sel = shard_mask(np.arange(pos, pos + n), shard, shards, mode, bounds)
            if sel.all():
                index.add(x)
            elif sel.any():
                index.add(np.ascontiguousarray(x[sel]))
            pos += n
    with out.writing(name) as tmp:
        faiss.write_index(index, str(tmp))
    return int(index.ntotal)


def shard_files(scans: list[FileScan], infos: list[ShardInfo], shard: int, shards: int,
                mode: ShardMode, bounds: np.ndarray) -> list[tuple[ShardInfo, int]]:
    """The ``(file, first position)`` pairs a shard task must read, in stream order."""
    if len(scans) != len(infos):
        raise ValueError(f"{len(scans)} scans for {len(infos)} files")
    starts = np.concatenate([[0], np.cumsum([s.valid for s in scans])])
    out = []
    for i, info in enumerate(infos):
        lo, hi = int(starts[i]), int(starts[i + 1])
        if hi == lo:
            continue
        if mode == "contiguous" and (hi <= bounds[shard] or lo >= bounds[shard + 1]):
            continue
        out.append((info, lo))
    return out


def _gather(refs: list[Any], desc: str, progress: bool) -> list[Any]:
    """``ray.get`` of task refs in order, with a bar over finished tasks."""
    import ray

    pending = list(refs)
    with tqdm(total=len(refs), unit="task", desc=desc, disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            bar.update(len(done))
    return ray.get(refs)


def _write_ids(out: Path, scans: list[FileScan], schema: pa.Schema, parts: Store) -> None:
    """Concatenate the ids parts, in file order, into ``out/ids.parquet`` (local)."""
    with atomic_write(out / IDS_FILE) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for scan in scans:
            if not parts.is_file(scan.part):
                raise FileNotFoundError(f"{join_path(parts.uri, scan.part)}, written by a Ray "
                                        f"task, is not visible here: {SHARED_FS}")
            writer.write_table(pq.read_table(parts.path(scan.part), filesystem=parts.fs,
                                             schema=schema))


def _template_arg(template: Any, store: Store) -> Any:
    """What the shard tasks get as the template: a Ray object for a local output, the
    template's file in the store's ``_parts/`` for an object store."""
    import ray

    blob = _faiss().serialize_index(template)
    if store.is_local:
        return ray.put(blob)
    name = f"{PARTS_DIR}/{TEMPLATE_FILE}"
    store.write_bytes(name, blob.tobytes())
    return StoredTemplate(store, name)


def _scan_all(infos: list[ShardInfo], dim: int, batch_size: int, caption: bool,
              schema: pa.Schema, parts: Store, progress: bool) -> list[FileScan]:
    """Round 1: one scan task per embeddings file (see the module docstring)."""
    import ray

    scan = ray.remote(num_cpus=1)(scan_file)
    return _gather([scan.remote(info, dim, batch_size, caption, schema, parts,
                                f"ids-{i:05d}.parquet") for i, info in enumerate(infos)],
                   "scan", progress)


def _build_all(infos: list[ShardInfo], scans: list[FileScan], template: Any, store: Store,
               shards: int, mode: ShardMode, batch_size: int, cpus_per_task: float,
               progress: bool) -> list[dict[str, Any]]:
    """Round 2: one task per shard; returns the manifest's shard rows.

    Raises:
        FileNotFoundError: a shard file a task wrote is not visible here.
    """
    import ray

    bounds = shard_bounds(sum(i.rows for i in infos), shards)
    arg = _template_arg(template, store)
    build = ray.remote(num_cpus=cpus_per_task)(build_shard)
    threads = max(1, int(cpus_per_task))
    sizes = _gather(
        [build.remote(arg, shard_files(scans, infos, s, shards, mode, bounds), s, shards,
                      mode, bounds, batch_size, store, shard_file(s), threads)
         for s in range(shards)], "shards", progress)
    meta, offset = [], 0
    for s, n in enumerate(sizes):
        if not store.is_file(shard_file(s)):
            raise FileNotFoundError(f"{join_path(store.uri, shard_file(s))}, written by a Ray "
                                    f"task, is not visible here: {SHARED_FS}")
        meta.append({"file": shard_file(s), "ntotal": int(n), "offset": offset})
        offset += int(n)
    return meta


def add_parallel(infos: list[ShardInfo], template: Any, out: Path, store: Store,
                 schema: pa.Schema, caption: bool, dim: int, shards: int, mode: ShardMode,
                 batch_size: int, cpus_per_task: float, ray_address: str | None,
                 progress: bool) -> Added:
    """Scan the files and build the shards in Ray tasks (see the module docstring).

    Args:
        out: the local directory the driver writes ``ids.parquet`` to.
        store: where the tasks write (``_parts/``, the shard files): ``out`` itself for a
            local output, else the object store the build is published to.

    Raises:
        ValueError: a file with vectors of another size (from its scan task).
        FileNotFoundError: a task's output is not visible to the driver (no shared
            filesystem).
    """
    from aligner.runtime.raycluster import init_ray

    init_ray(ray_address)
    t0 = time.time()
    parts = store.sub(PARTS_DIR)
    store.delete_tree(PARTS_DIR)
    try:
        scans = _scan_all(infos, dim, batch_size, caption, schema, parts, progress)
        _write_ids(out, scans, schema, parts)
        indexed = sum(s.valid for s in scans)
        failures = [f for s in scans for f in s.failures]
        log.info("scanned %d file(s) in %.1fs: %d valid rows, %d failed", len(infos),
                 time.time() - t0, indexed, len(failures))
        meta = _build_all(infos, scans, template, store, shards, mode, batch_size,
                          cpus_per_task, progress) if indexed else []
    finally:
        store.delete_tree(PARTS_DIR)
    return Added(meta, indexed, failures, sum(s.not_normalised for s in scans),
                 time.time() - t0, None)
