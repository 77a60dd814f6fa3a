"""The frozen-backbone reward head (aligner.reward.head_fit): the confidence-weighted loss by
hand, a planted preference learned from synthetic embeddings, and a fitted checkpoint that
RewardModel.load and PoolRewards read unchanged (no Ray)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from aligner.reward.head_fit import (
    ENSEMBLE_FILE,
    FrozenFeatures,
    HeadFitSettings,
    PairIndex,
    fit_reward_head,
    load_ensemble,
    load_features,
    train_heads,
)
from aligner.reward.model import bradley_terry_loss


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small heads train fastest on one thread (and a shared 2-core machine stays usable)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_confidence_weighted_loss_by_hand():
    """Weights are confidence / 5 (the serving export's mapping); the loss is the weighted
    MEAN of -log sigmoid(r_w - r_l): sum(w * l) / sum(w)."""
    conf = np.array([5, 2, 1, 0])  # the last pair: weight 0
    w = torch.tensor(conf / 5, dtype=torch.float32)
    rw = torch.tensor([2.0, 0.5, -1.0, 3.0], requires_grad=True)
    rl = torch.tensor([1.0, 1.5, 0.0, -2.0], requires_grad=True)
    loss = bradley_terry_loss(rw, rl, w)
    # by hand: l = log(1 + exp(-(r_w - r_l)))
    l0, l1, l2 = math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0)), \
        math.log(1 + math.exp(1.0))
    hand = (1.0 * l0 + 0.4 * l1 + 0.2 * l2) / (1.0 + 0.4 + 0.2)
    assert float(loss.detach()) == pytest.approx(hand, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(0.68826, abs=1e-5)  # the number, written out
    loss.backward()
    # d loss / d r_w[k] = -w_k sigmoid(-(r_w - r_l)_k) / sum(w); the zero-weight pair: 0
    sig = 1 / (1 + math.exp(1.0))  # sigmoid(-1)
    assert float(rw.grad[0]) == pytest.approx(-1.0 * sig / 1.6, rel=1e-5)
    assert float(rw.grad[1]) == pytest.approx(-0.4 * (1 - sig) / 1.6, rel=1e-5)
    assert float(rw.grad[3]) == 0.0 and float(rl.grad[3]) == 0.0
    np.testing.assert_allclose(rl.grad.numpy(), -rw.grad.numpy(), rtol=1e-6)
    # unweighted = every weight 1: the plain mean over the four pairs
    l3 = math.log(1 + math.exp(-5.0))
    plain = float(bradley_terry_loss(rw, rl).detach())
    assert plain == pytest.approx((l0 + l1 + l2 + l3) / 4, rel=1e-6)


def _synthetic(n_img: int = 200, n_txt: int = 4, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.standard_normal((n_txt, d)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    feats = FrozenFeatures([f"i{k}" for k in range(n_img)], img,
                           [f"q{k}" for k in range(n_txt)], txt, "synthetic")
    taste = rng.standard_normal(d)  # the planted preference: u = taste . image
    return feats, img @ taste


def _pairs(u: np.ndarray, n: int, n_txt: int, seed: int, flip: float = 0.0) -> PairIndex:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(u), n), rng.integers(0, len(u), n)
    a, b = a[a != b], b[a != b]
    first = (u[a] > u[b]) ^ (rng.random(len(a)) < flip)
    chosen, rejected = np.where(first, a, b), np.where(first, b, a)
    return PairIndex(rng.integers(0, n_txt, len(a)), chosen, rejected,
                     np.ones(len(a), np.float32))


def _accuracy(ens, feats, p: PairIndex) -> float:
    t = feats.text_emb[p.query]
    d = ens.raw(t, feats.image_emb[p.chosen])[0] - ens.raw(t, feats.image_emb[p.rejected])[0]
    return float((d > 0).mean())


def test_head_learns_a_planted_preference_and_is_seeded():
    feats, u = _synthetic()
    train, test = _pairs(u, 400, 4, seed=1, flip=0.1), _pairs(u, 400, 4, seed=2)
    s = HeadFitSettings(steps=60, batch_size=64, lr=3e-3, warmup=5, seed=3, val_fraction=0)
    ens = train_heads(feats, train, s)
    assert _accuracy(ens, feats, test) > 0.9
    again = train_heads(feats, train, s)
    t = feats.text_emb[test.query]
    np.testing.assert_array_equal(ens.raw(t, feats.image_emb[test.chosen]),
                                  again.raw(t, feats.image_emb[test.chosen]))
    # scores are normalised over the training items: about mean 0, sd 1 there
    items = np.unique(np.concatenate([train.chosen, train.rejected]))
    z = ens.rewards(feats.text_emb[np.zeros(len(items), int)], feats.image_emb[items])[0]
    assert abs(z.mean()) < 0.5 and 0.5 < z.std() < 1.5


def test_zero_weight_votes_are_ignored_and_weighting_can_be_switched_off():
    """Contradicting votes with weight 0 change nothing when weighted; unweighted they hurt."""
    feats, u = _synthetic(seed=4)
    good = _pairs(u, 100, 4, seed=5)
    bad = PairIndex(good.query, good.rejected, good.chosen, np.zeros(len(good), np.float32))
    both = PairIndex(*(np.concatenate([getattr(good, k), getattr(bad, k)])
                       for k in ("query", "chosen", "rejected", "weight")))
    test = _pairs(u, 400, 4, seed=6)
    s = HeadFitSettings(steps=50, batch_size=1024, lr=3e-3, warmup=5, val_fraction=0)
    weighted = train_heads(feats, both, s)
    assert _accuracy(weighted, feats, test) > 0.85
    unweighted = train_heads(feats, both, HeadFitSettings(steps=50, batch_size=1024, lr=3e-3,
                                                          warmup=5, val_fraction=0,
                                                          weighted=False))
    assert _accuracy(unweighted, feats, test) < _accuracy(weighted, feats, test) - 0.2
    with pytest.raises(ValueError, match="weight 0"):
        train_heads(feats, bad, s)


def test_ensemble_members_differ_and_give_a_spread():
    feats, u = _synthetic(seed=7)
    train = _pairs(u, 150, 4, seed=8, flip=0.2)
    ens = train_heads(feats, train, HeadFitSettings(steps=20, ensemble=3, val_fraction=0))
    lg = ens.pair_logits(feats, ["q0"] * 5, [f"i{k}" for k in range(5)],
                         [f"i{k}" for k in range(5, 10)])
    assert lg.shape == (3, 5)
    assert np.all(lg.std(0) > 0)
    # pair_logits scores each (query, image) once; the same as scoring each side
    q = ["q0", "q1", "q0", "q1"]
    a, b = ["i1", "i1", "i2", "i3"], ["i2", "i3", "i1", "i1"]
    t = feats.text_emb[feats.text_rows(q)]
    want = ens.raw(t, feats.image_emb[feats.image_rows(a)]) - \
        ens.raw(t, feats.image_emb[feats.image_rows(b)])
    np.testing.assert_allclose(ens.pair_logits(feats, q, a, b), want, rtol=1e-5, atol=1e-6)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint

    d = tmp_path_factory.mktemp("base") / "checkpoint"
    torch.manual_seed(0)
    save_checkpoint(load_retriever(ModelSpec(), device="cpu"), d)
    return d


def test_fitted_checkpoint_loads_and_scores_like_the_fit(base_checkpoint, tmp_path):
    from aligner.data.corpus import write_corpus
    from aligner.data.preferences import rows_to_table
    from aligner.reward.model import RewardModel
    from aligner.reward.teacher import PoolRewards

    levels = [20 * k + 10 for k in range(12)]
    ids = [f"g{v:03d}" for v in levels]
    corpus = tmp_path / "corpus.parquet"
    write_corpus(pa.table({"id": ids, "image": [_png(v) for v in levels]}), corpus)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(60):  # planted: the brighter image wins, at confidence 1..5
        i, j = rng.choice(len(ids), 2, replace=False)
        hi, lo = (i, j) if levels[i] > levels[j] else (j, i)
        rows.append({"query_id": f"q{rng.integers(2)}", "query": "grey squares",
                     "chosen_id": ids[hi], "rejected_id": ids[lo], "source": "human",
                     "weight": float(rng.integers(1, 6)) / 5})
    votes = rows_to_table(rows)
    out = tmp_path / "rm"
    s = HeadFitSettings(steps=20, warmup=5, ensemble=2, val_fraction=0)
    stats = fit_reward_head(votes, corpus, base_checkpoint, out, s)
    assert stats["pairs"] == 60 and stats["train_pairs"] == 60 and stats["steps"] == 20
    assert 0 <= stats["train_acc"] <= 1 and stats["seconds"] > 0
    assert (out / ENSEMBLE_FILE).is_file()
    record = json.loads((out / "reward.json").read_text())
    assert record["fit"].startswith("head_fit") and record["ensemble"] == 2

    rm = RewardModel.load(out, device="cpu")
    got = np.asarray(rm.score("grey squares", [Image.open(io.BytesIO(_png(v))) for v in levels]))
    feats = load_features(corpus, base_checkpoint, ids, ["grey squares"],
                          cache_root=tmp_path / "cache")
    ens = load_ensemble(out)
    want = ens.rewards(np.repeat(feats.text_emb, len(ids), 0), feats.image_emb)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    pool = PoolRewards(out, corpus)(["grey squares"], [ids])[0]
    np.testing.assert_allclose(pool, want, rtol=1e-4, atol=1e-4)
    # the cache answers a second call without embedding again
    again = load_features(corpus, base_checkpoint, ids[:3], ["grey squares"],
                          cache_root=tmp_path / "cache")
    np.testing.assert_array_equal(again.image_emb, feats.image_emb[:3])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_bad_votes_are_clear_errors(base_checkpoint, tmp_path):
    from aligner.data.preferences import rows_to_table

    row = {"query_id": "q", "query": "x", "chosen_id": "a~blur", "rejected_id": "a",
           "source": "degraded", "weight": 1.0}
    with pytest.raises(ValueError, match="degraded"):
        fit_reward_head(rows_to_table([row]), tmp_path, base_checkpoint, tmp_path / "o")
    with pytest.raises(ValueError, match="no votes"):
        fit_reward_head(rows_to_table([]), tmp_path, base_checkpoint, tmp_path / "o")
    with pytest.raises(ValueError, match="ensemble"):
        HeadFitSettings(ensemble=0)
    # an output directory that holds something else is never replaced
    from aligner.reward.head_fit import write_checkpoint

    feats, u = _synthetic(d=8)
    ens = train_heads(feats, _pairs(u, 20, 4, seed=0), HeadFitSettings(steps=2, warmup=0))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a reward checkpoint"):
        write_checkpoint(ens, base_checkpoint, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
