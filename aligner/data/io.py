"""What every table shares: one Parquet file-or-directory reader and one atomic writer.

Every dataset here is a Parquet file or a directory of them (DESIGN of the data contracts:
``docs/architecture.md``). :func:`read_parquet` reads either; :func:`parquet_files` says which
files a directory holds (recursively, sorted; hidden ``.x``/``_x`` names and ``failures/``
directories are never data). Every file a job writes goes through :func:`atomic_write`
(a temp file in the same directory, then ``os.replace``), so a reader never sees half a file
and a crash leaves only a ``.*.tmp`` file that the next run can remove.

:class:`Store` is the same contract for writers that run on Ray workers and for outputs in
object storage: a directory given as a local path or an ``s3://`` / ``gs://`` URI
(:func:`filesystem`), written all-or-nothing through pyarrow filesystems.
:func:`parquet_files_at` is :func:`parquet_files` for a local path or a URI (readers that take
either: the embeddings, an index in object storage), and :func:`read_parquet` reads through it,
so every table reader built on it (queries, preferences, judgments, ratings, results) takes a
URI too. :func:`require_at` / :func:`exists_at` / :func:`is_dir_at` are the input checks that
work on both, and :func:`output_dir` lets a job that writes a few files at its end publish them
to a URI (staged locally, ``manifest.json`` uploaded last).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

FAILURES_DIR = "failures"
TMP_GLOB = ".*.tmp*"


def parquet_files(path: str | Path, what: str = "table") -> list[Path]:
    """The Parquet files of a dataset: ``[path]`` for a file, else every ``*.parquet`` below
    a directory (sorted), skipping hidden and ``_``-prefixed names and ``failures/``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith((".", "_")) and d != FAILURES_DIR)
        out += [Path(dirpath) / f for f in filenames
                if f.endswith(".parquet") and not f.startswith((".", "_"))]
    return sorted(out)


def read_parquet(path: str | Path, what: str = "table", preferred: str | None = None,
                 columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file, ``path/preferred`` when that file exists, or every file of a directory
    concatenated (schemas promoted; a column missing from one file is null there).

    Args:
        path: file or directory; a local path or an ``s3://`` / ``gs://`` URI (the same files
            in the same order: :func:`parquet_files_at`).
        what: the dataset's name, for error messages.
        preferred: a file name to read alone when a directory holds it
            (``queries.parquet`` in a rephrase output).
        columns: read only these columns (all must exist).

    Raises:
        FileNotFoundError: nothing at ``path`` (or its bucket does not exist), or a directory
            without Parquet files.
        ValueError: a file that is not Parquet, a missing column, or an unsupported URI.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    shown = shown_path(path)
    if preferred and is_dir_at(path) and file_exists(join_path(path, preferred)):
        fs, inner = filesystem(join_path(path, preferred))
        files = [(join_path(path, preferred), inner)]
    else:
        fs, files = parquet_files_at(path, what)
    if not files:
        raise FileNotFoundError(f"{what}: no Parquet files under {shown}")
    tables = []
    for f, inner in files:
        try:
            tables.append(pq.read_table(inner, filesystem=fs,
                                        columns=list(columns) if columns else None))
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{what}: {f} is not a readable Parquet file ({e})") from e
        except KeyError as e:
            raise ValueError(f"{what}: {f} lacks column {e}") from e
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` atomically, on an
    error it is removed. The temp name keeps the suffix (``.x.parquet.123.tmp.parquet``), so
    writers that look at it (numpy's ``.npy``) behave. The temp path may also be filled as a
    directory (a saved model); ``path`` must then not exist yet (``OSError`` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers never see a half-written one."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write ``data`` as JSON (numpy values converted, NaN/inf as null: :func:`json_safe`)."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=indent))


def atomic_write_table(table: pa.Table, path: str | Path, **kwargs: Any) -> None:
    """Write an Arrow table as Parquet, atomically (``kwargs`` go to ``pq.write_table``)."""
    import pyarrow.parquet as pq

    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def remove_temp_files(directory: str | Path) -> int:
    """Delete the temp files an interrupted :func:`atomic_write` left in ``directory``."""
    d = Path(directory)
    n = 0
    for p in d.glob(TMP_GLOB) if d.is_dir() else []:
        p.unlink(missing_ok=True)
        n += 1
    return n


def json_safe(o: Any) -> Any:
    """Plain JSON data: numpy scalars/arrays converted, NaN and infinities as null, anything
    else unknown as its ``str``."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if o is None or isinstance(o, (str, int, float, bool)):
        return o
    return str(o)


# --------------------------------------------------------------------------- local or object storage

OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs")


def filesystem(uri: str | Path) -> tuple[Any, str]:
    """A local path or an ``s3://`` / ``gs://`` URI -> (pyarrow filesystem, path inside it).

    Object stores go through ``pyarrow.fs.FileSystem.from_uri``, which takes credentials and
    the endpoint from the usual places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` ...,
    ``GOOGLE_APPLICATION_CREDENTIALS``); the resolved endpoint (and S3 credentials taken from
    the environment) travel with the filesystem when it is pickled to a Ray worker.

    Raises:
        ValueError: a URI whose scheme is not a local path, ``file://``, ``s3://`` or
            ``gs://``, or that names no bucket.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    text = str(uri)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    if scheme != "file" and scheme not in OBJECT_STORE_SCHEMES:
        raise ValueError(f"{text!r}: unsupported URI scheme {scheme!r} (use a local path, "
                         "file://, s3://bucket/prefix or gs://bucket/prefix)")
    if scheme != "file" and not rest.split("/", 1)[0]:
        raise ValueError(f"{text!r} names no bucket (expected {scheme}://bucket/prefix)")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{text!r} is not a usable URI: {e}") from e
    return _with_env_credentials(fs), path


def _with_env_credentials(fs: Any) -> Any:
    """An S3 filesystem that carries the driver's ``AWS_ACCESS_KEY_ID`` / ``..._SECRET_...`` /
    ``AWS_SESSION_TOKEN`` explicitly when they come from the environment, so a Ray worker that
    unpickles it needs no credentials of its own (and does not probe for them: that costs
    seconds per process where no instance metadata service answers)."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if fs.type_name != "s3" or not key or not secret:
        return fs
    rebuild, (opts,) = fs.__reduce__()
    if opts.get("access_key"):
        return fs
    opts = dict(opts, access_key=key, secret_key=secret,
                session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return rebuild(opts)


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` is a URI (``scheme://...``: ``s3://``, ``gs://``, ``file://``) rather
    than a local path."""
    return "://" in str(path)


def join_path(base: str | Path, *parts: str) -> Path | str:
    """``parts`` below ``base``: a ``Path`` for a local path (kept as given, relative or not),
    a ``/``-joined string for a URI. What messages and manifests show."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts if p]])
    return Path(base, *parts)


def file_exists(path: str | Path) -> bool:
    """Whether a file exists at a local path or a URI (False for a missing bucket too).

    Raises:
        ValueError: an unsupported URI (see :func:`filesystem`).
    """
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_text_at(path: str | Path) -> str | None:
    """A text file at a local path or a URI; None when there is none."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def shown_path(path: str | Path) -> Path | str:
    """How messages and manifests name a dataset: a ``Path`` for a local path (as given,
    relative or not), else the URI without a trailing ``/``."""
    return str(path).rstrip("/") if is_uri(path) else Path(path)


def _file_type(path: str | Path) -> Any:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type


def exists_at(path: str | Path) -> bool:
    """Whether anything (a file or a non-empty prefix) is at a local path or a URI (False for
    a missing bucket too)."""
    import pyarrow.fs as pafs

    return _file_type(path) != pafs.FileType.NotFound


def is_dir_at(path: str | Path) -> bool:
    """Whether a local path or a URI is a directory (on an object store: a prefix with
    objects below it)."""
    import pyarrow.fs as pafs

    return _file_type(path) == pafs.FileType.Directory


def require_at(path: str | Path, what: str, directory: bool = False) -> None:
    """The input check of a job: raise unless something is at ``path`` (a directory when
    ``directory``), naming it as ``"{what} {path} does not exist"``; on an object store a
    missing bucket is named as such (:meth:`Store.check`).

    Raises:
        FileNotFoundError: nothing (or no directory) at ``path``, or no bucket.
        ValueError: an unsupported URI.
    """
    if is_uri(path):
        Store(path).check(what)
    ok = is_dir_at(path) if directory else exists_at(path)
    if not ok:
        raise FileNotFoundError(f"{what} {shown_path(path)} does not exist")


@contextlib.contextmanager
def output_dir(uri: str | Path, last: str = "manifest.json") -> Iterator[Path]:
    """A job's output directory, for jobs that write a few files at their end.

    A local path: the directory itself (created), as a ``Path`` as given. A URI: a local temp
    directory; when the block ends without an error every file in it is uploaded to ``uri``
    (:meth:`Store.upload`, each all-or-nothing), the old ``last`` (the manifest) deleted first
    and the new one uploaded last, so a reader that goes by the manifest never sees a mix.
    Nothing is uploaded on an error. Files already at ``uri`` that this run does not write
    stay, as they would in a local directory.

    Raises:
        FileNotFoundError: (object stores) the bucket does not exist, checked on entry.
    """
    if not is_uri(uri):
        out = Path(uri)
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    store = Store(uri)
    store.check("output")
    with tempfile.TemporaryDirectory(prefix="aligner-output-") as d:
        yield Path(d)
        files = sorted(p.relative_to(d).as_posix() for p in Path(d).rglob("*") if p.is_file())
        store.delete(last)
        for rel in [f for f in files if f != last] + [f for f in files if f == last]:
            store.upload(Path(d) / rel, rel)


def _is_data(rel: str) -> bool:
    """The :func:`parquet_files` rule for a path relative to the dataset's root."""
    *dirs, name = rel.split("/")
    if any(d.startswith((".", "_")) or d == FAILURES_DIR for d in dirs):
        return False
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def parquet_files_at(path: str | Path, what: str = "table",
                     ) -> tuple[Any, list[tuple[Path | str, str]]]:
    """:func:`parquet_files` for a local path or an ``s3://`` / ``gs://`` URI.

    Returns:
        ``(filesystem, [(shown, path inside the filesystem), ...])``: ``shown`` is what
        messages and manifests name (a local ``Path`` as :func:`parquet_files` returns it, or
        the file's URI); the same files in the same order as :func:`parquet_files` for a
        local path (which it calls: ``os.walk`` does not follow linked directories).

    Raises:
        FileNotFoundError: nothing at ``path``, or its bucket does not exist.
        ValueError: an unsupported URI.
    """
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), [(f, str(f)) for f in parquet_files(path, what)]
    store = Store(path)
    store.check(what)
    shown = store.uri
    kind = store.fs.get_file_info(store.root).type
    if kind == pafs.FileType.File:
        return store.fs, [(shown, store.root)]
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what}: {shown} does not exist")
    names = [name for name, _ in store.list_files("", recursive=True) if _is_data(name)]
    names.sort(key=lambda n: n.split("/"))  # the order of local Paths: part by part
    return store.fs, [(join_path(shown, n), store.path(n)) for n in names]


class Store:
    """A directory on a local disk or in an object store, for writers that run anywhere.

    Picklable (the pyarrow filesystem is), so a Ray task can be handed one and write beside
    the driver. Writes are all-or-nothing: on a local disk through a temp file and
    ``os.replace`` (as :func:`atomic_write`); on an object store a single upload, which the
    store makes visible only once complete. A tree is deleted with one batch call where the
    store has it, else file by file.

    Args:
        uri: local path, ``file://``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.
    """

    def __init__(self, uri: str | Path) -> None:
        self.uri = str(uri).rstrip("/") or "/"
        self.fs, self.root = filesystem(self.uri)
        self.root = self.root.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    def local_path(self) -> Path | None:
        """The directory as a local ``Path`` (None on an object store)."""
        return Path(self.root) if self.is_local else None

    def path(self, *parts: str) -> str:
        """The path of ``parts`` inside the filesystem."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri_of(self, *parts: str) -> str:
        """``parts`` as a URI (or local path) that :class:`Store` accepts."""
        return "/".join([self.uri, *[p.strip("/") for p in parts if p]])

    def sub(self, *parts: str) -> Store:
        """A store for a subdirectory."""
        return Store(self.uri_of(*parts))

    def check(self, what: str = "output") -> None:
        """Fail early on an object store whose bucket does not exist (or cannot be reached).

        Raises:
            FileNotFoundError: the bucket does not exist.
            PermissionError / OSError: the store refuses or cannot be reached (as pyarrow says).
        """
        import pyarrow.fs as pafs

        if self.is_local:
            return
        bucket = self.root.split("/", 1)[0]
        if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{what} {self.uri}: bucket {bucket!r} does not exist "
                                    "(create it first)")

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list_files(self, rel: str = "", suffix: str = "", recursive: bool = False,
                   ) -> list[tuple[str, int]]:
        """``(path relative to rel, size)`` of the files in ``rel`` ending in ``suffix``,
        sorted; names starting with ``.`` (temp files) are left out. ``[]`` when ``rel`` does
        not exist."""
        import pyarrow.fs as pafs

        base = self.path(rel)
        sel = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        out = []
        for info in self.fs.get_file_info(sel):
            name = info.path[len(base):].lstrip("/")
            if info.type != pafs.FileType.File or not name.endswith(suffix):
                continue
            if any(part.startswith(".") for part in name.split("/")):
                continue
            out.append((name, int(info.size or 0)))
        return sorted(out)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str | None:
        """A text file, or None when it does not exist."""
        return self.read_bytes(rel).decode("utf-8") if self.is_file(rel) else None

    def read_table(self, rel: str, columns: Sequence[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self.path(rel), filesystem=self.fs,
                             columns=list(columns) if columns else None)

    def num_rows(self, rel: str) -> int:
        """Rows of a Parquet file, from its footer."""
        import pyarrow.parquet as pq

        with self.fs.open_input_file(self.path(rel)) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file all-or-nothing (see the class docstring)."""
        if self.is_local:
            with atomic_write(self.path(rel)) as tmp:
                tmp.write_bytes(data)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_table(self, rel: str, table: pa.Table, **kwargs: Any) -> None:
        """Write an Arrow table as Parquet, all-or-nothing (``kwargs``: ``pq.write_table``)."""
        import pyarrow.parquet as pq

        if self.is_local:
            atomic_write_table(table, self.path(rel), **kwargs)
            return
        import pyarrow as pa

        buf = pa.BufferOutputStream()  # serialised first: an error here uploads nothing
        pq.write_table(table, buf, **kwargs)
        self.write_bytes(rel, buf.getvalue().to_pybytes())

    def delete(self, rel: str) -> bool:
        """Delete a file; False when there was none."""
        if not self.is_file(rel):
            return False
        self._delete_file(self.path(rel))
        return True

    def _delete_file(self, path: str) -> None:
        import pyarrow.fs as pafs

        try:
            self.fs.delete_file(path)
        except OSError:
            # pyarrow's S3 client re-creates an emptied parent as a ``dir/`` marker object
            # after the delete; servers that refuse such keys fail only that second step.
            if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                raise

    def delete_tree(self, rel: str) -> int:
        """Delete every file under ``rel`` (temp files included) and the directory; returns
        how many files."""
        import pyarrow.fs as pafs

        base = self.path(rel)
        if self.is_local:
            n = sum(len(files) for _, _, files in os.walk(base))
            shutil.rmtree(base, ignore_errors=True)
            return n
        infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True,
                                                        recursive=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File]
        if not files:
            return 0
        try:
            self.fs.delete_dir(base)  # one batch call (DeleteObjects) on S3, GCS, MinIO
            return len(files)
        except OSError:
            pass  # a server without the batch call: file by file
        for p in files:
            self._delete_file(p)
        return len(files)

    def remove_temp_files(self, rel: str) -> int:
        """Local disks: the temp files an interrupted write left in ``rel`` (object stores
        have none: an unfinished upload is never visible)."""
        return remove_temp_files(self.path(rel)) if self.is_local else 0

    @contextlib.contextmanager
    def writing(self, rel: str) -> Iterator[Path]:
        """Yield a local path to fill (a file); when the block ends without an error it
        becomes ``rel``, all-or-nothing: on a local disk through :func:`atomic_write`, on an
        object store one :meth:`upload` of a local temp file. Nothing is written on an error.
        """
        if self.is_local:
            with atomic_write(self.path(rel)) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory(prefix="aligner-upload-") as d:
            tmp = Path(d) / Path(rel).name
            yield tmp
            self.upload(tmp, rel)

    def upload(self, local: str | Path, rel: str) -> int:
        """Copy a local file to ``rel``, all-or-nothing; returns its size in bytes.

        On a local disk through a temp file and ``os.replace``; on an object store one write
        of the whole file from a memory map (no copy in process memory), which the store makes
        visible only once complete. As with :meth:`write_bytes`, the whole file goes in one
        call: pyarrow's S3 stream completes whatever it was given when it is closed, so a
        Python error between two writes would publish a partial object; one write leaves no
        such gap (with S3's default background writes, a failed part upload fails the close
        rather than completing the object).
        """
        import pyarrow as pa

        size = os.path.getsize(local)
        if self.is_local:
            with atomic_write(self.path(rel)) as tmp:
                shutil.copyfile(local, tmp)
            return size
        if not size:
            self.write_bytes(rel, b"")
            return 0
        with pa.memory_map(str(local)) as src, self.fs.open_output_stream(self.path(rel)) as f:
            f.write(src.read_buffer())
        return size

    def download(self, rel: str, local: str | Path, chunk: int = 8 << 20) -> int:
        """Copy ``rel`` to a local file, all-or-nothing: streamed into a uniquely named temp
        file beside it (``.<name>.*.tmp``, so threads and processes never share one), then
        ``os.replace``. Returns the bytes copied.

        Raises:
            FileNotFoundError: no file at ``rel``.
        """
        local = Path(local)
        if not self.is_file(rel):
            raise FileNotFoundError(f"{self.uri_of(rel)} does not exist")
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
        n = 0
        try:
            with os.fdopen(fd, "wb") as out, self.fs.open_input_stream(self.path(rel)) as src:
                while block := src.read(chunk):
                    out.write(block)
                    n += len(block)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return n

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"
