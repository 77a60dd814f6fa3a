"""Active pair choice (aligner.feedback.active): the most uncertain pairs first, the per-query
cap, a seeded random baseline, and the "between two systems' rows" mask."""

from __future__ import annotations

import numpy as np
import pytest

from aligner.feedback.active import (
    between_rows_mask,
    choose_pairs,
    pair_uncertainty,
    top_k_rows,
)


def test_uncertain_picks_the_pairs_nearest_a_coin_flip():
    q = ["q0", "q1", "q2", "q3", "q4", "q5"]
    logits = np.array([[3.0, -0.1, 2.0, 0.05, -4.0, 0.5],
                       [3.2, 0.1, 1.8, -0.05, -3.8, 0.7]])  # mean p nearest 1/2: 3, 1, 5
    got = choose_pairs(q, 3, "uncertain", logits)
    assert got.tolist() == [3, 1, 5]
    # one head works too, and allowed removes candidates
    allowed = np.ones(6, bool)
    allowed[3] = False
    assert choose_pairs(q, 2, "uncertain", logits[0], allowed=allowed).tolist() == [1, 5]


def test_disagreement_picks_where_the_heads_differ():
    q = ["q0", "q1", "q2", "q3"]
    logits = np.array([[0.0, 4.0, 1.0, -2.0],
                       [0.0, -4.0, 1.1, 2.0],
                       [0.0, 4.0, 0.9, 0.0]])
    u = pair_uncertainty(logits, "disagreement")
    assert u[0] == 0.0 and u[1] > u[3] > u[2]
    assert choose_pairs(q, 2, "disagreement", logits).tolist() == [1, 3]
    with pytest.raises(ValueError, match="at least 2 heads"):
        choose_pairs(q, 2, "disagreement", logits[:1])


def test_per_query_cap_spreads_the_choice_and_fills_only_when_needed():
    q = ["a"] * 5 + ["b"] * 3 + ["c"]
    # the "a" pairs are all the most uncertain
    logits = np.array([0.0, 0.01, 0.02, 0.03, 0.04, 1.0, 1.1, 1.2, 2.0])
    got = choose_pairs(q, 4, "uncertain", logits, per_query_cap=2)
    assert got.tolist() == [0, 1, 5, 6]
    counts = {k: sum(q[i] == k for i in got) for k in "abc"}
    assert max(counts.values()) <= 2
    # asking for more than the cap allows: the capped ones first, then the next best
    full = choose_pairs(q, 7, "uncertain", logits, per_query_cap=2)
    assert full[:5].tolist() == [0, 1, 5, 6, 8]
    assert full[5:].tolist() == [2, 3]
    assert len(choose_pairs(q, 50, "uncertain", logits, per_query_cap=1)) == 9


def test_random_is_seeded_and_needs_no_model():
    q = [f"q{k % 7}" for k in range(100)]
    a = choose_pairs(q, 30, "random", seed=3)
    assert np.array_equal(a, choose_pairs(q, 30, "random", seed=3))
    assert not np.array_equal(a, choose_pairs(q, 30, "random", seed=4))
    assert len(set(a.tolist())) == 30
    capped = choose_pairs(q, 21, "random", seed=3, per_query_cap=3)
    assert np.bincount([int(q[i][1:]) for i in capped]).max() == 3


def test_ties_are_broken_at_random_not_by_position():
    q = [f"q{k}" for k in range(50)]
    logits = np.zeros(50)
    firsts = {int(choose_pairs(q, 1, "uncertain", logits, seed=s)[0]) for s in range(10)}
    assert len(firsts) > 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategy"):
        choose_pairs(["q"], 1, "greedy")
    with pytest.raises(ValueError, match="logits"):
        choose_pairs(["q"], 1, "uncertain")
    with pytest.raises(ValueError, match="cover"):
        choose_pairs(["q", "r"], 1, "uncertain", np.zeros(3))


def test_between_rows_pairs_one_image_of_each_system():
    rows_base = top_k_rows(["q"] * 4, ["x", "y", "z", "w"], np.array([4, 3, 2, 1.0]), 2)
    rows_new = top_k_rows(["q"] * 4, ["x", "y", "z", "w"], np.array([4, 1, 3, 2.0]), 2)
    assert rows_base == {"q": {"x", "y"}} and rows_new == {"q": {"x", "z"}}
    m = between_rows_mask(["q", "q", "q", "q", "r"], ["y", "z", "x", "y", "y"],
                          ["z", "y", "z", "w", "z"], rows_base, rows_new)
    # y only in base, z only in the new one: either order; x is in both rows: no
    assert m.tolist() == [True, True, False, False, False]
