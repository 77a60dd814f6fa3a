"""Held out by construction: test-split images (and the images rendered for the val / test
galleries) never reach pre-training, and the evaluation searches them by default (preferences:
tests/unit/test_preferences.py; the alignment trainer's guard: tests/integration/test_align.py;
the galleries: tests/unit/test_galleries.py)."""

from __future__ import annotations

import pytest

from aligner.world import World, WorldSpec, generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    generate_world(WorldSpec(n_images=200, n_queries=60, n_paraphrases=10, rows_per_file=100),
                   d, workers=1, progress=False)
    return World(d)


def _split_of(world: World) -> dict[str, str]:
    t = world.corpus(["id", "split"])
    return dict(zip(t["id"].to_pylist(), t["split"].to_pylist(), strict=True))


def test_pretraining_sees_no_test_image(world):
    from aligner.training.config import PretrainConfig
    from aligner.training.pretrain import prepare_pretrain_data

    data = prepare_pretrain_data(PretrainConfig(world=str(world.root)))
    split = _split_of(world)
    assert data.ids and {split[i] for i in data.ids} == {"train"}
    assert data.val_ids and {split[i] for i in data.val_ids} == {"val"}
    assert len(data.ids) == len(data.images) and len(data.val_ids) == len(data.val_images)
    assert sum(s == "test" for s in split.values()) > 0  # there was something to hold out
    gallery = world.gallery_ids()  # the dense val / test galleries: never pre-trained on
    assert world.gallery_ids("val") and not (set(data.ids) | set(data.val_ids)) & gallery


def test_the_evaluation_searches_held_out_images_by_default(world):
    from aligner.evaluation.config import EvaluateConfig
    from aligner.evaluation.gallery import GALLERY_VIEWS, load_gallery

    cfg = EvaluateConfig()
    assert cfg.gallery == "test" and "held out" in GALLERY_VIEWS["test"]
    g = load_gallery(world=str(world.root), which=cfg.gallery)
    split = _split_of(world)
    # the held-out test images (reported on) and the val images (choices are made on): never
    # a training image
    assert g.ids and {split[i] for i in g.ids} == {"test", "val"}
    assert {split[g.ids[i]] for i in g.indices("test")} == {"test"}
    assert len(g.indices("test")) + len(g.indices("val")) == len(g.ids)
    assert len(load_gallery(world=str(world.root), which="all").ids) == len(split)
