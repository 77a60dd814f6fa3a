"""The built-in world: deterministic, oracle kept apart, held-out words held out, factors real."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aligner.world import World, WorldSpec, generate_world
from aligner.world.generate import image_record, make_queries
from aligner.world.render import Factors, oracle_beauty, render
from aligner.world.vocab import all_words


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    generate_world(WorldSpec(n_images=300, n_queries=120, n_paraphrases=30, rows_per_file=100,
                             gallery_relevant=0), d, workers=2, progress=False)
    return World(d)


def test_same_seed_same_world_regardless_of_workers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    spec = WorldSpec(n_images=60, n_queries=40, n_paraphrases=10, gallery_relevant=5)
    generate_world(spec, a, workers=1, progress=False)
    generate_world(spec, b, workers=2, progress=False)
    for sub in ("corpus/part-00000.parquet", "corpus/part-00001.parquet", "eval/oracle.parquet",
                "queries/queries.parquet", "galleries.parquet"):
        assert (a / sub).read_bytes() == (b / sub).read_bytes(), sub
    assert pq.read_metadata(a / "galleries.parquet").num_rows > 0
    other = WorldSpec(n_images=60, n_queries=40, n_paraphrases=10, seed=1, gallery_relevant=0)
    generate_world(other, tmp_path / "c", workers=1, progress=False)
    assert not pq.read_table(a / "corpus/part-00000.parquet").equals(
        pq.read_table(tmp_path / "c/corpus/part-00000.parquet"))


def test_oracle_is_not_in_the_corpus(world):
    corpus = world.corpus()
    assert set(corpus.column_names) == {"id", "image", "caption", "split"}
    assert not list(world.corpus_dir.glob("*oracle*"))
    oracle = world.oracle()
    assert {"beauty", "blur", "noise", "exposure", "tone", "composition"} <= set(oracle.column_names)
    assert sorted(oracle["id"].to_pylist()) == sorted(corpus["id"].to_pylist())


def test_splits_and_images(world):
    corpus = world.corpus()
    assert corpus.num_rows == 300 and len(set(corpus["id"].to_pylist())) == 300
    splits = corpus["split"].to_pylist()
    assert splits.count("test") == 45 and splits.count("val") == 15
    im = Image.open(io.BytesIO(corpus["image"][0].as_py()))
    assert im.size == (64, 64) and im.mode == "RGB"


def test_captions_vary_and_carry_looks(world):
    caps = world.corpus(["caption"])["caption"].to_pylist()
    assert len(set(caps)) > 0.95 * len(caps)
    looky = sum(any(w in c for w in ("blurry", "crisp", "dark", "vivid", "grainy", "well-lit",
                                     "centred", "dull", "golden", "green tint", "off-centre",
                                     "sharp", "clean", "faded", "framed", "overexposed"))
                for c in caps)
    assert looky > 0.5 * len(caps)


def test_heldout_words_never_in_captions(world):
    caps = " ".join(world.corpus(["caption"])["caption"].to_pylist())
    heldout = all_words(heldout=True) - all_words(heldout=False)
    leaked = [w for w in heldout if f" {w} " in f" {caps} "]
    assert not leaked, leaked


def test_query_splits_are_disjoint_and_paraphrases_use_heldout_words():
    q, truth = make_queries(WorldSpec(n_images=10, n_queries=200, n_paraphrases=40))
    rows = q.to_pylist()
    keys = {}
    for r, t in zip(rows, truth.to_pylist(), strict=True):
        if r["kind"] == "content":
            keys.setdefault(r["split"], set()).add((t["shape"], t["colour"], t["count"],
                                                    t["background"]))
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"]
    heldout = all_words(heldout=True)
    para = [r["query"] for r in rows if r["kind"] == "paraphrase"]
    assert len(para) == 40 and all(any(w in p for w in heldout) for p in para)


def _factors(**kw):
    base = dict(shape="circle", colour="red", count=1, background="paper", blur=0.0, noise=0.0,
                exposure=0.0, saturation=1.0, tone=0.5, composition=0.0, corner=0, scale=1.0)
    return Factors(**{**base, **kw})


def test_oracle_prefers_clean_images():
    good = oracle_beauty(_factors())
    for bad in (dict(blur=1.8), dict(noise=25), dict(exposure=-0.9), dict(exposure=0.9),
                dict(saturation=0.2), dict(tone=-0.9), dict(composition=0.9)):
        assert oracle_beauty(_factors(**bad)) < good - 0.05, bad


def test_look_factors_are_visible_in_pixels():
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    clean = render(_factors(), 64, rng()).astype(float)
    dark = render(_factors(exposure=-0.9), 64, rng()).astype(float)
    assert dark.mean() < 0.7 * clean.mean()
    blurry = render(_factors(blur=1.8), 64, rng()).astype(float)
    edge = lambda x: np.abs(np.diff(x.mean(2), axis=1)).max()  # noqa: E731 - strongest edge
    assert edge(blurry) < 0.6 * edge(clean)
    noisy = render(_factors(noise=25), 64, rng()).astype(float)
    assert (noisy - clean).std() > 15
    green = render(_factors(tone=-1.0), 64, rng()).astype(float)
    assert (green[..., 1] - green[..., 0]).mean() > (clean[..., 1] - clean[..., 0]).mean() + 10


def test_image_record_is_pure():
    a, b = image_record(3, 17, 64, 0.8), image_record(3, 17, 64, 0.8)
    assert a["png"] == b["png"] and a["caption"] == b["caption"]


def test_world_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        World(tmp_path / "missing")
    with pytest.raises(ValueError):
        WorldSpec(n_images=3)
