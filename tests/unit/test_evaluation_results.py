"""The evaluation results contract (aligner.data.results): per-query table, writer, readers."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligner.data.results import (
    METRICS_FILE,
    PER_QUERY_FILE,
    per_query_arrays,
    per_query_schema,
    per_query_table,
    read_metrics,
    read_per_query,
    write_results,
)

PER = {"base": {"aesthetic@10": np.array([0.1, 0.2, np.nan]), "precision@10": [1, 0, 1]},
       "aligned": {"aesthetic@10": np.array([0.3, 0.2, 0.1])}}


def test_per_query_table_schema_and_round_trip():
    t = per_query_table(["q1", "q2", "q3"], ["a", "b", "c"], PER)
    assert t.schema == per_query_schema(["base/aesthetic@10", "base/precision@10",
                                         "aligned/aesthetic@10"])
    assert t.column_names[:2] == ["query_id", "query"]
    assert all(t.schema.field(c).type == pa.float64() for c in t.column_names[2:])
    back = per_query_arrays(t)
    assert list(back) == ["base", "aligned"] and list(back["base"]) == list(PER["base"])
    np.testing.assert_array_equal(back["base"]["aesthetic@10"], PER["base"]["aesthetic@10"])
    assert back["base"]["precision@10"].dtype == np.float64


def test_per_query_table_refuses_bad_shapes_and_names():
    with pytest.raises(ValueError, match="shape"):
        per_query_table(["q1"], ["a"], {"base": {"m": [1.0, 2.0]}})
    with pytest.raises(ValueError, match="may not contain"):
        per_query_table(["q1"], ["a"], {"a/b": {"m": [1.0]}})
    with pytest.raises(ValueError, match="query texts"):
        per_query_table(["q1"], [], {})


def test_write_and_read_results(tmp_path):
    t = per_query_table(["q1", "q2", "q3"], ["a", "b", "c"], PER)
    metrics = {"k": 10, "x": np.float32(0.5), "bad": float("nan"), "inf": np.inf,
               "arr": np.arange(3), "nested": {"v": [np.int64(2), None]}}
    paths = write_results(tmp_path / "out", metrics, t)
    assert paths == {"metrics": tmp_path / "out" / METRICS_FILE,
                     "per_query": tmp_path / "out" / PER_QUERY_FILE}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [METRICS_FILE, PER_QUERY_FILE])  # no temp files left behind
    text = paths["metrics"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = read_metrics(tmp_path / "out")
    assert m == {"k": 10, "x": 0.5, "bad": None, "inf": None, "arr": [0, 1, 2],
                 "nested": {"v": [2, None]}}
    assert read_metrics(paths["metrics"]) == m
    for back in (read_per_query(tmp_path / "out"), read_per_query(paths["per_query"])):
        assert back.schema == t.schema and back["query_id"].to_pylist() == ["q1", "q2", "q3"]
        for system, cols in per_query_arrays(back).items():
            for metric, v in cols.items():
                np.testing.assert_array_equal(v, per_query_arrays(t)[system][metric])


def test_readers_say_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="per_query.parquet"):
        read_per_query(tmp_path)
    (tmp_path / METRICS_FILE).write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="object"):
        read_metrics(tmp_path)
    pq.write_table(pa.table({"query_id": ["q"], "query": ["a"], "base/m": ["text"]}),
                   tmp_path / PER_QUERY_FILE)
    with pytest.raises(ValueError, match="base/m"):
        read_per_query(tmp_path)
    with pytest.raises(ValueError, match="first columns"):
        write_results(tmp_path / "w", {}, pa.table({"id": ["q"]}))
