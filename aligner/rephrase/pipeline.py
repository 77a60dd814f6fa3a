"""Ray Data parts of the rephrase job: input checks, batch UDFs, actor pool plan, part files.

The pipeline is ``read_parquet -> filter(pending ids) -> map_batches(rephrase)``; the driver
iterates the result and writes part files (``parts/part-NNNNN.parquet``) as rows arrive, so a
long LLM run that stops is resumed from its finished parts. Every UDF returns the input
columns plus :data:`OUTPUT_COLUMNS`; a row that fails falls back (see ``base.finalise``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aligner.data.io import atomic_write_table
from aligner.data.queries import QUERIES_FILE, write_queries
from aligner.rephrase.base import Failed, Rephrase, count_reasons, finalise, make_rephraser

log = logging.getLogger(__name__)
OUTPUT_COLUMNS = ("rephrased", "rephraser", "fallback", "fallback_reason")
PARTS_DIR = "parts"


def to_columns(batch: dict[str, np.ndarray], rows: list[Rephrase]) -> dict[str, np.ndarray]:
    """The batch with :data:`OUTPUT_COLUMNS` added from ``rows``."""
    out = dict(batch)
    out["rephrased"] = np.array([r.text for r in rows], dtype=object)
    out["rephraser"] = np.array([r.rephraser for r in rows], dtype=object)
    out["fallback"] = np.array([r.fallback for r in rows], dtype=bool)
    out["fallback_reason"] = np.array([r.reason for r in rows], dtype=object)
    return out


def template_batch(batch: dict[str, np.ndarray], style: str, polarity: str,
                   max_chars: int | None) -> dict[str, np.ndarray]:
    """Ray Data task: the template rephrase of a batch (cheap; no actor needed)."""
    from aligner.rephrase.template import TemplateRephraser

    r = TemplateRephraser(style=style, polarity=polarity, max_chars=max_chars)
    return to_columns(batch, r.rephrase_rows(list(batch["query"])))


class RephraseActor:
    """Ray Data callable class: builds the back end once (model load), rephrases batches."""

    def __init__(self, backend: str, kwargs: dict[str, Any]) -> None:
        logging.basicConfig(level=os.environ.get("ALIGNER_LOG_LEVEL", "INFO"))
        self.rephraser = make_rephraser(backend, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return to_columns(batch, self.rephraser.rephrase_rows(list(batch["query"])))


def finalise_batch(batch: dict[str, np.ndarray], version: str, style: str,
                   max_chars: int | None = None, strict: bool = True) -> dict[str, np.ndarray]:
    """After a ``ray.data.llm`` processor: check ``raw_output``; errors and misses fall back."""
    from aligner.rephrase.template import TemplateRephraser

    n = len(batch["query"])
    raws = batch.get("raw_output", np.array([""] * n, dtype=object))
    errs = batch.get("__inference_error__", np.array([""] * n, dtype=object))
    outs = [Failed(f"error: {str(e)[:200]}") if e else ("" if r is None else str(r))
            for r, e in zip(raws, errs, strict=True)]
    rows = finalise(list(batch["query"]), outs, version,
                    TemplateRephraser(style=style, max_chars=max_chars), max_chars, strict)
    keep = {k: v for k, v in batch.items() if k not in ("raw_output", "__inference_error__")}
    return to_columns(keep, rows)


class PartWriter:
    """Write finished rows to ``parts/part-NNNNN.parquet`` every ``rows_per_part`` rows."""

    def __init__(self, out: Path, rows_per_part: int) -> None:
        self.dir = out / PARTS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_part = rows_per_part
        self.buf: list[pa.Table] = []
        self.buffered = 0
        self.next = 1 + max((int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.parquet")),
                            default=-1)

    def add(self, table: pa.Table) -> None:
        self.buf.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        table = pa.concat_tables(self.buf, promote_options="permissive")
        atomic_write_table(table, self.dir / f"part-{self.next:05d}.parquet")
        self.next += 1
        self.buf, self.buffered = [], 0


def read_parts(out: Path) -> pa.Table | None:
    """All finished part files as one table (None if there are none)."""
    files = sorted((out / PARTS_DIR).glob("part-*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def assemble_output(out: Path, target: list[str]) -> pa.Table:
    """The finished parts, restricted to ``target`` ids in ``target`` order, written
    atomically to ``out/queries.parquet``."""
    table = read_parts(out)
    if table is None:
        raise RuntimeError(f"{out}: no finished rows to assemble")
    pos = {q: i for i, q in enumerate(target)}
    got = table["query_id"].to_pylist()
    order = sorted((i for i, q in enumerate(got) if q in pos), key=lambda i: pos[got[i]])
    table = table.take(pa.array(order, type=pa.int64()))
    write_queries(table, out / QUERIES_FILE)
    return table


def summarise(table: pa.Table) -> dict[str, Any]:
    """Manifest counts: fallbacks (total, rate, by reason) and rows per rephraser version."""
    n_fb = sum(bool(x) for x in table["fallback"].to_pylist())
    versions: dict[str, int] = {}
    for v in table["rephraser"].to_pylist():
        versions[v] = versions.get(v, 0) + 1
    return {"fallbacks": n_fb, "fallback_rate": round(n_fb / max(1, table.num_rows), 4),
            "fallbacks_by_reason": count_reasons(table["fallback_reason"].to_pylist()),
            "rephraser_versions": versions}
