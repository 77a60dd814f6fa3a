"""Reading a planned corpus: one shard's rows as small Arrow tables, or all pending shards as a
Ray Data dataset (the shards come from :mod:`aligner.data.corpus_plan`).

:func:`iter_shard` streams one shard's rows as small Arrow tables of raw bytes (memory is
bounded by ``batch_rows`` images), and :func:`read_shards` turns a list of pending shards into
a Ray Data dataset: ``ray.data.from_items`` (one row per shard, one block each) and a
generator ``map_batches`` that calls :func:`iter_shard`.

Rows (:func:`raw_schema`): ``id``, ``source`` (where the bytes came from: ``file#row=N``, a
URI, a path or ``tar#key``), ``row`` (position in the shard), ``data`` (encoded bytes, null on
a read failure), ``caption`` (``""`` when none), ``reason``/``stage`` (``""`` unless the row
already failed: a URI that cannot be fetched, a tar sample without an image, an unreadable
tar), ``shard_id`` and ``shard_total`` (-1, except on every row of a shard's last batch, where
it is the number of rows the shard produced; the writer uses it to know a shard is complete).
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray.data

from aligner.data.corpus import CAPTION_EXTS, IMAGE_EXTS
from aligner.data.corpus_plan import Shard, _ext, _join, resolve

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 64


# --------------------------------------------------------------------------- reading rows

def raw_schema() -> pa.Schema:
    """Arrow schema of the rows :func:`iter_shard` yields."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("source", pa.string()), ("row", pa.int64()),
                      ("data", pa.binary()), ("caption", pa.string()), ("reason", pa.string()),
                      ("stage", pa.string()), ("shard_id", pa.string()),
                      ("shard_total", pa.int64())])


class _Rows:
    """Accumulates rows and cuts them into Arrow tables of ``batch_rows``."""

    def __init__(self, shard: Shard, batch_rows: int) -> None:
        self.shard = shard
        self.batch_rows = batch_rows
        self.cols: dict[str, list[Any]] = {k: [] for k in raw_schema().names
                                           if k not in ("shard_id", "shard_total")}
        self.count = 0

    def add(self, id_: str, source: str, data: bytes | None, caption: str = "",
            reason: str = "", stage: str = "") -> None:
        if not id_ and not reason:
            data, reason, stage = None, "missing_id: null or empty id", "read"
        c = self.cols
        c["id"].append(id_)
        c["source"].append(source)
        c["row"].append(self.count)
        c["data"].append(data)
        c["caption"].append(caption or "")
        c["reason"].append(reason)
        c["stage"].append(stage)
        self.count += 1

    def full(self) -> bool:
        return len(self.cols["id"]) >= self.batch_rows

    def take(self) -> pa.Table:
        """The first ``batch_rows`` accumulated rows (or all, if fewer) as a table."""
        import pyarrow as pa

        k = self.batch_rows
        head = {name: col[:k] for name, col in self.cols.items()}
        self.cols = {name: col[k:] for name, col in self.cols.items()}
        n = len(head["id"])
        head["shard_id"] = [self.shard.shard_id] * n
        head["shard_total"] = [-1] * n
        return pa.Table.from_pydict(head, schema=raw_schema())


def _caption_text(raw: bytes, ext: str) -> str:
    text = raw.decode("utf-8", errors="replace")
    if ext == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return ""
        if isinstance(obj, dict):
            for key in ("caption", "text", "txt", "prompt"):
                if isinstance(obj.get(key), str):
                    return obj[key].strip()
        return ""
    return text.strip()


class _Fetcher:
    """Reads URIs through pyarrow filesystems (cached per scheme/host) with a thread pool."""

    def __init__(self, root: str, root_fs: pafs.FileSystem | None = None,
                 threads: int = 16) -> None:
        self.root = root
        self.threads = threads
        self._fs: dict[str, pafs.FileSystem] = {}
        scheme, sep, rest = root.partition("://")
        if root_fs is not None and sep:  # URIs in the corpus's own bucket use its filesystem
            self._fs[f"{scheme}://{rest.split('/', 1)[0]}"] = root_fs

    def _resolve(self, target: str) -> tuple[pafs.FileSystem, str]:
        scheme, sep, rest = target.partition("://")
        if sep and scheme in ("s3", "gs", "gcs"):  # path = bucket/key: one client per bucket
            key = f"{scheme}://{rest.split('/', 1)[0]}"
            if key not in self._fs:
                self._fs[key] = resolve(target)[0]
            return self._fs[key], rest
        if not sep:
            if "local" not in self._fs:
                self._fs["local"] = resolve(target)[0]
            import os

            return self._fs["local"], os.path.abspath(target)
        return resolve(target)

    def _read(self, uri: str) -> tuple[bytes | None, str]:
        try:
            fs, path = self._resolve(_join(self.root, uri))
            with fs.open_input_stream(path) as f:
                return f.read(), ""
        except Exception as e:  # noqa: BLE001 - every fetch error becomes a failure row
            return None, f"fetch_error: {type(e).__name__}: {e}"

    def read_many(self, uris: list[str]) -> list[tuple[bytes | None, str]]:
        if len(uris) <= 1:
            return [self._read(u) for u in uris]
        with ThreadPoolExecutor(min(self.threads, len(uris))) as pool:
            return list(pool.map(self._read, uris))


def _iter_parquet(shard: Shard, rows: _Rows, fs: pafs.FileSystem) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    path = shard.paths[0]
    fetcher = _Fetcher(shard.root, fs) if "uri" in shard.columns else None
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        offset = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            lo, hi = offset, offset + n
            offset = hi
            if hi <= shard.start or lo >= shard.stop:
                continue
            pos = lo
            for batch in pf.iter_batches(batch_size=rows.batch_rows, row_groups=[rg],
                                         columns=list(shard.columns)):
                b_lo, b_hi = pos, pos + batch.num_rows
                pos = b_hi
                if b_hi <= shard.start:
                    continue
                if b_lo >= shard.stop:
                    break
                batch = batch.slice(max(0, shard.start - b_lo),
                                    min(b_hi, shard.stop) - max(b_lo, shard.start))
                first = max(b_lo, shard.start)
                d = batch.to_pydict()
                ids = d["id"]
                caps = d.get("caption") or [""] * len(ids)
                if fetcher is not None:
                    fetched = fetcher.read_many([u or "" for u in d["uri"]])
                    for i, (data, err) in enumerate(fetched):
                        uri = d["uri"][i] or ""
                        if not uri:
                            data, err = None, "missing_uri: null or empty uri"
                        rows.add(_id_or(ids[i]), uri, data, caps[i] or "",
                                 err, "fetch" if err else "")
                else:
                    for i, data in enumerate(d["image"]):
                        if isinstance(data, dict):  # Hugging Face Image(): {bytes, path}
                            data = data.get("bytes")
                        rows.add(_id_or(ids[i]), f"{path}#row={first + i}", data or b"",
                                 caps[i] or "")
                while rows.full():
                    yield rows.take()
            if pos >= shard.stop:
                break


def _id_or(value: Any) -> str:
    return "" if value is None else str(value)


def _iter_files(shard: Shard, rows: _Rows, fs: pafs.FileSystem) -> Iterator[pa.Table]:
    caps = shard.captions or ("",) * len(shard.paths)
    for rel, cap_rel in zip(shard.paths, caps, strict=True):
        path = posixpath.join(shard.root, rel)
        try:
            with fs.open_input_stream(path) as f:
                data: bytes | None = f.read()
            err = ""
        except Exception as e:  # noqa: BLE001 - a vanished/unreadable file is a failure row
            data, err = None, f"read_error: {type(e).__name__}: {e}"
        caption = ""
        if cap_rel:
            try:
                with fs.open_input_stream(posixpath.join(shard.root, cap_rel)) as f:
                    caption = _caption_text(f.read(), _ext(cap_rel))
            except Exception:  # noqa: BLE001 - a missing caption is not a failed image
                caption = ""
        rows.add(rel, path, data, caption, err, "read" if err else "")
        if rows.full():
            yield rows.take()


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/000123.seg.jpg`` -> key ``dir/000123``, ext ``seg.jpg``."""
    d, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def _emit_sample(rows: _Rows, tar_path: str, key: str, files: dict[str, bytes]) -> None:
    source = f"{tar_path}#{key}"
    caption = ""
    for ext in CAPTION_EXTS:
        if ext in files:
            caption = _caption_text(files[ext], ext)
            break
    for ext in IMAGE_EXTS:
        if ext in files:
            rows.add(key, source, files[ext], caption)
            return
    rows.add(key, source, None, caption,
             f"no_image: sample has {sorted(files)}, none of {list(IMAGE_EXTS)}", "read")


def _iter_tar(shard: Shard, rows: _Rows, fs: pafs.FileSystem) -> Iterator[pa.Table]:
    path = shard.paths[0]
    key: str | None = None
    files: dict[str, bytes] = {}
    end = -1
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key:
                    if key is not None:
                        _emit_sample(rows, path, key, files)
                        if rows.full():
                            yield rows.take()
                    key, files = k, {}
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:  # stream mode does not notice a cut file
                    raise tarfile.ReadError(f"unexpected end of data in {member.name}: "
                                            f"{len(data)} of {member.size} bytes")
                files[ext] = data
            end = tar.offset  # where the end-of-archive marker (2 zero blocks) must start
    except (tarfile.TarError, OSError, EOFError) as e:
        # Keep what was read; the rest of the tar becomes one failure row.
        rows.add(f"{posixpath.basename(path)}#unreadable", path, None, "",
                 f"tar_error: {type(e).__name__}: {e} (after {rows.count} samples)", "read")
        key = None  # the half-read sample is part of the failure
    if key is not None:
        _emit_sample(rows, path, key, files)
    if end >= 0:
        # Stream mode ends quietly when the file is cut inside or before a header; a whole
        # archive has two zero blocks (1024 bytes) after its last member.
        size = fs.get_file_info(path).size
        if size is not None and (size % 512 or size < end + 1024):
            rows.add(f"{posixpath.basename(path)}#unreadable", path, None, "",
                     f"tar_error: truncated: {size} bytes, no end-of-archive marker "
                     f"(after {rows.count} samples)", "read")


def iter_shard(shard: Shard, batch_rows: int = DEFAULT_BATCH_ROWS,
               fs: pafs.FileSystem | None = None) -> Iterator[pa.Table]:
    """Stream a shard's rows as Arrow tables (:func:`raw_schema`) of at most ``batch_rows``.

    The last table's rows carry ``shard_total`` = the number of rows the shard produced; a
    shard that produces nothing yields one failure row (``empty_shard``), so every shard ends
    with a count. Errors reading single items become failure rows; none is raised.

    Args:
        shard: the shard.
        batch_rows: rows per table.
        fs: the corpus's filesystem (default: resolved from ``shard.root`` here). The driver
            passes the one it planned with, so a Ray worker reads an object store with the
            driver's endpoint even where its own environment does not name one.
    """
    import pyarrow as pa

    rows = _Rows(shard, batch_rows)
    fs = fs if fs is not None else resolve(shard.root)[0]
    gen = {"parquet": _iter_parquet, "files": _iter_files, "tar": _iter_tar}[shard.kind]
    pending: pa.Table | None = None
    for table in gen(shard, rows, fs):
        if pending is not None:
            yield pending
        pending = table
    while rows.cols["id"]:
        if pending is not None:
            yield pending
        pending = rows.take()
    if pending is None:
        rows.add(f"{shard.shard_id}#empty", shard.describe(), None, "",
                 "empty_shard: the shard produced no rows", "read")
        pending = rows.take()
    idx = pending.schema.get_field_index("shard_total")
    yield pending.set_column(idx, "shard_total", pa.array([rows.count] * pending.num_rows,
                                                          pa.int64()))


class ReadShards:
    """Ray Data ``map_batches`` UDF (runs as tasks): shard descriptors -> streamed raw rows.

    Input batch: ``{"shard": [json, ...]}`` (pyarrow); yields :func:`raw_schema` tables.
    ``fs``: the corpus's filesystem (see :func:`iter_shard`).
    """

    def __init__(self, batch_rows: int = DEFAULT_BATCH_ROWS,
                 fs: pafs.FileSystem | None = None) -> None:
        self.batch_rows = batch_rows
        self.fs = fs

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for text in batch.column("shard").to_pylist():
            yield from iter_shard(Shard.from_json(text), self.batch_rows, self.fs)


def read_shards(shards: list[Shard], batch_rows: int = DEFAULT_BATCH_ROWS,
                fs: pafs.FileSystem | None = None) -> ray.data.Dataset:
    """A Ray Data dataset of the raw rows of ``shards`` (one read task per shard); ``fs`` is
    the corpus's filesystem, shipped to the read tasks (see :func:`iter_shard`)."""
    import ray.data

    if not shards:
        raise ValueError("no shards to read")
    items = [{"shard": s.to_json()} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(ReadShards(batch_rows, fs), batch_size=1, batch_format="pyarrow")


def read_shard_columns(shard: Shard, columns: list[str],
                       fs: pafs.FileSystem | None = None) -> pa.Table | None:
    """The given columns of a Parquet shard's rows, in shard order (None for other kinds).

    Used to carry extra corpus columns (``split`` ...) into outputs without streaming them
    through the pipeline; reads only the row groups the shard covers. Missing columns are left
    out; None when none is present. ``fs``: the corpus's filesystem (default: from the root).
    """
    import pyarrow.parquet as pq

    if shard.kind != "parquet":
        return None
    fs = fs if fs is not None else resolve(shard.root)[0]
    with fs.open_input_file(shard.paths[0]) as f:
        pf = pq.ParquetFile(f)
        have = [c for c in columns if c in pf.schema_arrow.names]
        if not have:
            return None
        groups, first, offset = [], None, 0
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if offset < shard.stop and offset + n > shard.start:
                groups.append(rg)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups, columns=have)
    return table.slice(shard.start - (first or 0), shard.stop - shard.start)
