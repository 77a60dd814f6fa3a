"""The embeddings table: its schema, its resume metadata and its readers.

An embeddings dataset is what ``jobs.embed`` writes (and what the index, the preference builder
and the evaluation read)::

    <out>/embeddings/<shard_id>.parquet   id string, embedding fixed_size_list<float32>[D]
                                          (L2-normalised), aesthetic float32 (the scorer's;
                                          NaN when unscored), caption string, source string,
                                          + corpus columns kept (split ...)
    <out>/failures/<shard_id>.parquet     id, source, reason, stage (aligner.data.images)
    <out>/skipped.parquet                 input files that are not images (path, reason)
    <out>/shards.json                     the shard plan and the model it was started with
    <out>/manifest.json                   model (name, pretrained, checkpoint, hash, D), counts
    <out>/_parts/<shard_id>/part-*.parquet  in flight only: rows the workers wrote for a shard
                                          that is not finished yet (never read as data)

``<out>`` is a local directory or an ``s3://`` / ``gs://`` prefix (:class:`aligner.data.io.Store`).

Writers: the embed job's workers (:mod:`aligner.data.embedding_parts`): part files per block,
merged into ``embeddings/<shard_id>.parquet`` by a Ray task once the shard is complete
(failures first, then the embeddings file, each all-or-nothing). The embeddings file is the
shard's "done" marker (:func:`done_shards`), so a re-run skips finished shards and
:func:`clean_partial` removes what unfinished ones left.

Readers: :func:`embedding_files` accepts an embed output (its ``embeddings/``) or any directory
of Parquet files with ``id`` and ``embedding``, as a local path or an ``s3://`` / ``gs://``
URI (:func:`aligner.data.io.parquet_files_at`: every reader opens its files through a pyarrow
filesystem, the local disk being ``LocalFileSystem``); :func:`read_embeddings` reads them whole,
:func:`iter_embeddings` and :func:`iter_embedding_batches` stream them (the index builder never
holds a corpus in memory), :func:`sample_vectors` draws a training sample reading only the row
groups it needs, :func:`embedding_matrix` turns the column into ``[N, D]`` float32.
:func:`model_record` is what the manifest says about the model that embedded the corpus
(``aligner.retrieval.models.ModelSpec.from_record`` turns it into a spec).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from aligner.data.io import (
    FAILURES_DIR,
    Store,
    is_dir_at,
    join_path,
    parquet_files_at,
    shown_path,
)

if TYPE_CHECKING:
    from aligner.data.corpus_plan import Shard

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
PLAN_FILE = "shards.json"
SKIPPED_FILE = "skipped.parquet"
NORM_TOL = 1e-3


def embeddings_schema(dim: int, extra: pa.Schema | None = None) -> pa.Schema:
    """``id, embedding fixed_size_list<float32>[dim], aesthetic, caption, source`` + extras."""
    fields = [("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
              ("aesthetic", pa.float32()), ("caption", pa.string()), ("source", pa.string())]
    schema = pa.schema(fields)
    for f in extra or []:
        if f.name not in schema.names:
            schema = schema.append(f)
    return schema


# --------------------------------------------------------------------------- resume / metadata

def as_store(out: str | Path | Store) -> Store:
    """An output directory (local path, ``s3://`` / ``gs://`` URI, or a store) as a store."""
    return out if isinstance(out, Store) else Store(out)


def done_shards(out_dir: str | Path | Store) -> set[str]:
    """Ids of the shards whose embeddings file exists (finished, possibly with 0 rows)."""
    store = as_store(out_dir)
    return {name[:-len(".parquet")] for name, _ in store.list_files(EMBEDDINGS_DIR, ".parquet")}


def clean_partial(out_dir: str | Path | Store, pending: list[str]) -> int:
    """Remove what unfinished shards left: temp files, their failure files and every part
    file (:mod:`aligner.data.embedding_parts`); returns how many files."""
    from aligner.data.embedding_parts import PARTS_DIR

    store = as_store(out_dir)
    n = sum(store.remove_temp_files(sub) for sub in (EMBEDDINGS_DIR, FAILURES_DIR))
    n += store.delete_tree(PARTS_DIR)
    for sid in pending:
        n += store.delete(f"{FAILURES_DIR}/{sid}.parquet")
    return n


def write_skipped(out_dir: str | Path | Store, skipped: Sequence[tuple[str, str]]) -> None:
    """``skipped.parquet``: the input files that are not data (``path``, ``reason``)."""
    table = pa.table({"path": pa.array([p for p, _ in skipped], pa.string()),
                      "reason": pa.array([r for _, r in skipped], pa.string())})
    as_store(out_dir).write_table(SKIPPED_FILE, table)


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """Counts by reason code (the text before the first ``:``)."""
    out: dict[str, int] = {}
    for r in reasons:
        code = str(r).split(":", 1)[0]
        out[code] = out.get(code, 0) + 1
    return dict(sorted(out.items()))


def write_plan(out_dir: str | Path | Store, shards: list[Shard], model: dict[str, Any],
               input_uri: str, checkpoint_hash: str | None = None) -> None:
    """Record the shard plan and the model an output was started with (``shards.json``)."""
    as_store(out_dir).write_text(PLAN_FILE, json.dumps({
        "input": input_uri, "model": model, "checkpoint_hash": checkpoint_hash,
        "shards": [{"shard_id": s.shard_id, "what": s.describe(), "num_rows": s.num_rows}
                   for s in shards]}, indent=1))


def read_plan(out_dir: str | Path | Store) -> dict[str, Any] | None:
    """``shards.json`` of an output, or None."""
    text = as_store(out_dir).read_text(PLAN_FILE)
    return json.loads(text) if text is not None else None


# --------------------------------------------------------------------------- reading

class EmbeddingFile(NamedTuple):
    """One Parquet file of an embeddings dataset and how to open it."""

    shown: Path | str  # a local Path (as the dataset was named) or the file's URI
    fs: Any            # the pyarrow filesystem that holds it (LocalFileSystem for a path)
    path: str          # its path inside ``fs``


def shown_root(path: str | Path) -> Path | str:
    """How messages and manifests name a dataset: a ``Path`` for a local path, else the URI
    (:func:`aligner.data.io.shown_path`)."""
    return shown_path(path)


def _files(path: str | Path) -> list[EmbeddingFile]:
    """``path/embeddings/`` when ``path`` holds one (an embed job output), else ``path``:
    its Parquet files (:func:`aligner.data.io.parquet_files_at`).

    Raises:
        FileNotFoundError: nothing at ``path``, or its bucket does not exist.
    """
    sub = join_path(path, EMBEDDINGS_DIR)
    fs, files = parquet_files_at(sub if is_dir_at(sub) else path, "embeddings")
    return [EmbeddingFile(shown, fs, inner) for shown, inner in files]


def _some_files(path: str | Path) -> list[EmbeddingFile]:
    """:func:`_files`, raising as :func:`embedding_files` when there are none."""
    files = _files(path)
    if not files:
        raise FileNotFoundError(f"embeddings: {shown_root(path)} holds no Parquet files")
    return files


def embedding_files(path: str | Path) -> list[Path | str]:
    """The Parquet files of an embeddings dataset: ``path/embeddings/*.parquet`` for an embed
    job output, else every Parquet file under ``path`` (:func:`aligner.data.io.parquet_files`);
    local ``Path`` s, or URIs for an ``s3://`` / ``gs://`` dataset.

    Raises:
        FileNotFoundError: ``path`` (or its bucket) does not exist or holds no Parquet files.
    """
    return [f.shown for f in _some_files(path)]


def read_embeddings(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of an embeddings dataset as one Arrow table (no images are read).

    Args:
        path: an embed job output (holding ``embeddings/``) or a directory of Parquet files;
            a local path or an ``s3://`` / ``gs://`` URI.
        columns: a subset (e.g. ``["id", "embedding"]``); default all.

    Returns:
        A table with ``embedding: fixed_size_list<float32>[D]``; see :func:`embedding_matrix`.
    """
    tables = [pq.read_table(f.path, filesystem=f.fs, columns=columns)
              for f in _some_files(path)]
    tables = [t for t in tables if t.num_rows] or tables[:1]
    return pa.concat_tables(tables, promote_options="permissive")


def iter_embeddings(path: str | Path, batch_size: int = 65_536,
                    columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream an embeddings dataset (local path or URI) as record batches (bounded memory,
    for huge corpora)."""
    for f in _some_files(path):
        yield from pq.ParquetFile(f.path, filesystem=f.fs).iter_batches(
            batch_size=batch_size, columns=columns)


def lookup_embeddings(path: str | Path, ids: Sequence[str],
                      columns: Sequence[str] = ("id", "embedding", "aesthetic")) -> pa.Table:
    """The rows of some ids, read with a pushed-down ``id`` filter (never the whole set);
    ``path`` is a local path or a URI."""
    files = _some_files(path)
    d = ds.dataset([f.path for f in files], filesystem=files[0].fs, format="parquet")
    return d.to_table(columns=list(columns), filter=ds.field("id").isin(sorted(set(ids))))


def model_record(path: str | Path) -> dict[str, Any]:
    """What an embed output's manifest (local path or URI) says about the model that embedded
    it (name, pretrained, checkpoint, checkpoint_hash, embed_dim, image_size); ``{}`` when
    the manifest does not record one.

    Raises:
        FileNotFoundError: no ``manifest.json``.
    """
    from aligner.runtime.manifest import read_manifest

    return dict(read_manifest(path).get("model") or {})


def embedding_matrix(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``embedding`` column as a ``[N, D]`` float32 array (zero-copy where possible).

    Raises:
        ValueError: null rows, or vectors of different sizes.
    """
    col = table.column("embedding")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        raise ValueError(f"{col.null_count} null embeddings")
    dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
    return _matrix(col, dim, "embedding")


def output_counts(out_dir: str | Path | Store) -> dict[str, int]:
    """Rows in the output's embeddings and failures (Parquet footers only)."""
    store = as_store(out_dir)
    out = {"rows_out": 0, "rows_failed": 0, "shards_done": 0}
    for sub, key in ((EMBEDDINGS_DIR, "rows_out"), (FAILURES_DIR, "rows_failed")):
        for name, _ in store.list_files(sub, ".parquet"):
            out[key] += store.num_rows(f"{sub}/{name}")
            if sub == EMBEDDINGS_DIR:
                out["shards_done"] += 1
    out["rows_in"] = out["rows_out"] + out["rows_failed"]
    return out


class ShardInfo(NamedTuple):
    """One embeddings Parquet file: path, row count, row-group sizes and vector size.

    ``path`` is what messages and manifests show (a local ``Path``, or the file's URI);
    ``fs`` and ``fs_path`` open it (default: ``path`` on the local disk). Picklable: a Ray
    task handed one reads the file from wherever it is (an S3 filesystem carries its
    endpoint and, from the driver's environment, its keys: :func:`aligner.data.io.filesystem`).
    """

    path: Path | str
    rows: int
    row_groups: list[int]
    dim: int | None
    has_caption: bool
    has_aesthetic: bool
    fs: Any = None
    fs_path: str = ""

    def source(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it): the local disk unless ``fs`` is set."""
        import pyarrow.fs as pafs

        return self.fs or pafs.LocalFileSystem(), self.fs_path or str(self.path)

    def parquet_file(self) -> pq.ParquetFile:
        """The file, opened (its footer read)."""
        fs, path = self.source()
        return pq.ParquetFile(path, filesystem=fs)

    def dataset(self) -> ds.Dataset:
        """The file as a one-file ``pyarrow.dataset``."""
        fs, path = self.source()
        return ds.dataset(path, filesystem=fs, format="parquet")


def _embedding_dim(field: pa.Field, path: Path | str) -> int | None:
    tp = field.type
    if pa.types.is_fixed_size_list(tp):
        return int(tp.list_size)
    if pa.types.is_list(tp) or pa.types.is_large_list(tp):
        return None  # variable-size lists: the size is checked per batch
    raise ValueError(f"{path}: column 'embedding' has type {tp}, expected fixed_size_list<float32>")


def inspect_embeddings(root: str | Path) -> list[ShardInfo]:
    """Schema and row counts of every embeddings file, from the Parquet footers only.

    Args:
        root: an embed job output or a directory of Parquet files; a local path or an
            ``s3://`` / ``gs://`` URI.

    Raises:
        FileNotFoundError: ``root`` (or its bucket) does not exist.
        ValueError: no Parquet files, missing ``id``/``embedding`` columns, or files whose
            vector sizes differ.
    """
    files = _files(root)
    if not files:
        raise ValueError(f"no embeddings: {root} holds no Parquet files")
    infos = []
    for f in files:
        meta = pq.ParquetFile(f.path, filesystem=f.fs).metadata
        schema = meta.schema.to_arrow_schema()
        missing = {"id", "embedding"} - set(schema.names)
        if missing:
            raise ValueError(f"{f.shown}: missing column(s) {sorted(missing)}; "
                             f"have {schema.names}")
        infos.append(ShardInfo(
            f.shown, meta.num_rows,
            [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
            _embedding_dim(schema.field("embedding"), f.shown), "caption" in schema.names,
            "aesthetic" in schema.names, f.fs, f.path))
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
        for batch in info.dataset().to_batches(columns=cols, batch_size=batch_size):
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
                pf = pf or info.parquet_file()
                col = pf.read_row_group(g, columns=["embedding"]).column("embedding")
                col = col.take(pa.array(picks[lo:hi] - start)).combine_chunks()
                col = col.filter(col.is_valid())
                x = _matrix(col, info.dim, str(info.path))
                parts.append(x[np.isfinite(x).all(axis=1)])
            start += rows
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


