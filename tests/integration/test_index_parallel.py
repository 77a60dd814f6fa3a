"""The parallel index build (Ray tasks, ``build_index(parallel=True)``) on the session's Ray.

The claim under test: trained once on the driver, scanned and added in Ray tasks, the output
is the serial build's: the same shard files byte for byte, ``ids.parquet``, failures and
manifest (but for timings and the ``parallel`` flag), so the same search results.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligner.data.embeddings import embeddings_schema
from aligner.retrieval.index import SearchIndex
from aligner.retrieval.index_build import build_index
from aligner.runtime.manifest import read_manifest
from tests.unit.test_index import (
    assert_exact,
    embedding_table,
    make_ids,
    numpy_topk,
    random_unit,
    write_embed_output,
)

D = 32
#: manifest keys that differ between two builds of the same input by design
VOLATILE = {"created_utc", "wall_time_s", "timings_s", "parallel", "host", "git_commit"}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def with_bad_rows(root: Path, x: np.ndarray, ids: list[str], files: int) -> Path:
    """Embeddings in ``files`` files where row 5 has a null vector and row 40 a NaN, so
    positions and row numbers differ from row 6 on (and one file is empty)."""
    root.mkdir(parents=True)
    rows = embedding_table(x, ids).to_pylist()
    rows[5]["embedding"] = None
    rows[40]["embedding"] = [float("nan")] * D
    table = pa.Table.from_pylist(rows, schema=embeddings_schema(D))
    cuts = np.linspace(0, len(rows), files + 1).astype(int)
    for i in range(files):
        pq.write_table(table.slice(cuts[i], cuts[i + 1] - cuts[i]), root / f"part-{i:02d}.parquet")
    pq.write_table(table.slice(0, 0), root / "part-zz-empty.parquet")
    return root


def stable(manifest: dict) -> dict:
    """The manifest without what differs between two runs by design."""
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


@pytest.mark.parametrize(("factory", "mode"), [("IVF16,PQ8,RFlat", "contiguous"),
                                               ("Flat", "round_robin")])
def test_parallel_build_equals_serial_build(ray_session, tmp_path, factory, mode):
    n = 1500
    x = random_unit(n, d=D, seed=41)
    ids = make_ids(n, seed=4)
    emb = with_bad_rows(tmp_path / "emb", x, ids, files=5)
    q = random_unit(25, d=D, seed=42)
    common = {"shards": 3, "shard_mode": mode, "batch_size": 130, "train_sample": 1000,
              "nprobe": 4}
    serial = build_index(emb, tmp_path / "serial", factory, **common)
    par = build_index(emb, tmp_path / "par", factory, parallel=True, **common)

    ms, mp = read_manifest(tmp_path / "serial"), read_manifest(tmp_path / "par")
    assert mp["parallel"] is True and ms["parallel"] is False
    assert stable(mp) == stable(ms)
    assert mp["counts"] == {"rows_in": n, "indexed": n - 2, "failed": 2, "not_normalised": 0}
    for name in ("shard-00.faiss", "shard-01.faiss", "shard-02.faiss"):
        assert (tmp_path / "par" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()
    for name in ("ids.parquet", "failures/failures.parquet"):
        assert pq.read_table(tmp_path / "par" / name).equals(
            pq.read_table(tmp_path / "serial" / name)), name
    assert not (tmp_path / "par" / "_parts").exists()

    loaded = SearchIndex.load(tmp_path / "par")
    for got in (par.search(q, 10), loaded.search(q, 10)):
        want = serial.search(q, 10)
        np.testing.assert_array_equal(got.positions, want.positions)
        np.testing.assert_array_equal(got.scores, want.scores)
        assert got.ids == want.ids
    if factory == "Flat":
        keep = [i for i in range(n) if i not in (5, 40)]
        assert_exact(loaded.search(q, 10), q, x[keep], [ids[i] for i in keep], 10)


def test_parallel_build_reports_a_file_of_another_size(ray_session, tmp_path):
    root = tmp_path / "emb"
    root.mkdir()
    pq.write_table(embedding_table(random_unit(20, d=D, seed=1), make_ids(20)),
                   root / "a.parquet")
    wide = random_unit(20, d=D, seed=2)
    table = pa.table({"id": [f"w{i}" for i in range(20)],
                      "embedding": pa.array(list(np.hstack([wide, wide])),
                                            pa.list_(pa.float32()))})
    pq.write_table(table, root / "b.parquet")  # variable-size lists: caught when read
    with pytest.raises(ValueError, match="size 64"):
        build_index(root, tmp_path / "idx", "Flat", shards=2, parallel=True)
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_build_index_job_parallel(ray_session, tmp_path, capsys):
    from jobs.build_index import main

    x = random_unit(600, d=D, seed=43)
    emb = write_embed_output(tmp_path / "emb", x)
    out = tmp_path / "index"
    rc = main([f"embeddings={emb}", f"output={out}", "factory=IVF8,Flat", "shards=2",
               "parallel=true", "nprobe=8", "train_sample=600", "progress=false"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["parallel"] is True and m["config"]["parallel"] is True and m["ntotal"] == 600
    assert [s["ntotal"] for s in m["shards"]] == [300, 300]
    assert "by Ray tasks" in capsys.readouterr().out
    res = SearchIndex.load(out).search(x[:20], 5)  # nprobe 8 of 8 lists: exact
    np.testing.assert_array_equal(res.positions, numpy_topk(x[:20], x, 5)[1])
