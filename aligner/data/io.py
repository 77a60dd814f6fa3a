"""What every table shares: one Parquet file-or-directory reader and one atomic writer.

Every dataset here is a Parquet file or a directory of them (DESIGN of the data contracts:
``docs/architecture.md``). :func:`read_parquet` reads either; :func:`parquet_files` says which
files a directory holds (recursively, sorted; hidden ``.x``/``_x`` names and ``failures/``
directories are never data). Every file a job writes goes through :func:`atomic_write`
(a temp file in the same directory, then ``os.replace``), so a reader never sees half a file
and a crash leaves only a ``.*.tmp`` file that the next run can remove.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
        path: file or directory.
        what: the dataset's name, for error messages.
        preferred: a file name to read alone when a directory holds it
            (``queries.parquet`` in a rephrase output).
        columns: read only these columns (all must exist).

    Raises:
        FileNotFoundError: nothing at ``path``, or a directory without Parquet files.
        ValueError: a file that is not Parquet, or a missing column.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if preferred and p.is_dir() and (p / preferred).is_file():
        files = [p / preferred]
    else:
        files = parquet_files(p, what)
    if not files:
        raise FileNotFoundError(f"{what}: no Parquet files under {p}")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=list(columns) if columns else None))
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
