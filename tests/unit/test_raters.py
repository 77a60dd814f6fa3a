"""Simulated raters: relevance, Bradley-Terry agreement and its calibration, and the votes a
world gives (schema, splits held apart, two different raters per test pair)."""

from __future__ import annotations

import numpy as np
import pytest

from aligner.data.preferences import conform, read_preferences, write_preferences
from aligner.world import World, WorldSpec, generate_world
from aligner.world.raters import (
    RaterPanel,
    calibrate_temperature,
    draw_pairs,
    expected_agreement,
    make_panel,
    relevance,
)
from aligner.world.votes import RaterSettings, simulate_votes


def test_relevance_counts_only_what_the_query_asks_for():
    labels = {"shape": np.array(["star", "star", "ring", "ring"]),
              "colour": np.array(["red", "blue", "red", "blue"]),
              "count": np.array([2, 2, 3, 2]), "background": np.array(["sand"] * 4)}
    any_count = {"shape": "star", "colour": "red", "count": 0, "background": ""}
    assert relevance(any_count, labels).tolist() == [1.0, 0.5, 0.5, 0.0]
    with_count = {"shape": "star", "colour": "red", "count": 2, "background": ""}
    np.testing.assert_allclose(relevance(with_count, labels), [1, 2 / 3, 1 / 3, 1 / 3])


def test_expected_agreement_matches_its_definition():
    panel = RaterPanel(0.5, np.array([0.7, 1.0, 1.6]))
    du = np.array([0.0, 0.3, -1.2, 5.0])
    want = []
    for d in du:
        p = [panel.p_first(np.array([d]), np.array([r]))[0] for r in range(3)]
        pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
        want.append(np.mean([p[i] * p[j] + (1 - p[i]) * (1 - p[j]) for i, j in pairs]))
    assert expected_agreement(du, panel) == pytest.approx(np.mean(want))
    assert expected_agreement(np.zeros(5), panel) == pytest.approx(0.5)
    assert expected_agreement(np.full(5, 50.0), panel) == pytest.approx(1.0)


def test_calibration_hits_the_target_and_refuses_the_impossible():
    rng = np.random.default_rng(0)
    du = rng.normal(0, 0.6, 2000)
    mult = make_panel(20, 0.25, 1.0, seed=0).multipliers
    t = calibrate_temperature(du, mult, 0.65)
    assert expected_agreement(du, RaterPanel(t, mult)) == pytest.approx(0.65, abs=1e-4)
    assert calibrate_temperature(du, mult, 0.8) < t  # less noise for more agreement
    with pytest.raises(ValueError, match="out of reach"):
        calibrate_temperature(np.zeros(10), mult, 0.65)
    with pytest.raises(ValueError, match="target_agreement"):
        calibrate_temperature(du, mult, 0.4)


def test_draw_pairs_are_distinct_images_of_the_query_content():
    labels = {"shape": np.array(["star"] * 6 + ["ring"] * 4),
              "colour": np.array(["red"] * 3 + ["blue"] * 3 + ["red"] * 4),
              "count": np.zeros(10, int), "background": np.array([""] * 10)}
    truth = [{"shape": "star", "colour": "red", "count": 0, "background": ""}]
    d = draw_pairs(truth, labels, pairs_per_query=20, seed=1)
    assert len(d.query) > 3 and (d.a != d.b).all()
    assert len({(min(x, y), max(x, y)) for x, y in zip(d.a, d.b, strict=True)}) == len(d.a)
    rel = relevance(truth[0], labels)
    both = np.stack([rel[d.a], rel[d.b]], 1)
    assert (both.max(1) == 1.0).all() or any(k == "partial" for k in d.kind)
    assert all((k == "full") == (min(x) == 1.0) for k, x in zip(d.kind, both, strict=True))


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> World:
    d = tmp_path_factory.mktemp("raters")
    generate_world(WorldSpec(n_images=1200, n_queries=150, n_paraphrases=5, rows_per_file=600,
                             gallery_relevant=0),  # votes skip galleries: test_galleries.py
                   d / "world", workers=1, progress=False)
    return World(d / "world")


def test_votes_keep_splits_apart_and_follow_the_page_schema(small_world, tmp_path):
    votes, test, stats = simulate_votes(small_world, RaterSettings(pairs_per_query=20,
                                                                   test_pairs_per_query=20))
    write_preferences(votes, tmp_path)
    back = read_preferences(tmp_path)
    assert back.num_rows == votes.num_rows > 0
    assert set(back["source"].to_pylist()) == {"rater"}
    assert all(t.startswith("simulated_rater:r") for t in back["teacher"].to_pylist())
    assert conform(votes).schema == back.schema
    split_of = dict(zip(*(small_world.oracle()[c].to_pylist() for c in ("id", "split")),
                        strict=True))
    q = small_world.queries()
    qsplit = dict(zip(q["query_id"].to_pylist(), q["split"].to_pylist(), strict=True))
    for r in back.to_pylist():
        s = qsplit[r["query_id"]]
        assert s in ("train", "val")
        assert split_of[r["chosen_id"]] == split_of[r["rejected_id"]] == s
    t = test.to_pylist()
    assert t and all(qsplit[r["query_id"]] == "test" for r in t)
    assert all(split_of[r["image_a"]] == split_of[r["image_b"]] == "test" for r in t)
    assert all(r["first_rater"] != r["second_rater"] for r in t)
    assert stats["expected_agreement_train"] == pytest.approx(0.65, abs=1e-3)
    # observed on held-out pairs: the same noise, so near the target (sampling noise only)
    assert abs(stats["observed_agreement_test"] - 0.65) < 0.06
    again, _, _ = simulate_votes(small_world, RaterSettings(pairs_per_query=20,
                                                            test_pairs_per_query=20))
    cols = ["query_id", "chosen_id", "rejected_id", "teacher"]
    assert again.select(cols).equals(votes.select(cols))  # seeded


def test_rater_settings_reject_bad_values():
    with pytest.raises(ValueError, match="target_agreement"):
        RaterSettings(target_agreement=1.2)
    with pytest.raises(ValueError, match="n_raters"):
        RaterSettings(n_raters=1)
