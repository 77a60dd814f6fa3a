"""Preference fine-tuning on Ray Train (2 real workers): parameters change, the preference
loss falls, validation pairs are used for selection, and a re-run resumes from a checkpoint."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from aligner.world import World, WorldSpec, generate_world


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small world, an untrained built-in model as the start, and preference pairs that
    follow the low-level scorer (a consistent signal the model can learn), plus degraded
    copies."""
    from aligner.aesthetics.scorer import make_scorer
    from aligner.data.images import decode_batch as decode_images
    from aligner.preferences.degrade import degraded_id
    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint

    d = tmp_path_factory.mktemp("align")
    generate_world(WorldSpec(n_images=300, n_queries=40, n_paraphrases=10, val_fraction=0.15,
                             test_fraction=0.15), d / "world", workers=1, progress=False)
    world = World(d / "world")
    save_checkpoint(load_retriever(ModelSpec(), device="cpu"), d / "start")
    train = world.corpus(["id", "image"], split="train")
    ids = np.array(train["id"].to_pylist())
    score = make_scorer("lowlevel").score(decode_images(train["image"].to_pylist()))
    rng = np.random.default_rng(0)
    rows = []
    q = world.queries(kind="content")
    for qid, text, split in zip(q["query_id"].to_pylist(), q["query"].to_pylist(),
                                q["split"].to_pylist(), strict=True):
        if split == "test":
            continue
        for _ in range(12):
            a, b = rng.choice(len(ids), 2, replace=False)
            if score[a] < score[b]:
                a, b = b, a
            rows.append({"query_id": qid, "query": text, "chosen_id": ids[a],
                         "rejected_id": ids[b], "source": "grid", "weight": 1.0})
        a = rng.integers(len(ids))
        rows.append({"query_id": qid, "query": text, "chosen_id": ids[a],
                     "rejected_id": degraded_id(ids[a], "blur"), "source": "degraded",
                     "weight": 0.5})
    pq.write_table(pa.Table.from_pylist(rows), d / "prefs.parquet")
    return d


def _history(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_align_two_workers_learns_and_resumes(ray_session, setup, tmp_path):
    from jobs.align import main

    out = tmp_path / "aligned"
    common = [f"world={setup / 'world'}", f"preferences={setup / 'prefs.parquet'}",
              f"model.checkpoint={setup / 'start'}", f"output={out}", "num_workers=2",
              "train.pairs_per_step=32", "train.captions_per_step=32", "train.lr=1e-3",
              "train.warmup=2", "train.eval_every=10", "train.log_every=5",
              "train.checkpoint_every=10", "train.grad_accum=2", "train.recall_margin=1.0"]
    assert main([*common, "train.steps=20"]) == 0
    hist = _history(out)
    assert [h["step"] for h in hist] == [0, 5, 10, 15, 20], hist
    start, train = hist[0], [h for h in hist if "pref_loss" in h]
    # logged training losses are means over each 5-step interval; held-out pairs are a fixed set
    assert train[-1]["pref_loss"] < train[0]["pref_loss"], train
    assert min(h["val_pair_loss"] for h in hist[1:] if "val_pair_loss" in h) < \
        start["val_pair_loss"], hist
    assert max(h["val_pair_acc"] for h in hist[1:] if "val_pair_acc" in h) > \
        start["val_pair_acc"], hist
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_pairs_by_source"]["degraded"] > 0 and metrics["val_pairs"] > 0
    # train.selection=wise (default): every interpolation, the start (alpha 0) included, was
    # validated; the chosen one is among them
    alphas = [r["alpha"] for r in metrics["interpolations"]]
    assert alphas == [0.0, 0.4, 0.6, 0.8, 1.0] and metrics["selected_alpha"] in alphas
    assert all(r["noninferior"] for r in metrics["interpolations"])  # recall_margin=1.0
    assert all("val_pair_margin" in r and "val_r@10" in r for r in metrics["interpolations"])
    before = load_file(str(setup / "start" / "open_clip_model.safetensors"))
    after = load_file(str(out / "checkpoint" / "open_clip_model.safetensors"))
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert any(k.startswith("visual.") for k in changed), "the image tower did not change"
    assert not any(k.startswith("text.") for k in changed), "towers=vision changed the text side"
    for f in ("train_log.csv", "training.png", "manifest.json", "config.yaml"):
        assert (out / f).is_file(), f

    # same output, more steps: resumes at step 20 instead of starting over
    assert main([*common, "train.steps=30"]) == 0
    steps2 = [h["step"] for h in _history(out)]
    assert steps2 == [0, 5, 10, 15, 20, 25, 30], steps2
