"""The alignment claim, as a test that can fail: on a small world, the default (oracle-free)
teacher's pairs fine-tune the shipped base on Ray Train, and the aligned model beats the
contrastive-only control with the same steps on held-out data: the teacher's reward margin on
held-out pairs (test queries x test images) and the oracle's aesthetic@10 over the test
gallery. The same fine-tune on the *flipped* preferences (chosen and rejected swapped) loses
both comparisons: the check is sensitive to the sign of the preference loss."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligner.world import World, WorldSpec, generate_world

STEPS = 30


@pytest.fixture(scope="module")
def claim_setup(tmp_path_factory, ray_session):
    """World -> shipped base -> embeddings -> template rephrasings -> the default teacher's
    pairs (train queries and images) and held-out pairs (test queries and images)."""
    from PIL import Image

    from aligner.aesthetics.scorer import make_scorer
    from aligner.data.embeddings import embeddings_schema
    from aligner.data.images import decode_batch
    from aligner.preferences.build import BuildPreferencesConfig, build_preferences
    from aligner.rephrase import make_rephraser
    from aligner.retrieval.models import load_checkpoint
    from aligner.retrieval.shipped import install_shipped_base
    from aligner.runtime.manifest import write_manifest

    d = tmp_path_factory.mktemp("claim")
    generate_world(WorldSpec(n_images=900, n_queries=150, n_paraphrases=10, val_fraction=0.1,
                             test_fraction=0.3, rows_per_file=300), d / "world", workers=1,
                   progress=False)
    world = World(d / "world")
    base = install_shipped_base(d / "base")
    r = load_checkpoint(str(base), device="cpu")
    t = world.corpus(["id", "image", "caption"])
    imgs = decode_batch(t["image"].to_pylist())
    emb = r.encode_pil([Image.fromarray(x) for x in imgs])
    (d / "emb" / "embeddings").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": t["id"], "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1)), emb.shape[1]),
        "aesthetic": make_scorer("lowlevel").score(imgs).astype(np.float32),
        "caption": t["caption"], "source": ["corpus"] * t.num_rows},
        schema=embeddings_schema(emb.shape[1])), d / "emb" / "embeddings" / "p0.parquet")
    write_manifest(d / "emb", "embed", input=str(world.corpus_dir),
                   model={**r.describe(), "checkpoint": str(base)})
    q = world.queries(kind="content")
    reph = make_rephraser("template").rephrase_batch(q["query"].to_pylist())
    pq.write_table(q.append_column("rephrased", pa.array(reph)), d / "queries.parquet")
    common = {"embeddings": str(d / "emb"), "queries": str(d / "queries.parquet"),
              "examples": 0}
    build_preferences(BuildPreferencesConfig(output=str(d / "prefs"), splits=["train", "val"],
                                             **common))
    build_preferences(BuildPreferencesConfig(output=str(d / "heldout"), splits=["test"],
                                             pool_splits=["test"], degraded_per_query=0,
                                             **common))
    prefs = pq.read_table(d / "prefs" / "preferences.parquet")
    flipped = prefs.set_column(prefs.schema.get_field_index("chosen_id"), "chosen_id",
                               prefs["rejected_id"]).set_column(
        prefs.schema.get_field_index("rejected_id"), "rejected_id", prefs["chosen_id"])
    (d / "flipped").mkdir()
    pq.write_table(flipped, d / "flipped" / "preferences.parquet")
    return d, world, base


def _train(d, world, base, prefs, name, pref_weight=1.0, alphas=None):
    from aligner.retrieval.models import ModelSpec
    from aligner.training.config import AlignConfig
    from aligner.training.runs import run_align

    ac = AlignConfig(world=str(world.root), preferences=str(prefs), output=str(d / name),
                     model=ModelSpec(checkpoint=str(base)), num_workers=2)
    train = replace(ac.train, steps=STEPS, pairs_per_step=32, captions_per_step=64,
                    eval_every=10, checkpoint_every=STEPS, lr=3e-4, pref_weight=pref_weight)
    if alphas is not None:
        train = replace(train, wise_alphas=alphas)
    run_align(replace(ac, train=train))
    return d / name / "checkpoint"


class Judge:
    """The two held-out measures of a model, against a reference (the base)."""

    def __init__(self, d, world, base):
        from aligner.data.images import decode_batch
        from aligner.retrieval.models import load_checkpoint

        self.world = world
        test = world.corpus(["id", "image"], split="test")
        self.ids = test["id"].to_pylist()
        self.images = decode_batch(test["image"].to_pylist())
        beauty = dict(zip(*(world.oracle()[c].to_pylist() for c in ("id", "beauty")),
                          strict=True))
        self.beauty = np.array([beauty[i] for i in self.ids])
        q = world.queries(split="test", kind="content")
        self.queries = q["query"].to_pylist()
        held = pq.read_table(d / "heldout" / "preferences.parquet").to_pylist()
        pos = {i: k for k, i in enumerate(self.ids)}
        held = [r for r in held if r["source"] == "grid"]
        assert len(held) > 100 and all(r["chosen_id"] in pos for r in held)
        self.pair_q = [r["query"] for r in held]
        self.pair_w = np.array([pos[r["chosen_id"]] for r in held])
        self.pair_l = np.array([pos[r["rejected_id"]] for r in held])
        self.load = load_checkpoint
        self.ref = self._scores(base)

    def _scores(self, ckpt):
        from PIL import Image

        r = self.load(str(ckpt), device="cpu")
        img = r.encode_pil([Image.fromarray(x) for x in self.images])
        txt = r.encode_texts(self.pair_q)
        pair = (txt * img[self.pair_w]).sum(1), (txt * img[self.pair_l]).sum(1)
        top = np.argsort(-(r.encode_texts(self.queries) @ img.T), axis=1)[:, :10]
        return pair, self.beauty[top].mean(1)

    def measure(self, ckpt):
        """(per-pair reward margin vs the base, per-query oracle aesthetic@10)."""
        (win, lose), aes = self._scores(ckpt)
        (w0, l0), _ = self.ref
        return (win - w0) - (lose - l0), aes


@pytest.mark.timeout(900)
def test_aligned_beats_control_and_flipped_preferences_lose(claim_setup):
    d, world, base = claim_setup
    aligned = _train(d, world, base, d / "prefs", "aligned")

    alpha = json.loads((d / "aligned" / "metrics.json").read_text()).get("selected_alpha", 1.0)
    control = _train(d, world, base, d / "prefs", "control", pref_weight=0.0, alphas=[alpha])
    flipped = _train(d, world, base, d / "flipped", "flipped", alphas=[alpha])
    judge = Judge(d, world, base)
    m_a, aes_a = judge.measure(aligned)
    m_c, aes_c = judge.measure(control)
    m_f, aes_f = judge.measure(flipped)
    margin = {"aligned": m_a.mean() - m_c.mean(), "flipped": m_f.mean() - m_c.mean()}
    aes = {"aligned": (aes_a - aes_c).mean(), "flipped": (aes_f - aes_c).mean()}
    print(f"vs control: reward margin {margin}, oracle aesthetic@10 {aes}, alpha {alpha}")
    assert margin["aligned"] > 0 and aes["aligned"] > 0, (margin, aes)
    assert margin["flipped"] < 0 and aes["flipped"] < 0, (margin, aes)
