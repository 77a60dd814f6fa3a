"""The alignment claim, as a test that can fail, on the project's primary metric.

On a small world **none of whose images the shipped base has seen**, the default (oracle-free)
teacher's pairs fine-tune the shipped base on Ray Train, once per training seed (0 and 1), and
each aligned model beats the base on the dense held-out test gallery: aligned - base nDCG@10
(gain match x beauty, ``docs/evaluation.md`` §2; ``WorldEval.graded``) over the test content
queries, each searching only the test-split images, is above 0. Seed 0's aligned model also
beats the contrastive-only control (the same loop without the preference loss, ``control_loop``
at its alpha). The same fine-tune on the *flipped* preferences (chosen and rejected swapped),
output at that alpha, falls below the base and clearly below the aligned model: the test is
sensitive to the sign of the preference loss, so it can fail.

Why the world is unseen: the shipped base was pre-trained on the train split of the default
world (seed 0, 10,000 images). Images are pure in ``(seed, index)`` and splits are a seeded
permutation of the image indices, so a seed-0 world of another size holds the same images as
the default world with its splits re-drawn: most of its "test" images would be base training
images. A world with another seed (here 11) shares no image with the default world; the
fixture checks that its fingerprint is not the shipped base's world's
(``shipped_base_fits``) and that its seed differs.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligner.world import World, WorldSpec, generate_world, world_fingerprint

#: A world the shipped base never saw (another seed), with dense val/test galleries: every
#: val and test content query has at least ``gallery_relevant`` relevant images in its split
#: (90 test queries over about 1,150 test images). With 150 queries (45 test queries) the
#: per-query noise of the paired nDCG difference (SD about 0.1) made a +0.02 gain a 1.3 SE event.
SPEC = WorldSpec(n_images=1000, seed=11, n_queries=300, n_paraphrases=10, val_fraction=0.1,
                 test_fraction=0.2, gallery_relevant=12, rows_per_file=500)
#: Short fine-tunes (the real default is 200 steps); at 40 steps each seed's aligned - base
#: nDCG@10 was about +0.03 with a bootstrap CI above 0 on this world.
STEPS = 40
SEEDS = (0, 1)
#: The selection's non-inferiority margin FOR THIS TEST ONLY (the default is 0.01,
#: docs/defaults.md). On these tiny worlds the val gallery holds a few hundred captions and the
#: paired SE of the validation recall@10 drop is 0.01-0.017 at every alpha, so the upper bound
#: (drop + 1.645 SE) of even a harmless interpolation sits at or above 0.01: in trial runs the
#: default margin output the start (alpha 0, aligned - base = 0 by construction) in 4 of 6
#: fine-tunes and alpha 0.4 by bounds of 0.0088 and 0.0069 in the other 2. The test is about
#: the sign of the preference loss, not the selection (tests/unit/test_align_select.py checks
#: that), so the margin is wide here (every bound seen was <= 0.055): the selection still runs
#: and picks, among the interpolations, the one with the largest validation reward margin.
RECALL_MARGIN = 0.1
K = 10


def unseen_world(d: Path) -> World:
    """Generate :data:`SPEC` under ``d`` and check the shipped base never saw any of its
    images (another seed, and a fingerprint that is not the shipped base's world's)."""
    from aligner.retrieval.shipped import provenance, shipped_base_fits

    fp = world_fingerprint(SPEC)
    fits, why = shipped_base_fits(fp)
    assert not fits, why
    shipped_seed = provenance()["world_fingerprint"]["spec"]["seed"]
    assert fp["spec"]["seed"] == SPEC.seed != shipped_seed, (fp, shipped_seed)
    generate_world(SPEC, d, workers=1, progress=False)
    return World(d)


def prepare(d: Path) -> tuple[World, Path]:
    """World -> shipped base -> embeddings -> template rephrasings -> the default teacher's
    pairs (train and val queries, train-split pools) and the same pairs flipped."""
    from PIL import Image

    from aligner.aesthetics.scorer import make_scorer
    from aligner.data.embeddings import embeddings_schema
    from aligner.data.images import decode_batch
    from aligner.preferences.build import BuildPreferencesConfig, build_preferences
    from aligner.rephrase import make_rephraser
    from aligner.retrieval.models import load_checkpoint
    from aligner.retrieval.shipped import install_shipped_base
    from aligner.runtime.manifest import write_manifest

    world = unseen_world(d / "world")
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
    build_preferences(BuildPreferencesConfig(
        embeddings=str(d / "emb"), queries=str(d / "queries.parquet"), output=str(d / "prefs"),
        splits=["train", "val"], examples=0))  # the default teacher, train-split pools
    prefs = pq.read_table(d / "prefs" / "preferences.parquet")
    flipped = prefs.set_column(prefs.schema.get_field_index("chosen_id"), "chosen_id",
                               prefs["rejected_id"]).set_column(
        prefs.schema.get_field_index("rejected_id"), "rejected_id", prefs["chosen_id"])
    (d / "flipped").mkdir()
    pq.write_table(flipped, d / "flipped" / "preferences.parquet")
    return world, base


def fine_tune(d: Path, world: World, base: Path, prefs: Path, name: str, seed: int,
              alpha: float | None = None, control: bool = False) -> tuple[Path, float]:
    """A short fine-tune on Ray Train (2 workers); returns its checkpoint and selected alpha.

    ``alpha`` None: the default selection (non-inferiority, :data:`RECALL_MARGIN`); else the
    output is exactly that interpolation (``selection=fixed``), without the preference loss
    when ``control`` (``control_loop``)."""
    from aligner.retrieval.models import ModelSpec
    from aligner.training.config import AlignConfig, control_loop
    from aligner.training.runs import run_align

    ac = AlignConfig(world=str(world.root), preferences=str(prefs), output=str(d / name),
                     model=ModelSpec(checkpoint=str(base)), num_workers=2)
    train = replace(ac.train, steps=STEPS, pairs_per_step=32, captions_per_step=64,
                    eval_every=10, checkpoint_every=STEPS, lr=3e-4, seed=seed,
                    recall_margin=RECALL_MARGIN)
    if control:
        train = control_loop(train, alpha)
    elif alpha is not None:
        train = replace(train, selection="fixed", wise_alphas=[float(alpha)])
    m = run_align(replace(ac, train=train))
    return d / name / "checkpoint", float(m["selected_alpha"])


class Judge:
    """The primary metric on the dense held-out test gallery: per test content query, nDCG@10
    (gain match x beauty) of a model's top 10 among the test-split images only."""

    def __init__(self, world: World) -> None:
        from aligner.data.images import decode_batch
        from aligner.evaluation.oracle import WorldEval

        test = world.corpus(["id", "image"], split="test")
        self.ids = test["id"].to_pylist()
        self.images = decode_batch(test["image"].to_pylist())
        q = world.queries(split="test", kind="content")
        self.qids, self.texts = q["query_id"].to_pylist(), q["query"].to_pylist()
        self.ev = WorldEval(world, np.zeros((len(self.ids), 1), np.float32), self.ids)
        rel = self.ev.relevant_counts(self.qids, "test")
        assert len(self.qids) >= 30 and rel.min() >= SPEC.gallery_relevant, rel  # dense

    def graded(self, ckpt: Path) -> dict[str, np.ndarray]:
        from PIL import Image

        from aligner.retrieval.models import load_checkpoint

        r = load_checkpoint(str(ckpt), device="cpu")
        ev = self.ev.with_embeddings(r.encode_pil([Image.fromarray(x) for x in self.images]))
        top = ev.query_topk(r.encode_texts, self.texts, K, split="test")
        return ev.graded(self.qids, top, K, "test")


def _diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {k.split("@")[0]: round(float(np.nanmean(a[k] - b[k])), 4)
            for k in (f"ndcg@{K}", f"precision@{K}", f"beauty_relevant@{K}")}


@pytest.fixture(scope="module")
def claim_setup(tmp_path_factory, ray_session):
    d = tmp_path_factory.mktemp("claim")
    world, base = prepare(d)
    return d, world, base


@pytest.mark.timeout(1200)
def test_aligned_beats_base_per_seed_and_flipped_preferences_lose(claim_setup):
    d, world, base = claim_setup
    judge = Judge(world)
    g_base = judge.graded(base)
    nd = f"ndcg@{K}"
    graded, alphas, seconds = {}, {}, {}

    def run(name, prefs, seed, **kw):
        t0 = time.time()
        ckpt, a = fine_tune(d, world, base, prefs, name, seed, **kw)
        seconds[name] = round(time.time() - t0)
        graded[name] = judge.graded(ckpt)
        return a

    for seed in SEEDS:
        alphas[seed] = run(f"aligned{seed}", d / "prefs", seed)
    # seed 0's aligned model against the same loop without the preference loss (the control)
    # and with the preferences flipped, both output at exactly its alpha (selection=fixed)
    a0 = alphas[SEEDS[0]]
    run("control", d / "prefs", SEEDS[0], alpha=a0, control=True)
    run("flipped", d / "flipped", SEEDS[0], alpha=a0)
    gain = {name: _diff(g, g_base) for name, g in graded.items()}
    aligned0 = graded[f"aligned{SEEDS[0]}"][nd]
    vs = {k: round(float(np.mean(aligned0 - graded[k][nd])), 4) for k in ("control", "flipped")}
    print(f"\nminus the base on the dense test gallery ({len(judge.qids)} test queries, "
          f"{len(judge.ids)} test images; base nDCG@{K} {np.mean(g_base[nd]):.4f}): {gain}; "
          f"aligned{SEEDS[0]} nDCG@{K} minus {vs}; alphas {alphas}; seconds {seconds}")
    (d / "claim.json").write_text(json.dumps({"gain": gain, "vs": vs, "alphas": alphas,
                                              "seconds": seconds}))
    for seed in SEEDS:
        assert alphas[seed] > 0, ("the selection output the start", alphas)
        assert gain[f"aligned{seed}"]["ndcg"] > 0, (seed, gain)
    assert vs["control"] > 0, (vs, gain)
    # the sign of the preference loss decides: flipped pairs make the base worse, and the
    # aligned model beats the flipped one by a clear margin
    assert gain["flipped"]["ndcg"] < 0, gain
    assert vs["flipped"] > 0.03, (vs, gain)
