"""Corpus readers: Parquet (image bytes or URIs), image folders, WebDataset tars -> shards -> rows.

Reading is two steps, so a job can resume:

1. :func:`plan_shards` enumerates the input, on the driver and before any Ray work, into
   deterministic :class:`Shard` s: a row range of a Parquet file (``rows_per_shard`` rows), a
   chunk of ``rows_per_shard`` image files in sorted path order, or one tar file. Each has a
   stable ``shard_id`` (readable prefix + a hash of what it covers, incl. the file size, so a
   rewritten file gets a new id) and its row count where that is cheap to know (Parquet
   footers, file listings; not tars). A missing input raises ``FileNotFoundError`` and a
   Parquet corpus without ``id`` or without ``image``/``uri`` raises ``ValueError`` naming the
   columns it has, before any work starts.
2. :func:`iter_shard` streams one shard's rows as small Arrow tables of raw bytes (memory is
   bounded by ``batch_rows`` images), and :func:`read_shards` turns a list of pending shards
   into a Ray Data dataset: ``ray.data.from_items`` (one row per shard, one block each) and a
   generator ``map_batches`` that calls :func:`iter_shard`.

Why not Ray's built-in ``read_parquet`` / ``read_images`` / ``read_webdataset``: their read
tasks and blocks do not map to stable units we can mark as done, so a crash means starting
over; with our own shard descriptors the job records a shard as finished only after all its
rows are written, and a re-run reads only the pending ones. The price is that we do the
listing and footer reads ourselves (cheap) and a shard is the unit of parallelism (use
``rows_per_shard`` so there are several shards per CPU).

Rows (:func:`raw_schema`): ``id``, ``source`` (where the bytes came from: ``file#row=N``, a
URI, a path or ``tar#key``), ``row`` (position in the shard), ``data`` (encoded bytes, null on
a read failure), ``caption`` (``""`` when none), ``reason``/``stage`` (``""`` unless the row
already failed: a URI that cannot be fetched, a tar sample without an image, an unreadable
tar), ``shard_id`` and ``shard_total`` (-1, except on every row of a shard's last batch, where
it is the number of rows the shard produced; the writer uses it to know a shard is complete).

Corpora without ids get them from the path relative to the folder (``a/b.jpg``) or the tar
sample key (``000123``). Paths are local or any URI ``pyarrow.fs.FileSystem.from_uri`` knows
(``s3://``, ``gs://``, ``hdfs://``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray.data

from aligner.data.corpus import CAPTION_EXTS, IMAGE_EXTS, check_corpus_schema

log = logging.getLogger(__name__)

Format = Literal["auto", "parquet", "folder", "webdataset"]
DEFAULT_ROWS_PER_SHARD = 10_000
DEFAULT_BATCH_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Shard:
    """One resumable unit of input.

    Attributes:
        shard_id: stable, file-name-safe id (``<readable>-<hash10>``).
        kind: ``parquet`` (row range of one file), ``files`` (image files) or ``tar``.
        root: the corpus root (path or URI), that relative paths are joined to.
        paths: parquet/tar: ``(file,)``; files: the image files (relative to ``root``).
        captions: files only: the caption sidecar (``.txt``/``.json``) per image, or ``""``.
        start: parquet only: first row (inclusive) in the file.
        stop: parquet only: last row (exclusive).
        num_rows: rows the shard will produce, or None where not cheaply known (tars).
        columns: parquet only: the columns to read (``id``, ``image`` or ``uri``, ``caption``).
    """

    shard_id: str
    kind: Literal["parquet", "files", "tar"]
    root: str
    paths: tuple[str, ...]
    captions: tuple[str, ...] = ()
    start: int = 0
    stop: int = 0
    num_rows: int | None = None
    columns: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Shard:
        d = json.loads(text)
        for k in ("paths", "captions", "columns"):
            d[k] = tuple(d[k])
        return cls(**d)

    def describe(self) -> str:
        """A short human-readable description (for logs and ``shards.json``)."""
        if self.kind == "parquet":
            return f"{self.paths[0]} rows [{self.start}, {self.stop})"
        if self.kind == "tar":
            return self.paths[0]
        return f"{len(self.paths)} files {self.paths[0]} .. {self.paths[-1]}"


def _shard_id(readable: str, key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("_")[:60] or "shard"
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


# --------------------------------------------------------------------------- file systems

def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A path or URI -> (pyarrow filesystem, path inside it)."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        import os

        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _join(root: str, rel: str) -> str:
    return rel if "://" in rel or rel.startswith("/") else posixpath.join(root, rel)


def _list_files(fs: pafs.FileSystem, path: str, hidden: bool = False) -> list[tuple[str, int]]:
    """(path, size) of every file under ``path``, sorted; hidden and ``_`` files left out
    unless ``hidden``."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, path)
        if not hidden and any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        out.append((info.path, int(info.size or 0)))
    return sorted(out)


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower().lstrip(".")


def detect_format(input_uri: str) -> Literal["parquet", "folder", "webdataset"]:
    """Guess the corpus format from a path: ``.parquet`` -> parquet, ``.tar`` -> webdataset,
    a directory by what it holds (Parquet files win over tars, tars over images).

    Raises:
        FileNotFoundError: nothing at ``input_uri``.
        ValueError: a directory holding none of the three.
    """
    import pyarrow.fs as pafs

    fs, path = resolve(input_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"corpus input {input_uri} does not exist")
    if info.type == pafs.FileType.File:
        ext = _ext(path)
        if ext == "parquet":
            return "parquet"
        if ext == "tar":
            return "webdataset"
        raise ValueError(f"cannot tell the format of {input_uri}: give input_format")
    exts = {_ext(p) for p, _ in _list_files(fs, path)}
    if "parquet" in exts:
        return "parquet"
    if "tar" in exts:
        return "webdataset"
    if exts & set(IMAGE_EXTS):
        return "folder"
    raise ValueError(f"{input_uri} holds no .parquet, .tar or image files "
                     f"(found extensions {sorted(exts)[:10]})")


def _inputs(input_uri: str, ext: str) -> tuple[pafs.FileSystem, str, list[tuple[str, int]]]:
    """(fs, root, files with extension ``ext``) for a file or a directory."""
    import pyarrow.fs as pafs

    fs, path = resolve(input_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"corpus input {input_uri} does not exist")
    if info.type == pafs.FileType.File:
        return fs, posixpath.dirname(path), [(path, int(info.size or 0))]
    files = [(p, s) for p, s in _list_files(fs, path) if _ext(p) == ext]
    if not files:
        raise ValueError(f"no .{ext} files under {input_uri}")
    return fs, path, files


# --------------------------------------------------------------------------- planning

def plan_parquet(input_uri: str, rows_per_shard: int) -> list[Shard]:
    """Row-range shards over every Parquet file (footers only, no data read).

    Raises:
        FileNotFoundError: missing input.
        ValueError: a file without ``id`` or without ``image``/``uri`` (names its columns).
    """
    import pyarrow.parquet as pq

    fs, root, files = _inputs(input_uri, "parquet")
    shards = []
    for path, size in files:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
        names = schema.names
        check_corpus_schema(schema, path)
        image_col = "image" if "image" in names else "uri"
        columns = ("id", image_col) + (("caption",) if "caption" in names else ())
        rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        for start in range(0, meta.num_rows, rows_per_shard):
            stop = min(start + rows_per_shard, meta.num_rows)
            key = f"parquet:{rel}:{size}:{start}:{stop}"
            shards.append(Shard(_shard_id(f"{rel}@{start}", key), "parquet", root, (path,),
                                start=start, stop=stop, num_rows=stop - start, columns=columns))
    return shards


def plan_folder(input_uri: str, rows_per_shard: int) -> list[Shard]:
    """Chunks of ``rows_per_shard`` image files in sorted order; ``x.txt``/``x.json`` beside
    ``x.jpg`` is its caption. Ids are paths relative to the folder.

    Raises:
        FileNotFoundError: missing input.
        ValueError: no image files.
    """
    import pyarrow.fs as pafs

    fs, path = resolve(input_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"corpus input {input_uri} does not exist")
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"folder corpus {input_uri} is not a directory")
    files = _list_files(fs, path)
    rels = [(posixpath.relpath(p, path), s) for p, s in files]
    side = {posixpath.splitext(r)[0]: r for r, _ in rels if _ext(r) in CAPTION_EXTS}
    images = [(r, s) for r, s in rels if _ext(r) in IMAGE_EXTS]
    if not images:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTS)}) under {input_uri}")
    shards = []
    for i in range(0, len(images), rows_per_shard):
        chunk = images[i:i + rows_per_shard]
        key = "files:" + "\n".join(f"{r}:{s}" for r, s in chunk)
        caps = tuple(side.get(posixpath.splitext(r)[0], "") for r, _ in chunk)
        shards.append(Shard(_shard_id(f"files-{i // rows_per_shard:06d}", key), "files", path,
                            tuple(r for r, _ in chunk), captions=caps, num_rows=len(chunk)))
    return shards


def plan_webdataset(input_uri: str) -> list[Shard]:
    """One shard per ``.tar`` (row count unknown until read).

    Raises:
        FileNotFoundError: missing input.
        ValueError: no tar files.
    """
    fs, root, files = _inputs(input_uri, "tar")
    shards = []
    for path, size in files:
        rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        shards.append(Shard(_shard_id(rel, f"tar:{rel}:{size}"), "tar", root, (path,)))
    return shards


class Skipped(NamedTuple):
    """An input file that is not read as data, and why (``hidden``, ``not_an_image`` ...)."""

    path: str
    reason: str


class CorpusPlan(NamedTuple):
    """Every file of an input, accounted for.

    Attributes:
        format: ``parquet``, ``folder`` or ``webdataset``.
        shards: the data, in resumable units (:func:`plan_shards`).
        files: how many files the input holds (hidden ones included).
        captions: caption sidecars used as captions (folder corpora).
        skipped: the other files, each with its reason.
    """

    format: str
    shards: list[Shard]
    files: int
    captions: int
    skipped: list[Skipped]

    def data_files(self) -> int:
        """Files the shards read: images (folders), Parquet files, tars."""
        return self.files - self.captions - len(self.skipped)


def _skip_reason(rel: str, fmt: str, captioned: set[str]) -> str:
    """Why a file under the input is not data ('' when it is data or a used caption)."""
    ext = _ext(rel)
    if any(part.startswith((".", "_")) for part in rel.split("/")):
        return "hidden: names starting with '.' or '_' are not corpus files"
    if fmt == "folder":
        if ext in IMAGE_EXTS:
            return ""
        if ext in CAPTION_EXTS:
            return "" if posixpath.splitext(rel)[0] in captioned else \
                "caption_without_image: no image file has this name"
        return f"not_an_image: extension {('.' + ext) if ext else '(none)'} is none of " \
               f"{', '.join(IMAGE_EXTS)}"
    want = "parquet" if fmt == "parquet" else "tar"
    return "" if ext == want else f"not_{want}: a {fmt} corpus reads only .{want} files"


def plan_corpus(input_uri: str, input_format: Format = "auto",
                rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> CorpusPlan:
    """:func:`plan_shards`, plus every other file of the input with the reason it is not read,
    so a job's counts add up to the input: data rows (embedded or failed) + caption sidecars
    + skipped files = files (for folders, where one image file is one row).

    Raises:
        as :func:`plan_shards`.
    """
    import pyarrow.fs as pafs

    fmt = detect_format(input_uri) if input_format == "auto" else input_format
    shards = plan_shards(input_uri, fmt, rows_per_shard)
    fs, path = resolve(input_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return CorpusPlan(fmt, shards, 1, 0, [])
    rels = [posixpath.relpath(p, path) for p, _ in _list_files(fs, path, hidden=True)]
    images = {posixpath.splitext(r)[0] for r in rels
              if _ext(r) in IMAGE_EXTS and not _skip_reason(r, fmt, set())}
    skipped, captions = [], 0
    for r in rels:
        why = _skip_reason(r, fmt, images)
        if why:
            skipped.append(Skipped(r, why))
        elif fmt == "folder" and _ext(r) in CAPTION_EXTS:
            captions += 1
    return CorpusPlan(fmt, shards, len(rels), captions, skipped)


def plan_shards(input_uri: str, input_format: Format = "auto",
                rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> list[Shard]:
    """Enumerate a corpus into deterministic shards (see the module docstring).

    Raises:
        FileNotFoundError: nothing at ``input_uri``.
        ValueError: wrong schema, no usable files, or an unknown format.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    fmt = detect_format(input_uri) if input_format == "auto" else input_format
    if fmt == "parquet":
        shards = plan_parquet(input_uri, rows_per_shard)
    elif fmt == "folder":
        shards = plan_folder(input_uri, rows_per_shard)
    elif fmt == "webdataset":
        shards = plan_webdataset(input_uri)
    else:
        raise ValueError(f"unknown input_format {input_format!r}: auto|parquet|folder|webdataset")
    ids = [s.shard_id for s in shards]
    if len(set(ids)) != len(ids):  # a hash collision on 40 bits, or a bug
        raise RuntimeError("shard ids are not unique")
    return shards


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

    def __init__(self, root: str, threads: int = 16) -> None:
        self.root = root
        self.threads = threads
        self._fs: dict[str, pafs.FileSystem] = {}

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


def _iter_parquet(shard: Shard, rows: _Rows) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    fs, _ = resolve(shard.root)
    path = shard.paths[0]
    fetcher = _Fetcher(shard.root) if "uri" in shard.columns else None
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


def _iter_files(shard: Shard, rows: _Rows) -> Iterator[pa.Table]:
    fs, _ = resolve(shard.root)
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


def _iter_tar(shard: Shard, rows: _Rows) -> Iterator[pa.Table]:
    fs, _ = resolve(shard.root)
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


def iter_shard(shard: Shard, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.Table]:
    """Stream a shard's rows as Arrow tables (:func:`raw_schema`) of at most ``batch_rows``.

    The last table's rows carry ``shard_total`` = the number of rows the shard produced; a
    shard that produces nothing yields one failure row (``empty_shard``), so every shard ends
    with a count. Errors reading single items become failure rows; none is raised.
    """
    import pyarrow as pa

    rows = _Rows(shard, batch_rows)
    gen = {"parquet": _iter_parquet, "files": _iter_files, "tar": _iter_tar}[shard.kind]
    pending: pa.Table | None = None
    for table in gen(shard, rows):
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
    """

    def __init__(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        self.batch_rows = batch_rows

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for text in batch.column("shard").to_pylist():
            yield from iter_shard(Shard.from_json(text), self.batch_rows)


def read_shards(shards: list[Shard], batch_rows: int = DEFAULT_BATCH_ROWS) -> ray.data.Dataset:
    """A Ray Data dataset of the raw rows of ``shards`` (one read task per shard)."""
    import ray.data

    if not shards:
        raise ValueError("no shards to read")
    items = [{"shard": s.to_json()} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(ReadShards(batch_rows), batch_size=1, batch_format="pyarrow")


def read_shard_columns(shard: Shard, columns: list[str]) -> pa.Table | None:
    """The given columns of a Parquet shard's rows, in shard order (None for other kinds).

    Used to carry extra corpus columns (``split`` ...) into outputs without streaming them
    through the pipeline; reads only the row groups the shard covers. Missing columns are left
    out; None when none is present.
    """
    import pyarrow.parquet as pq

    if shard.kind != "parquet":
        return None
    fs, _ = resolve(shard.root)
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
