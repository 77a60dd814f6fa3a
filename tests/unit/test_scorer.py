"""The low-level aesthetic scorer: hand-computed values, degradation properties, speed, registry."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from aligner.aesthetics.scorer import (
    AestheticScorer,
    LowLevelScorer,
    available_scorers,
    colourfulness,
    exposure,
    luma,
    median3,
    noise_sigma,
    sharpness,
)
from aligner.aesthetics.scorer import make_scorer as make

COLOURS = [(220, 40, 40), (40, 170, 60), (50, 80, 220), (240, 200, 40), (160, 60, 200)]
BACKGROUNDS = [(200, 200, 200), (90, 120, 160), (230, 220, 190), (60, 90, 60)]


def scene(seed: int, size: int = 64) -> Image.Image:
    """1-3 coloured shapes on a plain background (like the built-in world)."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), BACKGROUNDS[seed % len(BACKGROUNDS)])
    draw = ImageDraw.Draw(im)
    for k in range(1 + seed % 3):
        x, y = (int(v) for v in rng.integers(4, size - 28, 2))
        s = int(rng.integers(14, 26))
        colour = COLOURS[(seed + k) % len(COLOURS)]
        box = [x, y, x + s, y + s]
        [draw.ellipse, draw.rectangle][k % 2](box, fill=colour)
    return im


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, np.uint8)


def add_noise(a: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, a.shape)
    return np.clip(a.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def scale(a: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(a.astype(np.float32) * gain, 0, 255).astype(np.uint8)


SEEDS = range(12)
SCORER = LowLevelScorer()


def one(a: np.ndarray) -> dict[str, float]:
    comps = SCORER.components(a[None])
    return {**{k: float(v[0]) for k, v in comps.items()}, "score": float(SCORER.combine(comps)[0])}


# ----------------------------------------------------------------------------- by hand

def test_colourfulness_by_hand():
    """Half pure red, half pure blue: rg = R - G is 255 | 0 (mean 127.5, sd 127.5);
    yb = (R + G)/2 - B is 127.5 | -255 (mean -63.75, sd 191.25). So
    M = sqrt(127.5^2 + 191.25^2) + 0.3 sqrt(127.5^2 + 63.75^2) = 229.85 + 42.77 = 272.62."""
    a = np.zeros((1, 8, 8, 3), np.uint8)
    a[:, :, :4, 0] = 255
    a[:, :, 4:, 2] = 255
    expected = np.hypot(127.5, 191.25) + 0.3 * np.hypot(127.5, 63.75)
    np.testing.assert_allclose(colourfulness(a), [expected], rtol=1e-5)
    grey = np.full((1, 8, 8, 3), 90, np.uint8)
    np.testing.assert_allclose(colourfulness(grey), [0.0], atol=1e-6)


def test_exposure_by_hand():
    """Uniform Y: p99 = Y and nothing clipped, so exposure = 1 - |log2(Y / 235)|."""
    y = np.stack([np.full((16, 16), v, np.float32) for v in (235.0, 117.5, 58.75)])
    np.testing.assert_allclose(exposure(y), [1.0, 0.0, -1.0], atol=1e-5)
    white = np.full((1, 16, 16), 255.0, np.float32)  # fully clipped: 1 - log2(255/235) - 2
    np.testing.assert_allclose(exposure(white), [1 - np.log2(255 / 235) - 2], atol=1e-5)


def test_noise_estimate_is_calibrated():
    """Immerkaer's estimator is unbiased for white Gaussian noise on a flat image."""
    flat = np.full((1, 256, 256, 3), 128, np.uint8)
    assert noise_sigma(luma(flat))[0] == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    y = 128 + rng.normal(0, 10, (1, 256, 256)).astype(np.float32)
    assert noise_sigma(y)[0] == pytest.approx(10.0, rel=0.05)


def test_median3_matches_numpy_median():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 255, (3, 9, 11)).astype(np.uint8)
    windows = np.stack([y[:, i:i + 7, j:j + 9] for i in range(3) for j in range(3)])
    np.testing.assert_array_equal(median3(y), np.median(windows, axis=0).astype(np.uint8))


def test_sharpness_of_steps_and_ramps():
    """A one-pixel step scores higher than ramps, and wider ramps lower; flat scores 0."""
    x = np.arange(48, dtype=np.float32)
    steps = {w: np.clip((x - 24) / w + 0.5, 0, 1) * 200 + 20 for w in (1, 3, 6, 12)}
    y = np.stack([np.tile(p, (48, 1)) for p in steps.values()])
    s = sharpness(y)
    assert s[0] > s[1] > s[2] > s[3] > 0
    assert sharpness(np.full((1, 48, 48), 100, np.float32))[0] == 0


# ----------------------------------------------------------------------------- properties

@pytest.mark.parametrize("seed", SEEDS)
def test_blur_lowers_sharpness_and_score(seed):
    im = scene(seed)
    base = one(arr(im))
    prev = base
    for radius in (1.0, 2.0):
        blurred = one(arr(im.filter(ImageFilter.GaussianBlur(radius))))
        assert blurred["sharpness"] < prev["sharpness"]
        assert blurred["score"] < prev["score"]
        prev = blurred


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_raises_noise_estimate_and_lowers_score(seed):
    a = arr(scene(seed))
    base = one(a)
    noisy = one(add_noise(a, 15, seed))
    assert noisy["noise"] > base["noise"] + 8
    assert noisy["score"] < base["score"]


@pytest.mark.parametrize("seed", SEEDS)
def test_bad_exposure_lowers_score(seed):
    """-1.5 and +1.6 stops. (A dim scene brightened by one stop can be *better* exposed, so
    the over-exposure here is strong enough to blow highlights in every scene.)"""
    a = arr(scene(seed))
    base = one(a)
    dark = one(scale(a, 0.35))
    bright = one(scale(a, 3.0))
    assert dark["exposure"] < base["exposure"] and dark["score"] < base["score"]
    assert bright["exposure"] < base["exposure"] and bright["score"] < base["score"]


@pytest.mark.parametrize("seed", SEEDS)
def test_desaturating_lowers_colourfulness(seed):
    im = scene(seed)
    base = one(arr(im))["colourfulness"]
    faded = one(arr(ImageEnhance.Color(im).enhance(0.3)))["colourfulness"]
    grey = one(arr(im.convert("L").convert("RGB")))["colourfulness"]
    assert base > faded > grey
    assert grey == pytest.approx(0.0, abs=1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_sharpness_is_robust_to_noise(seed):
    """Noise inflated the Laplacian-variance sharpness; this one must not be fooled."""
    im = scene(seed)
    noisy_sharp = one(add_noise(arr(im), 20, seed))["sharpness"]
    clean_blurred = one(arr(im.filter(ImageFilter.GaussianBlur(2.0))))["sharpness"]
    assert noisy_sharp > clean_blurred
    lap = [np.var(y[1:-1, :-2] + y[1:-1, 2:] + y[:-2, 1:-1] + y[2:, 1:-1] - 4 * y[1:-1, 1:-1])
           for y in (luma(add_noise(arr(im), 20, seed)[None])[0],
                     luma(arr(im.filter(ImageFilter.GaussianBlur(2.0)))[None])[0])]
    assert lap[0] > lap[1]  # (the Laplacian also ranks these right, but for the wrong reason)


def test_sharpness_not_driven_by_noise_on_blurred_images():
    """Adding noise to a blurred image must not make it look sharper than the clean original."""
    for seed in SEEDS:
        im = scene(seed)
        clean = one(arr(im))["sharpness"]
        blurred_noisy = one(add_noise(arr(im.filter(ImageFilter.GaussianBlur(2.0))), 20))
        assert blurred_noisy["sharpness"] < clean


# ----------------------------------------------------------------------------- api

def test_batch_api_shapes_ranges_and_mixed_sizes():
    ims = [arr(scene(s)) for s in range(4)] + [arr(scene(9, size=100)), arr(scene(3, 80))]
    scores = SCORER.score(ims)
    assert scores.shape == (6,) and scores.dtype == np.float32
    assert np.all(np.abs(scores) <= 3)
    singles = np.array([SCORER.score([a])[0] for a in ims])
    np.testing.assert_allclose(scores, singles, rtol=1e-5, atol=1e-5)
    comps = SCORER.components(np.stack(ims[:4]))
    assert set(comps) == {"colourfulness", "contrast", "sharpness", "exposure", "noise"}
    assert all(v.shape == (4,) and v.dtype == np.float32 for v in comps.values())
    assert SCORER.score([]).shape == (0,)
    with pytest.raises(ValueError, match="RGB"):
        SCORER.score([np.zeros((8, 8), np.uint8)])


def test_fast_enough():
    batch = np.stack([arr(scene(s % 12)) for s in range(1000)])
    SCORER.score(batch[:8])
    t = time.perf_counter()
    SCORER.score(batch)
    assert time.perf_counter() - t < 2.0


class MeanEmbeddingScorer(AestheticScorer):
    """A stand-in learned scorer: needs embeddings, scores their mean."""

    name = "mean-embedding"
    needs = "embedding"

    def score(self, batch):
        return np.asarray(batch, np.float32).mean(axis=1)


def test_registry_and_import_paths():
    assert "lowlevel" in available_scorers()
    s = make()
    assert isinstance(s, LowLevelScorer) and s.needs == "pixels"
    assert s.describe()["name"] == "lowlevel"
    e = make(f"{MeanEmbeddingScorer.__module__}:MeanEmbeddingScorer")
    assert e.needs == "embedding"
    np.testing.assert_allclose(e.score(np.ones((2, 4))), [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*lowlevel"):
        make("nope")
    with pytest.raises(ValueError, match="not an AestheticScorer"):
        make("numpy:ndarray")
    with pytest.raises(ValueError, match="unknown components"):
        LowLevelScorer(weights={"beauty": 1.0})
    with pytest.raises(TypeError):
        AestheticScorer()  # abstract
