"""Retriever models: the built-in model builds offline, encodes normalised vectors, and a
checkpoint round-trips without the packaged text transformer."""

import numpy as np
import pytest
import torch

from aligner.retrieval.models import ModelSpec, load_checkpoint, load_retriever, save_checkpoint


@pytest.fixture(scope="module")
def builtin():
    return load_retriever(ModelSpec(), device="cpu")


def test_builtin_text_tower_is_a_real_sentence_encoder(builtin):
    e = builtin.encode_texts(["a gloomy photo of a cat", "a dark, depressing picture of a kitten",
                              "a bright sunny beach"])
    assert e.shape == (3, 256) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_builtin_init_is_deterministic(builtin):
    other = load_retriever(ModelSpec(), device="cpu")
    x = torch.randn(3, 3, 64, 64)
    np.testing.assert_array_equal(builtin.encode_images(x), other.encode_images(x))


def test_checkpoint_round_trip_is_small_and_exact(builtin, tmp_path):
    with torch.no_grad():
        builtin.model.visual.proj.add_(0.01)  # pretend training changed it
    x = torch.randn(2, 3, 64, 64)
    before = builtin.encode_images(x)
    save_checkpoint(builtin, tmp_path / "ck", meta={"kind": "test"})
    size = (tmp_path / "ck" / "open_clip_model.safetensors").stat().st_size
    assert size < 12e6  # the 90 MB MiniLM tower is not copied
    loaded = load_checkpoint(tmp_path / "ck", device="cpu")
    np.testing.assert_allclose(loaded.encode_images(x), before, atol=1e-6)
    assert loaded.checkpoint_hash and loaded.is_builtin
    t = ["two red circles on grass"]
    np.testing.assert_allclose(loaded.encode_texts(t), builtin.encode_texts(t), atol=1e-6)


def test_preprocess_matches_training_normalisation(builtin):
    from PIL import Image

    from aligner.retrieval.models import to_pixels

    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a = builtin.preprocess(Image.fromarray(arr))
    b = to_pixels(arr[None], builtin.preprocess_cfg["mean"], builtin.preprocess_cfg["std"])[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_retriever(ModelSpec(pretrained=str(tmp_path / "missing.safetensors")), device="cpu")


TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def test_named_open_clip_model_with_local_weights_file(tmp_path):
    """The code path of ``model=ViT-B-32 pretrained=<tag or file>``, on a tiny registered config."""
    import json

    import open_clip

    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "tiny-test-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(cfg_dir))
    r = load_retriever(ModelSpec(name="tiny-test-clip"), device="cpu")
    assert r.embed_dim == 64 and r.image_size == 32 and not r.is_builtin
    weights = tmp_path / "tiny.pt"
    with torch.no_grad():
        r.model.visual.proj.mul_(2.0)
    torch.save(r.model.state_dict(), weights)
    x = torch.randn(2, 3, 32, 32)
    r2 = load_retriever(ModelSpec(name="tiny-test-clip", pretrained=str(weights)), device="cpu")
    np.testing.assert_allclose(r2.encode_images(x), r.encode_images(x), atol=1e-5)
    assert r2.encode_texts(["a cat"]).shape == (1, 64)
    # a full (non built-in) checkpoint directory round-trips with every weight
    save_checkpoint(r2, tmp_path / "ck")
    r3 = load_checkpoint(tmp_path / "ck", device="cpu")
    np.testing.assert_allclose(r3.encode_texts(["a cat"]), r2.encode_texts(["a cat"]), atol=1e-5)


def test_lock_text_tower_unlocks_only_last_layers(builtin):
    from aligner.training.loop import lock_text_tower

    model = builtin.model
    lock_text_tower(model, 0)
    assert not any(p.requires_grad for p in model.text.transformer.parameters())
    assert all(p.requires_grad for p in model.text.proj.parameters())
    lock_text_tower(model, 1)
    layers = model.text.transformer.encoder.layer
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in layers[-2].parameters())
    assert not any(p.requires_grad for p in model.text.transformer.embeddings.parameters())
    lock_text_tower(model, 0)


def test_trailing_padding_is_cut_without_changing_text_features(builtin):
    from aligner.retrieval.models import trim_padding, trimmable_pad_id

    pad = trimmable_pad_id(builtin.model)
    assert pad == 0  # the built-in tower is a Hugging Face encoder with a mean pooler
    texts = ["a cat", "two red circles on a green lawn at dusk, crisp and well lit", "sky"]
    tokens = builtin.tokenizer(texts)
    cut = trim_padding(tokens, pad)
    assert cut.shape[1] < tokens.shape[1] and torch.equal(cut, tokens[:, :cut.shape[1]])
    assert (cut[:, -1] != pad).any()  # the longest text keeps every one of its tokens
    with torch.no_grad():
        full = builtin.model.encode_text(tokens, normalize=True)
        short = builtin.model.encode_text(cut, normalize=True)
    np.testing.assert_allclose(short.numpy(), full.numpy(), atol=1e-5)
    np.testing.assert_allclose(builtin.encode_texts(texts), full.numpy(), atol=1e-5)
    # where cutting would change the features (no HF tower), nothing is cut
    assert trimmable_pad_id(torch.nn.Linear(2, 2)) is None
    assert torch.equal(trim_padding(tokens, None), tokens)
    assert trim_padding(torch.zeros((2, 5), dtype=torch.long), 0).shape == (2, 1)
