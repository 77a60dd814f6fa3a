"""Worker-side writing of the embeddings table: part files, completion tracking, finalising.

The embed job never brings rows to the driver. Each encoded block is written by a Ray task
(:func:`write_parts`) as one part file per shard it holds::

    <out>/_parts/<shard_id>/part-<first row>-<last row>-<digest of the row set>.parquet

and only a small record per part comes back (:data:`PART_RECORD_COLUMNS`: shard id, part
name, its row ranges, the shard's total when known). The driver's :class:`ShardTracker` adds
up row *positions* per shard; when a shard's distinct positions reach its ``shard_total`` the
driver starts :func:`finalize_shard` as a Ray task, which merges the parts into
``embeddings/<shard_id>.parquet`` (and ``failures/<shard_id>.parquet``) and deletes them.

Exactly once, through failures:
- a part's name is a function of the rows it holds, so a retried task (a killed actor's batch
  replayed on a restarted one) writes the same name again: an overwrite, not a second copy;
- writes are all-or-nothing (:class:`aligner.data.io.Store`): a task killed mid-write leaves a
  hidden temp file (local disk) or nothing (object store), never a half part;
- if a retry ever groups rows differently, parts overlap by row position: the tracker counts
  positions, not rows, and the finaliser keeps one row per position (the first in sorted
  order) and checks that exactly ``shard_total`` positions are present;
- parts of unfinished shards are deleted when a run starts (resume redoes those shards).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from aligner.data.embeddings import EMBEDDINGS_DIR, count_reasons
from aligner.data.images import FAILURE_COLUMNS
from aligner.data.io import FAILURES_DIR, Store

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from aligner.data.corpus_plan import Shard

log = logging.getLogger(__name__)

PARTS_DIR = "_parts"
PART_COLUMNS = ("row", "id", "source", "caption", "reason", "stage", "aesthetic", "embedding")
PART_RECORD_COLUMNS = ("shard_id", "part", "ranges", "rows", "shard_total")


def row_ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted distinct row positions as half-open ``[lo, hi)`` runs: ``[0,1,2,5]`` ->
    ``[[0, 3], [5, 6]]``."""
    r = np.unique(np.asarray(rows, np.int64))
    if not len(r):
        return []
    cuts = np.flatnonzero(np.diff(r) != 1) + 1
    return [[int(run[0]), int(run[-1]) + 1] for run in np.split(r, cuts)]


def part_name(rows: np.ndarray) -> str:
    """A deterministic file name for a part holding these row positions."""
    r = np.sort(np.asarray(rows, np.int64))
    digest = hashlib.sha1(r.astype("<i8").tobytes()).hexdigest()[:10]
    return f"part-{int(r[0]):010d}-{int(r[-1]):010d}-{digest}.parquet"


def _part_table(batch: dict[str, np.ndarray], dim: int) -> pa.Table:
    emb = np.ascontiguousarray(batch["embedding"], np.float32).reshape(-1, dim)
    return pa.table({
        "row": pa.array(batch["row"], pa.int64()),
        "id": pa.array([str(x) for x in batch["id"]], pa.string()),
        "source": pa.array([str(x) for x in batch["source"]], pa.string()),
        "caption": pa.array([str(x) if x else "" for x in batch["caption"]], pa.string()),
        "reason": pa.array([str(x) if x else "" for x in batch["reason"]], pa.string()),
        "stage": pa.array([str(x) if x else "" for x in batch["stage"]], pa.string()),
        "aesthetic": pa.array(np.asarray(batch["aesthetic"], np.float32), pa.float32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim),
    })


def write_parts(store: Store, batch: dict[str, np.ndarray], dim: int) -> dict[str, np.ndarray]:
    """Write one encoded block as one part file per shard; return the part records.

    Args:
        store: the job's output directory.
        batch: :class:`aligner.retrieval.embed_pipeline.EncodeImages` output (numpy columns
            incl. ``shard_id``, ``row``, ``shard_total``, ``embedding [B, D]``).
        dim: embedding size D.

    Returns:
        Columns :data:`PART_RECORD_COLUMNS`, one row per part written: ``ranges`` is JSON
        (:func:`row_ranges`), ``rows`` the part's row count, ``shard_total`` the shard's row
        count if this block carries it, else -1.
    """
    sids = np.asarray(batch["shard_id"], dtype=object)
    rec: dict[str, list[Any]] = {c: [] for c in PART_RECORD_COLUMNS}
    for sid in dict.fromkeys(sids.tolist()):
        m = sids == sid
        order = np.argsort(np.asarray(batch["row"])[m], kind="stable")
        part = {c: np.asarray(batch[c])[m][order] for c in PART_COLUMNS}
        name = part_name(part["row"])
        store.write_table(f"{PARTS_DIR}/{sid}/{name}", _part_table(part, dim))
        totals = np.asarray(batch["shard_total"])[m]
        rec["shard_id"].append(sid)
        rec["part"].append(name)
        rec["ranges"].append(json.dumps(row_ranges(part["row"])))
        rec["rows"].append(int(m.sum()))
        rec["shard_total"].append(int(totals.max()) if len(totals) else -1)
    return {"shard_id": np.asarray(rec["shard_id"], dtype=object),
            "part": np.asarray(rec["part"], dtype=object),
            "ranges": np.asarray(rec["ranges"], dtype=object),
            "rows": np.asarray(rec["rows"], np.int64),
            "shard_total": np.asarray(rec["shard_total"], np.int64)}


class ShardTracker:
    """Driver side: which shards have all their rows written (from part records only).

    Args:
        shard_ids: the shards this run processes.
    """

    def __init__(self, shard_ids: Sequence[str]) -> None:
        self.expected = set(shard_ids)
        self.rows: dict[str, set[int]] = {}
        self.totals: dict[str, int] = {}
        self.complete: set[str] = set()
        self.parts = 0

    def add(self, records: dict[str, np.ndarray]) -> list[str]:
        """Take a batch of part records; returns the shards that became complete."""
        finished = []
        for sid, ranges, total in zip(records["shard_id"].tolist(), records["ranges"].tolist(),
                                      records["shard_total"].tolist(), strict=True):
            if sid in self.complete:
                continue  # a late duplicate record: the rows are already counted
            self.parts += 1
            rows = self.rows.setdefault(sid, set())
            for lo, hi in json.loads(ranges):
                rows.update(range(lo, hi))
            if total >= 0:
                self.totals[sid] = int(total)
            if sid in self.totals and len(rows) >= self.totals[sid]:
                self.complete.add(sid)
                del self.rows[sid]
                finished.append(sid)
        return finished

    def rows_seen(self) -> int:
        """Rows of shards not yet complete, plus the totals of complete ones."""
        return sum(len(r) for r in self.rows.values()) + sum(
            self.totals[s] for s in self.complete)

    def pending(self) -> list[str]:
        """Shards that started but are not complete."""
        return sorted(self.rows)


def finalize_shard(store: Store, shard_id: str, total: int, dim: int,
                   keep_columns: Sequence[str] = (), shard: Shard | None = None,
                   input_fs: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Merge a complete shard's parts into its final files, then delete the parts.

    Rows are sorted by position and deduplicated by position; a later copy of an ``id``
    within the shard becomes a ``duplicate_id`` failure. ``failures/<shard>.parquet`` (when
    there are failures) is written before ``embeddings/<shard>.parquet``, the done marker.

    Args:
        store: the job's output directory.
        shard_id: the shard.
        total: its row count (``shard_total``); the parts must hold exactly these positions.
        dim: embedding size D.
        keep_columns: corpus columns to carry over (Parquet corpora; read from the corpus
            by row position here, so they never travel through Ray).
        shard: the shard's descriptor (needed for ``keep_columns``).
        input_fs: the corpus's filesystem (for ``keep_columns``).

    Returns:
        ``shard_id``, ``rows_in``, ``rows_out``, ``rows_failed``, ``failure_reasons``.

    Raises:
        RuntimeError: the parts do not hold exactly positions ``0 .. total-1``.
    """
    from aligner.data.corpus_shards import read_shard_columns

    base = f"{PARTS_DIR}/{shard_id}"
    names = [n for n, _ in store.list_files(base, ".parquet") if n.startswith("part-")]
    tables = [store.read_table(f"{base}/{n}") for n in names]
    if not tables:
        raise RuntimeError(f"shard {shard_id}: no part files under {store.uri_of(base)}")
    t = pa.concat_tables(tables).sort_by([("row", "ascending")])
    rows = t.column("row").to_numpy()
    keep = np.ones(len(rows), bool)
    keep[1:] = rows[1:] != rows[:-1]  # overlapping parts: one row per position
    if not keep.all():
        t, rows = t.filter(pa.array(keep)), rows[keep]
    if len(rows) != total or (total and (rows[0] != 0 or rows[-1] != total - 1)):
        raise RuntimeError(f"shard {shard_id}: parts hold {len(rows)} distinct rows, "
                           f"expected {total}; re-run to redo the shard")
    reason = t.column("reason").to_pylist()
    stage = t.column("stage").to_pylist()
    seen: set[str] = set()
    for i, id_ in enumerate(t.column("id").to_pylist()):  # ids must be unique: later copies fail
        if not reason[i] and id_ in seen:
            reason[i], stage[i] = f"duplicate_id: {id_!r} already in this shard", "read"
        seen.add(id_)
    bad = np.asarray([bool(r) for r in reason], bool)
    failure_reasons: dict[str, int] = {}
    if bad.any():
        mask = pa.array(bad)
        fail = pa.table({"id": t.column("id").filter(mask),
                         "source": t.column("source").filter(mask),
                         "reason": pa.array(reason, pa.string()).filter(mask),
                         "stage": pa.array(stage, pa.string()).filter(mask)})
        assert tuple(fail.column_names) == FAILURE_COLUMNS
        store.write_table(f"{FAILURES_DIR}/{shard_id}.parquet", fail)
        failure_reasons = count_reasons(np.asarray(reason, dtype=object)[bad])
    ok = t.filter(pa.array(~bad))
    captions = [c or None for c in ok.column("caption").to_pylist()]
    table = pa.table({
        "id": ok.column("id"),
        "embedding": ok.column("embedding").combine_chunks(),
        "aesthetic": ok.column("aesthetic"),
        "caption": pa.array(captions, pa.string()),
        "source": ok.column("source"),
    })
    extra_cols = [c for c in keep_columns if c != "caption"]
    if extra_cols and shard is not None:
        extra = read_shard_columns(shard, extra_cols, fs=input_fs)
        if extra is not None:
            for name in extra.column_names:
                table = table.append_column(name, extra.column(name).take(ok.column("row")))
    store.write_table(f"{EMBEDDINGS_DIR}/{shard_id}.parquet", table)
    store.delete_tree(base)
    return {"shard_id": shard_id, "rows_in": int(len(rows)), "rows_out": int(ok.num_rows),
            "rows_failed": int(bad.sum()), "failure_reasons": failure_reasons}
