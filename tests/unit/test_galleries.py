"""Dense val / test galleries (docs/evaluation.md, section 1): every val and test content query
gets at least ``gallery_relevant`` relevant images in its split, the natural images stay what
they were, and nothing that trains or votes sees a gallery image."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from aligner.world import World, WorldSpec, generate_world, world_fingerprint
from aligner.world.generate import (
    CONTENT_KEYS,
    GALLERIES_FILE,
    image_id,
    plan_galleries,
    relevant_counts,
    relevant_distribution,
)

SPEC = dict(n_images=600, n_queries=120, n_paraphrases=10, rows_per_file=250)
RELEVANT = 20


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("galleries")
    dense = generate_world(WorldSpec(**SPEC, gallery_relevant=RELEVANT), d / "dense", workers=1,
                           progress=False)
    generate_world(WorldSpec(**SPEC, gallery_relevant=0), d / "plain", workers=1, progress=False)
    return {"dense": World(d / "dense"), "plain": World(d / "plain"), "summary": dense}


def _labels(oracle, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(oracle[k].to_pylist())[mask] for k in CONTENT_KEYS}


def test_natural_images_do_not_depend_on_galleries(worlds):
    dense, plain = worlds["dense"], worlds["plain"]
    n = SPEC["n_images"]
    a, b = plain.corpus(), dense.corpus()
    assert a.num_rows == n and b.num_rows > n
    assert b.slice(0, n).equals(a)  # id, PNG bytes, caption, split
    oa, ob = plain.oracle(), dense.oracle()
    assert ob.select(oa.column_names).slice(0, n).equals(oa.select(oa.column_names))
    assert set(ob["rendered_for"].to_pylist()[:n]) == {""}
    natural_files = [f"corpus/part-{i:05d}.parquet" for i in range(3)]  # 600 rows, 250 a file
    for f in ("queries/queries.parquet", "eval/query_truth.parquet", *natural_files):
        assert (plain.root / f).read_bytes() == (dense.root / f).read_bytes(), f
    assert plain.gallery_ids() == set()


def test_every_val_and_test_query_has_enough_relevant_images(worlds):
    w = worlds["dense"]
    oracle, truth = w.oracle(), {r["query_id"]: r for r in w.query_truth().to_pylist()}
    split = np.asarray(oracle["split"].to_pylist())
    for s in ("val", "test"):
        rows = [truth[q] for q in w.queries(split=s, kind="content")["query_id"].to_pylist()]
        counts = relevant_counts(rows, _labels(oracle, split == s))
        assert len(counts) and counts.min() >= RELEVANT, s
        g = worlds["summary"]["galleries"][s]
        assert g["after"]["min"] >= RELEVANT and g["after"]["under_10"] == 0
        assert g["before"]["median"] < RELEVANT and g["added"] == len(w.gallery_ids(s)) > 0
        assert g["after"] == relevant_distribution(counts)
    # each gallery image shows the content of the query it was rendered for
    for r in oracle.to_pylist()[SPEC["n_images"]:]:
        t = truth[r["rendered_for"]]
        assert (r["shape"], r["colour"]) == (t["shape"], t["colour"])
        assert t["count"] in (0, r["count"]) and t["background"] in ("", r["background"])


def test_gallery_images_are_val_and_test_only_and_listed(worlds):
    w, n = worlds["dense"], SPEC["n_images"]
    listed = pq.read_table(w.root / GALLERIES_FILE)
    assert listed.column_names == ["id", "split"]  # public: never which query
    oracle = w.oracle().to_pylist()
    gallery = [r for r in oracle if r["rendered_for"]]
    assert listed["id"].to_pylist() == [r["id"] for r in gallery]
    assert listed["id"].to_pylist() == [image_id(i) for i in range(n, len(oracle))]
    assert set(listed["split"].to_pylist()) == {"val", "test"}
    qsplit = dict(zip(*(w.queries()[c].to_pylist() for c in ("query_id", "split")), strict=True))
    corpus_split = dict(zip(*(w.corpus(["id", "split"])[c].to_pylist() for c in ("id", "split")),
                            strict=True))
    for r, s in zip(gallery, listed["split"].to_pylist(), strict=True):
        assert r["split"] == s == qsplit[r["rendered_for"]] == corpus_split[r["id"]]
    # ids in a shuffled order: the val images (planned first) are spread over the id range
    first_half = listed["split"].to_pylist()[:len(gallery) // 2]
    assert "val" in first_half and "test" in first_half
    assert w.gallery_ids() == {r["id"] for r in gallery}
    assert w.gallery_ids("train") == set()
    natural = w.corpus(["caption"], split="test", galleries=False)
    assert natural.column_names == ["caption"]
    assert natural.num_rows == worlds["plain"].corpus(["id"], split="test").num_rows
    assert not set(w.corpus(["id"], galleries=False)["id"].to_pylist()) & w.gallery_ids()


def test_same_world_whatever_the_workers(tmp_path):
    spec = WorldSpec(n_images=150, n_queries=60, n_paraphrases=4, gallery_relevant=12,
                     rows_per_file=200)
    a = generate_world(spec, tmp_path / "a", workers=1, progress=False)
    generate_world(spec, tmp_path / "b", workers=2, progress=False)
    assert a["gallery_images"] > 250  # more than one render chunk of gallery images
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert len(files) >= 5
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_plan_counts_planned_images_and_draws_open_attributes():
    labels = {"shape": np.array(["star", "star", "ring"]), "colour": np.array(["red"] * 3),
              "count": np.array([2, 1, 2]), "background": np.array(["sky", "sand", "sky"])}
    splits = np.array(["test", "train", "test"])
    queries = [
        {"query_id": "q0", "split": "test", "shape": "star", "colour": "red", "count": 0,
         "background": ""},
        {"query_id": "q1", "split": "test", "shape": "star", "colour": "red", "count": 2,
         "background": ""},
        {"query_id": "q2", "split": "val", "shape": "ring", "colour": "red", "count": 3,
         "background": "wood"},
        {"query_id": "q3", "split": "train", "shape": "ring", "colour": "red", "count": 0,
         "background": ""},
    ]
    plan = plan_galleries(queries, labels, splits, relevant=10, seed=0)
    assert plan == plan_galleries(queries, labels, splits, relevant=10, seed=0)
    by = {q: [g for g in plan if g.query_id == q] for q in ("q0", "q1", "q2", "q3")}
    assert len(by["q0"]) == 9 and not by["q3"]  # one natural test red star; train: none
    assert len(by["q2"]) == 10 and {g.split for g in by["q2"]} == {"val"}
    assert {(g.content.count, g.content.background) for g in by["q2"]} == {(3, "wood")}
    assert len({(g.content.count, g.content.background) for g in by["q0"]}) > 1  # open: drawn
    twos = 1 + sum(g.content.count == 2 for g in by["q0"])
    assert len(by["q1"]) == max(0, 10 - twos)  # q0's planned images count for q1
    assert [g.query_id for g in plan][:10] == ["q2"] * 10  # val first, then test
    assert plan_galleries(queries, labels, splits, relevant=0, seed=0) == []


def test_fingerprint_describes_the_natural_images_only():
    from aligner.retrieval.shipped import shipped_base_dir, shipped_base_fits

    small = dict(n_images=100, seed=2)
    assert world_fingerprint(WorldSpec(**small, gallery_relevant=0), n_probe=8) == \
        world_fingerprint(WorldSpec(**small, gallery_relevant=20), n_probe=8)
    assert WorldSpec().gallery_relevant == 20
    assert "gallery_relevant" not in world_fingerprint(WorldSpec(n_images=100), n_probe=1)["spec"]
    if shipped_base_dir() is None:
        pytest.skip("the repository ships no base model")
    assert shipped_base_fits(world_fingerprint(WorldSpec(gallery_relevant=20))) == \
        (True, "trained on this very world")


def test_gallery_relevant_is_validated():
    with pytest.raises(ValueError, match="gallery_relevant"):
        WorldSpec(gallery_relevant=-1)


def test_an_old_world_without_galleries_file_loads(worlds, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(worlds["plain"].root, old)
    (old / GALLERIES_FILE).unlink()
    w = World(old)
    assert w.gallery_ids() == set() and w.gallery_ids("test") == set()
    assert w.corpus(["id"], galleries=False).num_rows == SPEC["n_images"]
    assert w.corpus(["id"], split="val").equals(w.corpus(["id"], split="val", galleries=False))


def test_pretraining_data_holds_no_gallery_image(worlds):
    from aligner.training.config import PretrainConfig, PretrainLoopConfig
    from aligner.training.pretrain import prepare_pretrain_data

    w = worlds["dense"]
    # unlocked text layers: no text-feature cache to build (the images are what matter here;
    # tests/unit/test_held_out.py checks the default, cached path)
    cfg = PretrainConfig(world=str(w.root), train=PretrainLoopConfig(text_unlocked_layers=1))
    data = prepare_pretrain_data(cfg)
    assert data.ids and data.val_ids
    assert not (set(data.ids) | set(data.val_ids)) & w.gallery_ids()
    assert len(data.val_ids) == worlds["plain"].corpus(["id"], split="val").num_rows
    assert len(data.val_ids) == len(data.val_captions) == len(data.val_images)


def test_rater_votes_hold_no_gallery_image(worlds):
    from aligner.world.votes import RaterSettings, simulate_votes

    w = worlds["dense"]
    votes, test, _ = simulate_votes(w, RaterSettings(pairs_per_query=5, test_pairs_per_query=5))
    seen = {*votes["chosen_id"].to_pylist(), *votes["rejected_id"].to_pylist(),
            *test["image_a"].to_pylist(), *test["image_b"].to_pylist()}
    assert votes.num_rows and test.num_rows
    assert not seen & w.gallery_ids()


def test_preference_candidates_hold_no_gallery_image(worlds):
    from aligner.preferences.build import allowed_images

    w = worlds["dense"]
    allowed, held = allowed_images(str(w.corpus_dir), ["train"])
    assert allowed and not allowed & w.gallery_ids()
    assert held["held_out"]["test"] > worlds["plain"].corpus(["id"], split="test").num_rows
