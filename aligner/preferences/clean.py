"""Clean-up passes over a preferences table, in the order :func:`clean_pairs` runs them.

Per-source weight multipliers, dedupe on ``(query_id, chosen_id, rejected_id)`` keeping the
largest weight, removal of contradictions (``a > b`` and ``b > a`` for one query: both rows
go), then seeded caps per source and per query. Each returns the table and a count for the
manifest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def parse_source_weights(value: str | Mapping[str, float] | Sequence[str] | None) -> dict[str, float]:
    """``"grid=1.0,degraded=0.5"`` (or a mapping, or ``["grid=1", ...]``) -> ``{source: w}``.

    Raises:
        ValueError: an item without ``=``, or a weight that is not a number >= 0.
    """
    if not value:
        return {}
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    else:
        parts = value.split(",") if isinstance(value, str) else list(value)
        items = []
        for part in parts:
            part = str(part).strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"source weight {part!r} is not source=weight")
            k, _, v = part.partition("=")
            items.append((k.strip(), v.strip()))
    out = {}
    for k, v in items:
        try:
            w = float(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"source weight {k}={v!r} is not a number") from e
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"source weight {k}={w} must be >= 0")
        out[k] = w
    return out


def apply_source_weights(table: pa.Table, weights: Mapping[str, float]) -> tuple[pa.Table, int]:
    """Multiply each row's weight by its source's multiplier (1 if unlisted); rows whose weight
    becomes 0 are dropped. Returns the table and the number of dropped rows."""
    if not weights or table.num_rows == 0:
        return table, 0
    src = table.column("source").to_pylist()
    w = table.column("weight").to_numpy(zero_copy_only=False).astype(np.float32)
    w = w * np.array([weights.get(s, 1.0) for s in src], np.float32)
    table = table.set_column(table.schema.get_field_index("weight"), "weight",
                             pa.array(w, pa.float32()))
    keep = w > 0
    return table.filter(pa.array(keep)), int((~keep).sum())


def _keys(table: pa.Table) -> list[tuple[str, str, str]]:
    return list(zip(table.column("query_id").to_pylist(), table.column("chosen_id").to_pylist(),
                    table.column("rejected_id").to_pylist(), strict=True))


def dedupe(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep one row per ``(query_id, chosen_id, rejected_id)``: the largest weight (the earlier
    row on ties). Returns the table (original row order) and the number of rows removed."""
    if table.num_rows == 0:
        return table, 0
    w = table.column("weight").to_numpy(zero_copy_only=False)
    keys = _keys(table)
    seen: set[tuple[str, str, str]] = set()
    keep = np.zeros(len(keys), bool)
    for i in np.argsort(-w, kind="stable"):
        if keys[i] not in seen:
            seen.add(keys[i])
            keep[i] = True
    return table.filter(pa.array(keep)), int((~keep).sum())


def drop_contradictions(table: pa.Table) -> tuple[pa.Table, int]:
    """Remove both rows of every ``a > b`` / ``b > a`` pair within one query (run after
    :func:`dedupe`). Returns the table and the number of contradicting pairs (not rows)."""
    if table.num_rows == 0:
        return table, 0
    keys = _keys(table)
    present = set(keys)
    keep = np.array([(q, r, c) not in present for q, c, r in keys], bool)
    return table.filter(pa.array(keep)), int((~keep).sum()) // 2


def _subsample(groups: Mapping[Any, list[int]], cap: int, rng: np.random.Generator) -> np.ndarray:
    drop: list[int] = []
    for key in sorted(groups, key=str):
        rows = groups[key]
        if len(rows) > cap:
            chosen = set(rng.choice(len(rows), cap, replace=False).tolist())
            drop += [r for j, r in enumerate(rows) if j not in chosen]
    return np.asarray(drop, np.int64)


def cap_pairs(table: pa.Table, column: str, cap: int, seed: int = 0) -> tuple[pa.Table, int]:
    """At most ``cap`` rows per value of ``column`` (``source`` or ``query_id``), chosen
    uniformly at random with ``seed``; ``cap <= 0`` keeps everything. Returns the table (order
    kept) and the number of rows removed."""
    if cap <= 0 or table.num_rows == 0:
        return table, 0
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(table.column(column).to_pylist()):
        groups[v].append(i)
    drop = _subsample(groups, cap, np.random.default_rng([seed, len(column)]))
    if not len(drop):
        return table, 0
    keep = np.ones(table.num_rows, bool)
    keep[drop] = False
    return table.filter(pa.array(keep)), int(len(drop))


def clean_pairs(table: pa.Table, source_weights: Mapping[str, float] | None = None,
                max_pairs_per_source: int = 0, max_pairs_per_query: int = 0,
                seed: int = 0) -> tuple[pa.Table, dict[str, int]]:
    """All passes in order (see the module docstring); returns the table and their counts."""
    counts = {"rows_in": table.num_rows}
    table, counts["dropped_zero_weight"] = apply_source_weights(table, source_weights or {})
    table, counts["duplicates"] = dedupe(table)
    table, counts["contradictions"] = drop_contradictions(table)
    table, counts["capped_per_source"] = cap_pairs(table, "source", max_pairs_per_source, seed)
    table, counts["capped_per_query"] = cap_pairs(table, "query_id", max_pairs_per_query, seed)
    counts["rows_out"] = table.num_rows
    return table, counts


def count_by(table: pa.Table, column: str) -> dict[str, int]:
    """Rows per value of a column (sorted by value)."""
    out: dict[str, int] = defaultdict(int)
    for v in table.column(column).to_pylist():
        out[v] += 1
    return dict(sorted(out.items()))
