"""The corpus contract: what an image corpus is, and reading it by table, by id or by shard.

A corpus is a Parquet file or directory with::

    id string (unique), image binary (encoded JPEG/PNG/WebP/GIF/TIFF/BMP bytes)
                        or uri string (a path or s3:// / gs:// URI of such a file),
    caption string (optional), split string (optional: train / val / test)

(:data:`CORPUS_SCHEMA` is the built-in world's exact layout), an image folder tree (ids are
paths relative to the folder, ``x.txt`` / ``x.json`` beside ``x.jpg`` is its caption), or
WebDataset tars (ids are sample keys). Readers here: :func:`read_corpus` (a Parquet corpus as
a table, with pushed-down split / id filters), :func:`fetch_images` (the encoded bytes of some
ids from any of the three layouts), and the resumable shard reader the embedding job streams
(:mod:`aligner.data.corpus_shards`). :func:`write_corpus` writes a Parquet corpus file.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

log = logging.getLogger(__name__)

CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("caption", pa.string()),
                           ("split", pa.string())])
#: File extensions read as images (PIL decodes them; a multi-frame GIF / TIFF gives its first
#: frame). Other files in a folder corpus are listed as skipped, never dropped unseen.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp")
CAPTION_EXTS = ("txt", "json")


def check_corpus_schema(schema: pa.Schema, where: str) -> None:
    """Raise ValueError (naming the columns found) unless ``schema`` is a corpus: ``id`` and
    ``image`` (encoded bytes, or a Hugging Face ``{bytes, path}`` struct) or ``uri``."""
    names = schema.names
    if "id" not in names or not ({"image", "uri"} & set(names)):
        raise ValueError(
            f"{where}: a corpus needs an 'id' column and an 'image' (bytes) or 'uri' column; "
            f"found columns {names}")
    if "image" in names:
        t = schema.field("image").type
        ok = (pa.types.is_binary(t) or pa.types.is_large_binary(t)
              or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))
        if not ok:
            raise ValueError(f"{where}: column 'image' must hold encoded bytes (binary, or a "
                             f"struct with 'bytes' as Hugging Face writes it), not {t}")
    elif not (pa.types.is_string(schema.field("uri").type)
              or pa.types.is_large_string(schema.field("uri").type)):
        raise ValueError(f"{where}: column 'uri' must be a string, not {schema.field('uri').type}")


def _dataset(path: str | Path):
    """The Parquet corpus at a local path or a URI as a ``pyarrow.dataset`` (checked)."""
    import pyarrow.dataset as ds

    from aligner.data.io import filesystem, require_at

    require_at(path, "corpus")
    fs, root = filesystem(path)
    d = ds.dataset(root, filesystem=fs, format="parquet")
    check_corpus_schema(d.schema, str(path))
    return d


def corpus_columns(path: str | Path) -> list[str]:
    """The column names of a Parquet corpus (from the file footers; no rows are read).

    Raises:
        FileNotFoundError: nothing at ``path`` (or its bucket does not exist).
        ValueError: not a corpus (:func:`check_corpus_schema`), or an unsupported URI.
    """
    return list(_dataset(path).schema.names)


def read_corpus(path: str | Path, columns: Sequence[str] | None = None, split: str | None = None,
                ids: Sequence[str] | None = None) -> pa.Table:
    """A Parquet corpus (file or directory, local or URI) as one table.

    Args:
        columns: the columns to read (default all).
        split: only rows of this split (the corpus must have a ``split`` column).
        ids: only these ids (a pushed-down filter: a large corpus is never read whole).

    Raises:
        FileNotFoundError: nothing at ``path`` (or its bucket does not exist).
        ValueError: a missing column, not a corpus, or an unsupported URI.
    """
    import pyarrow.dataset as ds

    d = _dataset(path)
    want = list(columns) if columns else d.schema.names
    missing = [c for c in want + (["split"] if split else []) if c not in d.schema.names]
    if missing:
        raise ValueError(f"corpus {path} lacks column(s) {missing} (has {d.schema.names})")
    filt = None
    if split:
        filt = ds.field("split") == split
    if ids is not None:
        f_ids = ds.field("id").isin(list(dict.fromkeys(ids)))
        filt = f_ids if filt is None else filt & f_ids
    return d.to_table(columns=want, filter=filt)


def write_corpus(table: pa.Table, path: str | Path, row_group_size: int = 500) -> None:
    """Write a corpus Parquet file (atomically), checked against the contract."""
    from aligner.data.io import atomic_write_table

    check_corpus_schema(table.schema, str(path))
    atomic_write_table(table, path, row_group_size=row_group_size)


def is_safe_relative_path(rel: str) -> bool:
    """Whether a folder corpus id names a file inside the folder (no absolute path, no
    ``..`` component, no backslash or NUL): ids come from users and must not reach other
    files."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/") or "://" in rel:
        return False
    return all(part not in ("..", "") for part in rel.split("/"))


def fetch_images(corpus: str, ids: Sequence[str]) -> dict[str, bytes]:
    """Encoded image bytes for ``ids`` from a corpus (Parquet, folder tree or WebDataset tars).

    Parquet: rows are selected with a pushed-down ``id`` filter (never the whole corpus);
    a ``uri`` column is fetched through pyarrow filesystems. Folder: the id is the path
    relative to the folder (an id that would leave the folder is refused). WebDataset: tar
    members whose key is an id (a scan of the tars). Ids that cannot be found are left out of
    the result.
    """
    from aligner.data.corpus_plan import detect_format, resolve

    wanted = list(dict.fromkeys(i for i in ids if i))
    if not wanted:
        return {}
    fmt = detect_format(corpus)
    out: dict[str, bytes] = {}
    if fmt == "parquet":
        import pyarrow.dataset as ds

        fs, path = resolve(corpus)
        d = ds.dataset(path, filesystem=fs, format="parquet")
        cols = [c for c in ("id", "image", "uri") if c in d.schema.names]
        table = d.to_table(columns=cols, filter=ds.field("id").isin(wanted))
        for row in table.to_pylist():
            image = row.get("image")
            if isinstance(image, dict):  # Hugging Face Image(): {bytes, path}
                image = image.get("bytes")
            if image:
                out[row["id"]] = image
            elif row.get("uri"):
                try:
                    ufs, upath = resolve(row["uri"])
                    with ufs.open_input_file(upath) as f:
                        out[row["id"]] = f.read()
                except OSError as e:
                    log.warning("cannot fetch %s: %s", row["uri"], e)
    elif fmt == "folder":
        fs, root = resolve(corpus)
        for i in wanted:
            if not is_safe_relative_path(i):
                log.warning("id %r is not a path inside the corpus folder: not read", i)
                continue
            try:
                with fs.open_input_file(f"{root.rstrip('/')}/{i}") as f:
                    out[i] = f.read()
            except OSError as e:
                log.warning("cannot read %s/%s: %s", corpus, i, e)
    else:
        from aligner.data.corpus_plan import plan_webdataset
        from aligner.data.corpus_shards import split_key

        want = set(wanted)
        fs, _ = resolve(corpus)
        for shard in plan_webdataset(corpus):
            with fs.open_input_file(shard.paths[0]) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
                for member in tar:
                    key, ext = split_key(member.name)
                    if key in want and ext in IMAGE_EXTS and key not in out:
                        f = tar.extractfile(member)
                        if f is not None:
                            out[key] = f.read()
            if len(out) == len(want):
                break
    return out
