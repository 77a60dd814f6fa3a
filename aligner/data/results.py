"""The evaluation results contract: ``metrics.json`` and ``per_query.parquet``.

An evaluation output directory holds (beside its report, config and manifest)::

    metrics.json        the metrics: systems, comparisons, verdict, frontier, teacher ...
                        (plain JSON: NaN and infinities are null)
    per_query.parquet   one row per held-out query:
                            query_id string, query string,
                            then one float64 column per "<system>/<metric>"
                            (e.g. "aligned/aesthetic@10", "base/precision@10"; NaN: unknown)

:func:`write_results` is the one writer (both files atomically), :func:`read_metrics` and
:func:`read_per_query` the readers, :func:`per_query_table` builds the table from per-system
arrays and :func:`per_query_arrays` turns it back into them.
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
