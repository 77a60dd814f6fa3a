"""Text-to-image search (aligner.retrieval.search, jobs.search) over a tiny real corpus, without Ray.

30 generated 64x64 PNGs are written as a Parquet corpus, embedded in-process with the built-in
model (loaded once per module, ~9 s), written in the embed job's layout with a manifest naming
the model and the corpus, and indexed with ``Flat``. Expected hits are computed with numpy from
the same model's text and image embeddings. ``jobs.search.main`` loads the model again from the
index manifest, which checks that the manifest leads back to the same model.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from aligner.data.corpus import fetch_images
from aligner.data.embeddings import embeddings_schema
from aligner.retrieval.index import SearchIndex
from aligner.retrieval.index_build import build_index
from aligner.retrieval.models import ModelSpec, load_retriever
from aligner.retrieval.search import Searcher, corpus_from_index, spec_from_index
from aligner.runtime.manifest import read_manifest, write_manifest

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (240, 220, 40), "white": (245, 245, 245)}
BACKGROUNDS = {"black": (10, 10, 10), "grey": (128, 128, 128)}
QUERIES = ["a red circle", "a blue square on a grey background"]


def draw(shape: str, colour: str, background: str) -> bytes:
    im = Image.new("RGB", (64, 64), BACKGROUNDS[background])
    d = ImageDraw.Draw(im)
    box, fill = (14, 14, 50, 50), COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(32, 10), (54, 54), (10, 54)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def retriever():
    return load_retriever(ModelSpec(), device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory, retriever):
    """Parquet corpus (2 files) -> embeddings in the embed layout -> Flat index."""
    root = tmp_path_factory.mktemp("search")
    rows = [{"id": f"img-{i:02d}", "image": draw(s, c, b), "caption": f"a {c} {s} on a {b} background"}
            for i, (s, c, b) in enumerate(itertools.product(
                ["circle", "square", "triangle"], COLOURS, BACKGROUNDS))]
    assert len(rows) == 30
    corpus = root / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:17]), corpus / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[17:]), corpus / "part-1.parquet")

    emb = retriever.encode_pil([Image.open(io.BytesIO(r["image"])) for r in rows])
    dim = emb.shape[1]
    out = root / "emb"
    (out / "embeddings").mkdir(parents=True)
    aesthetic = np.linspace(0, 1, 30, dtype=np.float32)
    pq.write_table(pa.table({
        "id": [r["id"] for r in rows],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
        "aesthetic": aesthetic, "caption": [r["caption"] for r in rows],
        "source": [f"{corpus}/part-x.parquet#{i}" for i in range(30)]},
        schema=embeddings_schema(dim)), out / "embeddings" / "part-00000.parquet")
    (out / "failures").mkdir()
    write_manifest(out, "embed", config={"input": str(corpus)}, input=str(corpus),
                   model=retriever.describe())
    build_index(out, root / "index", "Flat")
    return types.SimpleNamespace(root=root, corpus=corpus, rows=rows, emb=emb, index=root / "index",
                                 images={r["id"]: r["image"] for r in rows}, aesthetic=aesthetic,
                                 ids=[r["id"] for r in rows])


def expected_hits(w, retriever, query: str, k: int) -> tuple[list[str], np.ndarray]:
    """Top-k ids and scores by numpy: ``encode_texts(q) @ emb.T``, sorted."""
    s = retriever.encode_texts([query])[0].astype(np.float64) @ w.emb.astype(np.float64).T
    order = np.argsort(-s, kind="stable")[:k]
    return [w.ids[i] for i in order], s[order]


# ----------------------------------------------------------------------------- Searcher


def test_searcher_hits_are_the_exact_top_k(world, retriever):
    index = SearchIndex.load(world.index)
    assert spec_from_index(index) == ModelSpec(name="builtin")
    assert corpus_from_index(index) == str(world.corpus)
    searcher = Searcher(index, retriever)
    assert searcher.corpus == str(world.corpus)
    results = searcher.search(QUERIES, k=5)
    assert len(results) == 2
    for q, hits in zip(QUERIES, results, strict=True):
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        scores = np.array([h.score for h in hits])
        assert (np.diff(scores) <= 0).all()
        qv = retriever.encode_texts([q])[0]
        for h in hits:
            row = world.ids.index(h.id)  # ValueError if the id is not in the corpus
            assert h.score == pytest.approx(float(qv @ world.emb[row]), abs=1e-5)
            assert h.aesthetic == pytest.approx(float(world.aesthetic[row]))
            assert h.caption == world.rows[row]["caption"]
        want_ids, want_scores = expected_hits(world, retriever, q, 5)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        assert [h.id for h in hits] == want_ids

    every = searcher.search([QUERIES[0]], k=50)[0]  # k > N: every row once, no padding
    assert sorted(h.id for h in every) == sorted(world.ids)
    images = searcher.images(results[0])
    assert images == {h.id: world.images[h.id] for h in results[0]}


def test_searcher_rejects_bad_queries_and_models(world, retriever, tmp_path):
    index = SearchIndex.load(world.index)
    searcher = Searcher(index, retriever)
    for bad in ([], [""], ["ok", "   "]):
        with pytest.raises(ValueError, match="non-empty"):
            searcher.search(bad)
    with pytest.raises(ValueError, match="embeds into 128 dims"):
        Searcher(index, types.SimpleNamespace(embed_dim=128))
    # embeddings without a manifest: the index cannot name the query model
    (tmp_path / "emb").mkdir()
    pq.write_table(pq.read_table(world.root / "emb" / "embeddings" / "part-00000.parquet"),
                   tmp_path / "emb" / "a.parquet")
    bare = build_index(tmp_path / "emb", tmp_path / "idx", "Flat")
    with pytest.raises(ValueError, match="does not record the embedding model"):
        Searcher(bare)
    assert Searcher(bare, retriever).corpus is None
    assert Searcher(bare, retriever).images(searcher.search(["x"], 2)[0]) == {}


# ----------------------------------------------------------------------------- fetch_images


def test_fetch_images_parquet(world, tmp_path):
    want = ["img-03", "img-20", "img-29"]
    got = fetch_images(str(world.corpus), [*want, "img-03", "no-such-id", ""])
    assert got == {i: world.images[i] for i in want}
    one_file = fetch_images(str(world.corpus / "part-1.parquet"), ["img-20", "img-03"])
    assert one_file == {"img-20": world.images["img-20"]}
    assert fetch_images(str(world.corpus), []) == {}

    # a corpus of uris: the bytes are read from the referenced files
    (tmp_path / "files").mkdir()
    for i in ("img-01", "img-02"):
        (tmp_path / "files" / f"{i}.png").write_bytes(world.images[i])
    (tmp_path / "uris").mkdir()
    pq.write_table(pa.table({"id": ["img-01", "img-02", "img-09"],
                             "uri": [str(tmp_path / "files" / "img-01.png"),
                                     str(tmp_path / "files" / "img-02.png"),
                                     str(tmp_path / "files" / "gone.png")]}),
                   tmp_path / "uris" / "c.parquet")
    got = fetch_images(str(tmp_path / "uris"), ["img-02", "img-09", "img-01"])
    assert got == {"img-01": world.images["img-01"], "img-02": world.images["img-02"]}


def test_fetch_images_folder(world, tmp_path):
    folder = tmp_path / "folder"
    for rel, i in (("a/one.png", "img-04"), ("a/two.png", "img-05"), ("b/three.png", "img-06")):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(world.images[i])
    (folder / "a" / "one.txt").write_text("a caption")
    got = fetch_images(str(folder), ["b/three.png", "a/one.png", "a/missing.png"])
    assert got == {"b/three.png": world.images["img-06"], "a/one.png": world.images["img-04"]}


def test_fetch_images_webdataset(world, tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    keys = {"000000": "img-07", "000001": "img-08", "sub/000002": "img-10", "000003": "img-11"}
    for n, chunk in enumerate([list(keys)[:2], list(keys)[2:]]):
        with tarfile.open(shards / f"shard-{n:05d}.tar", "w") as tar:
            for key in chunk:
                add(tar, f"{key}.txt", f"caption {key}".encode())  # before the image
                add(tar, f"{key}.png", world.images[keys[key]])
    got = fetch_images(str(shards), ["sub/000002", "000001", "999999"])
    assert got == {"sub/000002": world.images["img-10"], "000001": world.images["img-08"]}
    # the caption member of a sample is never returned as its image
    assert fetch_images(str(shards / "shard-00000.tar"), ["000000"]) == {
        "000000": world.images["img-07"]}


# ----------------------------------------------------------------------------- the job


def test_search_job_in_process(world, retriever, tmp_path, capsys):
    from jobs.search import main

    out = tmp_path / "search"
    rc = main([f"index={world.index}", f"query={json.dumps(QUERIES)}", "k=4",
               f"output={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results) == QUERIES
    for q in QUERIES:
        want_ids, want_scores = expected_hits(world, retriever, q, 4)
        assert [h["id"] for h in results[q]] == want_ids  # the manifest's model, reloaded
        np.testing.assert_allclose([h["score"] for h in results[q]], want_scores, atol=1e-5)
        assert f"query: {q}" in printed
        for i in want_ids:
            assert i in printed
    with Image.open(out / "search.png") as im:
        assert im.format == "PNG" and im.width > 4 * 100
    html = (out / "search.html").read_text()
    assert html.count("src='data:image/png;base64,") == 8  # every hit's image was fetched
    m = read_manifest(out)
    assert m["job"] == "search" and m["corpus"] == str(world.corpus)
    assert m["model"]["name"] == "builtin" and m["config"]["k"] == 4
    assert (out / "config.yaml").is_file()


def test_search_job_bad_input_returns_2(world, tmp_path, capsys):
    from jobs.search import main

    assert main([f"index={tmp_path / 'missing'}", "query=a red circle",
                 f"output={tmp_path / 'a'}"]) == 2
    assert main([f"index={world.index}", f"output={tmp_path / 'b'}"]) == 2
    assert main([f"index={world.index}", "query=   ", f"output={tmp_path / 'c'}"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert capsys.readouterr().out == ""


def test_query_with_a_comma_stays_one_query(world, tmp_path):
    from jobs.search import main

    out = tmp_path / "comma"
    assert main([f"index={world.index}", "query=a red circle, on grey", "k=2",
                 f"output={out}"]) == 0
    assert list(json.loads((out / "results.json").read_text())) == ["a red circle, on grey"]
