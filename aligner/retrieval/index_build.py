"""Build a faiss index directory from an embeddings dataset (the writer of the index contract).

Train the ``faiss.index_factory`` template once on a sample drawn across all embedding files
(:func:`aligner.data.embeddings.sample_vectors`), stream the vectors in record batches into S
shard copies of it, write ``ids.parquet`` (:data:`aligner.retrieval.index.IDS_SCHEMA`) as rows
are added and ``failures/failures.parquet`` for rows that cannot be indexed (null or
non-finite vectors), then the shard files and the manifest that marks a finished build.

Memory while building: the trained index itself, the training sample (``train_sample x D``
float32) and one record batch; ids go to ``ids.parquet`` as they are added. A *position* is
the row's place in the stream of valid rows (files in sorted path order), i.e. its row in
``ids.parquet``; each shard maps its local faiss ids back to positions.

Parallel build (``parallel=True``): the template is trained once here (on the driver), then
Ray tasks scan the embedding files (one task per file: valid rows, failures, the ids part) and
S tasks each add their positions into a copy of the trained template and write their shard
file (:mod:`aligner.retrieval.index_parallel`). The output, manifest included, is the serial
build's; a local output directory must be on a filesystem every Ray node shares, an
object-store output needs none (below).

Object storage: ``embeddings`` may be an ``s3://`` / ``gs://`` URI (read through pyarrow
filesystems, by the driver and by the parallel build's tasks), and so may ``out_dir``: the
build then runs in a local temp directory and :func:`aligner.retrieval.index_store.
publish_index` uploads it (old manifest deleted first, every file all-or-nothing, the
manifest last). In a parallel build into a store, the trained template goes to the store's
``_parts/`` and each shard task reads it from there, builds its shard in a local temp file and
uploads it; the driver uploads ``ids.parquet``, the failures and, last, the manifest. A bad
input (no bucket, no embeddings, a bad factory) fails before anything is written there.

Re-ranking: a factory with a refine stage (``IVF4096,PQ64x4fsr,RFlat``,
``...,Refine(SQfp16)``) keeps exact (or float16) vectors beside the codes and re-scores
``k_factor x k`` candidates; ``k_factor`` is saved as a search parameter (default
:data:`DEFAULT_K_FACTOR` when the factory has a refine stage).

IVF lists vs training points: faiss needs at least as many training vectors as inverted
lists. By default that is a ``ValueError`` that says what to change; with ``clamp_nlist=True``
the list count is lowered to ``max(1, n_train // 39)`` (faiss' minimum of 39 points per
list) and a warning is logged; the manifest then records both factory strings.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from aligner.data.embeddings import (
    NORM_TOL,
    ShardInfo,
    inspect_embeddings,
    iter_embedding_batches,
    sample_vectors,
    shown_root,
)
from aligner.data.io import FAILURES_DIR, Store, atomic_write_table, join_path
from aligner.retrieval.index import (
    IDS_FILE,
    IDS_SCHEMA,
    SearchIndex,
    ShardMode,
    _faiss,
    _unwrap_idmap,
    has_refine,
    set_search_params,
)
from aligner.retrieval.index_store import (
    MANIFEST_FILE,
    as_local,
    publish_index,
    remote_store,
)
from aligner.runtime.manifest import read_manifest, write_manifest

log = logging.getLogger(__name__)

#: Defaults of :func:`build_index` (``jobs.build_index`` takes its own from here).
DEFAULT_TRAIN_SAMPLE = 100_000
DEFAULT_BATCH_SIZE = 65_536
#: Candidates a refine stage re-scores, as a multiple of k, when the build is not told
#: (faiss' own default, 1, only re-orders the IVF-PQ top k). Measured in
#: ``bench/bench_index.py`` (docs/defaults.md, index table).
DEFAULT_K_FACTOR = 32.0
SHARD_MODES = ("contiguous", "round_robin")


def shard_file(shard: int) -> str:
    """The file name of shard ``shard`` inside an index directory."""
    return f"shard-{shard:02d}.faiss"


def shard_bounds(rows: int, shards: int) -> np.ndarray:
    """Contiguous shard boundaries: shard s holds positions ``[b[s], b[s+1])`` (``S + 1``
    int64 values over ``rows``, the input's row count: shards are cut before validation, so
    rows that fail leave their shard a little short)."""
    return np.linspace(0, rows, shards + 1).round().astype(np.int64)


def shard_mask(positions: np.ndarray, shard: int, shards: int, mode: ShardMode,
               bounds: np.ndarray) -> np.ndarray:
    """Which of ``positions`` belong to ``shard`` (``round_robin``: ``p % S == s``;
    ``contiguous``: ``b[s] <= p < b[s+1]``)."""
    if mode == "round_robin":
        return positions % shards == shard
    return (positions >= bounds[shard]) & (positions < bounds[shard + 1])


def _clamped_factory(factory: str, n_train: int, nlist: int, clamp: bool) -> str:
    if n_train >= nlist:
        return factory
    if not clamp:
        raise ValueError(
            f"factory {factory!r} has {nlist} inverted lists but only {n_train} training "
            f"vectors are available; faiss needs at least one per list (39-256 per list "
            f"recommended): raise train_sample, use fewer lists, or set clamp_nlist=true")
    new = max(1, n_train // 39)
    clamped = re.sub(r"IVF\d+", f"IVF{new}", factory, count=1)
    log.warning("only %d training vectors for %d inverted lists: clamping %r -> %r",
                n_train, nlist, factory, clamped)
    return clamped


def _skip_polysemous_training(index) -> None:
    """Switch off faiss' polysemous PQ training (on by default for factory ``PQ{m}``).

    It reorders PQ centroids for Hamming pre-filtering (``polysemous_ht``), which this module
    never enables, and costs about 5x the PQ training itself (measured: 59 s vs 12 s for
    ``IVF100,PQ16`` on 10k vectors of size 64). Reaches through ID maps, a refine stage
    (its base index) and pre-transforms (OPQ).
    """
    faiss = _faiss()
    index = _unwrap_idmap(index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if getattr(index, "do_polysemous_training", False):
        index.do_polysemous_training = False


# ----------------------------------------------------------------------------- build


def _embeddings_info(root: Path | str) -> dict[str, Any]:
    try:
        m = read_manifest(root)
    except FileNotFoundError:
        log.warning("%s has no manifest.json: the index will not record the embedding model", root)
        return {"path": str(root)}
    return {"path": str(root), "model": m.get("model"),
            "input": (m.get("config") or {}).get("input"), "job": m.get("job"),
            "created_utc": m.get("created_utc")}


def _write_failures(out: Path, failures: list[dict[str, Any]]) -> None:
    d = out / FAILURES_DIR
    if failures:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_table(pa.Table.from_pylist(failures, schema=pa.schema(
            [("id", pa.string()), ("file", pa.string()), ("reason", pa.string())])),
            d / "failures.parquet")


class Trained(NamedTuple):
    """A trained template and how it was trained."""

    template: Any       # the faiss index, trained, empty
    factory: str        # the factory string used (after clamping)
    n_train: int        # training vectors used (0: no training needed)
    t_train: float      # seconds to sample and train


class Added(NamedTuple):
    """What adding the vectors produced."""

    shards: list[dict[str, Any]]   # manifest rows: file, ntotal, offset
    indexed: int                   # valid rows added (positions 0 .. indexed-1)
    failures: list[dict[str, Any]]
    not_normalised: int
    t_add: float
    indexes: list[Any] | None      # the shards in memory (serial build), else None


def train_template(infos: list[ShardInfo], dim: int, factory: str, train_sample: int,
                   seed: int, clamp_nlist: bool) -> Trained:
    """Build the ``faiss.index_factory`` template and train it on a sample across files.

    Raises:
        ValueError: a bad factory string, ``train_sample < 1`` for an index that needs
            training, too few training vectors for the IVF lists, or a failed training.
    """
    faiss = _faiss()
    total = sum(i.rows for i in infos)
    try:
        template = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build factory string {factory!r} for dim {dim}: "
                         f"{str(e).strip().splitlines()[-1]}") from e
    _skip_polysemous_training(template)
    if template.is_trained:
        return Trained(template, factory, 0, 0.0)
    if train_sample < 1:
        raise ValueError(f"factory {factory!r} needs training but train_sample={train_sample}")
    requested = factory
    ivf = faiss.try_extract_index_ivf(template)
    if ivf is not None:
        factory = _clamped_factory(factory, min(train_sample, total), int(ivf.nlist), clamp_nlist)
        if factory != requested:
            template = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            _skip_polysemous_training(template)
    t = time.time()
    sample = sample_vectors(infos, train_sample, seed)
    n_train = len(sample)
    if ivf is not None and n_train < faiss.try_extract_index_ivf(template).nlist:
        raise ValueError(f"only {n_train} valid training vectors for {factory!r}")
    log.info("training %s on %d sampled vectors (%.1fs to sample)", factory, n_train,
             time.time() - t)
    try:
        template.train(sample)
    except RuntimeError as e:
        raise ValueError(f"training {factory!r} on {n_train} vectors failed: "
                         f"{str(e).strip().splitlines()[-1]}") from e
    return Trained(template, factory, n_train, time.time() - t)


def _add_serial(infos: list[ShardInfo], template: Any, out: Path, schema: pa.Schema,
                caption: bool, dim: int, shards: int, shard_mode: ShardMode,
                batch_size: int, progress: bool, root: Path | str) -> Added:
    """Stream every batch once, in this process, into S copies of the template; write
    ``ids.parquet`` as rows are added, then the shard files."""
    faiss = _faiss()
    total = sum(i.rows for i in infos)
    indexes = [template] + [faiss.clone_index(template) for _ in range(shards - 1)]
    bounds = shard_bounds(total, shards)
    failures: list[dict[str, Any]] = []
    pos, off_norm, t_add = 0, 0, time.time()
    with pq.ParquetWriter(out / IDS_FILE, schema) as writer, \
            tqdm(total=total, unit="row", desc="add", disable=not progress) as bar:
        for batch in iter_embedding_batches(infos, batch_size, caption):
            failures += batch.failures
            x, n = batch.vectors, len(batch.vectors)
            if n and x.shape[1] != dim:
                raise ValueError(f"embeddings of size {x.shape[1]} among embeddings of size "
                                 f"{dim} under {root}")
            if n:
                writer.write_table(batch.table.cast(schema))
                off_norm += int((np.abs(np.linalg.norm(x, axis=1) - 1) > NORM_TOL).sum())
                p = np.arange(pos, pos + n)
                for s, idx in enumerate(indexes):
                    sel = shard_mask(p, s, shards, shard_mode, bounds)
                    if sel.all():
                        idx.add(x)
                    elif sel.any():
                        idx.add(np.ascontiguousarray(x[sel]))
                pos += n
            bar.update(n + len(batch.failures))
    t_add = time.time() - t_add
    meta, offset = [], 0
    for s, idx in enumerate(indexes):
        if pos:
            faiss.write_index(idx, str(out / shard_file(s)))
        meta.append({"file": shard_file(s), "ntotal": int(idx.ntotal), "offset": offset})
        offset += int(idx.ntotal)
    return Added(meta, pos, failures, off_norm, t_add, indexes)


def build_index(embeddings: str | Path, out_dir: str | Path, factory: str = "Flat", *,
                train_sample: int = DEFAULT_TRAIN_SAMPLE, batch_size: int = DEFAULT_BATCH_SIZE,
                shards: int = 1,
                shard_mode: ShardMode = "contiguous", seed: int = 0, clamp_nlist: bool = False,
                nprobe: int | None = None, ef_search: int | None = None,
                k_factor: float | None = None, parallel: bool = False,
                cpus_per_task: float = 1.0, ray_address: str | None = None,
                progress: bool = False, config: dict[str, Any] | None = None,
                started: float | None = None) -> SearchIndex:
    """Build a faiss index from an embeddings directory and save it to ``out_dir``.

    Args:
        embeddings: directory of Parquet files (``id``, ``embedding``, ``aesthetic``,
            ``caption?``), read recursively; a local path or an ``s3://`` / ``gs://`` URI.
        out_dir: index directory to write (see the module docstring): a local path, or an
            ``s3://`` / ``gs://`` URI (built locally, then uploaded).
        factory: a ``faiss.index_factory`` string; the metric is inner product. A refine
            stage (``...,RFlat``, ``...,Refine(SQfp16)``) re-ranks with stored vectors.
        train_sample: rows drawn across all files to train IVF/PQ/OPQ (ignored for
            indexes that need no training, e.g. ``Flat``, ``HNSW32``).
        batch_size: rows per streamed ``add``.
        shards: number of index shards S; every shard is a copy of the trained template.
        shard_mode: ``contiguous`` (shard s holds one range of positions) or
            ``round_robin`` (position p goes to shard ``p % S``).
        seed: seeds the training sample.
        clamp_nlist: lower the IVF list count when there are too few training vectors
            instead of raising (see the module docstring).
        nprobe: IVF lists to visit; saved as the index's default search parameter.
        ef_search: HNSW search breadth; saved as the default.
        k_factor: a refine stage re-scores ``k_factor x k`` candidates; saved as the
            default (:data:`DEFAULT_K_FACTOR` when the factory has a refine stage).
        parallel: add the vectors in Ray tasks, one per shard (see the module docstring);
            the result equals the serial build's. A local ``out_dir`` must be on a
            filesystem every Ray node shares; a URI needs none.
        cpus_per_task: CPUs each shard task reserves (and faiss threads it uses).
        ray_address: the Ray cluster of a parallel build (default: ``RAY_ADDRESS``, else a
            local Ray).
        progress: show a tqdm bar over added rows (serial) or finished tasks (parallel).
        config: the job's resolved config, recorded in the manifest.
        started: the job's start time (``time.time()``) for the manifest's wall time.

    Returns:
        The built index, in memory (the same content as ``SearchIndex.load(out_dir)``).

    Raises:
        FileNotFoundError: ``embeddings`` (or a bucket of ``embeddings`` or ``out_dir``)
            does not exist.
        ValueError: no rows, mixed vector sizes, a bad factory string, too few training
            vectors, ``shards < 1``, a bad ``shard_mode``, ``batch_size``,
            ``cpus_per_task`` or ``k_factor``, an unsupported URI.
    """
    t0 = time.time()
    _check_args(shards, shard_mode, batch_size, cpus_per_task, k_factor)
    remote = remote_store(out_dir)  # None: a local directory, written in place
    if remote is not None:
        remote.check("index output")
    embeddings = shown_root(embeddings)
    infos = inspect_embeddings(embeddings)
    total = sum(i.rows for i in infos)
    if total == 0:
        raise ValueError(f"no embeddings: the {len(infos)} Parquet file(s) under {embeddings} "
                         "hold no rows")
    dim = next((i.dim for i in infos if i.dim), None)
    if dim is None:  # variable-size lists only: read one vector
        dim = int(sample_vectors(infos, 1, seed).shape[1])
    emb_info = _embeddings_info(embeddings)
    model_dim = (emb_info.get("model") or {}).get("embed_dim")
    if model_dim and int(model_dim) != dim:
        log.warning("embeddings manifest says embed_dim=%s but vectors have size %d", model_dim, dim)

    trained = train_template(infos, dim, factory, train_sample, seed, clamp_nlist)
    template = trained.template
    refine = has_refine(template)
    if refine and k_factor is None:
        k_factor = DEFAULT_K_FACTOR
    search_params = set_search_params(template, nprobe, ef_search, k_factor)

    with _build_dir(remote, out_dir) as out:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_FILE).unlink(missing_ok=True)  # the manifest marks a finished build
        caption = any(i.has_caption for i in infos)
        schema = IDS_SCHEMA if caption else IDS_SCHEMA.remove(IDS_SCHEMA.get_field_index("caption"))
        if parallel:
            from aligner.retrieval.index_parallel import add_parallel

            if remote is not None:
                remote.delete(MANIFEST_FILE)  # the tasks upload shards before the manifest
            added = add_parallel(infos, template, out, remote or Store(out), schema, caption,
                                 dim, shards, shard_mode, batch_size, cpus_per_task,
                                 ray_address, progress)
        else:
            added = _add_serial(infos, template, out, schema, caption, dim, shards, shard_mode,
                                batch_size, progress, embeddings)
        _check_added(added, total, embeddings, join_path(out_dir, FAILURES_DIR))
        _write_failures(out, added.failures)

        manifest = {
            "factory": trained.factory, "factory_requested": factory, "metric": "inner_product",
            "dim": dim, "ntotal": added.indexed,
            "ivf": _faiss().try_extract_index_ivf(template) is not None, "refine": refine,
            "shard_mode": shard_mode, "shards": added.shards, "parallel": parallel,
            "search_params": search_params,
            "train_sample": {"requested": train_sample if trained.n_train else 0,
                             "used": trained.n_train, "seed": seed},
            "timings_s": {"train": round(trained.t_train, 3), "add": round(added.t_add, 3),
                          "build": round(time.time() - t0, 3)},
            "embeddings": emb_info,
            "input_files": [{"path": str(i.path), "rows": i.rows} for i in infos],
            "counts": {"rows_in": total, "indexed": added.indexed,
                       "failed": len(added.failures), "not_normalised": added.not_normalised},
        }
        written = write_manifest(out, "build_index", config=config, started=started or t0,
                                 **manifest)
        if remote is not None:
            publish_index(out, remote)
        log.info("indexed %d vectors of size %d into %d shard(s) of %s in %.1fs%s",
                 added.indexed, dim, shards, trained.factory, time.time() - t0,
                 " (parallel)" if parallel else "")
        indexes = added.indexes if added.indexes is not None else \
            [_read_shard(remote or Store(out), m["file"]) for m in added.shards]
        return SearchIndex(indexes, pq.read_table(out / IDS_FILE), written)


def _check_added(added: Added, total: int, embeddings: Path | str,
                 failures_at: Path | str) -> None:
    """Refuse a build that indexed nothing; warn about rows that failed or are not unit length.

    Raises:
        ValueError: no valid row.
    """
    if added.indexed == 0:
        failures = added.failures
        raise ValueError(f"no embeddings: none of the {total} rows under {embeddings} is "
                         f"valid (first failure: {failures[0] if failures else None})")
    if added.not_normalised:
        log.warning("%d of %d embeddings are not L2-normalised (|norm - 1| > %g): scores "
                    "are inner products, not cosines", added.not_normalised, added.indexed,
                    NORM_TOL)
    if added.failures:
        log.warning("%d rows could not be indexed; see %s", len(added.failures), failures_at)


@contextlib.contextmanager
def _build_dir(remote: Store | None, out_dir: str | Path) -> Iterator[Path]:
    """Where the build writes: ``out_dir`` itself, or a local temp directory that is
    uploaded to an object store (removed afterwards)."""
    if remote is None:
        yield as_local(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="aligner-index-") as tmp:
        yield Path(tmp)


def _read_shard(store: Store, name: str) -> Any:
    """A shard file a parallel build's task wrote: read in place, or from the object store."""
    faiss = _faiss()
    local = store.local_path()
    if local is not None:
        return faiss.read_index(str(local / name))
    return faiss.deserialize_index(np.frombuffer(store.read_bytes(name), np.uint8))


def _check_args(shards: int, shard_mode: str, batch_size: int, cpus_per_task: float,
                k_factor: float | None) -> None:
    """Raise ``ValueError`` naming the first bad build argument."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shard_mode not in SHARD_MODES:
        raise ValueError(f"shard_mode must be one of {SHARD_MODES}, got {shard_mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cpus_per_task <= 0:
        raise ValueError(f"cpus_per_task must be > 0, got {cpus_per_task}")
    if k_factor is not None and k_factor < 1:
        raise ValueError(f"k_factor must be >= 1 (candidates = k_factor x k), got {k_factor}")
