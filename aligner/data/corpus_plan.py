"""Planning a corpus read: every input file accounted for, the data cut into resumable shards.

:func:`plan_shards` enumerates the input, on the driver and before any Ray work, into
deterministic :class:`Shard` s: a row range of a Parquet file (``rows_per_shard`` rows), a
chunk of ``rows_per_shard`` image files in sorted path order, or one tar file. Each has a
stable ``shard_id`` (readable prefix + a hash of what it covers, incl. the file size, so a
rewritten file gets a new id) and its row count where that is cheap to know (Parquet footers,
file listings; not tars). :func:`plan_corpus` adds every other file of the input with the
reason it is not read (hidden, not an image, a caption without an image ...), so a job's
counts add up to the input. A missing input raises ``FileNotFoundError`` and a Parquet corpus
without ``id`` or without ``image``/``uri`` raises ``ValueError`` naming the columns it has,
before any work starts. :mod:`aligner.data.corpus_shards` reads the shards.

Why not Ray's built-in ``read_parquet`` / ``read_images`` / ``read_webdataset``: their read
tasks and blocks do not map to stable units we can mark as done, so a crash means starting
over; with our own shard descriptors the job records a shard as finished only after all its
rows are written, and a re-run reads only the pending ones. The price is that we do the
listing and footer reads ourselves (cheap) and a shard is the unit of parallelism (use
``rows_per_shard`` so there are several shards per CPU).

Corpora without ids get them from the path relative to the folder (``a/b.jpg``) or the tar
sample key (``000123``). Paths are local or any URI ``pyarrow.fs.FileSystem.from_uri`` knows
(``s3://``, ``gs://``, ``hdfs://``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    import pyarrow.fs as pafs

from aligner.data.corpus import CAPTION_EXTS, IMAGE_EXTS, check_corpus_schema

Format = Literal["auto", "parquet", "folder", "webdataset"]
DEFAULT_ROWS_PER_SHARD = 10_000


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


