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

IVF lists vs training points: faiss needs at least as many training vectors as inverted
lists. By default that is a ``ValueError`` that says what to change; with ``clamp_nlist=True``
the list count is lowered to ``max(1, n_train // 39)`` (faiss' minimum of 39 points per
list) and a warning is logged; the manifest then records both factory strings.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from aligner.data.embeddings import (
    NORM_TOL,
    inspect_embeddings,
    iter_embedding_batches,
    sample_vectors,
)
from aligner.data.io import FAILURES_DIR, atomic_write_table
from aligner.retrieval.index import (
    IDS_FILE,
    IDS_SCHEMA,
    SearchIndex,
    ShardMode,
    _faiss,
    _unwrap_idmap,
    set_search_params,
)
from aligner.runtime.manifest import read_manifest, write_manifest

log = logging.getLogger(__name__)

#: Defaults of :func:`build_index` (``jobs.build_index`` takes its own from here).
DEFAULT_TRAIN_SAMPLE = 100_000
DEFAULT_BATCH_SIZE = 65_536


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
    ``IVF100,PQ16`` on 10k vectors of size 64).
    """
    faiss = _faiss()
    index = _unwrap_idmap(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if getattr(index, "do_polysemous_training", False):
        index.do_polysemous_training = False


# ----------------------------------------------------------------------------- build


def _embeddings_info(root: Path) -> dict[str, Any]:
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


def build_index(embeddings: str | Path, out_dir: str | Path, factory: str = "Flat", *,
                train_sample: int = DEFAULT_TRAIN_SAMPLE, batch_size: int = DEFAULT_BATCH_SIZE,
                shards: int = 1,
                shard_mode: ShardMode = "contiguous", seed: int = 0, clamp_nlist: bool = False,
                nprobe: int | None = None, ef_search: int | None = None,
                progress: bool = False, config: dict[str, Any] | None = None,
                started: float | None = None) -> SearchIndex:
    """Build a faiss index from an embeddings directory and save it to ``out_dir``.

    Args:
        embeddings: directory of Parquet files (``id``, ``embedding``, ``aesthetic``,
            ``caption?``), read recursively.
        out_dir: index directory to write (see the module docstring).
        factory: a ``faiss.index_factory`` string; the metric is inner product.
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
        progress: show a tqdm bar over added rows.
        config: the job's resolved config, recorded in the manifest.
        started: the job's start time (``time.time()``) for the manifest's wall time.

    Returns:
        The built index, in memory (the same content as ``SearchIndex.load(out_dir)``).

    Raises:
        FileNotFoundError: ``embeddings`` does not exist.
        ValueError: no rows, mixed vector sizes, a bad factory string, too few training
            vectors, or ``shards < 1``.
    """
    faiss = _faiss()
    t0 = time.time()
    embeddings, out = Path(embeddings), Path(out_dir)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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

    try:
        template = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build factory string {factory!r} for dim {dim}: "
                         f"{str(e).strip().splitlines()[-1]}") from e
    requested, n_train, t_train = factory, 0, 0.0
    _skip_polysemous_training(template)
    if not template.is_trained:
        if train_sample < 1:
            raise ValueError(f"factory {factory!r} needs training but train_sample={train_sample}")
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
        del sample
        t_train = time.time() - t
    indexes = [template] + [faiss.clone_index(template) for _ in range(shards - 1)]
    for idx in indexes:
        set_search_params(idx, nprobe, ef_search)

    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the manifest marks a finished build
    caption = any(i.has_caption for i in infos)
    schema = IDS_SCHEMA if caption else IDS_SCHEMA.remove(IDS_SCHEMA.get_field_index("caption"))
    bounds = np.linspace(0, total, shards + 1).round().astype(np.int64)
    failures: list[dict[str, Any]] = []
    pos, off_norm, t_add = 0, 0, time.time()
    with pq.ParquetWriter(out / IDS_FILE, schema) as writer, \
            tqdm(total=total, unit="row", desc="add", disable=not progress) as bar:
        for batch in iter_embedding_batches(infos, batch_size, caption):
            failures += batch.failures
            x, n = batch.vectors, len(batch.vectors)
            if n and x.shape[1] != dim:
                raise ValueError(f"embeddings of size {x.shape[1]} among embeddings of size "
                                 f"{dim} under {embeddings}")
            if n:
                writer.write_table(batch.table.cast(schema))
                off_norm += int((np.abs(np.linalg.norm(x, axis=1) - 1) > NORM_TOL).sum())
                p = np.arange(pos, pos + n)
                for s, idx in enumerate(indexes):
                    sel = (p % shards == s) if shard_mode == "round_robin" else \
                        (p >= bounds[s]) & (p < bounds[s + 1])
                    if sel.all():
                        idx.add(x)
                    elif sel.any():
                        idx.add(np.ascontiguousarray(x[sel]))
                pos += n
            bar.update(n + len(batch.failures))
    t_add = time.time() - t_add
    if pos == 0:
        raise ValueError(f"no embeddings: none of the {total} rows under {embeddings} is valid "
                         f"(first failure: {failures[0] if failures else None})")
    if off_norm:
        log.warning("%d of %d embeddings are not L2-normalised (|norm - 1| > %g): scores are "
                    "inner products, not cosines", off_norm, pos, NORM_TOL)
    if failures:
        log.warning("%d rows could not be indexed; see %s", len(failures), out / FAILURES_DIR)
    _write_failures(out, failures)

    shard_meta, offset = [], 0
    for s, idx in enumerate(indexes):
        name = f"shard-{s:02d}.faiss"
        faiss.write_index(idx, str(out / name))
        shard_meta.append({"file": name, "ntotal": int(idx.ntotal), "offset": offset})
        offset += int(idx.ntotal)
    manifest = {
        "factory": factory, "factory_requested": requested, "metric": "inner_product",
        "dim": dim, "ntotal": pos, "ivf": faiss.try_extract_index_ivf(template) is not None,
        "shard_mode": shard_mode, "shards": shard_meta,
        "search_params": set_search_params(template, nprobe, ef_search),
        "train_sample": {"requested": train_sample if n_train else 0, "used": n_train,
                         "seed": seed},
        "timings_s": {"train": round(t_train, 3), "add": round(t_add, 3),
                      "build": round(time.time() - t0, 3)},
        "embeddings": emb_info,
        "input_files": [{"path": str(i.path), "rows": i.rows} for i in infos],
        "counts": {"rows_in": total, "indexed": pos, "failed": len(failures),
                   "not_normalised": off_norm},
    }
    written = write_manifest(out, "build_index", config=config, started=started or t0, **manifest)
    log.info("indexed %d vectors of size %d into %d shard(s) of %s in %.1fs", pos, dim, shards,
             factory, time.time() - t0)
    return SearchIndex(indexes, pq.read_table(out / IDS_FILE), written)


