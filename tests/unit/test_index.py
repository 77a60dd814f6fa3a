"""faiss index library (aligner.retrieval.index) and the build job, without Ray.

Expected results come from numpy (``q @ x.T`` and a full sort), never from aligner.retrieval.index's own
``exact_topk``, except in the test of ``exact_topk`` itself against hand-written values.

faiss runs single-threaded in this module: on a shared 2-core machine OpenMP's spin-waiting
makes small trainings 10-30x slower when another process holds a core (IVF256,PQ16 on 5k
points: 2.8 s with one thread, 12 s with two under load). Thread count does not change what
is tested.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from aligner.data.embeddings import embeddings_schema, inspect_embeddings, sample_vectors
from aligner.retrieval.index import SearchIndex, exact_topk, merge_topk
from aligner.retrieval.index_build import build_index
from aligner.retrieval.metrics import neighbour_recall
from aligner.runtime.manifest import read_manifest, write_manifest

D = 64


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


# ----------------------------------------------------------------------------- data helpers


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, centres: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """``[n, D]`` unit vectors: a random centre plus Gaussian noise of std ``noise`` per dim."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, len(centres), n)
    return unit(centres[lab] + noise * rng.standard_normal((n, centres.shape[1]), np.float32))


def random_unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d), np.float32))


def make_ids(n: int, seed: int = 0) -> list[str]:
    """Ids that are not the row numbers (so a position/id mix-up shows)."""
    return [f"img-{i:06d}" for i in np.random.default_rng(seed + 99).permutation(n)]


def embedding_table(x: np.ndarray, ids: list[str], dim: int | None = None) -> pa.Table:
    """Rows in the embed job's schema (``aligner.retrieval.embed_pipeline.embeddings_schema``)."""
    n = len(ids)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()),
                                            dim or x.shape[1])
    return pa.table({"id": ids, "embedding": emb,
                     "aesthetic": pa.array(np.arange(n, dtype=np.float32) / 10),
                     "caption": [f"caption of {i}" for i in ids], "source": ["corpus"] * n},
                    schema=embeddings_schema(dim or x.shape[1]))


def write_embed_output(root: Path, x: np.ndarray, ids: list[str] | None = None, files: int = 3,
                       row_group_size: int | None = None, manifest: dict | None = None) -> Path:
    """Write the embed job's output layout: ``embeddings/part-*.parquet``, ``failures/`` (with
    the failure schema, so reading it as embeddings would fail), ``shards.json``,
    ``config.yaml`` and, unless ``manifest`` is ``{}``, ``manifest.json``."""
    ids = ids if ids is not None else make_ids(len(x))
    (root / "embeddings").mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(len(x)), files)):
        t = embedding_table(x[part], [ids[j] for j in part], x.shape[1])
        pq.write_table(t, root / "embeddings" / f"part-{i:05d}.parquet",
                       row_group_size=row_group_size)
    (root / "failures").mkdir()
    pq.write_table(pa.table({"id": ["bad-1"], "source": ["corpus/bad.png"],
                             "reason": ["decode: truncated"], "stage": ["decode"]}),
                   root / "failures" / "part-00000.parquet")
    (root / "shards.json").write_text("{}")
    (root / "config.yaml").write_text("input: /data/corpus\n")
    if manifest != {}:
        write_manifest(root, "embed", config={"input": "/data/corpus"},
                       **(manifest or {"model": {"name": "builtin", "embed_dim": x.shape[1]}}))
    return root


def numpy_topk(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by a float64 matrix product and a full stable sort."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def assert_exact(res, q: np.ndarray, x: np.ndarray, ids: list[str], k: int) -> None:
    """``res`` is the exact top-k: its scores are the true inner products of its hits, sorted,
    and equal the true top-k scores (so only exact ties may be ordered differently)."""
    true_s, true_p = numpy_topk(q, x, k)
    full = q.astype(np.float64) @ x.astype(np.float64).T
    np.testing.assert_allclose(res.scores, np.take_along_axis(full, res.positions, 1), atol=1e-5)
    np.testing.assert_allclose(res.scores, true_s, atol=1e-5)
    assert (np.diff(res.scores, axis=1) <= 0).all()
    assert res.ids == [[ids[p] for p in row] for row in res.positions]
    assert neighbour_recall(res.positions, true_p) == 1.0


# ----------------------------------------------------------------------------- pure helpers


def test_exact_topk_merge_and_recall_by_hand():
    """x = [e1, e2, (0.6, 0.8), -e1], q = e1 -> scores [1, 0, 0.6, -1]: top-2 = rows 0, 2."""
    x = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], np.float32)
    s, i = exact_topk(np.array([[1, 0]], np.float32), x, 2, chunk=1)
    np.testing.assert_allclose(s, [[1.0, 0.6]], atol=1e-7)
    np.testing.assert_array_equal(i, [[0, 2]])
    s, i = exact_topk(np.array([[1, 0]], np.float32), x, 6, chunk=3)  # k > N: padded
    np.testing.assert_array_equal(i, [[0, 2, 1, 3, -1, -1]])
    assert np.isneginf(s[0, 4:]).all()

    # two shards' lists; the 0.9 tie is broken by the lower position (1 before 3); -1 last
    s, p = merge_topk([np.array([[0.5, 0.9]]), np.array([[0.9, 0.1, 7.0]])],
                      [np.array([[7, 3]]), np.array([[1, 4, -1]])], 4)
    np.testing.assert_array_equal(p, [[1, 3, 7, 4]])
    np.testing.assert_allclose(s, [[0.9, 0.9, 0.5, 0.1]])

    # recall: query 0 finds 2 of 3, query 1 finds 2 of 3 (-1 never counts) -> 4/6
    assert neighbour_recall(np.array([[1, 2, 3], [4, 5, -1]]),
                       np.array([[1, 2, 9], [4, 5, 6]])) == pytest.approx(4 / 6)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_round_trip_save_load_search(tmp_path, factory):
    x = random_unit(2000, seed=1)
    q = random_unit(25, seed=2)
    ids = make_ids(len(x))
    emb = write_embed_output(tmp_path / "emb", x, ids)
    # efSearch 64 is saved in the manifest: the loaded index must search with it too
    built = build_index(emb, tmp_path / "idx", factory,
                        ef_search=64 if factory == "HNSW32" else None)
    mem = built.search(q, 10)
    assert built.ntotal == 2000

    for mmap in (False, True):
        loaded = SearchIndex.load(tmp_path / "idx", mmap=mmap)
        got = loaded.search(q, 10)
        assert loaded.ntotal == 2000 and loaded.dim == D
        np.testing.assert_array_equal(got.positions, mem.positions)
        np.testing.assert_array_equal(got.scores, mem.scores)
        assert got.ids == mem.ids
    rows = loaded.rows_at(got.positions[0][:3])
    assert [r["id"] for r in rows] == got.ids[0][:3]
    assert rows[0]["caption"] == f"caption of {rows[0]['id']}"

    if factory == "Flat":
        assert_exact(mem, q, x, ids, 10)
    else:  # approximate; measured 1.00 at efSearch 64 (0.89 at faiss' default 16)
        import faiss

        assert faiss.downcast_index(loaded.shards[0]).hnsw.efSearch == 64
        narrow = SearchIndex.load(tmp_path / "idx", ef_search=16)
        assert faiss.downcast_index(narrow.shards[0]).hnsw.efSearch == 16
        assert neighbour_recall(mem.positions, numpy_topk(q, x, 10)[1]) >= 0.9
    # one [D] query is accepted and equals the first row of the batch
    one = built.search(q[0], 10)
    np.testing.assert_array_equal(one.positions[0], mem.positions[0])


@pytest.mark.parametrize("mode", ["contiguous", "round_robin"])
def test_sharded_flat_equals_unsharded(tmp_path, mode):
    n = 3001  # not a multiple of 3; batches of 700 straddle the shard boundaries
    x = random_unit(n, seed=3)
    q = random_unit(40, seed=4)
    ids = make_ids(n)
    emb = write_embed_output(tmp_path / "emb", x, ids, files=4)
    one = build_index(emb, tmp_path / "one", "Flat").search(q, 10)
    build_index(emb, tmp_path / "three", "Flat", shards=3, shard_mode=mode, batch_size=700)
    idx = SearchIndex.load(tmp_path / "three")
    got = idx.search(q, 10)
    np.testing.assert_array_equal(got.positions, one.positions)
    np.testing.assert_array_equal(got.scores, one.scores)
    assert got.ids == one.ids
    assert_exact(got, q, x, ids, 10)

    sizes = [s["ntotal"] for s in idx.manifest["shards"]]
    assert sizes == ([1000, 1001, 1000] if mode == "contiguous" else [1001, 1000, 1000])
    # one replica holding only shard 1 finds the exact top-k of that shard's rows
    mine = np.arange(1000, 2001) if mode == "contiguous" else np.arange(1, n, 3)
    part = SearchIndex.load(tmp_path / "three", shards=[1])
    assert part.ntotal == len(mine)
    res = part.search(q, 5)
    assert set(res.positions.ravel()) <= set(mine)
    true_s, true_p = numpy_topk(q, x[mine], 5)
    np.testing.assert_array_equal(res.positions, mine[true_p])
    np.testing.assert_allclose(res.scores, true_s, atol=1e-5)


# ----------------------------------------------------------------------------- IVF / PQ recall


def make_clustered_set(tmp_path_factory):
    """20k unit vectors of size 64 around 100 Gaussian centres (noise std 0.5 per dim, i.e.
    about 27 degrees from the centre), written as an embed output in 4 files, 200 queries near
    the same centres, numpy's exact top-10: ``(embeddings dir, x, queries, top-10 positions)``.
    """
    centres = np.random.default_rng(10).standard_normal((100, D)).astype(np.float32)
    x = clustered(20_000, centres, 0.5, seed=11)
    q = clustered(200, centres, 0.5, seed=12)
    emb = write_embed_output(tmp_path_factory.mktemp("clustered"), x, files=4)
    return emb, x, q, numpy_topk(q, x, 10)[1]


@pytest.fixture(scope="module")
def clustered_set(tmp_path_factory):
    """:func:`make_clustered_set`, once per module."""
    return make_clustered_set(tmp_path_factory)


def test_ivf_flat_recall_and_nprobe(clustered_set, tmp_path):
    """Measured (IVF256,Flat, 256 lists over 100 clusters): recall@10 = 1.00 at nprobe 16,
    0.66 at nprobe 1."""
    emb, x, q, truth = clustered_set
    build_index(emb, tmp_path / "ivf", "IVF256,Flat", nprobe=16)
    idx = SearchIndex.load(tmp_path / "ivf")  # nprobe 16 saved by the build
    assert idx.manifest["search_params"] == {"nprobe": 16}
    assert idx.manifest["train_sample"]["used"] == 20_000
    r16 = neighbour_recall(idx.search(q, 10).positions, truth)
    assert r16 >= 0.9

    import faiss

    low = SearchIndex.load(tmp_path / "ivf", nprobe=1)
    assert faiss.extract_index_ivf(low.shards[0]).nprobe == 1
    assert faiss.extract_index_ivf(idx.shards[0]).nprobe == 16
    r1 = neighbour_recall(low.search(q, 10).positions, truth)
    assert r1 < r16 - 0.1, (r1, r16)
    every = SearchIndex.load(tmp_path / "ivf", nprobe=256)  # every list: exhaustive
    assert neighbour_recall(every.search(q, 10).positions, truth) == 1.0


def test_ivf_pq_recall_and_size(clustered_set, tmp_path):
    """Measured (IVF256,PQ16, trained on 5k sampled rows): recall@10 = 0.51 at nprobe 16.

    PQ keeps 16 bytes per vector instead of 256, so neighbours that differ only by the
    within-cluster noise are often misordered; the assertion leaves a 0.09 margin.
    """
    emb, x, q, truth = clustered_set
    idx = build_index(emb, tmp_path / "pq", "IVF256,PQ16", train_sample=5000, nprobe=16)
    assert idx.manifest["train_sample"]["used"] == 5000
    r = neighbour_recall(SearchIndex.load(tmp_path / "pq").search(q, 10).positions, truth)
    assert r >= 0.42, r
    flat = build_index(emb, tmp_path / "flat", "Flat")
    assert flat.ntotal == idx.ntotal == 20_000
    pq_bytes = (tmp_path / "pq" / "shard-00.faiss").stat().st_size
    flat_bytes = (tmp_path / "flat" / "shard-00.faiss").stat().st_size
    assert flat_bytes >= 20_000 * D * 4 and pq_bytes < flat_bytes / 5


# ----------------------------------------------------------------------------- streaming


def test_streamed_adds_equal_one_batch(tmp_path):
    x = random_unit(5000, seed=5)
    q = random_unit(30, seed=6)
    emb = write_embed_output(tmp_path / "emb", x, files=4, row_group_size=300)
    for factory in ("Flat", "IVF32,Flat"):
        big = build_index(emb, tmp_path / f"big-{factory}", factory, batch_size=65_536,
                          train_sample=2000, nprobe=4)
        small = build_index(emb, tmp_path / f"small-{factory}", factory, batch_size=333,
                            train_sample=2000, nprobe=4)
        assert small.ntotal == big.ntotal == 5000
        a, b = big.search(q, 10), small.search(q, 10)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert pq.read_table(tmp_path / f"small-{factory}" / "ids.parquet").equals(
            pq.read_table(tmp_path / f"big-{factory}" / "ids.parquet"))


def test_training_sample_is_drawn_across_files(tmp_path):
    x = random_unit(5000, seed=7)
    emb = write_embed_output(tmp_path / "emb", x, files=4, row_group_size=250)
    infos = inspect_embeddings(emb)
    assert [i.rows for i in infos] == [1250] * 4 and len(infos[0].row_groups) == 5
    sample = sample_vectors(infos, 400, seed=0)
    assert sample.shape == (400, D)
    row_of = {v.tobytes(): i for i, v in enumerate(x)}
    rows = np.array([row_of[v.tobytes()] for v in sample])  # KeyError: not a stored row
    assert len(set(rows)) == 400
    per_file = np.bincount(rows // 1250, minlength=4)
    assert (per_file >= 50).all(), per_file  # binomial(400, 1/4): mean 100, sd 8.7
    np.testing.assert_array_equal(sample, sample_vectors(infos, 400, seed=0))
    assert not np.array_equal(sample, sample_vectors(infos, 400, seed=1))
    assert len(sample_vectors(infos, 10**6)) == 5000  # capped at the row count


# ----------------------------------------------------------------------------- embed layout


def test_embed_job_layout(tmp_path):
    x = random_unit(300, seed=8)
    ids = make_ids(300)
    model = {"name": "builtin", "checkpoint": None, "embed_dim": D}
    emb = write_embed_output(tmp_path / "emb", x, ids, manifest={"model": model})
    idx = build_index(emb, tmp_path / "idx", "Flat")
    m = read_manifest(tmp_path / "idx")
    assert m["ntotal"] == idx.ntotal == 300 and m["counts"]["failed"] == 0
    assert m["embeddings"]["model"] == model
    assert m["embeddings"]["input"] == "/data/corpus"
    assert all("/embeddings/" in f["path"] for f in m["input_files"])
    assert not (tmp_path / "idx" / "failures").exists()
    table = pq.read_table(tmp_path / "idx" / "ids.parquet")
    assert table.column("id").to_pylist() == ids
    assert table.column("caption")[5].as_py() == f"caption of {ids[5]}"
    assert_exact(idx.search(x[:5], 3), x[:5], x, ids, 3)


def test_hive_style_nested_dirs_and_skipped_files(tmp_path):
    x = random_unit(90, seed=9)
    ids = make_ids(90)
    root = tmp_path / "emb" / "embeddings"
    for i, (day, part) in enumerate([("2024-01-01", 0), ("2024-01-01", 1), ("2024-01-02", 0)]):
        d = root / f"day={day}" / f"part={part}"
        d.mkdir(parents=True)
        pq.write_table(embedding_table(x[30 * i:30 * i + 30], ids[30 * i:30 * i + 30]),
                       d / "data.parquet")
    # files a finished output may hold beside the data: never indexed
    junk = embedding_table(random_unit(5, seed=99), [f"junk-{i}" for i in range(5)])
    (root / "_temporary").mkdir()
    pq.write_table(junk, root / "_temporary" / "data.parquet")
    pq.write_table(junk, root / ".part-9.parquet")
    (root / "_SUCCESS").write_text("")
    pq.write_table(pa.table({"id": ["x"], "reason": ["r"]}), root / "stray.parquet")
    # beside embeddings/, an embed output's other tables are not embeddings
    pq.write_table(pa.table({"id": ["x"], "reason": ["r"]}), tmp_path / "emb" / "skipped.parquet")
    (tmp_path / "emb" / "failures").mkdir()
    pq.write_table(junk, tmp_path / "emb" / "failures" / "f.parquet")

    with pytest.raises(ValueError, match="missing column"):  # a stray file is not skipped
        build_index(tmp_path / "emb", tmp_path / "bad", "Flat")
    (root / "stray.parquet").unlink()
    idx = build_index(tmp_path / "emb", tmp_path / "idx", "Flat")
    assert idx.ntotal == 90
    assert pq.read_table(tmp_path / "idx" / "ids.parquet").column("id").to_pylist() == ids


# ----------------------------------------------------------------------------- errors


def test_missing_inputs_raise_file_not_found(tmp_path):
    missing = tmp_path / "nope" / "embeddings"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_index(missing, tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "noindex"))):
        SearchIndex.load(tmp_path / "noindex")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest"):
        SearchIndex.load(tmp_path / "half")


def test_dim_mismatches_raise_value_error(tmp_path):
    d = tmp_path / "emb"
    d.mkdir()
    pq.write_table(embedding_table(random_unit(10, 64), make_ids(10)), d / "a.parquet")
    pq.write_table(embedding_table(random_unit(10, 32), make_ids(10, 1)), d / "b.parquet")
    with pytest.raises(ValueError, match="differ"):
        build_index(d, tmp_path / "idx")

    (d / "b.parquet").unlink()
    idx = build_index(d, tmp_path / "idx", "Flat")
    with pytest.raises(ValueError, match="size 32 but the index holds size 64"):
        idx.search(random_unit(2, 32), 5)
    with pytest.raises(ValueError, match="k must be"):
        idx.search(random_unit(2, 64), 0)
    with pytest.raises(ValueError, match="NaN"):
        idx.search(np.full((1, 64), np.nan, np.float32), 5)


def test_empty_embeddings_raise_value_error(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no embeddings"):
        build_index(tmp_path / "none", tmp_path / "idx")
    (tmp_path / "zero").mkdir()
    pq.write_table(embedding_table(np.zeros((0, D), np.float32), []),
                   tmp_path / "zero" / "a.parquet")
    with pytest.raises(ValueError, match="no embeddings"):
        build_index(tmp_path / "zero", tmp_path / "idx")
    (tmp_path / "nan").mkdir()
    pq.write_table(embedding_table(np.full((3, D), np.nan, np.float32), make_ids(3)),
                   tmp_path / "nan" / "a.parquet")
    with pytest.raises(ValueError, match="none of the 3 rows"):
        build_index(tmp_path / "nan", tmp_path / "idx")
    (tmp_path / "ok").mkdir()
    pq.write_table(embedding_table(random_unit(20), make_ids(20)), tmp_path / "ok" / "a.parquet")
    with pytest.raises(ValueError, match="NotAnIndex"):
        build_index(tmp_path / "ok", tmp_path / "idx", "NotAnIndex")
    with pytest.raises(ValueError, match="shards"):
        build_index(tmp_path / "ok", tmp_path / "idx", "Flat", shards=0)


def test_bad_rows_go_to_failures_and_positions_stay_aligned(tmp_path):
    x = random_unit(50, seed=13)
    ids = make_ids(50)
    t = embedding_table(x, ids).to_pylist()
    t[3]["embedding"] = None
    t[10]["embedding"] = [float("nan")] * D
    d = tmp_path / "emb"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(t, schema=embeddings_schema(D)), d / "a.parquet")
    idx = build_index(d, tmp_path / "idx", "Flat", batch_size=8)
    assert idx.ntotal == 48
    m = idx.manifest["counts"]
    assert (m["rows_in"], m["indexed"], m["failed"]) == (50, 48, 2)
    fails = pq.read_table(tmp_path / "idx" / "failures" / "failures.parquet").to_pylist()
    assert [(f["id"], f["reason"]) for f in fails] == [(ids[3], "null embedding"),
                                                       (ids[10], "non-finite embedding")]
    keep = [i for i in range(50) if i not in (3, 10)]
    res = idx.search(x[[0, 4, 11, 49]], 1)  # each row finds itself, by id
    assert [r[0] for r in res.ids] == [ids[0], ids[4], ids[11], ids[49]]
    assert_exact(idx.search(x[keep][:7], 4), x[keep][:7], x[keep], [ids[i] for i in keep], 4)


def test_ivf_with_too_few_training_points(tmp_path, caplog):
    """200 rows, IVF100 and train_sample 50: an error by default; clamp_nlist=True lowers the
    list count to 50 // 39 = 1 list, which makes the search exhaustive (exact)."""
    x = random_unit(200, seed=14)
    ids = make_ids(200)
    emb = write_embed_output(tmp_path / "emb", x, ids)
    with pytest.raises(ValueError, match="clamp_nlist"):
        build_index(emb, tmp_path / "idx", "IVF100,Flat", train_sample=50)
    assert not (tmp_path / "idx" / "manifest.json").exists()
    with caplog.at_level(logging.WARNING, logger="aligner.retrieval.index"):
        idx = build_index(emb, tmp_path / "idx", "IVF100,Flat", train_sample=50,
                          clamp_nlist=True)
    assert "clamping" in caplog.text
    m = read_manifest(tmp_path / "idx")
    assert (m["factory"], m["factory_requested"]) == ("IVF1,Flat", "IVF100,Flat")
    assert idx.ntotal == 200
    assert_exact(SearchIndex.load(tmp_path / "idx").search(x[:6], 5), x[:6], x, ids, 5)
    # enough training rows: no clamping needed
    ok = build_index(emb, tmp_path / "ok", "IVF4,Flat", train_sample=50)
    assert ok.manifest["factory"] == "IVF4,Flat"


def test_non_normalised_vectors_are_counted_and_warned(tmp_path, caplog):
    x = random_unit(100, seed=15)
    x[[1, 5, 9, 20, 33, 60, 99]] *= 3.0
    emb = write_embed_output(tmp_path / "emb", x)
    with caplog.at_level(logging.WARNING, logger="aligner.retrieval.index"):
        idx = build_index(emb, tmp_path / "idx", "Flat")
    assert read_manifest(tmp_path / "idx")["counts"]["not_normalised"] == 7
    assert "7 of 100 embeddings are not L2-normalised" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aligner.retrieval.index"):
        res = idx.search(x[:1] * 2, 1)  # still searched; scores are inner products
    assert "not L2-normalised" in caplog.text
    assert res.scores[0, 0] == pytest.approx(float(np.max(x.astype(np.float64) @ (2 * x[0]))),
                                             rel=1e-5)


# ----------------------------------------------------------------------------- the job


def test_build_index_job_in_process(tmp_path, capsys):
    from jobs.build_index import main

    x = random_unit(500, seed=16)
    emb = write_embed_output(tmp_path / "emb", x)
    out = tmp_path / "index"
    rc = main([f"embeddings={emb}", f"output={out}", "factory=HNSW32", "shards=2",
               "ef_search=64", "progress=false"])
    assert rc == 0
    for name in ("manifest.json", "config.yaml", "ids.parquet", "shard-00.faiss",
                 "shard-01.faiss"):
        assert (out / name).is_file(), name
    m = read_manifest(out)
    assert m["job"] == "build_index" and m["ntotal"] == 500 and m["factory"] == "HNSW32"
    assert m["search_params"] == {"efSearch": 64}
    assert m["config"]["shards"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["factory"] == "HNSW32"
    assert "500 vectors in 2 shard(s)" in capsys.readouterr().out
    idx = SearchIndex.load(out)
    assert neighbour_recall(idx.search(x[:20], 5).positions, numpy_topk(x[:20], x, 5)[1]) >= 0.9

    assert main([f"embeddings={tmp_path / 'missing'}", f"output={tmp_path / 'o2'}"]) == 2
    assert main([f"embeddings={emb}", f"output={tmp_path / 'o3'}", "factory=Bogus12"]) == 2
    assert main([f"embeddings={emb}", f"output={tmp_path / 'o4'}", "factory=IVF1000,Flat",
                 "train_sample=100"]) == 2
