"""The evaluation results contract: ``metrics.json``, ``per_query.parquet``, ``rankings.parquet``.

An evaluation output directory holds (beside its report, config and manifest)::

    metrics.json        the metrics: systems, comparisons, verdict, frontier, teacher ...
                        (plain JSON: NaN and infinities are null)
    per_query.parquet   one row per held-out query:
                            query_id string, query string,
                            then one float64 column per "<system>/<metric>"
                            (e.g. "aligned/aesthetic@10", "base/precision@10"; NaN: unknown)
    rankings.parquet    what each system returned: one row per (query, system, rank):
                            query_id string, query string, system string,
                            rank int16 (1 = best), image_id string
                        (each system's top K on the held-out queries: what jobs.judge shows
                        its judge)

:func:`write_results` is the one writer (both files atomically), :func:`read_metrics` and
:func:`read_per_query` the readers, :func:`per_query_table` builds the table from per-system
arrays and :func:`per_query_arrays` turns it back into them; :func:`rankings_table`,
:func:`write_rankings`, :func:`read_rankings` and :func:`ranked_ids` do the same for the
rankings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from aligner.data.io import atomic_write_json, atomic_write_table, read_parquet

METRICS_FILE = "metrics.json"
PER_QUERY_FILE = "per_query.parquet"
RANKINGS_FILE = "rankings.parquet"
RANKINGS_SCHEMA = pa.schema([("query_id", pa.string()), ("query", pa.string()),
                             ("system", pa.string()), ("rank", pa.int16()),
                             ("image_id", pa.string())])
#: The fixed leading columns of ``per_query.parquet``; every other column is float64.
PER_QUERY_KEYS = pa.schema([("query_id", pa.string()), ("query", pa.string())])
SEPARATOR = "/"


def per_query_schema(columns: Sequence[str]) -> pa.Schema:
    """The schema of a per-query table with these ``"<system>/<metric>"`` columns."""
    fields = list(PER_QUERY_KEYS)
    for c in columns:
        if SEPARATOR not in c:
            raise ValueError(f"per-query column {c!r} is not '<system>/<metric>'")
        fields.append(pa.field(c, pa.float64()))
    return pa.schema(fields)


def per_query_table(query_ids: Sequence[str], queries: Sequence[str],
                    per_system: Mapping[str, Mapping[str, np.ndarray]]) -> pa.Table:
    """The per-query table from ``{system: {metric: values [Q]}}`` (columns in the mappings'
    order).

    Raises:
        ValueError: an array whose length is not the number of queries, or a name holding
            the separator ``/``.
    """
    n = len(query_ids)
    if len(queries) != n:
        raise ValueError(f"{len(queries)} query texts for {n} query ids")
    cols: dict[str, Any] = {"query_id": list(query_ids), "query": list(queries)}
    for system, metrics in per_system.items():
        if SEPARATOR in system:
            raise ValueError(f"system name {system!r} may not contain {SEPARATOR!r}")
        for metric, values in metrics.items():
            v = np.asarray(values, np.float64)
            if v.shape != (n,):
                raise ValueError(f"{system}/{metric}: shape {v.shape}, expected ({n},)")
            cols[f"{system}{SEPARATOR}{metric}"] = v
    return pa.table(cols, schema=per_query_schema(list(cols)[2:]))


def per_query_arrays(table: pa.Table) -> dict[str, dict[str, np.ndarray]]:
    """``{system: {metric: float64 [Q]}}`` from a per-query table (the inverse of
    :func:`per_query_table`)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in table.column_names[2:]:
        system, _, metric = name.partition(SEPARATOR)
        out.setdefault(system, {})[metric] = np.asarray(
            table[name].to_numpy(zero_copy_only=False), np.float64)
    return out


def check_per_query(table: pa.Table, where: str = "per-query table") -> None:
    """Raise ValueError unless ``table`` follows the per-query schema."""
    if table.column_names[:2] != PER_QUERY_KEYS.names:
        raise ValueError(f"{where}: the first columns must be {PER_QUERY_KEYS.names}, "
                         f"found {table.column_names[:2]}")
    for f in table.schema:
        if f.name in PER_QUERY_KEYS.names:
            if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
                raise ValueError(f"{where}: column {f.name!r} must be a string, not {f.type}")
        elif SEPARATOR not in f.name or not pa.types.is_floating(f.type):
            raise ValueError(f"{where}: column {f.name!r} must be a float '<system>/<metric>'")


def write_results(out_dir: str | Path, metrics: Mapping[str, Any], per_query: pa.Table) -> dict[
        str, Path]:
    """Write ``metrics.json`` (through :func:`aligner.data.io.json_safe`) and
    ``per_query.parquet`` into ``out_dir``, each atomically; returns their paths.

    Raises:
        ValueError: ``per_query`` does not follow the per-query schema.
    """
    out = Path(out_dir)
    check_per_query(per_query, f"{out / PER_QUERY_FILE}")
    atomic_write_json(out / METRICS_FILE, dict(metrics), indent=2)
    atomic_write_table(per_query, out / PER_QUERY_FILE)
    return {"metrics": out / METRICS_FILE, "per_query": out / PER_QUERY_FILE}


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The metrics of an evaluation output (a directory, or its ``metrics.json``).

    Raises:
        FileNotFoundError: no ``metrics.json``.
        ValueError: not a JSON object.
    """
    p = Path(path)
    f = p / METRICS_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} at {p}: is this an evaluation output?")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{f} does not hold a JSON object")
    return data


def read_per_query(path: str | Path) -> pa.Table:
    """The per-query table of an evaluation output (a directory, or the file), checked.

    Raises:
        FileNotFoundError: no ``per_query.parquet``.
        ValueError: not Parquet, or not the per-query schema.
    """
    p = Path(path)
    f = p / PER_QUERY_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no {PER_QUERY_FILE} at {p}: is this an evaluation output?")
    t = read_parquet(f, "per-query table")
    check_per_query(t, str(f))
    return t


def rankings_table(query_ids: Sequence[str], queries: Sequence[str],
                   tops: Mapping[str, Sequence[Sequence[str]]]) -> pa.Table:
    """The rankings table from ``{system: per query, its image ids best first}`` (systems in
    the mapping's order, then queries, then ranks).

    Raises:
        ValueError: a system with a number of rows other than the number of queries, or
            query texts that do not match the ids.
    """
    n = len(query_ids)
    if len(queries) != n:
        raise ValueError(f"{len(queries)} query texts for {n} query ids")
    cols: dict[str, list[Any]] = {name: [] for name in RANKINGS_SCHEMA.names}
    for system, rows in tops.items():
        if len(rows) != n:
            raise ValueError(f"rankings of {system}: {len(rows)} rows for {n} queries")
        for qid, text, ids in zip(query_ids, queries, rows, strict=True):
            for rank, image_id in enumerate(ids, start=1):
                cols["query_id"].append(qid)
                cols["query"].append(text)
                cols["system"].append(system)
                cols["rank"].append(rank)
                cols["image_id"].append(str(image_id))
    return pa.table({k: pa.array(v, RANKINGS_SCHEMA.field(k).type) for k, v in cols.items()},
                    schema=RANKINGS_SCHEMA)


def check_rankings(table: pa.Table, where: str = "rankings table") -> None:
    """Raise ValueError unless ``table`` has the rankings columns (types included), no empty
    ids and ranks from 1, unique within each (query, system)."""
    for f in RANKINGS_SCHEMA:
        if f.name not in table.column_names:
            raise ValueError(f"{where}: missing column {f.name!r} (the rankings schema is "
                             f"{RANKINGS_SCHEMA.names}, found {table.column_names})")
        t = table.schema.field(f.name).type
        ok = pa.types.is_integer(t) if f.name == "rank" else (
            pa.types.is_string(t) or pa.types.is_large_string(t))
        if not ok:
            raise ValueError(f"{where}: column {f.name!r} has type {t}, expected {f.type}")
    for c in ("query_id", "system", "image_id"):
        empty = sum(1 for v in table.column(c).to_pylist() if not v)
        if empty:
            raise ValueError(f"{where}: {empty} rows with an empty or null {c!r}")
    seen: set[tuple[str, str, int]] = set()
    for key in zip(table.column("query_id").to_pylist(), table.column("system").to_pylist(),
                   table.column("rank").to_pylist(), strict=True):
        if key[2] is None or key[2] < 1:
            raise ValueError(f"{where}: rank {key[2]!r} of {key[:2]} is not >= 1")
        if key in seen:
            raise ValueError(f"{where}: rank {key[2]} appears twice for query {key[0]!r}, "
                             f"system {key[1]!r}")
        seen.add(key)


def write_rankings(table: pa.Table, out_dir: str | Path) -> Path:
    """Check and write ``out_dir/rankings.parquet`` atomically; returns its path."""
    path = Path(out_dir) / RANKINGS_FILE
    check_rankings(table, str(path))
    atomic_write_table(table.select(RANKINGS_SCHEMA.names), path)
    return path


def read_rankings(path: str | Path) -> pa.Table:
    """The rankings of an evaluation output (a directory, or the file), checked.

    Raises:
        FileNotFoundError: no ``rankings.parquet`` (an evaluation from before rankings were
            written: run jobs.evaluate again).
        ValueError: not Parquet, or not the rankings schema.
    """
    p = Path(path)
    f = p / RANKINGS_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no {RANKINGS_FILE} at {p}: is this an evaluation output? "
                                "(evaluations before rankings were written need a re-run)")
    t = read_parquet(f, "rankings table")
    check_rankings(t, str(f))
    return t


def ranked_ids(table: pa.Table, system: str) -> dict[str, tuple[str, list[str]]]:
    """``{query_id: (query, image ids best first)}`` of one system in a rankings table.

    Raises:
        KeyError: the system is not in the table (the message lists those that are).
    """
    systems = table.column("system").to_pylist()
    if system not in set(systems):
        raise KeyError(f"system {system!r} is not in the rankings (has "
                       f"{sorted(set(systems))})")
    rows: dict[str, list[tuple[int, str]]] = {}
    texts: dict[str, str] = {}
    for qid, q, s, r, i in zip(table.column("query_id").to_pylist(),
                               table.column("query").to_pylist(), systems,
                               table.column("rank").to_pylist(),
                               table.column("image_id").to_pylist(), strict=True):
        if s == system:
            rows.setdefault(qid, []).append((r, i))
            texts[qid] = q
    return {qid: (texts[qid], [i for _, i in sorted(v)]) for qid, v in rows.items()}
