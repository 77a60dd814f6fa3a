"""The world's taste as a setting: the default world unchanged, a divergent world with the same
images and truthful captions, the taste hidden in eval/, and rater populations around it."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from aligner.world import World, WorldSpec, generate_world, world_fingerprint
from aligner.world.raters import RaterPopulation, RaterSettings, confidences, row_weights
from aligner.world.render import Factors, goodness, oracle_beauty
from aligner.world.taste import (
    DEFAULT_TASTE,
    DIVERGENT_TASTE,
    TASTES,
    FactorTaste,
    Taste,
    look_axes,
    read_taste,
    resolve_taste,
)
from aligner.world.vocab import FACTORS, LOOK_WORDS


def _factors(**over: float) -> Factors:
    base = dict(shape="star", colour="red", count=2, background="sand", blur=0.1, noise=1.0,
                exposure=0.0, saturation=1.0, tone=0.8, composition=0.05, corner=0, scale=1.0)
    return Factors(**{**base, **over})


def _old_oracle(f: Factors) -> float:
    """The built-in world's beauty as it was written before tastes were a setting."""
    w = {"blur": 0.8, "noise": 0.7, "exposure": 0.8, "saturation": 0.5, "tone": 0.8,
         "composition": 0.8}
    g = goodness(f)
    total = sum(w[k] * g[k] for k in w) + 0.4 * g["saturation"] * g["tone"]
    return float(total / sum(w.values()))


def test_default_taste_is_the_old_oracle_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(300):
        f = _factors(blur=rng.uniform(0, 2), noise=rng.uniform(0, 30),
                     exposure=rng.uniform(-1, 1), saturation=rng.uniform(0.15, 1.25),
                     tone=rng.uniform(-1, 1), composition=rng.uniform(0, 1))
        assert oracle_beauty(f) == _old_oracle(f)
        assert DEFAULT_TASTE.goodness(f.as_dict()) == pytest.approx(goodness(f))


def test_the_default_world_is_the_one_the_shipped_base_was_trained_on():
    from aligner.retrieval.shipped import shipped_base_fits

    assert shipped_base_fits(world_fingerprint(WorldSpec()))[0]
    assert world_fingerprint(WorldSpec(taste="divergent"))["sha256"] != \
        world_fingerprint(WorldSpec())["sha256"]  # other captions (which true things are said)


def test_divergent_taste_prefers_low_key_light_and_off_centre_framing():
    t = DIVERGENT_TASTE
    assert sorted(t.disagrees_with(DEFAULT_TASTE)) == ["composition", "exposure"]
    dark, bright = _factors(exposure=-0.8), _factors(exposure=0.8)
    well = _factors(exposure=0.0)
    assert oracle_beauty(dark, t) > oracle_beauty(well, t) > oracle_beauty(bright, t)
    assert oracle_beauty(well) > oracle_beauty(dark) and oracle_beauty(well) > oracle_beauty(bright)
    assert oracle_beauty(_factors(composition=0.9), t) > oracle_beauty(_factors(), t)
    blurry = _factors(blur=1.8)
    assert oracle_beauty(blurry, t) < oracle_beauty(_factors(), t)  # agrees on the rest
    g, gd = t.goodness(_factors().as_dict()), DEFAULT_TASTE.goodness(_factors().as_dict())
    for k in ("blur", "noise", "saturation", "tone"):
        assert g[k] == gd[k]


def test_look_axes_work_on_columns_and_tastes_check_their_input(tmp_path):
    cols = {k: np.array([0.0, 1.0]) for k in FACTORS}
    cols["saturation"] = np.array([1.2, 0.1])
    ax = look_axes(cols)
    assert ax["exposure"].tolist() == [0.0, 1.0] and ax["saturation"].tolist() == [1.0, -1.0]
    assert DIVERGENT_TASTE.beauty(cols).shape == (2,)
    with pytest.raises(ValueError, match="prefer must be one of"):
        Taste({**DEFAULT_TASTE.factors, "tone": FactorTaste(1.0, "golden")})
    with pytest.raises(ValueError, match="every look factor"):
        Taste({"blur": FactorTaste(1.0, "sharp")})
    with pytest.raises(ValueError, match="weight"):
        Taste({**DEFAULT_TASTE.factors, "tone": FactorTaste(-1.0, "warm")})
    path = tmp_path / "brand.json"
    brand = DEFAULT_TASTE.with_weights({"saturation": 2.0}, name="brand").to_dict()
    brand["factors"]["saturation"]["prefer"] = "muted"
    path.write_text(json.dumps(brand))
    got = resolve_taste(str(path))
    assert got.factors["saturation"] == FactorTaste(1.0, "muted") and got.name == "brand"
    with pytest.raises(ValueError, match="one of"):
        resolve_taste("moody")
    with pytest.raises(ValueError, match="taste"):
        WorldSpec(taste="moody")
    assert set(TASTES) == {"default", "divergent"}


@pytest.fixture(scope="module")
def two_worlds(tmp_path_factory):
    d = tmp_path_factory.mktemp("tastes")
    out = {}
    for taste in ("default", "divergent"):
        spec = WorldSpec(n_images=1500, n_queries=150, n_paraphrases=5, rows_per_file=1500,
                         gallery_relevant=0, taste=taste)
        generate_world(spec, d / taste, workers=1, progress=False)
        out[taste] = World(d / taste)
    return out


def _phrase_in(caption: str, phrase: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])", caption) is not None


def test_same_seed_other_taste_same_images_other_beauty_truthful_captions(two_worlds):
    a, b = two_worlds["default"], two_worlds["divergent"]
    ca, cb = a.corpus(), b.corpus()
    assert ca["image"].equals(cb["image"]) and ca["split"].equals(cb["split"])
    oa, ob = a.oracle(), b.oracle()
    for k in FACTORS:
        assert oa[k].equals(ob[k])
    ba, bb = np.asarray(oa["beauty"]), np.asarray(ob["beauty"])
    assert 0.2 < np.corrcoef(ba, bb)[0, 1] < 0.95  # related, not the same
    assert a.taste() == DEFAULT_TASTE and b.taste() == DIVERGENT_TASTE
    # every look phrase is true of its factor, whatever the taste
    rows = ob.to_pylist()
    caps = cb["caption"].to_pylist()
    checked = 0
    for cap, r in zip(caps, rows, strict=True):
        g = goodness(Factors(**{k: r[k] for k in Factors.__dataclass_fields__}))
        for (k, pol), words in LOOK_WORDS.items():
            for w in words.train:
                if not _phrase_in(cap, w) or (k == "composition" and w == "centred"
                                              and _phrase_in(cap, "off-centre")):
                    continue
                checked += 1
                if pol == "good":
                    assert g[k] > 0, (cap, k, w)
                elif pol == "dark":
                    assert r["exposure"] < 0 and g[k] < 0, (cap, w)
                elif pol == "bright":
                    assert r["exposure"] > 0 and g[k] < 0, (cap, w)
                else:
                    assert g[k] < 0, (cap, k, w)
    assert checked > 500
    # the polarity of what is said follows the world's taste: lovely low-key pictures are
    # called dark more often in the divergent world than in the default one
    dark_words = LOOK_WORDS[("exposure", "dark")].train

    def dark_share(world_caps: list[str], beauty: np.ndarray) -> float:
        dark = np.array([r["exposure"] < -0.4 for r in rows])
        top = dark & (beauty > np.quantile(beauty[dark], 0.5))
        said = [any(_phrase_in(c, w) for w in dark_words) for c in np.asarray(world_caps)[top]]
        return float(np.mean(said))

    assert dark_share(caps, bb) > dark_share(ca["caption"].to_pylist(), ba) + 0.1


def test_the_taste_is_recorded_only_in_eval(tmp_path):
    from jobs import make_world

    out = tmp_path / "w"
    assert make_world.main([f"output={out}", "n_images=200", "n_queries=40", "n_paraphrases=2",
                            "gallery_relevant=0", "taste=divergent", "progress=false",
                            "workers=1"]) == 0
    assert read_taste(out / "eval") == DIVERGENT_TASTE
    public = (out / "config.yaml").read_text() + (out / "manifest.json").read_text()
    assert "divergent" not in public and "off_centre" not in public and "hidden" in public
    assert "divergent" in (out / "eval" / "make_world.yaml").read_text()
    assert read_taste(tmp_path) == DEFAULT_TASTE  # a world made before tastes: the default
    meta = pq.read_schema(out / "corpus" / "part-00000.parquet").metadata or {}
    assert not any(b"divergent" in v for v in meta.values())


# ----------------------------------------------------------------------------- populations

@pytest.fixture(scope="module")
def populations(two_worlds):
    w = two_worlds["divergent"]
    return {spread: RaterPopulation.from_world(w, RaterSettings(pairs_per_query=20,
                                                                taste_spread=spread))
            for spread in (0.0, 0.6)}


def test_populations_are_calibrated_and_report_what_can_be_learnt(populations, two_worlds):
    for spread, pop in populations.items():
        c = pop.calibration
        assert c["agreement"] == pytest.approx(0.65, abs=1e-3), spread
        assert 0.5 < c["world_taste_accuracy"] <= c["best_accuracy"] + 1e-9 < 1
        q, a, b, _ = pop.candidate_pairs("test", 10, seed=5)
        held = pop.agreement_stats(q, a, b)
        assert 0.55 < held["agreement"] < 0.75 and held["pairs"] == len(q)
    same, spread = populations[0.0], populations[0.6]
    assert same.calibration["world_taste_accuracy"] == pytest.approx(
        same.calibration["best_accuracy"])  # one taste: the world's is the best predictor
    assert spread.beauty.shape[0] == spread.size and same.beauty.shape[0] == 1
    # raters' own tastes: same ends as the world, other weights
    assert all(t.disagrees_with(two_worlds["divergent"].taste()) == [] for t in spread.tastes)
    assert len({t.factors["exposure"].weight for t in spread.tastes}) == spread.size


def test_informative_confidence_marks_the_reliable_votes(populations):
    pop = populations[0.0]
    q, a, b, _ = pop.candidate_pairs("train", 40, seed=9)
    v = pop.image_votes(q, a, b, np.random.default_rng(0))
    right = v.prefers_a == (v.du > 0)
    hi, lo = v.confidence >= 4, v.confidence <= 2
    assert hi.sum() > 50 and lo.sum() > 50
    assert right[hi].mean() > right[lo].mean() + 0.15
    rnd = confidences(np.full(4000, 0.99), "random", np.random.default_rng(1))
    assert set(np.unique(rnd)) == {1, 2, 3, 4, 5}
    assert confidences(np.array([0.5, 1.0]), "informative",
                       np.random.default_rng(2)).tolist()[1] >= 4


def test_a_row_vote_sees_only_ids_and_prefers_the_better_row(populations):
    pop = populations[0.0]
    qid = next(q for q, sp in pop.query_splits.items() if sp == "train"
               and pop.kinds[q] == "content")
    rel = pop._relevance(qid)
    order = np.lexsort((pop.world_beauty, rel))  # relevant and beautiful last
    good = [pop.ids[i] for i in order[-5:][::-1]]
    bad = [pop.ids[i] for i in order[:5]]
    rng = np.random.default_rng(3)
    votes = [pop.row_vote(qid, good, bad, rng) for _ in range(200)]
    assert sum(v[0] == "left" for v in votes) > 150
    assert all(1 <= v[1] <= 5 and 0 <= v[2] < pop.size for v in votes)
    assert pop.row_vote(qid, good, good, rng)[0] == "tie"
    with pytest.raises(KeyError, match="not in this world"):
        pop.row_vote(qid, ["img-nope"], bad, rng)
    assert row_weights(4).sum() == pytest.approx(1.0) and row_weights(4)[0] > row_weights(4)[3]
