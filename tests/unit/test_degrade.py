"""Degraded copies (aligner.preferences.degrade): worse to the low-level scorer, deterministic, id round trips.

The images are 200 built-in world images rendered in-process (``aligner.world.render``, the
same generator and factor distribution as the world's corpus: about half are already blurry,
noisy, badly exposed, desaturated or off-centre), so a degradation must also make an already
flawed image worse.

Where the low-level scorer is blind, the test checks the degradation's own effect instead:

- ``crop`` (bad framing): the scorer measures no composition at all, so the test checks that
  the image changed materially and kept its size;
- ``hue`` (colour jitter toward a random hue, a default kind): the scorer has no notion of
  colour harmony, so the tests check that each id gets its own hue direction, that the colour
  moved and that size and mean luminance were kept;
- ``tint`` (sickly green cast, the oracle-aware ablation only): the test checks that the image
  moved towards green;
- ``jpeg``: the scorer measures no compression artefacts, and heavy quantisation smooths
  noise, which it rewards; the test checks that 8x8 blockiness rose.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aligner.aesthetics.scorer import LowLevelScorer
from aligner.preferences.degrade import (
    DEFAULT_DEGRADE_KINDS,
    DEFAULT_STRENGTH,
    DEGRADE_KINDS,
    ORACLE_AWARE_DEGRADE_KINDS,
    cycle_kinds,
    degrade,
    degraded_id,
    is_degraded_id,
    materialise,
    original_id,
    parse_degraded_id,
    parse_strengths,
    resolve_images,
)
from aligner.world.render import render, sample_factors

SCORER_SEES = ("blur", "noise", "dark", "bright", "washed")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    out = []
    for i in range(200):
        rng = np.random.default_rng([7, 1, i])
        out.append(render(sample_factors(rng), 64, rng))
    return np.stack(out)


@pytest.fixture(scope="module")
def degraded(images) -> dict[str, np.ndarray]:
    return {k: np.stack([degrade(im, k, DEFAULT_STRENGTH, (f"img-{i}", 0))
                         for i, im in enumerate(images)]) for k in DEGRADE_KINDS}


@pytest.mark.parametrize("kind", SCORER_SEES)
def test_low_level_scorer_prefers_the_original(images, degraded, kind):
    scorer = LowLevelScorer()
    lower = scorer.score(degraded[kind]) < scorer.score(images)
    assert lower.mean() >= 0.9, f"{kind}: only {lower.mean():.2f} of copies scored lower"


def test_crop_changes_framing_not_size(images, degraded):
    crop = degraded["crop"]
    assert crop.shape == images.shape
    mad = np.abs(crop.astype(np.int16) - images).mean(axis=(1, 2, 3))
    assert (mad > 5).mean() >= 0.95  # pixel values move by more than 5/255 on average
    # the content moves: the frame's centre shows what was off-centre before
    c = slice(24, 40)
    centre_diff = np.abs(crop[:, c, c].astype(np.int16) - images[:, c, c]).mean(axis=(1, 2, 3))
    assert np.median(centre_diff) > 5


def test_tint_moves_colours_towards_green(images, degraded):
    def greenness(x):
        x = x.astype(np.float32)
        return (x[..., 1] - 0.5 * (x[..., 0] + x[..., 2])).mean(axis=(1, 2))

    assert (greenness(degraded["tint"]) > greenness(images) + 5).all()


def _luma_mean(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).mean(axis=(-2, -1))


def _chroma_angle(x: np.ndarray) -> float:
    """Hue angle (degrees) of an image's mean colour in an opponent-colour plane."""
    r, g, b = x.reshape(-1, 3).astype(np.float64).mean(axis=0)
    return float(np.degrees(np.arctan2((g - b) * np.sqrt(3) / 2, r - (g + b) / 2)) % 360)


def test_default_kinds_are_generic():
    assert "tint" not in DEFAULT_DEGRADE_KINDS and "hue" in DEFAULT_DEGRADE_KINDS
    assert set(DEFAULT_DEGRADE_KINDS) == {"blur", "noise", "jpeg", "dark", "bright", "washed",
                                          "crop", "hue"}
    assert "tint" in ORACLE_AWARE_DEGRADE_KINDS  # the ablation keeps the former defaults
    assert set(DEFAULT_DEGRADE_KINDS) | set(ORACLE_AWARE_DEGRADE_KINDS) == set(DEGRADE_KINDS)


def test_hue_is_deterministic_per_id_and_seed(images):
    im = images[3]
    a = degrade(im, "hue", DEFAULT_STRENGTH, ("img-3", 0))
    np.testing.assert_array_equal(a, degrade(im.copy(), "hue", DEFAULT_STRENGTH, ("img-3", 0)))
    np.testing.assert_array_equal(a, materialise(im, "img-3~hue", seed=0))
    assert not np.array_equal(a, degrade(im, "hue", DEFAULT_STRENGTH, ("img-3", 1)))
    assert not np.array_equal(a, degrade(im, "hue", DEFAULT_STRENGTH, ("img-4", 0)))


def test_hue_direction_is_random_across_ids():
    """On a grey card the cast alone shows: each id gets its own hue angle, spread round the
    colour circle (not one fixed cast like ``tint``)."""
    grey = np.full((16, 16, 3), 128, np.uint8)
    angles = np.sort([_chroma_angle(degrade(grey, "hue", DEFAULT_STRENGTH, (f"img-{i}", 0)))
                      for i in range(24)])
    assert len(np.unique(np.round(angles))) >= 20
    gaps = np.diff(np.concatenate([angles, angles[:1] + 360]))
    assert gaps.max() < 120  # no third of the colour circle is left out
    assert {int(a // 90) for a in angles} == {0, 1, 2, 3}


def test_hue_changes_colour_keeps_size_and_luminance(images, degraded):
    hue = degraded["hue"]
    assert hue.shape == images.shape and hue.dtype == np.uint8
    mad = np.abs(hue.astype(np.int16) - images).mean(axis=(1, 2, 3))
    assert np.median(mad) > 10 and (mad > 3).mean() >= 0.95  # the colour moved
    dl = np.abs(_luma_mean(hue) - _luma_mean(images))
    assert np.median(dl) < 1 and np.quantile(dl, 0.9) < 8  # mean luma kept (up to clipping)
    # stronger jitter moves the colour further
    weak, strong = (np.median([np.abs(degrade(im, "hue", s, (f"img-{i}", 0)).astype(np.int16)
                                      - im).mean() for i, im in enumerate(images[:40])])
                    for s in (0.2, 1.0))
    assert strong > 2 * weak


def test_jpeg_adds_block_artefacts(images, degraded):
    def blockiness(x):
        """Mean luma step across 8x8 block borders / mean step inside blocks."""
        y = x.astype(np.float32).mean(axis=3)
        d = np.abs(np.diff(y, axis=2))  # [B, H, W-1]: step between column c and c+1
        border = d[:, :, 7::8].mean(axis=(1, 2))
        inner = np.delete(d, np.s_[7::8], axis=2).mean(axis=(1, 2))
        return border / (inner + 1e-3)

    assert (blockiness(degraded["jpeg"]) > blockiness(images)).mean() >= 0.9


@pytest.mark.parametrize("kind", DEGRADE_KINDS)
def test_deterministic_shape_and_dtype(kind):
    rng = np.random.default_rng(3)
    im = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    a = degrade(im, kind, 0.7, ("x", 1))
    b = degrade(im.copy(), kind, 0.7, ("x", 1))
    assert a.shape == im.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, im)


def test_random_parts_follow_the_seed_key():
    im = np.full((32, 32, 3), 128, np.uint8)
    a, b = degrade(im, "noise", 0.5, ("a", 0)), degrade(im, "noise", 0.5, ("b", 0))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, degrade(im, "noise", 0.5, ("a", 0)))


def test_stronger_is_worse():
    rng = np.random.default_rng([7, 1, 3])
    im = render(sample_factors(rng), 64, rng)
    scorer = LowLevelScorer()
    s = scorer.score(np.stack([degrade(im, "blur", x, 0) for x in (0.2, 0.6, 1.0)]))
    assert s[0] > s[1] > s[2]


def test_bad_arguments():
    im = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(im, "sepia")
    with pytest.raises(ValueError, match="strength"):
        degrade(im, "blur", 0.0)
    with pytest.raises(ValueError, match="strength"):
        degrade(im, "blur", 1.5)
    with pytest.raises(ValueError, match="RGB"):
        degrade(np.zeros((8, 8), np.uint8), "blur")


def test_ids_round_trip():
    assert degraded_id("img-1", "blur") == "img-1~blur"
    assert degraded_id("img-1", "blur", DEFAULT_STRENGTH) == "img-1~blur"
    assert degraded_id("img-1", "noise", 0.9) == "img-1~noise@0.9"
    ref = parse_degraded_id("img-1~noise@0.9")
    assert ref == ("img-1", "noise", 0.9) and ref.id == "img-1" and ref.kind == "noise"
    assert parse_degraded_id("img-1~blur") == ("img-1", "blur", DEFAULT_STRENGTH)
    assert parse_degraded_id("a~b~crop").id == "a~b"  # an id may itself contain '~'
    for plain in ("img-1", "img~1", "x~sepia", "~blur", "x~blur@2", "x~blur@abc", ""):
        assert parse_degraded_id(plain) is None, plain
    assert is_degraded_id("x~dark") and not is_degraded_id("x")
    assert original_id("x~dark@0.3") == "x" and original_id("x") == "x"


def test_materialise_matches_the_builder():
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert materialise(im, "img-7", seed=3) is im
    np.testing.assert_array_equal(materialise(im, "img-7~noise@0.3", seed=3),
                                  degrade(im, "noise", 0.3, ("img-7", 3)))
    assert not np.array_equal(materialise(im, "img-7~noise", 0), materialise(im, "img-7~noise", 1))


def test_resolve_images_from_a_parquet_corpus(tmp_path):
    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), colour).save(buf, "PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"id": ["a", "b"], "image": [png((200, 30, 30)), png((30, 30, 200))]}),
                   tmp_path / "part-0.parquet")
    got = resolve_images(str(tmp_path), ["a", "a~dark", "b~washed@0.9", "missing~blur"], seed=0)
    assert set(got) == {"a", "a~dark", "b~washed@0.9"}
    assert got["a"].shape == (20, 20, 3) and got["a~dark"].mean() < got["a"].mean()
    np.testing.assert_array_equal(got["b~washed@0.9"], materialise(got["a"] * 0 + np.array(
        [30, 30, 200], np.uint8), "b~washed@0.9", 0))


def test_kind_helpers():
    assert cycle_kinds(["a", "b", "c"], 4, offset=2) == ["c", "a", "b", "c"]
    assert parse_strengths({"blur": 0.9})["blur"] == 0.9
    assert parse_strengths(None)["noise"] == DEFAULT_STRENGTH
    with pytest.raises(ValueError):
        parse_strengths({"blur": 0})


def test_the_trainer_takes_the_degrade_seed_from_the_preferences_manifest(tmp_path):
    """Degraded pixels are the builder's, whatever the training seed."""
    import json

    from aligner.training.align_data import degrade_seed_of

    assert degrade_seed_of(tmp_path / "missing") == 0
    (tmp_path / "manifest.json").write_text(json.dumps({"degrade": {"seed": 3}}))
    assert degrade_seed_of(tmp_path) == 3
