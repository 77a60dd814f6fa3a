"""Reward model from simulated-rater votes, on Ray Train (2 real workers): it learns (held-out
accuracy above CLIP similarity's against the hidden taste), its scores are normalised on the
training items, the checkpoint loads through the ImageReward-style API, and a re-run resumes.

The reward model starts from the shipped base, and both are judged on held-out pairs (test
queries x test-split images, ``test_pairs.parquet``). The shipped base was pre-trained on the
train split of the default world (seed 0, 10,000 images); images are pure in ``(seed, index)``
and splits a seeded permutation, so a seed-0 world of another size would put base training
images in its test split (and flatter the "CLIP similarity" row and the reward model's start).
The world here has another seed (7): it shares no image with the default world, which the
fixture checks (its fingerprint is not the shipped base's world's, and its seed differs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aligner.world import World, WorldSpec, generate_world, world_fingerprint


@pytest.fixture(scope="module")
def reward_setup(tmp_path_factory):
    """A small world the shipped base never saw, the shipped base and simulated-rater votes
    over it."""
    from aligner.retrieval.shipped import install_shipped_base, provenance, shipped_base_fits
    from jobs.rater_votes import main

    d = tmp_path_factory.mktemp("reward")
    spec = WorldSpec(n_images=1200, seed=7, n_queries=150, n_paraphrases=5, rows_per_file=600)
    fits, why = shipped_base_fits(world_fingerprint(spec))
    assert not fits, why
    assert spec.seed != provenance()["world_fingerprint"]["spec"]["seed"]  # no shared image
    generate_world(spec, d / "world", workers=1, progress=False)
    base = install_shipped_base(d / "base")
    assert main([f"world={d / 'world'}", f"output={d / 'votes'}",
                 "raters.pairs_per_query=40"]) == 0
    return d, base


def _history(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_reward_model_learns_the_votes_and_resumes(ray_session, reward_setup, tmp_path):
    from aligner.reward.model import RewardModel
    from jobs.train_reward import main

    d, base = reward_setup
    out = tmp_path / "reward"
    common = [f"votes={d / 'votes'}", f"world={d / 'world'}", f"model.checkpoint={base}",
              f"output={out}", "num_workers=2", "train.batch_size=64", "train.eval_every=30",
              "train.checkpoint_every=30", "train.log_every=10", "train.warmup=5"]
    assert main([*common, "train.steps=90"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rows = m["evaluation"]["rows"]
    acc = {k: r["accuracy"]["mean"] for k, r in rows.items()}
    print("held-out accuracy vs the hidden taste:", acc)
    # learnt from votes alone, the reward model beats the base's similarity on held-out pairs
    assert acc["reward model"] > acc["CLIP similarity"] + 0.02, acc
    assert acc["reward model"] > 0.6
    assert m["val_acc_vs_votes"] > 0.55
    assert m["evaluation"]["raters"] == "simulated raters"
    for f in ("reward_eval.md", "reward_eval.png", "training.png", "manifest.json"):
        assert (out / f).is_file(), f

    rm = RewardModel.load(out / "checkpoint")
    assert rm.norm.n > 100 and rm.norm.std > 0
    # normalised on the training items: scores of training images have mean ~0 and sd ~1
    from aligner.data.preferences import read_preferences

    votes = read_preferences(d / "votes").to_pylist()[:300]
    world = World(d / "world")
    png = dict(zip(*(world.corpus(["id", "image"], split="train")[c].to_pylist()
                     for c in ("id", "image")), strict=True))
    pairs = [(v["query"], png[v[k]]) for v in votes for k in ("chosen_id", "rejected_id")
             if v[k] in png]  # the training items: winners and losers alike
    s = rm.score_batch([q for q, _ in pairs], [im for _, im in pairs])
    assert abs(float(np.mean(s))) < 0.3 and 0.6 < float(np.std(s)) < 1.4, (np.mean(s), np.std(s))

    # same output, more steps: resumes at step 90 instead of starting over
    assert main([*common, "train.steps=120"]) == 0
    steps = [h["step"] for h in _history(out)]
    assert steps == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120], steps
