"""No choice sees a test image (docs/evaluation.md §3): the evaluation's knob choices are made
by the val queries over the val gallery, so replacing every test image's oracle labels
(beauty and content) by noise changes the reported numbers but no choice.

Choices made elsewhere read no oracle at all: the fine-tune's selection reads teacher pairs
and captions (tests/unit/test_align_select.py), the teachers read pixels and text."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligner.evaluation.config import EvaluateConfig
from aligner.evaluation.run import run_evaluation


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """A small world with dense val/test galleries, an untrained base and a perturbed copy
    ("aligned"), template rephrasings; and a copy of the world whose test images' oracle
    labels are noise."""
    from aligner.evaluation.oracle import with_good_looks
    from aligner.world import World, WorldSpec, generate_world
    from tests.helpers.models import base_and_perturbed

    d = tmp_path_factory.mktemp("choices")
    generate_world(WorldSpec(n_images=400, n_queries=60, n_paraphrases=0, rows_per_file=200,
                             gallery_relevant=8), d / "world", workers=1, progress=False)
    world = World(d / "world")
    base_and_perturbed(d, seed=3)
    q = world.queries(kind="content")
    (d / "rephrase").mkdir()
    pq.write_table(pa.table({"query_id": q["query_id"], "query": q["query"],
                             "rephrased": [with_good_looks(t) for t in q["query"].to_pylist()]}),
                   d / "rephrase" / "queries.parquet")
    shutil.copytree(d / "world", d / "noised")
    o = pq.read_table(d / "noised" / "eval" / "oracle.parquet")
    test = np.asarray(o["split"].to_pylist()) == "test"
    rng = np.random.default_rng(9)
    cols = {}
    for c in ("beauty", "shape", "colour", "count", "background"):
        v = np.asarray(o[c].to_pylist(), dtype=object if c in ("shape", "colour", "background")
                       else None)
        v[test] = rng.permutation(v[test]) if c != "beauty" else rng.uniform(-1, 1, test.sum())
        cols[c] = pa.array(v.tolist(), o.schema.field(c).type)
    for c, arr in cols.items():
        o = o.set_column(o.schema.get_field_index(c), c, arr)
    pq.write_table(o, d / "noised" / "eval" / "oracle.parquet")
    return d


def _evaluate(d, world: str):
    cfg = EvaluateConfig(world=str(d / world), base_checkpoint=str(d / "base"),
                         models=[f"aligned={d / 'aligned'}"], rephrased=str(d / "rephrase"),
                         output=str(d / f"out_{world}"), grid_queries=0, hpir=_hpir(),
                         baseline=_baseline())
    return run_evaluation(cfg).metrics


def _hpir():
    from aligner.evaluation.config import HpirSettings

    return HpirSettings(pool=20)


def _baseline():
    from aligner.evaluation.config import BaselineSettings

    return BaselineSettings(cascade_n=20, teacher_aesthetic=["scorer", "contrast"])


def test_noised_test_labels_change_results_but_no_choice(worlds):
    true, noised = _evaluate(worlds, "world"), _evaluate(worlds, "noised")
    eq_t, eq_n = true["equal_relevance"], noised["equal_relevance"]
    assert eq_t["chosen_on"] == "val" and eq_t["fallback"] is None
    assert true["gallery"]["selection"]["split"] == "val"
    assert true["gallery"]["held_out"]["split"] == "test"
    # every choice: the setting per family, and everything it was chosen from
    assert set(eq_t["families"]) == {"cascade", "query_shift", "rephrase", "teacher_rerank"}
    for fam in eq_t["families"]:
        assert eq_t["families"][fam]["setting"] == eq_n["families"][fam]["setting"], fam
        sel_t = [r["selection"] for r in true["frontier"][fam]]
        sel_n = [r["selection"] for r in noised["frontier"][fam]]
        assert sel_t == sel_n, fam
    assert eq_t["aligned_selection"] == eq_n["aligned_selection"]
    # ... while what is reported on the test gallery did change
    assert true["systems"]["base"]["ndcg@10"] != noised["systems"]["base"]["ndcg@10"]
    assert [r["ndcg@10"] for r in true["frontier"]["cascade"]] != \
        [r["ndcg@10"] for r in noised["frontier"]["cascade"]]
