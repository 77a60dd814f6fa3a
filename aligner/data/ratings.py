"""The ratings contract: an annotator's 1-5 rating of one (query, image) on one aspect.

Schema (:func:`rating_schema`)::

    query_id string, query string, image_id string,
    aspect string          prompt_following | aesthetics | fidelity | harmlessness | ...
    rating int8            1-5 (0 when status is failed)
    expected float32       the expected rating under the answer's log-probabilities
                           (NaN when the back end gave none: the rating was read from text)
    decision string        logprobs | text | unparsed
    rationale string       the annotator's short reason
    annotator string       e.g. "lmm:openai:<model>/annotate.v1"
    status string          ok | failed
    error string           why it failed ('' when ok)

VisionPrefer-style preference pairs are derived from it per aspect
(:func:`aligner.judge.annotate.derive_pairs`). :func:`write_ratings` / :func:`read_ratings`
are the one writer and reader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from aligner.data.io import atomic_write_table, read_parquet

RATINGS_FILE = "ratings.parquet"


def rating_schema() -> pa.Schema:
    """The Arrow schema of a ratings table."""
    s = pa.string()
    return pa.schema([("query_id", s), ("query", s), ("image_id", s), ("aspect", s),
                      ("rating", pa.int8()), ("expected", pa.float32()), ("decision", s),
                      ("rationale", s), ("annotator", s), ("status", s), ("error", s)])


_DEFAULTS: dict[str, Any] = {"rating": 0, "expected": float("nan"), "status": "ok"}


def ratings_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Row dicts -> a checked table in :func:`rating_schema` (missing text columns are '').

    Raises:
        ValueError: a row that breaks the contract (:func:`check_ratings`).
    """
    schema = rating_schema()
    cols = {f.name: [r.get(f.name, _DEFAULTS.get(f.name, "")) for r in rows] for f in schema}
    table = pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)
    check_ratings(table)
    return table


def check_ratings(table: pa.Table, where: str = "ratings table") -> None:
    """Raise ValueError unless ``table`` has the contract's columns and an ok row's rating is
    1-5 (a failed row carries its reason)."""
    missing = [n for n in rating_schema().names if n not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing columns {missing} (the ratings schema is "
                         f"{rating_schema().names})")
    if not pa.types.is_integer(table.schema.field("rating").type):
        raise ValueError(f"{where}: column 'rating' must be an integer, not "
                         f"{table.schema.field('rating').type}")
    for i, (st, r, err) in enumerate(zip(table.column("status").to_pylist(),
                                         table.column("rating").to_pylist(),
                                         table.column("error").to_pylist(), strict=True)):
        if st == "ok":
            if r is None or not 1 <= r <= 5:
                raise ValueError(f"{where}: row {i} has rating {r!r}, not 1-5")
        elif st == "failed":
            if not err:
                raise ValueError(f"{where}: row {i} failed without a reason in 'error'")
        else:
            raise ValueError(f"{where}: row {i} has status {st!r}, not ok | failed")


def write_ratings(table: pa.Table, out_dir: str | Path) -> Path:
    """Check and write ``out_dir/ratings.parquet`` atomically; returns its path."""
    path = Path(out_dir) / RATINGS_FILE
    check_ratings(table, str(path))
    atomic_write_table(table.select(rating_schema().names).cast(rating_schema()), path)
    return path


def read_ratings(path: str | Path) -> pa.Table:
    """Read and check a ratings table (a directory holding ``ratings.parquet``, or a file).

    Raises:
        FileNotFoundError: nothing there.
        ValueError: not Parquet, or not the ratings contract.
    """
    table = read_parquet(path, "ratings table", preferred=RATINGS_FILE)
    check_ratings(table, str(path))
    return table
