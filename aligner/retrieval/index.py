"""faiss indexes over embedding shards: build (train on a sample, stream the adds), save, load, search.

An index directory holds::

    shard-00.faiss ... shard-{S-1}.faiss   # faiss indexes sharing one trained quantiser
    ids.parquet                            # faiss position -> id, aesthetic[, caption]
    failures/failures.parquet              # rows that could not be indexed, with the reason
    manifest.json                          # factory, dim, ntotal, shards, sample, model, timings

Every index uses the inner-product metric: embeddings are L2-normalised, so scores are
cosine similarities. The index type is any ``faiss.index_factory`` string (``Flat``,
``HNSW32``, ``IVF1024,Flat``, ``IVF1024,PQ64``, ``OPQ64,IVF4096,PQ64`` ...).

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
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from aligner.runtime.manifest import read_manifest, write_manifest

log = logging.getLogger(__name__)

IDS_FILE = "ids.parquet"
FAILURES_DIR = "failures"
NORM_TOL = 1e-3
ShardMode = Literal["contiguous", "round_robin"]


def _faiss():
    import faiss  # imported lazily: it starts OpenMP threads

    return faiss


# ----------------------------------------------------------------------------- reading shards


def parquet_files(root: str | Path) -> list[Path]:
    """Parquet files under ``root`` (recursively, sorted), skipping ``_*``, ``.*`` and ``failures/``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(("_", ".")) and d != FAILURES_DIR)
        out += [Path(dirpath) / f for f in sorted(filenames)
                if f.endswith(".parquet") and not f.startswith(("_", "."))]
    return sorted(out)


class ShardInfo(NamedTuple):
    """One embeddings Parquet file: path, row count, row-group sizes and vector size."""

    path: Path
    rows: int
    row_groups: list[int]
    dim: int | None
    has_caption: bool
    has_aesthetic: bool


def _embedding_dim(field: pa.Field, path: Path) -> int | None:
    tp = field.type
    if pa.types.is_fixed_size_list(tp):
        return int(tp.list_size)
    if pa.types.is_list(tp) or pa.types.is_large_list(tp):
        return None  # variable-size lists: the size is checked per batch
    raise ValueError(f"{path}: column 'embedding' has type {tp}, expected fixed_size_list<float32>")


def inspect_embeddings(root: str | Path) -> list[ShardInfo]:
    """Schema and row counts of every embeddings file, from the Parquet footers only.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no Parquet files, missing ``id``/``embedding`` columns, or files whose
            vector sizes differ.
    """
    files = parquet_files(root)
    if not files:
        raise ValueError(f"no embeddings: {root} holds no Parquet files")
    infos = []
    for f in files:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
        missing = {"id", "embedding"} - set(schema.names)
        if missing:
            raise ValueError(f"{f}: missing column(s) {sorted(missing)}; have {schema.names}")
        infos.append(ShardInfo(
            f, meta.num_rows, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
            _embedding_dim(schema.field("embedding"), f), "caption" in schema.names,
            "aesthetic" in schema.names))
    dims = {i.dim for i in infos if i.dim is not None}
    if len(dims) > 1:
        by_dim = {d: next(str(i.path) for i in infos if i.dim == d) for d in sorted(dims)}
        raise ValueError(f"embedding sizes differ between files under {root}: {by_dim}")
    return infos


def _matrix(col: pa.Array, dim: int | None, where: str) -> np.ndarray:
    """A list column without nulls -> ``[n, D]`` float32."""
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if dim is None:
        dim = flat.size // max(n, 1)
    if flat.size != n * dim:
        raise ValueError(f"{where}: embeddings are not all of size {dim}")
    return flat.reshape(n, dim)


class Batch(NamedTuple):
    """Valid rows of one record batch, plus the rows that failed and why."""

    table: pa.Table      # id, aesthetic[, caption] of the valid rows
    vectors: np.ndarray  # [n, D] float32
    failures: list[dict[str, Any]]


def _clean_batch(batch: pa.RecordBatch, dim: int | None, caption: bool, where: str) -> Batch:
    emb = batch.column("embedding")
    ids = batch.column("id")
    valid = np.ones(len(batch), bool)
    reasons: dict[int, str] = {}
    for name, col in (("id", ids), ("embedding", emb)):
        if col.null_count:
            nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False))
            for i in np.flatnonzero(nulls & valid):
                reasons[int(i)] = f"null {name}"
            valid &= ~nulls
    good = batch.filter(pa.array(valid)) if not valid.all() else batch
    x = _matrix(good.column("embedding"), dim, where)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(valid)
        for i in rows[~finite]:
            reasons[int(i)] = "non-finite embedding"
        good, x = good.filter(pa.array(finite)), x[finite]
    n = good.num_rows
    cols = {"id": good.column("id").cast(pa.string())}
    cols["aesthetic"] = (good.column("aesthetic").cast(pa.float32())
                         if "aesthetic" in good.schema.names else pa.nulls(n, pa.float32()))
    if caption:
        cols["caption"] = (good.column("caption").cast(pa.string())
                           if "caption" in good.schema.names else pa.nulls(n, pa.string()))
    failures = [{"id": ids[i].as_py(), "file": where, "reason": r} for i, r in sorted(reasons.items())]
    return Batch(pa.table(cols), x, failures)


def iter_embedding_batches(infos: Sequence[ShardInfo], batch_size: int = 65_536,
                           caption: bool | None = None) -> Iterator[Batch]:
    """Stream valid rows of every file, one record batch at a time (never the whole set).

    Args:
        infos: from :func:`inspect_embeddings`.
        batch_size: rows per record batch.
        caption: keep a ``caption`` column (default: when any file has one).
    """
    caption = any(i.has_caption for i in infos) if caption is None else caption
    for info in infos:
        cols = ["id", "embedding"] + [c for c, ok in (("aesthetic", info.has_aesthetic),
                                                       ("caption", info.has_caption and caption)) if ok]
        for batch in ds.dataset(str(info.path), format="parquet").to_batches(
                columns=cols, batch_size=batch_size):
            if batch.num_rows:
                yield _clean_batch(batch, info.dim, caption, str(info.path))


def sample_vectors(infos: Sequence[ShardInfo], n: int, seed: int = 0) -> np.ndarray:
    """A uniform random sample of ``n`` rows drawn across all files, ``[n', D]`` float32.

    Row positions are drawn with a seeded RNG; only the row groups that hold a drawn row are
    read, one at a time and only the ``embedding`` column, so memory is one row group plus
    the sample. Null or non-finite rows are left out (``n' <= n``).
    """
    total = sum(i.rows for i in infos)
    n = min(int(n), total)
    if n <= 0:
        return np.zeros((0, next((i.dim for i in infos if i.dim), 0)), np.float32)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    parts, start = [], 0
    for info in infos:
        pf = None
        for g, rows in enumerate(info.row_groups):
            lo, hi = np.searchsorted(picks, [start, start + rows])
            if hi > lo:
                pf = pf or pq.ParquetFile(info.path)
                col = pf.read_row_group(g, columns=["embedding"]).column("embedding")
                col = col.take(pa.array(picks[lo:hi] - start)).combine_chunks()
                col = col.filter(col.is_valid())
                x = _matrix(col, info.dim, str(info.path))
                parts.append(x[np.isfinite(x).all(axis=1)])
            start += rows
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------- search params


def _unwrap_idmap(index):
    faiss = _faiss()
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    return index


def set_search_params(index, nprobe: int | None = None,
                      ef_search: int | None = None) -> dict[str, int]:
    """Set ``nprobe`` (IVF) and ``efSearch`` (HNSW, also an HNSW coarse quantiser) on an index.

    Goes through ``faiss.ParameterSpace``, which reaches through ``IndexPreTransform``
    (OPQ/PCA) and into IVF quantisers; ``IndexIDMap`` wrappers are unwrapped first. A
    parameter the index does not have is skipped (logged at debug level).

    Returns:
        The parameters that were applied.
    """
    faiss = _faiss()
    target = _unwrap_idmap(index)
    space = faiss.ParameterSpace()
    applied = {}
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        try:
            space.set_index_parameter(target, name, float(value))
            applied[name] = int(value)
        except RuntimeError:
            log.debug("index %s has no parameter %s; ignored", type(target).__name__, name)
    return applied


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


# ----------------------------------------------------------------------------- search


class SearchResult(NamedTuple):
    """Top-k hits for a batch of queries.

    Attributes:
        scores: ``[B, k]`` float32 inner products (cosines), ``-inf`` where fewer than k hits.
        ids: ``B`` lists of ``k`` string ids (``None`` where there is no hit).
        positions: ``[B, k]`` int64 rows of ``ids.parquet`` (``-1`` where there is no hit).
    """

    scores: np.ndarray
    ids: list[list[str | None]]
    positions: np.ndarray


def merge_topk(scores: Sequence[np.ndarray], positions: Sequence[np.ndarray],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists (``[B, k_s]`` each) into one ``[B, k]`` list.

    Ordered by score, ties broken by lower position (exactly when the total width is at most
    ``4k``; beyond that a tie at the k-th score may keep either); missing hits (``-1``) last.
    """
    s = np.concatenate(scores, axis=1).astype(np.float32)
    p = np.concatenate(positions, axis=1).astype(np.int64)
    s = np.where(p < 0, -np.inf, s)
    if s.shape[1] > 4 * k:  # cut to k candidates first; sorting the full width is slow
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s, p = np.take_along_axis(s, part, 1), np.take_along_axis(p, part, 1)
    order = np.lexsort((np.where(p < 0, np.iinfo(np.int64).max, p), -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(p, order, 1)


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Queries as a C-contiguous ``[B, D]`` float32 array; warn if they are not unit length.

    Raises:
        ValueError: wrong rank, wrong vector size, or non-finite values.
    """
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise ValueError(f"queries must be [B, D], got shape {q.shape}")
    if q.shape[1] != dim:
        raise ValueError(f"query vectors have size {q.shape[1]} but the index holds size {dim}: "
                         "was the query encoded with the model that embedded the corpus?")
    if not np.isfinite(q).all():
        raise ValueError("queries hold NaN or inf")
    norms = np.linalg.norm(q, axis=1)
    if len(q) and np.abs(norms - 1).max() > NORM_TOL:
        log.warning("queries are not L2-normalised (norms %.3f..%.3f): scores are inner "
                    "products, not cosines", norms.min(), norms.max())
    return np.ascontiguousarray(q)


class SearchIndex:
    """One or more faiss shards plus the id map; search returns string ids.

    Attributes:
        shards: the faiss indexes (all built from one trained template).
        table: ``ids.parquet`` (id, aesthetic[, caption]), one row per position.
        manifest: the index directory's ``manifest.json``.
        shard_numbers: which of the manifest's shards are loaded.
    """

    def __init__(self, shards: Sequence[Any], table: pa.Table, manifest: dict[str, Any],
                 shard_numbers: Sequence[int] | None = None) -> None:
        self.shards = list(shards)
        self.table = table
        self.manifest = manifest
        self.shard_numbers = list(shard_numbers if shard_numbers is not None
                                  else range(len(self.shards)))
        self._ids = table.column("id")
        dims = {int(s.d) for s in self.shards}
        if len(dims) != 1 or dims != {int(manifest["dim"])}:
            raise ValueError(f"shard vector sizes {sorted(dims)} do not match the manifest's "
                             f"dim {manifest['dim']}")

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False, shards: Sequence[int] | None = None,
             nprobe: int | None = None, ef_search: int | None = None) -> SearchIndex:
        """Load an index directory written by :func:`build_index`.

        Args:
            path: the index directory.
            mmap: memory-map the vectors instead of reading them (``IO_FLAG_MMAP`` for IVF
                lists, ``IO_FLAG_MMAP_IFC`` for flat codes / HNSW storage).
            shards: load only these shard numbers (a serving replica holding some shards).
            nprobe: IVF lists to visit (default: the build's, else faiss' 1).
            ef_search: HNSW search breadth (default: the build's, else faiss' 16).

        Raises:
            FileNotFoundError: the directory, its manifest or a shard file is missing.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"index directory {path} does not exist")
        manifest = read_manifest(path)
        faiss = _faiss()
        flag = 0
        if mmap:
            flag = faiss.IO_FLAG_MMAP if manifest.get("ivf") else faiss.IO_FLAG_MMAP_IFC
        numbers = list(range(len(manifest["shards"]))) if shards is None else list(shards)
        loaded = []
        for s in numbers:
            f = path / manifest["shards"][s]["file"]
            if not f.is_file():
                raise FileNotFoundError(f"index shard {f} is missing")
            loaded.append(faiss.read_index(str(f), flag))
        table = pq.read_table(path / IDS_FILE, memory_map=mmap)
        index = cls(loaded, table, manifest, numbers)
        params = manifest.get("search_params", {})
        index.set_params(nprobe if nprobe is not None else params.get("nprobe"),
                         ef_search if ef_search is not None else params.get("efSearch"))
        return index

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def ntotal(self) -> int:
        """Vectors in the loaded shards."""
        return int(sum(s.ntotal for s in self.shards))

    def set_params(self, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
        """Set search parameters on every shard (see :func:`set_search_params`)."""
        applied: dict[str, int] = {}
        for shard in self.shards:
            applied = set_search_params(shard, nprobe, ef_search)
        return applied

    def _to_positions(self, number: int, local: np.ndarray) -> np.ndarray:
        info = self.manifest["shards"][number]
        pos = (local * len(self.manifest["shards"]) + number
               if self.manifest.get("shard_mode") == "round_robin" else local + info["offset"])
        return np.where(local < 0, -1, pos).astype(np.int64)

    def search(self, queries: np.ndarray, k: int = 10) -> SearchResult:
        """Top-k by inner product for ``[B, D]`` float32 queries (one ``[D]`` query is accepted).

        Raises:
            ValueError: ``k < 1`` or queries of the wrong shape (see :func:`check_queries`).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = check_queries(queries, self.dim)
        scores, positions = [], []
        for number, shard in zip(self.shard_numbers, self.shards, strict=True):
            s, local = shard.search(q, k)
            scores.append(s)
            positions.append(self._to_positions(number, local))
        s, p = merge_topk(scores, positions, k)
        return SearchResult(s, self.ids_at(p), p)

    def ids_at(self, positions: np.ndarray) -> list[list[str | None]]:
        """String ids for ``[B, k]`` positions (``None`` for ``-1``)."""
        flat = positions.reshape(-1)
        ok = flat >= 0
        got = self._ids.take(pa.array(flat[ok])).to_pylist() if ok.any() else []
        out: list[str | None] = [None] * len(flat)
        for i, v in zip(np.flatnonzero(ok), got, strict=True):
            out[i] = v
        k = positions.shape[1] if positions.ndim == 2 else len(flat)
        return [out[i:i + k] for i in range(0, len(out), k)]

    def rows_at(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        """The ``ids.parquet`` rows (id, aesthetic, caption if present) at positions."""
        return self.table.take(pa.array(np.asarray(positions, np.int64))).to_pylist()


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
        pq.write_table(pa.Table.from_pylist(failures, schema=pa.schema(
            [("id", pa.string()), ("file", pa.string()), ("reason", pa.string())])),
            d / "failures.parquet")


def build_index(embeddings: str | Path, out_dir: str | Path, factory: str = "Flat", *,
                train_sample: int = 100_000, batch_size: int = 65_536, shards: int = 1,
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
    schema = pa.schema([("id", pa.string()), ("aesthetic", pa.float32())]
                       + ([("caption", pa.string())] if caption else []))
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


# ----------------------------------------------------------------------------- exact search


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int,
               chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, in chunks of ``vectors`` (for recall measurement).

    Args:
        queries: ``[B, D]`` float32.
        vectors: ``[N, D]`` float32 (a memory-mapped array works: it is read chunk by chunk).
        k: hits per query.
        chunk: rows of ``vectors`` scored at once (memory ``B x chunk`` floats).

    Returns:
        ``scores [B, k]`` (descending; ``-inf`` past N) and ``indices [B, k]`` int64 rows of
        ``vectors`` (``-1`` past N); ties are broken by lower index.
    """
    q = np.asarray(queries, np.float32)
    b = len(q)
    best_s = np.full((b, k), -np.inf, np.float32)
    best_i = np.full((b, k), -1, np.int64)
    for start in range(0, len(vectors), chunk):
        v = np.asarray(vectors[start:start + chunk], np.float32)
        s = q @ v.T
        idx = np.broadcast_to(np.arange(start, start + len(v), dtype=np.int64), s.shape)
        best_s, best_i = merge_topk([best_s, s], [best_i, idx], k)
    return best_s, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of ``|found ∩ truth| / |truth|`` for ``[B, k]`` position arrays.

    ``-1`` entries (no hit) never count as found.
    """
    hits = 0
    total = 0
    for f, t in zip(np.asarray(found), np.asarray(truth), strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t))
        total += len(t)
    return hits / total if total else 1.0
