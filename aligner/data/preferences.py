"""The preferences contract: its schema, the one reader (checked) and the writer.

Schema (the required columns, then diagnostics that the builder fills where it can)::

    query_id string, query string, chosen_id string, rejected_id string,
    source string (grid / degraded / human / lmm / ...), weight float32,
    rephrased string, teacher string, kind string (degradation kind, "" otherwise),
    chosen_sem float32, rejected_sem float32      cosine to the original query
    chosen_aes float32, rejected_aes float32      the teacher's combined z-score in the pool
    chosen_cell int16, rejected_cell int16        grid cell as row * v + column (-1: none)
    aspect string                                 the aspect an LMM annotator rated
                                                  (prompt_following, aesthetics ...; "" else)

``chosen_id`` / ``rejected_id`` are corpus ids, or degraded ids (``"<id>~<kind>"``,
:mod:`aligner.preferences.degrade`) whose pixels a trainer makes from the original. Tables from
elsewhere (human votes, LMM labels) need only the required columns; :func:`read_preferences`
checks and conforms any of them. The clean-up passes (weights, dedupe, contradictions, caps)
are :mod:`aligner.preferences.clean`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from aligner.data.io import (
    atomic_write_table,
    is_dir_at,
    join_path,
    read_parquet,
    read_text_at,
    shown_path,
)

PREFERENCES_FILE = "preferences.parquet"
REQUIRED_COLUMNS = ("query_id", "query", "chosen_id", "rejected_id", "source", "weight")
DIAGNOSTIC_COLUMNS = ("rephrased", "teacher", "kind", "chosen_sem", "rejected_sem",
                      "chosen_aes", "rejected_aes", "chosen_cell", "rejected_cell", "aspect")


def preference_schema() -> pa.Schema:
    """Arrow schema of the builder's output (required columns first)."""
    s, f, i = pa.string(), pa.float32(), pa.int16()
    return pa.schema([("query_id", s), ("query", s), ("chosen_id", s), ("rejected_id", s),
                      ("source", s), ("weight", f), ("rephrased", s), ("teacher", s),
                      ("kind", s), ("chosen_sem", f), ("rejected_sem", f), ("chosen_aes", f),
                      ("rejected_aes", f), ("chosen_cell", i), ("rejected_cell", i),
                      ("aspect", s)])


_NULL_DIAG: dict[str, Any] = {"rephrased": None, "teacher": None, "kind": "",
                              "chosen_sem": np.nan, "rejected_sem": np.nan,
                              "chosen_aes": np.nan, "rejected_aes": np.nan,
                              "chosen_cell": -1, "rejected_cell": -1, "aspect": ""}


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Row dicts (missing diagnostics filled with nulls / NaN / -1) -> a schema-conforming table."""
    schema = preference_schema()
    cols: dict[str, list[Any]] = {n: [] for n in schema.names}
    for r in rows:
        for n in schema.names:
            cols[n].append(r[n] if n in r else _NULL_DIAG.get(n))
    return pa.table({n: pa.array(cols[n], schema.field(n).type) for n in schema.names},
                    schema=schema)


def conform(table: pa.Table) -> pa.Table:
    """A table with at least the required columns -> exactly :func:`preference_schema`.

    Missing diagnostics are filled (null text, NaN scores, cell -1); extra columns are dropped.
    """
    schema = preference_schema()
    n = table.num_rows
    out = {}
    for f in schema:
        if f.name in table.column_names:
            out[f.name] = table.column(f.name).cast(f.type)
        else:
            fill = _NULL_DIAG.get(f.name)
            out[f.name] = pa.array([fill] * n, f.type)
    return pa.table(out, schema=schema)


def read_preferences(path: str | Path) -> pa.Table:
    """Read and check a preferences table (file or directory), e.g. human votes or LMM labels.

    Returns it in :func:`preference_schema` (extra columns such as a rationale are dropped;
    ``source`` and ``weight`` are kept as given). ``path`` is a local path or an ``s3://`` /
    ``gs://`` URI (:func:`aligner.data.io.read_parquet`).

    Raises:
        FileNotFoundError: the path (or its bucket) or its Parquet files do not exist.
        ValueError: a required column is missing or of the wrong type, ids or source are
            empty/null, or a weight is not a finite number >= 0.
    """
    p = shown_path(path)
    table = read_parquet(path, "preference table", preferred=PREFERENCES_FILE)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"preference table {p} lacks columns {missing}; the preferences "
                         f"schema is {list(REQUIRED_COLUMNS)} (has {table.column_names})")
    for c in REQUIRED_COLUMNS:
        t = table.schema.field(c).type
        ok = (pa.types.is_floating(t) or pa.types.is_integer(t)) if c == "weight" else (
            pa.types.is_string(t) or pa.types.is_large_string(t))
        if not ok:
            want = "a number" if c == "weight" else "a string"
            raise ValueError(f"preference table {p}: column {c!r} has type {t}, expected {want}")
    for c in ("query_id", "chosen_id", "rejected_id", "source"):
        vals = table.column(c).to_pylist()
        bad = sum(1 for v in vals if not v)
        if bad:
            raise ValueError(f"preference table {p}: {bad} rows with an empty or null {c!r}")
    w = table.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError(f"preference table {p}: weights must be finite numbers >= 0")
    same = sum(1 for a, b in zip(table.column("chosen_id").to_pylist(),
                                 table.column("rejected_id").to_pylist(), strict=True) if a == b)
    if same:
        raise ValueError(f"preference table {p}: {same} rows prefer an image over itself")
    return conform(table)


def preferences_manifest(path: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a preferences directory (a builder's output, votes), local or
    a URI; ``{}`` for a bare file or a directory without one."""
    import json

    if not is_dir_at(path):
        return {}
    text = read_text_at(join_path(path, "manifest.json"))
    return json.loads(text) if text is not None else {}


def write_preferences(table: pa.Table, out_dir: str | Path) -> Path:
    """Write ``out_dir/preferences.parquet`` atomically in :func:`preference_schema`."""
    path = Path(out_dir) / PREFERENCES_FILE
    atomic_write_table(conform(table), path)
    return path
