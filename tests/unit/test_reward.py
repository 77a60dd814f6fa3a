"""The reward model: ImageReward's loss and head by hand, layer freezing, the normalisation, and
the batched ``score`` / ``inference_rank`` API on a saved checkpoint (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from aligner.retrieval.models import (
    ModelSpec,
    build_model_from_config,
    load_retriever,
    save_checkpoint,
)
from aligner.reward.model import (
    HeadSpec,
    Normalisation,
    RewardHead,
    RewardModel,
    bradley_terry_loss,
    freeze_bottom,
    joint_features,
    save_reward_parts,
)


def test_bradley_terry_loss_by_hand():
    rw, rl = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    per = [math.log(1 + math.exp(-(a - b))) for a, b in ((2, 1), (0, 0), (-1, 1))]
    assert float(bradley_terry_loss(rw, rl)) == pytest.approx(sum(per) / 3, rel=1e-6)
    w = torch.tensor([1.0, 0.0, 3.0])
    assert float(bradley_terry_loss(rw, rl, w)) == pytest.approx((per[0] + 3 * per[2]) / 4,
                                                                 rel=1e-6)
    # the gradient pushes the chosen reward up and the rejected one down
    a, b = torch.tensor([0.5], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    bradley_terry_loss(a, b).backward()
    assert a.grad.item() < 0 < b.grad.item()


def test_head_has_imagerewards_shape_and_joint_features_carry_the_cosine():
    head = RewardHead(HeadSpec(3 * 8))
    linears = [m for m in head.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (24, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    drops = [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.2, 0.2, 0.1]
    assert not any(isinstance(m, torch.nn.GELU) for m in head.layers)
    assert sum(isinstance(m, torch.nn.GELU) for m in RewardHead(HeadSpec(24, activation="gelu"))
               .layers) == 4
    i = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    j = joint_features(i, t)
    assert j.shape == (5, 24)
    np.testing.assert_allclose(j[:, 16:].sum(1) / 8, (i * t).sum(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        HeadSpec(24, activation="relu6")


def _frozen(module) -> list[bool]:
    return [not p.requires_grad for p in module.parameters()]


def test_freeze_bottom_on_the_builtin_retriever():
    model = load_retriever(ModelSpec(), device="cpu").model
    out = freeze_bottom(model, 0.7)
    blocks = model.visual.transformer.resblocks
    assert out["image"] == 2 and out["image_of"] == len(blocks) == 4
    assert all(_frozen(blocks[0])) and all(_frozen(blocks[1]))
    assert not any(_frozen(blocks[2])) and not any(_frozen(blocks[3]))
    assert not model.visual.conv1.weight.requires_grad
    assert all(_frozen(model.text.transformer))  # the packaged MiniLM stays locked
    assert model.text.proj.weight.requires_grad  # its projection trains
    assert not model.logit_scale.requires_grad
    with pytest.raises(ValueError, match="freeze_fraction"):
        freeze_bottom(model, 1.5)


def test_freeze_bottom_on_an_open_clip_text_transformer():
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                           "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2,
                        "layers": 3}}
    model, _ = build_model_from_config(cfg)
    out = freeze_bottom(model, 0.7)
    assert (out["image"], out["text"]) == (1, 2)
    assert all(_frozen(model.transformer.resblocks[1]))
    assert not any(_frozen(model.transformer.resblocks[2]))
    assert not model.token_embedding.weight.requires_grad
    assert freeze_bottom(build_model_from_config(cfg)[0], 0.0)["text"] == 0


def test_normalisation_fits_training_rewards():
    raw = np.random.default_rng(0).normal(3.0, 2.0, 1000)
    n = Normalisation.fit(raw)
    z = (raw - n.mean) / n.std
    assert abs(z.mean()) < 1e-9 and z.std() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        Normalisation.fit(np.array([1.0]))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A reward checkpoint: the built-in retriever (random image tower) + a random head."""
    d = tmp_path_factory.mktemp("rm") / "checkpoint"
    r = load_retriever(ModelSpec(), device="cpu")
    save_checkpoint(r, d)
    torch.manual_seed(0)
    spec = HeadSpec(3 * r.embed_dim)
    save_reward_parts(d, RewardHead(spec), spec, Normalisation(0.25, 2.0, 10))
    return d


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_score_api_is_batched_and_matches_one_at_a_time(reward_dir, tmp_path):
    rm = RewardModel.load(reward_dir, device="cpu")
    imgs = _images(7)
    batched = rm.score("two red stars on sand", imgs)
    assert isinstance(batched, list) and len(batched) == 7
    singles = [rm.score("two red stars on sand", im) for im in imgs]
    assert all(isinstance(s, float) for s in singles)
    np.testing.assert_allclose(batched, singles, rtol=1e-4, atol=1e-5)
    # every input kind gives the same score: array, PIL image, file path, bytes
    Image.fromarray(imgs[0]).save(tmp_path / "a.png")
    kinds = [imgs[0], Image.fromarray(imgs[0]), tmp_path / "a.png",
             (tmp_path / "a.png").read_bytes()]
    np.testing.assert_allclose([rm.score("two red stars on sand", k) for k in kinds],
                               batched[0], rtol=1e-4, atol=1e-5)
    ranks, rewards = rm.inference_rank("two red stars on sand", imgs)
    np.testing.assert_allclose(rewards, batched, rtol=1e-6)
    assert sorted(ranks) == list(range(1, 8))
    assert ranks[int(np.argmax(rewards))] == 1 and ranks[int(np.argmin(rewards))] == 7
    # normalisation: score = (raw - 0.25) / 2
    txt = rm.encode_texts(["q"])
    img = rm.encode_pixels(np.stack(imgs[:2]))
    with torch.no_grad():
        raw = rm.head(joint_features(torch.from_numpy(img), torch.from_numpy(txt).expand(2, -1)))
    np.testing.assert_allclose(rm.rewards_from_features(np.repeat(txt, 2, 0), img),
                               (raw.numpy() - 0.25) / 2.0, rtol=1e-5, atol=1e-6)
    assert rm.score("q", []) == []


def test_bad_inputs_are_clear_errors(reward_dir, tmp_path):
    rm = RewardModel.load(reward_dir, device="cpu")
    with pytest.raises(ValueError, match="prompt"):
        rm.score(["not", "a string"], _images(1))
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        rm.score("q", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError):
        rm.score("q", [tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError):
        rm.score("q", [tmp_path / "bad.png"])
    with pytest.raises(ValueError, match="prompts for"):
        rm.score_batch(["a", "b"], _images(1))
    plain = tmp_path / "plain"
    save_checkpoint(load_retriever(ModelSpec(), device="cpu"), plain)
    with pytest.raises(FileNotFoundError, match="not a reward-model checkpoint"):
        RewardModel.load(plain)


def _reward_embeddings(rm: RewardModel, out, images, ids, checkpoint_hash=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aligner.data.embeddings import embeddings_schema
    from aligner.runtime.manifest import write_manifest

    emb = rm.encode_pixels(np.stack(images))
    d = emb.shape[1]
    (out / "embeddings").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d),
        "aesthetic": np.zeros(len(ids), np.float32), "caption": ["x"] * len(ids),
        "source": ["t"] * len(ids)}, schema=embeddings_schema(d)), out / "embeddings" / "p.parquet")
    write_manifest(out, "embed", model={**rm.retriever.describe(),
                                        "checkpoint_hash": checkpoint_hash
                                        or rm.retriever.checkpoint_hash})
    return out


def test_reward_reranker_scores_stored_embeddings_and_reorders(reward_dir, tmp_path):
    import asyncio

    from aligner.evaluation.systems import cascade_scores
    from aligner.reward.rerank import RewardReranker
    from serving.deployments import Reranker

    rm = RewardModel.load(reward_dir, device="cpu")
    imgs = _images(6, seed=3)
    ids = [f"img-{i}" for i in range(6)]
    emb = _reward_embeddings(rm, tmp_path / "emb", imgs, ids)
    rr = RewardReranker(reward_dir, emb)
    got = rr.rewards("a blue ring", ["img-2", "nope", "img-0"])
    want = rm.score("a blue ring", [imgs[2], imgs[0]])
    assert np.isnan(got[1])
    np.testing.assert_allclose(got[[0, 2]], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="re-embed"):
        RewardReranker(reward_dir, _reward_embeddings(rm, tmp_path / "other", imgs, ids, "abc"))
    with pytest.raises(FileNotFoundError):
        RewardReranker(reward_dir, tmp_path / "missing")

    # the serving deployment's class: a text query is re-ranked by the reward, others by the
    # stored scores
    dep = Reranker.func_or_class(n=6, weight=2.0, reward_model=str(reward_dir),
                                 reward_embeddings=str(emb))
    sims = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    stored = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    out = asyncio.run(dep.rerank(sims, stored, None, text="a blue ring", ids=ids))
    rewards = rr.rewards("a blue ring", ids)
    final = cascade_scores(np.array([sims]), rewards[None], 2.0)[0]
    assert out["by"] == "reward" and out["order"] == np.argsort(-final, kind="stable").tolist()
    plain = asyncio.run(dep.rerank(sims, stored, None))
    assert plain["by"] == "scorer"
    assert plain["order"] == np.argsort(-cascade_scores(np.array([sims]), np.array([stored]),
                                                        2.0)[0], kind="stable").tolist()
    assert dep.describe()["kind"] == "reward"


def test_serving_reranker_args_take_the_reward_pair():
    from serving.config import RerankerArgs

    with pytest.raises(ValueError, match="go together"):
        RerankerArgs(reward_model="x")
    assert RerankerArgs(reward_model="x", reward_embeddings="y").reward_model == "x"


def test_reward_net_scores_each_unique_image_once_in_any_row_order():
    from aligner.reward.model import RewardNet

    r = load_retriever(ModelSpec(), device="cpu")
    torch.manual_seed(0)
    net = RewardNet(r.model, RewardHead(HeadSpec(3 * r.embed_dim))).eval()
    x = torch.randn(3, 3, 64, 64)
    tokens = r.tokenizer(["a red star", "two blue rings"])
    rows, qs = torch.tensor([2, 0, 2, 1]), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        once = net(x, qs, tokens=tokens, img_index=rows)
        repeated = net(x[rows], qs, tokens=tokens)
    torch.testing.assert_close(once, repeated, rtol=1e-5, atol=1e-5)
