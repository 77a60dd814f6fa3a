"""The learning curve's bookkeeping: nested vote pools from the population, levels and paired
differences pooled over seeds, the targets read off the rows, the report and the plot."""

from __future__ import annotations

import numpy as np
import pytest

from aligner.feedback.curve import (
    CurveConfig,
    Prepared,
    plot_curves,
    report_markdown,
    summarise,
    vote_pool,
)
from aligner.world import WorldSpec, generate_world
from aligner.world.raters import RaterSettings

QIDS = [f"q-{i:05d}" for i in range(40)]


def _point(rng: np.random.Generator, level: float) -> dict:
    n = len(QIDS)
    return {"query_ids": QIDS, "ndcg@10": (level + rng.normal(0, 0.05, n)).tolist(),
            "beauty_relevant@10": rng.normal(0.2, 0.1, n).tolist(),
            "precision@10": rng.uniform(0.5, 1, n).tolist()}


def test_summary_pools_seeds_and_reads_the_targets():
    rng = np.random.default_rng(0)
    cfg = CurveConfig(counts=[0, 500, 2000], seeds=[0, 1])
    base = _point(rng, 0.50)
    points = {}
    for s in (0, 1):
        points[f"{s}/label_free/0"] = _point(rng, 0.52)
        points[f"{s}/reward/500"] = _point(rng, 0.52)
        points[f"{s}/reward/2000"] = _point(rng, 0.60)
        points[f"{s}/mix/500"] = _point(rng, 0.53)
        points[f"{s}/mix/2000"] = _point(rng, 0.58)
    s = summarise(points, base, cfg)
    rows = {(r["teacher"], r["votes"]): r for r in s["rows"]}
    assert set(rows) == {("label_free", 0), ("reward", 0), ("reward", 500), ("reward", 2000),
                         ("mix", 0), ("mix", 500), ("mix", 2000)}
    # at 0 votes the reward teacher is the label-free one: no difference at all
    assert rows[("reward", 0)]["ndcg@10_vs_label_free"]["mean"] == 0
    r = rows[("reward", 2000)]
    want = np.mean([np.mean(points[f"{k}/reward/2000"]["ndcg@10"])
                    - np.mean(points[f"{k}/label_free/0"]["ndcg@10"]) for k in (0, 1)])
    assert r["ndcg@10_vs_label_free"]["mean"] == pytest.approx(want)
    assert r["ndcg@10_vs_label_free"]["n"] == 2 * len(QIDS)
    assert r["ndcg@10_vs_label_free"]["ci_low"] > 0 and len(r["per_seed"]) == 2
    t = s["targets"]
    assert t["reward_beats_label_free_from"] == 2000
    assert t["reward_beats_label_free_at_2000"] is True
    assert t["mix_non_inferior_every_count"] is True
    text = report_markdown({**s, "world": "toy"})
    assert "| reward | 2,000 |" in text and "from 2000 votes" in text


def test_plot_and_config_checks(tmp_path):
    rng = np.random.default_rng(1)
    cfg = CurveConfig(counts=[0, 500], seeds=[0])
    points = {"0/label_free/0": _point(rng, 0.5), "0/reward/500": _point(rng, 0.55),
              "0/mix/500": _point(rng, 0.56)}
    s = {**summarise(points, _point(rng, 0.45), cfg), "world": "toy"}
    path = plot_curves([s, s], tmp_path / "c.png")
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="label_free"):
        CurveConfig(teachers=["reward"])
    with pytest.raises(ValueError, match="counts"):
        CurveConfig(counts=[-1])
    with pytest.raises(FileNotFoundError, match="not a prepared world"):
        Prepared.of(tmp_path, "both+degraded")


def test_vote_pool_is_nested_seeded_and_never_names_a_test_image(tmp_path):
    from aligner.world import World

    generate_world(WorldSpec(n_images=900, n_queries=120, n_paraphrases=2, rows_per_file=900,
                             gallery_relevant=3), tmp_path / "w", workers=1, progress=False)
    w = World(tmp_path / "w")
    pool, stats = vote_pool(tmp_path / "w", RaterSettings(pairs_per_query=8), seed=0)
    again, _ = vote_pool(tmp_path / "w", RaterSettings(pairs_per_query=8), seed=0)
    other, _ = vote_pool(tmp_path / "w", RaterSettings(pairs_per_query=8), seed=1)
    def key(t):
        return list(zip(t["chosen_id"].to_pylist(), t["rejected_id"].to_pylist(), strict=True))

    assert key(pool) == key(again) and key(pool) != key(other)
    assert pool.num_rows == stats["pool"] > 100
    assert 0.55 < stats["votes_agree_with_world_taste"] < 0.95
    split = dict(zip(w.corpus(["id", "split"])["id"].to_pylist(),
                     w.corpus(["id", "split"])["split"].to_pylist(), strict=True))
    used = set(pool["chosen_id"].to_pylist()) | set(pool["rejected_id"].to_pylist())
    assert {split[i] for i in used} <= {"train", "val"}
    assert not used & w.gallery_ids()
    assert set(pool["weight"].to_pylist()) == {1.0}
    weighted, _ = vote_pool(tmp_path / "w", RaterSettings(pairs_per_query=8,
                                                          weigh_by_confidence=True), seed=0)
    got = np.unique(np.round(weighted["weight"].to_numpy().astype(np.float64), 4))  # float32
    assert set(got.tolist()) <= {0.2, 0.4, 0.6, 0.8, 1.0} and len(got) >= 3


def test_a_run_of_some_points_reports_only_the_points_it_has():
    rng = np.random.default_rng(2)
    cfg = CurveConfig(counts=[0, 500, 2000], seeds=[0, 1], points=["reward/2000"])
    assert cfg.wanted("reward", 2000) and not cfg.wanted("mix", 500)
    points = {f"{s}/label_free/0": _point(rng, 0.5) for s in (0, 1)}
    points.update({"0/reward/2000": _point(rng, 0.6), "1/reward/2000": _point(rng, 0.6),
                   "0/mix/500": _point(rng, 0.6)})  # mix/500 lacks seed 1: no row
    s = summarise(points, _point(rng, 0.45), cfg)
    assert {(r["teacher"], r["votes"]) for r in s["rows"]} == {
        ("label_free", 0), ("reward", 0), ("reward", 2000), ("mix", 0)}
    assert s["targets"]["reward_counts_measured"] == [0, 2000]
    with pytest.raises(ValueError, match="point"):
        CurveConfig(counts=[0, 500], points=["reward/800"])
