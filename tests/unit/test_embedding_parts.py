"""The worker-side embeddings writer without Ray: part files, the driver's tracker, the
finaliser, and the store they write through (aligner.data.embedding_parts, aligner.data.io)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from aligner.data.embedding_parts import (
    PARTS_DIR,
    ShardTracker,
    finalize_shard,
    part_name,
    row_ranges,
    write_parts,
)
from aligner.data.embeddings import clean_partial, done_shards, output_counts
from aligner.data.io import Store, filesystem


def _batch(shard_id: str, rows: list[int], total: int, ids: list[str] | None = None,
           reasons: list[str] | None = None) -> dict[str, np.ndarray]:
    """An EncodeImages output block: ``rows`` of one shard, D=4."""
    n = len(rows)
    emb = np.stack([np.random.default_rng(r).normal(size=4) for r in rows]).astype(np.float32)
    reasons = reasons or [""] * n
    return {"id": np.array(ids or [f"x{r}" for r in rows], dtype=object),
            "source": np.array([f"s#{r}" for r in rows], dtype=object),
            "row": np.array(rows, np.int64), "caption": np.array([""] * n, dtype=object),
            "reason": np.array(reasons, dtype=object),
            "stage": np.array(["decode" if r else "" for r in reasons], dtype=object),
            "shard_id": np.array([shard_id] * n, dtype=object),
            "shard_total": np.array([total] * n, np.int64),
            "embedding": emb, "aesthetic": np.zeros(n, np.float32)}


def _concat(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_row_ranges_and_names_are_functions_of_the_rows():
    assert row_ranges(np.array([5, 0, 1, 2, 2])) == [[0, 3], [5, 6]]
    assert row_ranges(np.array([], np.int64)) == []
    assert part_name(np.array([3, 1, 2])) == part_name(np.array([1, 2, 3]))
    assert part_name(np.array([1, 2, 3])) != part_name(np.array([1, 3]))
    assert part_name(np.array([7, 9])).startswith("part-0000000007-0000000009-")


def test_a_retried_block_overwrites_its_part(tmp_path):
    """Same rows -> same file name: a replayed batch adds no second copy."""
    store = Store(tmp_path)
    block = _concat(_batch("a", [0, 1], -1), _batch("b", [0], 1))
    first = write_parts(store, block, dim=4)
    again = write_parts(store, block, dim=4)
    assert list(first["part"]) == list(again["part"]) and list(first["shard_id"]) == ["a", "b"]
    assert list(first["rows"]) == [2, 1] and list(first["shard_total"]) == [-1, 1]
    assert [json.loads(r) for r in first["ranges"]] == [[[0, 2]], [[0, 1]]]
    assert len(list((tmp_path / PARTS_DIR / "a").glob("part-*.parquet"))) == 1


def test_tracker_completes_on_distinct_positions():
    tracker = ShardTracker(["a", "b"])
    rec = {"shard_id": np.array(["a"], dtype=object),
           "ranges": np.array([json.dumps([[0, 2]])], dtype=object),
           "shard_total": np.array([-1])}
    assert tracker.add(rec) == []
    assert tracker.add(rec) == []  # the same rows again (an overlapping retry): no progress
    last = {"shard_id": np.array(["a", "b"], dtype=object),
            "ranges": np.array([json.dumps([[1, 3]]), json.dumps([[0, 1]])], dtype=object),
            "shard_total": np.array([3, 1])}
    assert tracker.add(last) == ["a", "b"]
    assert tracker.add(last) == []  # late duplicates of complete shards are ignored
    assert tracker.pending() == [] and tracker.totals == {"a": 3, "b": 1}


def test_finalise_merges_overlapping_parts_exactly_once(tmp_path):
    store = Store(tmp_path)
    write_parts(store, _batch("a", [0, 1], -1), 4)
    write_parts(store, _batch("a", [1, 2], -1), 4)  # row 1 again, grouped differently
    write_parts(store, _batch("a", [3], 4, reasons=["corrupt: bad"]), 4)
    res = finalize_shard(store, "a", total=4, dim=4)
    assert res == {"shard_id": "a", "rows_in": 4, "rows_out": 3, "rows_failed": 1,
                   "failure_reasons": {"corrupt": 1}}
    a = pq.read_table(tmp_path / "embeddings" / "a.parquet")
    assert a.column("id").to_pylist() == ["x0", "x1", "x2"]  # in row order, deduplicated
    assert a.column_names == ["id", "embedding", "aesthetic", "caption", "source"]
    assert a.column("caption").to_pylist() == [None, None, None]
    np.testing.assert_allclose(np.stack(a.column("embedding").to_numpy(zero_copy_only=False)),
                               _batch("a", [0, 1, 2], 4)["embedding"])
    assert pq.read_table(tmp_path / "failures" / "a.parquet").column("id").to_pylist() == ["x3"]
    assert not (tmp_path / PARTS_DIR / "a").exists()
    assert done_shards(tmp_path) == {"a"}
    assert output_counts(tmp_path) == {"rows_out": 3, "rows_failed": 1, "shards_done": 1,
                                       "rows_in": 4}


def test_finalise_refuses_missing_rows(tmp_path):
    store = Store(tmp_path)
    write_parts(store, _batch("a", [0, 2], 3), 4)
    with pytest.raises(RuntimeError, match="2 distinct rows, expected 3"):
        finalize_shard(store, "a", total=3, dim=4)
    assert not (tmp_path / "embeddings" / "a.parquet").exists()


def test_duplicate_ids_become_failures(tmp_path):
    store = Store(tmp_path)
    write_parts(store, _batch("s", [0, 1, 2], 3, ids=["p", "q", "p"]), 4)
    finalize_shard(store, "s", total=3, dim=4)
    assert pq.read_table(tmp_path / "embeddings" / "s.parquet").column("id").to_pylist() == [
        "p", "q"]
    fail = pq.read_table(tmp_path / "failures" / "s.parquet").to_pylist()
    assert fail[0]["id"] == "p" and fail[0]["reason"].startswith("duplicate_id")


def test_clean_partial_removes_parts_temp_files_and_stale_failures(tmp_path):
    store = Store(tmp_path)
    write_parts(store, _batch("a", [0], -1), 4)
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / ".x.parquet.1.tmp.parquet").write_bytes(b"junk")
    (tmp_path / "failures").mkdir()
    (tmp_path / "failures" / "a.parquet").write_bytes(b"old")
    assert clean_partial(tmp_path, ["a"]) == 3
    assert not (tmp_path / PARTS_DIR).exists() and not list((tmp_path / "failures").iterdir())


def test_store_uris_fail_clearly():
    with pytest.raises(ValueError, match="unsupported URI scheme 'ftp'"):
        filesystem("ftp://host/x")
    with pytest.raises(ValueError, match="names no bucket"):
        Store("s3:///prefix")
    fs, path = filesystem("relative/dir")
    assert fs.type_name == "local" and path.endswith("/relative/dir")
