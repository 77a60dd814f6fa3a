"""Past the embedding job in object storage: embeddings on ``s3://`` -> ``build_index`` (serial,
and ``parallel=true`` in Ray tasks on the session's Ray) -> an index on ``s3://`` -> search and
serving's index loading through the local cache, against a real S3-compatible server.

The server and the environment that points pyarrow at it: ``s3`` / ``s3_env`` in
``tests/integration/conftest.py`` (LocalBucket, ``tests/helpers/s3.py``). The Ray tasks of a
parallel build get no S3 variables of their own: the endpoint and keys travel in the pickled
filesystems. ``tests/unit/test_index_store.py`` covers the cache and the readers' local paths
without a server.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from aligner.data.io import Store
from aligner.retrieval.index import RemoteShardsIndex, SearchIndex
from aligner.retrieval.index_build import build_index
from aligner.runtime.manifest import read_manifest, write_manifest
from tests.helpers.s3 import upload_dir
from tests.integration.test_index_parallel import stable, with_bad_rows
from tests.unit.test_index import make_ids, random_unit, write_embed_output

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300),
              pytest.mark.usefixtures("one_faiss_thread")]

D = 32
INDEX_FILES = {"ids.parquet", "manifest.json", "shard-00.faiss", "shard-01.faiss"}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """``$ALIGNER_CACHE`` in the test's temp dir; index copies land in ``<it>/index``."""
    monkeypatch.setenv("ALIGNER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "index"


def listing(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """``{path below prefix: mtime_ns}`` of every object under ``prefix``."""
    sel = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return {i.path[len(prefix) + 1:]: i.mtime_ns for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File}


def without_paths(manifest: dict) -> dict:
    """A manifest without what names where the embeddings were (a path or a URI)."""
    m = stable(manifest)
    m["embeddings"] = {k: v for k, v in m["embeddings"].items() if k != "path"}
    m["input_files"] = [f["rows"] for f in m["input_files"]]
    return m


def assert_same_hits(got, want) -> None:
    np.testing.assert_array_equal(got.positions, want.positions)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.ids == want.ids


def test_serial_and_parallel_builds_into_s3_equal_the_local_build(ray_session, s3_env, cache,
                                                                  tmp_path):
    fs = s3_env
    n = 900
    x = random_unit(n, d=D, seed=51)
    ids = make_ids(n, seed=5)
    emb = with_bad_rows(tmp_path / "emb", x, ids, files=4)  # a null and a NaN vector
    write_manifest(emb, "embed", model={"name": "builtin", "embed_dim": D})
    upload_dir(emb, "s3://emb/run")
    common = {"shards": 2, "batch_size": 100, "train_sample": 800, "nprobe": 4}
    factory = "IVF16,PQ8x4,RFlat"
    local = build_index(emb, tmp_path / "local", factory, **common)
    serial = build_index("s3://emb/run", "s3://index/serial", factory, **common)
    par = build_index("s3://emb/run", "s3://index/par", factory, parallel=True, **common)

    for name in ("serial", "par"):
        files = listing(fs, f"index/{name}")
        assert set(files) == INDEX_FILES | {"failures/failures.parquet"}, files  # no _parts/
        for f in ("shard-00.faiss", "shard-01.faiss"):
            with fs.open_input_stream(f"index/{name}/{f}") as s:
                assert s.read() == (tmp_path / "local" / f).read_bytes(), (name, f)
        assert pq.read_table(f"index/{name}/ids.parquet", filesystem=fs).equals(
            pq.read_table(tmp_path / "local" / "ids.parquet")), name
        fails = pq.read_table(f"index/{name}/failures/failures.parquet", filesystem=fs)
        want_fails = pq.read_table(tmp_path / "local" / "failures" / "failures.parquet")
        assert fails.drop(["file"]).equals(want_fails.drop(["file"])), name
        assert fails.column("file").to_pylist() == ["s3://emb/run/part-00.parquet"] * 2
    ml, ms, mp = (read_manifest(p) for p in (tmp_path / "local", "s3://index/serial",
                                              "s3://index/par"))
    assert mp["parallel"] is True and ms["parallel"] is False
    assert without_paths(ms) == without_paths(ml) == without_paths(mp)
    assert ms["embeddings"]["path"] == "s3://emb/run"
    assert ms["embeddings"]["model"] == {"name": "builtin", "embed_dim": D}
    assert [f["path"] for f in ms["input_files"]][:2] == ["s3://emb/run/part-00.parquet",
                                                          "s3://emb/run/part-01.parquet"]
    assert ms["counts"] == {"rows_in": n, "indexed": n - 2, "failed": 2, "not_normalised": 0}

    q = random_unit(20, d=D, seed=52)
    want = local.search(q, 10)
    for got in (serial, par, SearchIndex.load("s3://index/serial"),
                SearchIndex.load("s3://index/par", mmap=True)):
        assert_same_hits(got.search(q, 10), want)
    assert len(list(cache.iterdir())) == 2  # one copy per index


def test_the_cache_is_reused_and_follows_the_manifest(s3_env, cache, tmp_path, caplog):
    x = random_unit(400, d=D, seed=61)
    emb = write_embed_output(tmp_path / "emb", x)
    uri = "s3://index/cached"
    local = build_index(emb, tmp_path / "local", "Flat", shards=2)
    build_index(emb, uri, "Flat", shards=2)  # local embeddings, index in the store
    q = x[:6]

    def load(**kw) -> tuple[SearchIndex, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="aligner.retrieval.index_store"):
            index = SearchIndex.load(uri, **kw)
        return index, caplog.text

    # serving's pieces: the retriever over remote shards needs the ids only; a shard group
    # replica its own shards
    remote = RemoteShardsIndex.open(uri, fan_out=None)
    assert remote.ntotal == 400
    (copy,) = cache.iterdir()
    assert sorted(p.name for p in copy.iterdir() if not p.name.startswith(".")) == \
        ["ids.parquet", "manifest.json", "source.txt"]
    assert (copy / "source.txt").read_text().strip() == uri
    one, text = load(shards=[1])
    assert "downloaded 1 file(s)" in text and str(copy) in text
    assert_same_hits(one.search(q, 5), SearchIndex.load(tmp_path / "local", shards=[1]).search(q, 5))
    full, text = load(mmap=True)
    assert "downloaded 1 file(s)" in text  # shard 0; the rest was there
    assert_same_hits(full.search(q, 5), local.search(q, 5))
    inodes = {p.name: p.stat().st_ino for p in copy.iterdir()}
    _, text = load()
    assert "using the cached copy" in text and "downloaded" not in text
    assert {p.name: p.stat().st_ino for p in copy.iterdir()} == inodes

    # rebuilt in place: a new manifest, so a new copy; the old one is left as it was
    rebuilt = build_index(emb, uri, "IVF4,Flat", nprobe=4)
    new, text = load()
    assert "downloaded 2 file(s)" in text
    assert new.manifest["factory"] == "IVF4,Flat" and len(new.shards) == 1
    assert_same_hits(new.search(q, 5), rebuilt.search(q, 5))
    assert len(list(cache.iterdir())) == 2
    assert {p.name: p.stat().st_ino for p in copy.iterdir()} == inodes


def test_bad_inputs_fail_clearly_and_write_nothing(s3_env, cache, tmp_path, capsys):
    from jobs.build_index import main
    from jobs.search import main as search_main

    fs = s3_env
    x = random_unit(200, d=D, seed=71)
    upload_dir(write_embed_output(tmp_path / "emb", x), "s3://emb/good")
    Store("s3://emb/empty").write_text("README.txt", "no embeddings here")
    assert main(["embeddings=s3://emb/good", "output=s3://index/keep", "factory=Flat",
                 "progress=false"]) == 0
    kept = SearchIndex.load("s3://index/keep").search(x[:3], 4)
    before = listing(fs, "index")
    assert "keep/config.yaml" in before
    capsys.readouterr()

    def args(emb: str, out: str = "s3://index/new", *extra: str) -> list[str]:
        return [f"embeddings={emb}", f"output={out}", "factory=Flat", "progress=false", *extra]

    cases = [
        (args("s3://no-such-bucket/emb"), "FileNotFoundError",
         "embeddings s3://no-such-bucket/emb: bucket 'no-such-bucket' does not exist"),
        (args("s3://emb/missing"), "FileNotFoundError", "embeddings: s3://emb/missing does not exist"),
        (args("s3://emb/empty"), "ValueError", "no embeddings: s3://emb/empty holds no Parquet files"),
        (args("s3://emb/empty", "s3://index/new", "parallel=true", "shards=2"), "ValueError",
         "no embeddings: s3://emb/empty holds no Parquet files"),
        (args("s3://emb/good", "s3://no-out-bucket/idx"), "FileNotFoundError",
         "index output s3://no-out-bucket/idx: bucket 'no-out-bucket' does not exist"),
        (args("s3://emb/good", "s3://index/keep", "factory=NotAnIndex"), "ValueError",
         "faiss cannot build factory string 'NotAnIndex'"),
        (args("s3://emb/good", "ftp://host/idx"), "ValueError", "unsupported URI scheme 'ftp'"),
    ]
    for argv, kind, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{kind}: " in err and message in err, (argv, err[-2000:])
    assert listing(fs, "index") == before  # the old index untouched, nothing new
    assert not listing(fs, "no-out-bucket")
    assert_same_hits(SearchIndex.load("s3://index/keep").search(x[:3], 4), kept)

    for uri, kind, message in [
        ("s3://no-such-bucket/idx", FileNotFoundError,
         "index s3://no-such-bucket/idx: bucket 'no-such-bucket' does not exist"),
        ("s3://index/missing", FileNotFoundError, "index directory s3://index/missing does not exist"),
        ("s3://emb/empty", FileNotFoundError, "no manifest.json in s3://emb/empty"),
        ("s3://emb/good", FileNotFoundError, "index file s3://emb/good/ids.parquet is missing"),
    ]:
        with pytest.raises(kind, match=message):
            SearchIndex.load(uri)
    assert search_main(["index=s3://index/missing", "query=a cat", f"output={tmp_path / 's'}"]) == 2
    assert "index directory s3://index/missing does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_embed_index_search_and_serving_all_in_s3(ray_session, s3_env, s3_corpus, cache,
                                                  tmp_path, capsys):
    """The whole path with the built-in model: jobs.embed s3 -> s3, jobs.build_index
    parallel s3 -> s3, jobs.search over the s3 index (images from the s3 corpus), and what a
    serving replica does with an s3 index (the app's checks, the shard groups from the
    manifest, a shard replica, the search service)."""
    from aligner.retrieval.models import ModelSpec
    from aligner.retrieval.search import Searcher
    from aligner.retrieval.service import SearchService
    from jobs import build_index as build_job
    from jobs import embed, search
    from serving.app import build_app
    from serving.deployments import IndexShard

    fs = s3_env
    assert embed.main(["input=s3://corpus/world", "output=s3://out/e2e", "model.name=builtin",
                       "batch_size=16", "rows_per_shard=10", "progress=false"]) == 0
    uri = "s3://index/e2e"
    assert build_job.main(["embeddings=s3://out/e2e", f"output={uri}", "factory=Flat",
                           "shards=2", "parallel=true", "progress=false"]) == 0
    assert "by Ray tasks" in capsys.readouterr().out
    assert set(listing(fs, "index/e2e")) == INDEX_FILES | {"config.yaml"}
    m = read_manifest(uri)
    assert m["ntotal"] == len(s3_corpus) - 1 and m["config"]["output"] == uri
    assert m["embeddings"]["input"] == "s3://corpus/world"

    query = "two red circles on grass"
    out = tmp_path / "search"
    assert search.main([f"index={uri}", f"query={query}", "k=5", f"output={out}"]) == 0
    got = json.loads((out / "results.json").read_text())[query]
    build_index("s3://out/e2e", tmp_path / "local", "Flat")  # the same vectors, indexed here
    local = Searcher.open(tmp_path / "local")
    want = local.search([query], 5)[0]
    assert [h["id"] for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], rtol=1e-6)
    images = Searcher(SearchIndex.load(uri), local.retriever).images(want)  # the s3 corpus
    assert sorted(images) == sorted(h.id for h in want)
    assert all(v.startswith(b"\x89PNG") for v in images.values())

    # serving: the app's start-up checks and shard groups read the manifest in the store
    args = {"corpus": "s3://corpus/world", "data_dir": str(tmp_path / "serving"),
            "models": {"base": {"indexes": {"main": uri}, "shard_groups": 2},
                       "aligned": {"indexes": {"main": uri}}},
            "auth": {"api_key": "k"}}
    build_app(args)
    with pytest.raises(FileNotFoundError, match="s3://index/none is not a finished index"):
        build_app({**args, "models": {**args["models"],
                                      "aligned": {"indexes": {"main": "s3://index/none"}}}})
    q = local.retriever.encode_texts([query])
    replicas = [IndexShard.func_or_class(uri, [g]) for g in (0, 1)]  # one shard each

    def fan_out(queries: np.ndarray, k: int, params: dict) -> list:
        return [(r.scores, r.positions) for r in
                (g.index.search(queries, k, **params) for g in replicas)]

    merged = RemoteShardsIndex.open(uri, fan_out).search(q, 5)
    want_q = local.index.search(q, 5)
    assert merged.ids == want_q.ids
    np.testing.assert_allclose(merged.scores, want_q.scores, rtol=1e-6)
    service = SearchService.open(ModelSpec(name="builtin"), {"main": uri})
    assert service.index("main").ntotal == m["ntotal"]
    assert service.index("main").search(q, 5).ids == want_q.ids
