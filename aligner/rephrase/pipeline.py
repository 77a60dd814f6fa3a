"""Ray Data parts of the rephrase job: input checks, batch UDFs, actor pool plan, part files.

The pipeline is ``read_parquet -> filter(pending ids) -> map_batches(rephrase)``; the driver
iterates the result and writes part files (``parts/part-NNNNN.parquet``) as rows arrive, so a
long LLM run that stops is resumed from its finished parts. Every UDF returns the input
columns plus :data:`OUTPUT_COLUMNS`; a row that fails falls back (see ``base.finalise``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from aligner.rephrase.base import Failed, Rephrase, count_reasons, finalise, make_rephraser

log = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("query_id", "query")
OUTPUT_COLUMNS = ("rephrased", "rephraser", "fallback", "fallback_reason")
PARTS_DIR = "parts"


def read_query_index(path: str, splits: list[str], kinds: list[str], limit: int) -> pa.Table:
    """The input's ``query_id`` (+ filter columns) after filters and limit, in input order.

    Raises:
        FileNotFoundError: missing input.
        ValueError: not Parquet, missing columns, a filter on an absent column, duplicate ids.
    """
    if "://" not in path and not Path(path).exists():
        raise FileNotFoundError(f"queries input {path} does not exist")
    try:
        dset = pads.dataset(path, format="parquet")
        schema = dset.schema
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file/directory: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: a queries table needs columns {list(REQUIRED_COLUMNS)}; "
                         f"missing {missing} (it has {schema.names})")
    for col in REQUIRED_COLUMNS:
        if not (pa.types.is_string(schema.field(col).type)
                or pa.types.is_large_string(schema.field(col).type)):
            raise ValueError(f"{path}: column {col!r} must be a string, not "
                             f"{schema.field(col).type}")
    cols = ["query_id"]
    for name, values in (("split", splits), ("kind", kinds)):
        if values:
            if name not in schema.names:
                raise ValueError(f"{path}: filter {name}s={values} but the table has no "
                                 f"{name!r} column")
            cols.append(name)
    table = dset.to_table(columns=cols)
    for name, values in (("split", splits), ("kind", kinds)):
        if values:
            table = table.filter(pc.is_in(table[name], pa.array(values)))
    if limit > 0:
        table = table.slice(0, limit)
    ids = table["query_id"]
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError(f"{path}: query_id values are not unique")
    return table


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


@dataclass
class ActorPlan:
    """How many model actors, the CPUs Ray reserves for each, and torch threads in each."""

    num_actors: int
    num_cpus: float
    threads: int


def plan_actors(cluster_cpus: float, num_actors: int = 0, threads: int = 0,
                num_cpus: float = 0.0) -> ActorPlan:
    """Size a CPU model-actor pool: many single-threaded actors, and a CPU left for reads.

    Measured on 2 shared cores (SmolLM2-135M, 600 queries): 1 actor x 2 torch threads decoded
    4-10x slower than 1 x 1 when other work took a core (OpenMP threads wait on each other);
    2 actors x 1 thread were 1.8x faster than 1 x 1 (6.4 vs 3.7 queries/s). So threads default
    to 1 per actor (2 above 4 CPUs), actors to ``cpus / threads``. An actor holding a full CPU
    beside the read task can hang a 2-CPU pipeline, so each reserves at most
    ``(cpus - 1) / actors`` CPUs (at least 0.25) for Ray's accounting.
    """
    cpus = max(1.0, float(cluster_cpus))
    n = num_actors or max(1, int(cpus // (threads or (1 if cpus <= 4 else 2))))
    t = threads or int(min(4, max(1, cpus // n)))
    c = num_cpus or round(max(0.25, min(float(t), (cpus - 1) / n)), 2)
    return ActorPlan(num_actors=n, num_cpus=c, threads=t)


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
        path = self.dir / f"part-{self.next:05d}.parquet"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
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
    tmp = out / f".queries.parquet.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "queries.parquet")
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


class Progress:
    """Log rows done, rate and ETA at most every ``every_s`` seconds."""

    def __init__(self, total: int, every_s: float = 15.0) -> None:
        self.total, self.every_s = total, every_s
        self.start = self.last = time.time()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every_s or self.done >= self.total:
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("rephrased %d/%d queries (%.2f q/s, ETA %.0f s)", self.done, self.total,
                     rate, eta)
            self.last = now
