"""The queries contract: search queries, and the same table with their rephrasings.

A queries table is a Parquet file, or a directory holding ``queries.parquet`` (or Parquet
files), with::

    query_id string (unique), query string,
    split string (optional: train / val / test), kind string (optional: content / paraphrase)

The rephrase job writes the same rows plus :data:`REPHRASED_COLUMNS`::

    rephrased string, rephraser string (back end / model / prompt version),
    fallback bool (the template answered), fallback_reason string

:func:`read_queries` is the one reader (checks, split / kind filters, a limit);
:func:`query_splits` maps ids to splits for training; :func:`read_rephrasings` looks up the
rephrasing of given queries; :func:`write_queries` writes either table.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from aligner.data.io import atomic_write_table, exists_at, read_parquet

log = logging.getLogger(__name__)

QUERIES_FILE = "queries.parquet"
QUERIES_SCHEMA = pa.schema([("query_id", pa.string()), ("query", pa.string()),
                            ("split", pa.string()), ("kind", pa.string())])
REPHRASED_COLUMNS = ("rephrased", "rephraser", "fallback", "fallback_reason")
REQUIRED = ("query_id", "query")


def read_queries(path: str | Path, splits: Sequence[str] = (), kinds: Sequence[str] = (),
                 limit: int = 0, require: Sequence[str] = ()) -> pa.Table:
    """A queries table, checked, optionally filtered to ``splits`` / ``kinds`` and cut to the
    first ``limit`` rows (input order is kept).

    Args:
        path: a Parquet file, or a directory (its ``queries.parquet`` when present); a local
            path or an ``s3://`` / ``gs://`` URI.
        splits, kinds: keep rows whose ``split`` / ``kind`` is one of these (the column must
            exist when a filter is given).
        limit: first N rows after the filters (0: all).
        require: further columns that must be present (``rephrased`` ...).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: not Parquet, a missing or non-string ``query_id`` / ``query``, a filter on
            an absent column, or duplicate ``query_id`` values.
    """
    t = read_parquet(path, "queries", preferred=QUERIES_FILE)
    missing = [c for c in (*REQUIRED, *require) if c not in t.column_names]
    if missing:
        raise ValueError(f"queries {path}: a queries table needs columns "
                         f"{[*REQUIRED, *require]}; missing {missing} (it has {t.column_names})")
    for col in REQUIRED:
        tp = t.schema.field(col).type
        if not (pa.types.is_string(tp) or pa.types.is_large_string(tp)):
            raise ValueError(f"queries {path}: column {col!r} must be a string, not {tp}")
    if pc.count_distinct(t["query_id"]).as_py() != t.num_rows:
        raise ValueError(f"queries {path}: query_id values are not unique")
    t = filter_queries(t, splits, kinds, where=f"queries {path}")
    if limit > 0:
        t = t.slice(0, limit)
    return t


def filter_queries(t: pa.Table, splits: Sequence[str] = (), kinds: Sequence[str] = (),
                   where: str = "queries") -> pa.Table:
    """Rows whose ``split`` / ``kind`` is one of the given values (order kept; no filter for
    an empty list).

    Raises:
        ValueError: a filter on a column the table does not have.
    """
    for name, values in (("split", splits), ("kind", kinds)):
        if not values:
            continue
        if name not in t.column_names:
            raise ValueError(f"{where}: filter {name}s={list(values)} but the table has "
                             f"no {name!r} column")
        t = t.filter(pc.is_in(t[name], pa.array(list(values), pa.string())))
    return t


def query_splits(path: str | Path | None, query_ids: Sequence[str], val_fraction: float,
                 seed: int) -> dict[str, str]:
    """Each query id's split: the table's ``split`` column where it has one, else a seeded
    hash (``val`` for a ``val_fraction`` of ids, ``train`` for the rest). ``path`` (a local
    path or a URI) may be empty or name nothing: every id is then hashed."""
    split: dict[str, str] = {}
    if path and exists_at(path):
        t = read_queries(path)
        if "split" in t.column_names:
            split = dict(zip(t["query_id"].to_pylist(), t["split"].to_pylist(), strict=True))
    for q in query_ids:
        if q not in split:
            h = zlib.crc32(f"{seed}:{q}".encode()) / 2**32
            split[q] = "val" if h < val_fraction else "train"
    return split


def read_rephrasings(path: str | Path, query_ids: Sequence[str],
                     texts: Sequence[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """``query_id -> rephrased`` for the given queries, and counts (used, missing, duplicate
    rows, rows whose query text differs from ``texts``: a rephrasing of another query is never
    used).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_queries`, or no ``rephrased`` column.
    """
    t = read_queries_lenient(path, require=("rephrased",))
    rows = t.select([c for c in ("query_id", "query", "rephrased")
                     if c in t.column_names]).to_pylist()
    table: dict[str, str] = {}
    dup = mismatch = 0
    wanted = dict(zip(query_ids, texts, strict=True))
    for r in rows:
        qid = r["query_id"]
        if qid not in wanted:
            continue
        if qid in table:
            dup += 1
            continue
        if r.get("query") is not None and r["query"] != wanted[qid]:
            mismatch += 1
            continue
        if r["rephrased"]:
            table[qid] = r["rephrased"]
    counts = {"rows": len(rows), "used": len(table), "missing": len(set(query_ids) - set(table)),
              "duplicates": dup, "query_text_mismatch": mismatch}
    if counts["missing"]:
        log.warning("rephrase: %d of %d queries have no rephrasing (%d whose text differs)",
                    counts["missing"], len(query_ids), mismatch)
    return table, counts


def read_queries_lenient(path: str | Path, require: Sequence[str] = ()) -> pa.Table:
    """A table with ``query_id`` (and ``require``), duplicates allowed (counted by callers)."""
    t = read_parquet(path, "queries", preferred=QUERIES_FILE)
    need = [c for c in ("query_id", *require) if c not in t.column_names]
    if need:
        raise ValueError(f"queries {path} lacks columns {need} (has {t.column_names})")
    return t


def write_queries(table: pa.Table, path: str | Path) -> None:
    """Write a queries (or rephrased queries) table atomically, checked against the contract."""
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"a queries table needs columns {list(REQUIRED)}; missing {missing}")
    atomic_write_table(table, path)
