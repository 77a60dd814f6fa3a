"""The judgments contract: one row per (query, pair of systems) judged by a row judge.

Schema (:func:`judgment_schema`)::

    query_id string, query string,
    system_a string, system_b string      the systems whose rows were shown as a and b
    judge string                          e.g. "lmm:openai:<model>", "proxy:scorer+similarity"
    proxy bool                            the judge is a proxy, not an LMM (named so too)
    style string                          ranker | scorer | proxy
    prompt string                         the prompt id ("ranker.v1"; "" for a proxy)
    winner string                         a | b | similar ("" when status is failed)
    accuracy, aesthetics, diversity string   per aspect a | b | similar ("": not judged)
    orders_agree bool                     both orders named the same overall winner
    first_winner, second_winner string    each order's overall verdict, in (a, b) terms
    decision string                       how it was read: logprobs | text | mixed |
                                          unparsed | proxy | identical (same rows: no call)
    rationale string                      the judge's reason ('' unless asked for)
    status string                         ok | failed
    error string                          why it failed ('' when ok)
    ids_a, ids_b list<string>             the rows' image ids, best first
    details string                        JSON: the numbers behind the decision

A row whose images could not be fetched or whose judge call failed is kept, with
``status=failed`` and the reason; nothing is dropped. :func:`write_judgments` and
:func:`read_judgments` are the one writer and reader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from aligner.data.io import atomic_write_table, read_parquet

JUDGMENTS_FILE = "judgments.parquet"
SIDES = ("a", "b", "similar")
ASPECT_COLUMNS = ("accuracy", "aesthetics", "diversity")
STATUSES = ("ok", "failed")


def judgment_schema() -> pa.Schema:
    """The Arrow schema of a judgments table."""
    s, b = pa.string(), pa.bool_()
    return pa.schema([
        ("query_id", s), ("query", s), ("system_a", s), ("system_b", s), ("judge", s),
        ("proxy", b), ("style", s), ("prompt", s), ("winner", s),
        *[(c, s) for c in ASPECT_COLUMNS], ("orders_agree", b), ("first_winner", s),
        ("second_winner", s), ("decision", s), ("rationale", s), ("status", s), ("error", s),
        ("ids_a", pa.list_(s)), ("ids_b", pa.list_(s)), ("details", s)])


_DEFAULTS: dict[str, Any] = {"proxy": False, "orders_agree": False, "ids_a": [], "ids_b": [],
                             "details": "{}"}


def judgments_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Row dicts -> a checked table in :func:`judgment_schema` (missing text columns are '').

    Raises:
        ValueError: a row that breaks the contract (:func:`check_judgments`).
    """
    schema = judgment_schema()
    cols = {f.name: [r.get(f.name, _DEFAULTS.get(f.name, "")) for r in rows] for f in schema}
    table = pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)
    check_judgments(table)
    return table


def check_judgments(table: pa.Table, where: str = "judgments table") -> None:
    """Raise ValueError unless ``table`` follows the contract: the schema's columns and types,
    ``status`` ok | failed, an ok row's winner and aspects in a | b | similar (aspects may be
    ''), a failed row with its reason."""
    schema = judgment_schema()
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing columns {missing} (the judgments schema is "
                         f"{schema.names})")
    for f in schema:
        t = table.schema.field(f.name).type
        if not (t == f.type or (pa.types.is_large_string(t) and f.type == pa.string())):
            raise ValueError(f"{where}: column {f.name!r} has type {t}, expected {f.type}")
    status = table.column("status").to_pylist()
    bad = sorted({s for s in status if s not in STATUSES}, key=str)
    if bad:
        raise ValueError(f"{where}: status must be one of {list(STATUSES)}, found {bad}")
    for i, st in enumerate(status):
        if st == "failed":
            if not table.column("error")[i].as_py():
                raise ValueError(f"{where}: row {i} failed without a reason in 'error'")
            continue
        w = table.column("winner")[i].as_py()
        if w not in SIDES:
            raise ValueError(f"{where}: row {i} has winner {w!r}, not one of {list(SIDES)}")
        for c in ASPECT_COLUMNS:
            v = table.column(c)[i].as_py()
            if v not in (*SIDES, ""):
                raise ValueError(f"{where}: row {i} has {c}={v!r}, not a | b | similar | ''")


def write_judgments(table: pa.Table, out_dir: str | Path) -> Path:
    """Check and write ``out_dir/judgments.parquet`` atomically; returns its path."""
    path = Path(out_dir) / JUDGMENTS_FILE
    check_judgments(table, str(path))
    atomic_write_table(table.select(judgment_schema().names), path)
    return path


def read_judgments(path: str | Path) -> pa.Table:
    """Read and check a judgments table (a directory holding ``judgments.parquet``, or a file).

    Raises:
        FileNotFoundError: nothing there.
        ValueError: not Parquet, or not the judgments contract.
    """
    table = read_parquet(path, "judgments table", preferred=JUDGMENTS_FILE)
    check_judgments(table, str(path))
    return table
