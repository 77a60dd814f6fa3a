"""Render one world image from its content and aesthetic factors, and score it with the oracle.

Every look factor is something a 64-pixel image tower can perceive: Gaussian blur, sensor
noise, exposure (gain), saturation, a global colour cast (warm golden vs sickly green), and
composition (the object group centred vs pushed towards a corner and cut by the frame).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from aligner.world.taste import DEFAULT_TASTE, Taste
from aligner.world.vocab import BACKGROUNDS, COLOURS, SHAPES

COLOUR_RGB = {
    "red": (214, 38, 40), "orange": (242, 133, 24), "yellow": (245, 210, 35),
    "green": (40, 160, 60), "blue": (35, 75, 200), "purple": (128, 50, 170),
    "pink": (240, 110, 170), "black": (22, 22, 26),
}
BACKGROUND_RGB = {
    "paper": (232, 230, 224), "sky": (120, 175, 230), "grass": (85, 150, 60),
    "sand": (220, 195, 140), "wood": (140, 95, 55),
}


@dataclass(frozen=True)
class Factors:
    """One image's hidden factors. Content first, then look (aesthetic) factors.

    Look factors: ``blur`` Gaussian radius in pixels at 64 px (0..2.0); ``noise`` std of
    additive noise in 0..255 units (0..30); ``exposure`` log2 gain / 0.9 in -1..1 (0 = well
    exposed); ``saturation`` 0.15..1.25 (1 = natural); ``tone`` -1 (sickly green cast) .. +1
    (warm golden); ``composition`` 0 (centred) .. 1 (pushed to a corner, cut by the frame).
    """

    shape: str
    colour: str
    count: int
    background: str
    blur: float
    noise: float
    exposure: float
    saturation: float
    tone: float
    composition: float
    corner: int  # which corner an off-centre group drifts towards (0..3)
    scale: float  # object size jitter (0.85..1.15)

    def as_dict(self) -> dict:
        return asdict(self)


def goodness(f: Factors) -> dict[str, float]:
    """Per-factor goodness in [-1, 1] (+1 ideal). The oracle and the captions both use it."""
    return {
        "blur": 1.0 - 2.0 * min(f.blur / 1.6, 1.0),
        "noise": 1.0 - 2.0 * min(f.noise / 22.0, 1.0),
        "exposure": 1.0 - 2.0 * min(abs(f.exposure) / 0.7, 1.0),
        "saturation": float(np.clip((f.saturation - 0.6) / 0.4, -1.0, 1.0)),
        "tone": float(np.clip(f.tone, -1.0, 1.0)),
        "composition": 1.0 - 2.0 * min(f.composition / 0.6, 1.0),
    }


def oracle_beauty(f: Factors, taste: Taste = DEFAULT_TASTE) -> float:
    """The hidden "human": beauty from the look factors (never seen by any teacher).

    ``taste.beauty`` (:mod:`aligner.world.taste`): ``sum_k w_k * g_k + interaction *
    g_saturation * g_tone`` over the weights' sum, so that the score lies in about [-1, 1]. With
    the default taste (``0.4`` interaction: vivid colours are lovely in warm light and garish
    under a green cast) a low-level scorer can see blur, noise, exposure and saturation, but not
    the colour cast's harmony or the composition.
    """
    return float(taste.beauty(f.as_dict()))


class Content(NamedTuple):
    """What an image shows: the content part of :class:`Factors` (no look factor)."""

    shape: str
    colour: str
    count: int
    background: str


def sample_factors(rng: np.random.Generator, content: Content | None = None) -> Factors:
    """Draw content uniformly and each look factor from a mixture of 'fine' and 'flawed'.

    Args:
        rng: the image's generator.
        content: the content to show (a gallery image rendered for a query); None draws it
            uniformly. The look factors are drawn the same way either way; with ``content``
            None the draws are exactly those of a natural image (the generator's stream is
            unchanged).
    """
    def mix(p_good: float, good: tuple[float, float], bad: tuple[float, float]) -> float:
        lo, hi = good if rng.random() < p_good else bad
        return float(rng.uniform(lo, hi))

    exposure = mix(0.55, (-0.12, 0.12), (0.4, 1.0)) * (1 if rng.random() < 0.5 else -1)
    if content is None:  # drawn here, between exposure and blur, as always
        content = Content(shape=SHAPES[rng.integers(len(SHAPES))],
                          colour=COLOURS[rng.integers(len(COLOURS))],
                          count=int(rng.integers(1, 4)),
                          background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    return Factors(
        shape=content.shape,
        colour=content.colour,
        count=int(content.count),
        background=content.background,
        blur=mix(0.55, (0.0, 0.25), (0.9, 2.0)),
        noise=mix(0.55, (0.0, 3.0), (12.0, 30.0)),
        exposure=exposure,
        saturation=mix(0.55, (0.9, 1.25), (0.15, 0.45)),
        tone=float(rng.uniform(-1.0, 1.0)),
        composition=mix(0.55, (0.0, 0.1), (0.45, 1.0)),
        corner=int(rng.integers(4)),
        scale=float(rng.uniform(0.85, 1.15)),
    )


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUND_RGB[name], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if name == "sky":  # lighter towards the horizon
        img += (yy[..., None] * np.array([60, 45, 20], np.float32))
    elif name == "grass":  # blades: vertical streaks
        img += rng.normal(0, 14, (1, size, 1)).astype(np.float32) * np.array([0.6, 1.0, 0.4])
        img += rng.normal(0, 6, (size, size, 1)).astype(np.float32)
    elif name == "sand":
        img += rng.normal(0, 5, (size, size, 1)).astype(np.float32)
    elif name == "wood":  # horizontal grain
        grain = np.sin(yy * 40 + rng.uniform(0, 6) + 2 * np.sin(xx * 6)) * 12
        img += grain[..., None] * np.array([1.0, 0.7, 0.4], np.float32)
    elif name == "paper":  # soft vignette
        img -= (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 40)[..., None]
    return img


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple]:
    if shape == "square":
        k = [(math.pi / 4 + rot + i * math.pi / 2) for i in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in k]
    if shape == "triangle":
        k = [(-math.pi / 2 + rot + i * 2 * math.pi / 3) for i in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a) + r * 0.15) for a in k]
    if shape == "diamond":
        return [(cx, cy - r * 1.1), (cx + r * 0.7, cy), (cx, cy + r * 1.1), (cx - r * 0.7, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + rot + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(shape)


_LAYOUTS = {1: [(0.0, 0.0)], 2: [(-0.22, 0.0), (0.22, 0.0)],
            3: [(-0.24, 0.16), (0.24, 0.16), (0.0, -0.2)]}
_CORNERS = [(-1, -1), (1, -1), (-1, 1), (1, 1)]


def render(f: Factors, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the image: ``[size, size, 3]`` uint8. Supersampled 2x for anti-aliased edges."""
    big = size * 2
    canvas = _background(f.background, big, rng)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    colour = np.array(COLOUR_RGB[f.colour], np.float32) + rng.normal(0, 8, 3)
    colour_t = tuple(int(c) for c in np.clip(colour, 0, 255))
    r = big * (0.17 if f.count == 1 else 0.13 if f.count == 2 else 0.11) * f.scale
    dx, dy = _CORNERS[f.corner]
    shift = f.composition * 0.42  # towards a corner; at 1.0 objects are cut by the frame
    for ox, oy in _LAYOUTS[f.count]:
        cx = big * (0.5 + ox + dx * shift) + rng.normal(0, big * 0.01)
        cy = big * (0.5 + oy + dy * shift) + rng.normal(0, big * 0.01)
        rot = float(rng.uniform(-0.25, 0.25))
        if f.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour_t)
        elif f.shape == "ring":
            w = max(2, int(r * 0.38))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour_t, width=w)
        else:
            draw.polygon(_shape_polygon(f.shape, cx, cy, r, rot), fill=colour_t)
    img = img.resize((size, size), Image.Resampling.BOX)
    x = np.asarray(img, np.float32)
    # colour cast: warm golden (+) or sickly green (-)
    t = f.tone
    cast = (np.array([1.10, 1.02, 0.80]) if t >= 0 else np.array([0.86, 1.12, 0.84])) - 1.0
    x = x * (1.0 + abs(t) * cast.astype(np.float32))
    grey = x.mean(axis=2, keepdims=True)
    x = grey + f.saturation * (x - grey)
    x = x * (2.0 ** (0.9 * f.exposure))
    x = np.clip(x, 0, 255)
    if f.blur > 0.05:
        x = np.asarray(Image.fromarray(x.astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(radius=f.blur)), np.float32)
    if f.noise > 0.5:
        x = x + rng.normal(0, f.noise, x.shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> PNG bytes (lossless, so no compression artefacts are added)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
