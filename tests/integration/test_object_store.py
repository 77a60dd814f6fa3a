"""The embedding job from ``s3://`` to ``s3://`` against a real S3-compatible HTTP server.

The server (``s3`` / ``s3_env`` / ``s3_corpus`` fixtures in ``tests/integration/conftest.py``,
LocalBucket: ``tests/helpers/s3.py``) is reached only through pyarrow's S3 filesystem and
``AWS_ENDPOINT_URL``, as AWS, GCS's S3 API or MinIO would be. Set in the driver's environment
only: the Ray workers get the endpoint and credentials with the pickled filesystem.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.helpers.s3 import CORRUPT, N_IMAGES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _args(inp: str, out: str, *extra: str) -> list[str]:
    return [f"input={inp}", f"output={out}", "model.name=builtin", "batch_size=16",
            "rows_per_shard=10", "progress=false", *extra]


def _files(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    sel = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return {i.path: i.mtime_ns for i in fs.get_file_info(sel) if i.type == pafs.FileType.File}


def test_embed_s3_to_s3_then_resume_and_bad_inputs(ray_session, s3_env, s3_corpus, capsys):
    import json

    from jobs.embed import main

    fs = s3_env
    assert main(_args("s3://corpus/world", "s3://out/emb")) == 0, capsys.readouterr().err[-3000:]
    emb = pq.read_table("out/emb/embeddings", filesystem=fs)
    assert sorted(emb.column("id").to_pylist()) == [i for i in s3_corpus if i != s3_corpus[CORRUPT]]
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 256)
    assert set(emb.column("split").to_pylist()) == {"train"}  # kept corpus column, read on a worker
    x = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)
    fail = pq.read_table("out/emb/failures", filesystem=fs).to_pylist()
    assert [f["id"] for f in fail] == [s3_corpus[CORRUPT]] and fail[0]["stage"] == "decode"
    with fs.open_input_stream("out/emb/manifest.json") as f:
        m = json.loads(f.read())
    assert (m["rows_in"], m["rows_out"], m["rows_failed"]) == (N_IMAGES, N_IMAGES - 1, 1)
    assert m["shards"] == {"total": 4, "done": 4, "skipped_this_run": 0, "incomplete": []}
    files = _files(fs, "out/emb")
    assert {"out/emb/config.yaml", "out/emb/shards.json", "out/emb/skipped.parquet"} <= set(files)
    assert not [p for p in files if "/_parts/" in p]
    capsys.readouterr()

    # resume: a second run does nothing and touches nothing
    assert main(_args("s3://corpus/world", "s3://out/emb")) == 0
    assert "4 shards already done, nothing to do" in capsys.readouterr().err
    again = _files(fs, "out/emb")
    skipped = "out/emb/skipped.parquet"  # re-listed on every run, as for local outputs
    assert {k: v for k, v in again.items() if k != skipped} == \
        {k: v for k, v in files.items() if k != skipped}
    files = again

    # bad inputs fail clearly, before any work, and lose nothing (even with overwrite=true)
    cases = [
        (_args("s3://no-such-bucket/world", "s3://out/emb", "overwrite=true"),
         "FileNotFoundError", "bucket 'no-such-bucket' does not exist"),
        (_args("s3://corpus/missing", "s3://out/emb", "overwrite=true"),
         "FileNotFoundError", "corpus input s3://corpus/missing does not exist"),
        (_args("ftp://corpus/world", "s3://out/emb"), "ValueError", "unsupported URI scheme"),
        (_args("s3://corpus/world", "s3://no-out-bucket/emb"), "FileNotFoundError",
         "bucket 'no-out-bucket' does not exist"),
        (_args("s3://corpus/world", "s3:///emb"), "ValueError", "names no bucket"),
    ]
    for argv, kind, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert kind in err and message in err, (argv, err[-2000:])
    assert _files(fs, "out/emb") == files
    assert not _files(fs, "no-out-bucket")


def test_parts_finalise_and_resume_cleanup_on_s3(s3_env):
    """The worker-side writer's pieces against the server, without Ray: parts written
    all-or-nothing, a replayed part overwritten, a shard merged, and what an interrupted run
    left (parts, a stale failure file) removed by the next run's clean-up."""
    from aligner.data.embedding_parts import PARTS_DIR, finalize_shard, write_parts
    from aligner.data.embeddings import clean_partial, done_shards, output_counts
    from aligner.data.io import Store

    fs = s3_env
    store = Store("s3://out/pieces")
    store.check()
    n, dim = 5, 4
    rng = np.random.default_rng(0)
    batch = {"id": np.array([f"p{i}" for i in range(n)], dtype=object),
             "source": np.array([f"s#{i}" for i in range(n)], dtype=object),
             "row": np.arange(n), "caption": np.array(["", "c", "", "", ""], dtype=object),
             "reason": np.array(["", "", "corrupt: x", "", ""], dtype=object),
             "stage": np.array(["", "", "decode", "", ""], dtype=object),
             "shard_id": np.array(["a"] * 3 + ["b"] * 2, dtype=object),
             "shard_total": np.array([3, 3, 3, -1, -1]),
             "embedding": rng.normal(size=(n, dim)).astype(np.float32),
             "aesthetic": np.zeros(n, np.float32)}
    rec = write_parts(store, batch, dim)
    assert list(rec["part"]) == list(write_parts(store, batch, dim)["part"])  # a replay
    assert len(_files(fs, f"out/pieces/{PARTS_DIR}/a")) == 1
    assert finalize_shard(store, "a", 3, dim)["rows_out"] == 2
    assert done_shards(store) == {"a"}
    assert output_counts(store) == {"rows_out": 2, "rows_failed": 1, "shards_done": 1,
                                    "rows_in": 3}
    got = pq.read_table("out/pieces/embeddings/a.parquet", filesystem=fs)
    assert got.column("id").to_pylist() == ["p0", "p1"]
    assert got.column("caption").to_pylist() == [None, "c"]
    # an interrupted run: shard b has parts and a stale failure file, but no embeddings file
    store.write_bytes("failures/b.parquet", b"stale")
    assert clean_partial(store, ["b"]) == 2  # b's part + its failure file
    assert not [p for p in _files(fs, "out/pieces") if "/_parts/" in p or p.endswith("/b.parquet")]
    assert done_shards(store) == {"a"}
    with pytest.raises(FileNotFoundError, match="bucket 'nope' does not exist"):
        Store("s3://nope/x").check()
