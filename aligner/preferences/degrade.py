"""Degraded copies of images: free, label-free aesthetic negatives (SeVa; docs/method.md).

An image is preferred over a degraded copy of itself for the same query. The copy is never
stored: a preference row names it by a *degraded id*, ``"<id>~<kind>"`` (``"<id>~<kind>@<s>"``
when the strength is not the kind's default), and a trainer decodes the original and applies
the degradation on the fly with :func:`materialise`. Everything is deterministic given
(image id, kind, strength, seed), so the builder, the trainer and an evaluation see the same
pixels.

Kinds (each maps a strength ``s`` in (0, 1] to its parameters; sizes scale with the image, so
a 512-px photo gets the same *relative* damage as a 64-px world image):

============  ==============================================================================
kind          what it does
============  ==============================================================================
``blur``      Gaussian blur (defocus), radius ``(0.5 + 2.5 s) * side / 64`` px; sensor
              noise kept (see below)
``noise``     additive Gaussian noise, sigma ``6 + 34 s`` (0-255 units) on luma plus 0.3 of
              that independently per channel (chroma noise)
``jpeg``      re-encode as JPEG at quality ``round(2 + 20 (1 - s))`` with 4:2:0 chroma
              subsampling (blocking, ringing, colour bleeding)
``dark``      underexposure: over-bright highlights are first pulled down to white (p99 of
              luma -> 235), then ``1 + 2 s`` stops darker, so the result is darker than both
              the original and a well-exposed version of it; sensor noise kept
``bright``    overexposure: dark images are first lifted to a normal exposure, then
              ``1 + 2 s`` stops brighter, clipped; blooming (a screen blend of a blurred
              copy) and a ``0.3 s`` lift towards white; sensor noise kept where not blown
``washed``    flat, washed-out colour: keeps ``1 - 0.85 s`` of the chroma and compresses
              the luma towards the highlights (p99) to ``1 - 0.6 s`` of its range (lifted,
              milky shadows); sensor noise kept
``crop``      bad framing: a window of ``1 - 0.5 s`` of each side, flush with a random corner,
              resized back (bicubic) - the image's centre moves towards the frame's edge and
              a centred subject is cut off. The resize also softens the image a little.
``hue``       colour jitter in a *random* direction (a bad white balance / colour grade): RGB
              gains ``1 + 0.35 s cos(theta - c)`` (``c`` = 0, 120, 240 degrees for R, G, B)
              toward a random hue angle ``theta``, then the chroma scaled by
              ``exp(+-0.9 s u)`` (random sign, ``u`` uniform in [0.5, 1]: over- or
              under-saturated), then the mean luma brought back to the original's
``tint``      *oracle-aware ablation, not a default*: a fixed sickly green colour cast (RGB
              gains ``1 + s * (-0.20, +0.15, -0.22)``). It was written knowing the built-in
              world's hidden colour rule and reproduces its renderer's bad cast; use it only
              to measure what that knowledge is worth (:data:`ORACLE_AWARE_DEGRADE_KINDS`)
============  ==============================================================================

:data:`DEFAULT_DEGRADE_KINDS` (what :class:`aligner.preferences.pairs.PairSettings` cycles by
default) are generic photographic flaws a user would name for real photographs without knowing
any world's taste: blur, noise, jpeg, dark, bright, washed, crop and hue. The former
defaults, chosen knowing the built-in world's hidden look factors (with ``tint``, without
``jpeg``), are kept as :data:`ORACLE_AWARE_DEGRADE_KINDS`, for the ablation only.

"Sensor noise kept": blur, haze and exposure happen in front of the sensor, so the copy gets
back the noise the operation smoothed away (:func:`_keep_noise`); otherwise a low-level
scorer would rate a blurred or flattened noisy photo *higher* for its lost noise.

What the low-level scorer sees (200 rendered world images, default strength, fraction of
copies it scores lower than the original): blur .96, noise .99, dark 1.0, bright .95, washed
.92; it is blind to crop (.45: it measures no composition), jpeg (.27-.36: quantisation
smooths noise, which it rewards), hue (.41-.48 over two image sets x two seeds: an
over-saturated copy raises its colourfulness, an under-saturated one lowers it) and tint
(.23-.30: a cast raises its colourfulness).

The default strength (:data:`DEFAULT_STRENGTH`) is 0.6 for every kind.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

#: Every known kind (``tint`` is known so that ablation ids parse, not a default).
DEGRADE_KINDS: tuple[str, ...] = ("blur", "noise", "jpeg", "dark", "bright", "washed", "crop",
                                   "hue", "tint")
#: The default kinds: generic photographic flaws, written without knowledge of any world's
#: hidden taste (no fixed colour cast: ``hue`` jitters toward a random hue per image).
DEFAULT_DEGRADE_KINDS: tuple[str, ...] = ("blur", "noise", "jpeg", "dark", "bright", "washed",
                                          "crop", "hue")
#: ABLATION ONLY. The former defaults, chosen knowing the built-in world's hidden look factors:
#: ``tint`` reproduces the world renderer's exact bad colour cast (and ``jpeg`` was left out).
#: Use them only to measure what that knowledge is worth, never as a default.
ORACLE_AWARE_DEGRADE_KINDS: tuple[str, ...] = ("blur", "noise", "dark", "bright", "washed",
                                               "tint", "crop")
DEFAULT_STRENGTH = 0.6
SEPARATOR = "~"


class DegradedRef(NamedTuple):
    """A parsed degraded id: the original image's id, the kind and the strength."""

    id: str
    kind: str
    strength: float


# ----------------------------------------------------------------------------- ids

def _format_strength(strength: float) -> str:
    return f"{float(strength):.3g}"


def degraded_id(image_id: str, kind: str, strength: float | None = None) -> str:
    """The id of a degraded copy: ``"<id>~<kind>"``, or ``"<id>~<kind>@<s>"`` when
    ``strength`` is given and differs from :data:`DEFAULT_STRENGTH`.

    Raises:
        ValueError: an unknown kind or a strength outside (0, 1].
    """
    _check(kind, DEFAULT_STRENGTH if strength is None else strength)
    if strength is None or abs(float(strength) - DEFAULT_STRENGTH) < 1e-9:
        return f"{image_id}{SEPARATOR}{kind}"
    return f"{image_id}{SEPARATOR}{kind}@{_format_strength(strength)}"


def parse_degraded_id(s: str) -> DegradedRef | None:
    """``"<id>~<kind>[@<strength>]"`` -> :class:`DegradedRef`; ``None`` for a plain id.

    Only a suffix naming a known kind counts, so an original id that itself contains ``~``
    is not mistaken for a degraded one.
    """
    if not s or SEPARATOR not in s:
        return None
    base, _, suffix = s.rpartition(SEPARATOR)
    kind, _, strength = suffix.partition("@")
    if not base or kind not in DEGRADE_KINDS:
        return None
    if not strength:
        return DegradedRef(base, kind, DEFAULT_STRENGTH)
    try:
        value = float(strength)
    except ValueError:
        return None
    if not 0.0 < value <= 1.0:
        return None
    return DegradedRef(base, kind, value)


def is_degraded_id(s: str) -> bool:
    """Whether ``s`` names a degraded copy."""
    return parse_degraded_id(s) is not None


def original_id(s: str) -> str:
    """The original image's id of a (possibly) degraded id."""
    ref = parse_degraded_id(s)
    return ref.id if ref else s


# ----------------------------------------------------------------------------- randomness

def rng_for(seed_key: Any) -> np.random.Generator:
    """A generator seeded from any key (``(id, kind, seed)``, a string, an int ...).

    Stable across processes and Python versions (BLAKE2b of the key's ``repr``; Python's own
    ``hash`` of a string is salted per process).
    """
    digest = hashlib.blake2b(repr(seed_key).encode(), digest_size=16).digest()
    return np.random.default_rng(np.frombuffer(digest, np.uint32).tolist())


# ----------------------------------------------------------------------------- kinds

def _luma(x: np.ndarray) -> np.ndarray:
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def noise_sigma(img: np.ndarray) -> float:
    """Immerkaer's noise estimate of one ``[H, W, 3]`` image (luma units, 0-255)."""
    from aligner.aesthetics.scorer import noise_sigma as _sigma

    return float(_sigma(_luma(img.astype(np.float32))[None])[0])


def _keep_noise(original: np.ndarray, out: np.ndarray, rng: np.random.Generator,
                mask: np.ndarray | None = None) -> np.ndarray:
    """Add back the sensor noise an optical degradation smoothed away.

    Blur, haze and exposure happen in front of the sensor, whose noise is added afterwards:
    a defocused photo from a noisy camera is still noisy. So the copy gets Gaussian noise of
    ``sqrt(sigma_orig^2 - sigma_out^2)`` (luma units, same on all channels) when its noise
    estimate fell below the original's. Without this a low-level scorer rewards blur and
    flat exposure for removing noise. ``mask`` (``[H, W]`` bool) limits the noise to
    unsaturated pixels: a blown-out highlight stays blown.
    """
    missing = noise_sigma(original) ** 2 - noise_sigma(out) ** 2
    if missing <= 0.25:
        return out
    n = rng.normal(0.0, np.sqrt(missing), out.shape[:2]).astype(np.float32)
    if mask is not None:
        n = n * mask
    return _to_uint8(out.astype(np.float32) + n[..., None])


def _blur(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageFilter

    radius = (0.5 + 2.5 * s) * max(img.shape[:2]) / 64.0
    out = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)), np.uint8)
    return _keep_noise(img, out, rng)


def _noise(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    sigma = 6.0 + 34.0 * s
    h, w = img.shape[:2]
    luma_noise = rng.normal(0, sigma, (h, w, 1)).astype(np.float32)
    chroma_noise = rng.normal(0, 0.3 * sigma, (h, w, 3)).astype(np.float32)
    return _to_uint8(img.astype(np.float32) + luma_noise + chroma_noise)


def _jpeg(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    quality = int(round(2 + 20 * (1.0 - s)))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=2)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def _dark(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    p99 = float(np.quantile(_luma(x), 0.99))
    gain = min(1.0, 235.0 / max(p99, 1.0)) * 2.0 ** -(1.0 + 2.0 * s)
    return _keep_noise(img, _to_uint8(x * gain), rng)


def _bright(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageFilter

    x = img.astype(np.float32)
    p99 = float(np.quantile(_luma(x), 0.99))
    gain = max(1.0, 235.0 / max(p99, 1.0)) * 2.0 ** (1.0 + 2.0 * s)
    x = np.minimum(x * gain, 255.0)
    # blooming: blown highlights bleed into their surroundings (screen blend of a blurred
    # copy), so clipped regions get soft halos instead of the hard edges clipping alone makes
    radius = 1.5 * max(img.shape[:2]) / 64.0
    glow = np.asarray(Image.fromarray(_to_uint8(x)).filter(ImageFilter.GaussianBlur(radius)),
                      np.float32)
    x = 255.0 - (255.0 - x) * (255.0 - glow) / 255.0
    lift = 0.3 * s  # milky shadows
    out = _to_uint8(x + (255.0 - x) * lift)
    return _keep_noise(img, out, rng, mask=out.min(axis=2) < 250)


def _washed(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    grey = _luma(x)[..., None]
    x = grey + (1.0 - 0.85 * s) * (x - grey)  # desaturate
    top = float(np.quantile(grey, 0.99))
    x = top - (1.0 - 0.6 * s) * (top - x)  # flat: shadows lifted towards the highlights
    return _keep_noise(img, _to_uint8(x), rng)


def _hue(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter toward a random hue: white-balance gains, then a random saturation change.

    The direction (``theta``) and the saturation's sign and size come from ``rng``, so each
    image id gets its own cast; the mean luma is kept, so this is a colour flaw, not exposure.
    """
    x = img.astype(np.float32)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    log_sat = (1.0 if rng.random() < 0.5 else -1.0) * 0.9 * s * rng.uniform(0.5, 1.0)
    phases = np.array([0.0, 2.0 * np.pi / 3.0, 4.0 * np.pi / 3.0], np.float32)
    gains = 1.0 + 0.35 * s * np.cos(theta - phases)
    gains = gains / float(gains @ np.array([0.299, 0.587, 0.114], np.float32))  # grey keeps luma
    x = x * gains.astype(np.float32)
    grey = _luma(x)[..., None]
    x = np.clip(grey + np.exp(log_sat) * (x - grey), 0.0, 255.0)
    before, after = float(_luma(img.astype(np.float32)).mean()), float(_luma(x).mean())
    if after > 1.0:
        x = x * (before / after)
    return _to_uint8(x)


def _tint(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """ABLATION ONLY (oracle-aware): the built-in world's own sickly green cast."""
    x = img.astype(np.float32)
    cast = 1.0 + s * (np.array([0.80, 1.15, 0.78], np.float32) - 1.0)
    return _to_uint8(x * cast)


def _crop(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    frac = 1.0 - 0.5 * s
    ch, cw = max(1, int(round(h * frac))), max(1, int(round(w * frac)))
    corner = int(rng.integers(4))
    top = 0 if corner in (0, 1) else h - ch
    left = 0 if corner in (0, 2) else w - cw
    window = Image.fromarray(img[top:top + ch, left:left + cw])
    return np.asarray(window.resize((w, h), Image.Resampling.BICUBIC), np.uint8)


_KINDS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "blur": _blur, "noise": _noise, "jpeg": _jpeg, "dark": _dark, "bright": _bright,
    "washed": _washed, "crop": _crop, "hue": _hue, "tint": _tint,
}
assert tuple(_KINDS) == DEGRADE_KINDS


def _check(kind: str, strength: float) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown degradation {kind!r}; known: {list(DEGRADE_KINDS)}")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"degradation strength must be in (0, 1], got {strength}")


def degrade(image: np.ndarray, kind: str, strength: float = DEFAULT_STRENGTH,
            seed_key: Any = 0) -> np.ndarray:
    """A degraded copy of ``image``: ``[H, W, 3]`` uint8 -> ``[H, W, 3]`` uint8.

    Args:
        image: RGB pixels.
        kind: one of :data:`DEGRADE_KINDS`.
        strength: in (0, 1]; how bad (see the module docstring for each kind's parameters).
        seed_key: anything with a stable ``repr``; the random parts (noise pattern, crop
            corner, hue direction) are drawn from :func:`rng_for` of ``(seed_key, kind, strength)``.

    Raises:
        ValueError: unknown kind, strength out of range, or not an ``[H, W, 3]`` image.
    """
    _check(kind, strength)
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    rng = rng_for((seed_key, kind, _format_strength(strength)))
    out = _KINDS[kind](np.ascontiguousarray(img), float(strength), rng)
    assert out.shape == img.shape and out.dtype == np.uint8
    return out


def materialise(original: np.ndarray, image_id: str, seed: int = 0) -> np.ndarray:
    """Pixels for a preference row's image id, given the decoded original's pixels.

    A plain id returns ``original`` unchanged; a degraded id (``"<id>~<kind>[@s]"``) returns
    ``degrade(original, kind, s, seed_key=(<id>, seed))`` - the same pixels the builder meant.

    Args:
        original: ``[H, W, 3]`` uint8 pixels of the *original* image (``original_id(image_id)``).
        image_id: the id as written in ``chosen_id`` / ``rejected_id``.
        seed: the builder's ``seed`` (recorded in the preferences manifest as
            ``degrade_seed``).
    """
    ref = parse_degraded_id(image_id)
    if ref is None:
        return np.asarray(original)
    return degrade(original, ref.kind, ref.strength, seed_key=(ref.id, seed))


def resolve_images(corpus: str, ids: Sequence[str], seed: int = 0,
                   max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """Pixels for preference ids (plain or degraded) from a corpus: ``id -> [H, W, 3] uint8``.

    Each original is fetched once (:func:`aligner.data.corpus.fetch_images`) and decoded
    (:func:`aligner.data.images.decode_image`); degraded ids are materialised from it. Ids whose
    original cannot be found or decoded are left out.
    """
    from aligner.data.corpus import fetch_images
    from aligner.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, to_uint8

    wanted = list(dict.fromkeys(ids))
    blobs = fetch_images(corpus, list(dict.fromkeys(original_id(i) for i in wanted)))
    decoded: dict[str, np.ndarray] = {}
    for oid, data in blobs.items():
        try:
            decoded[oid] = to_uint8(decode_image(data, max_pixels or DEFAULT_MAX_PIXELS))
        except ImageError:
            continue
    return {i: materialise(decoded[original_id(i)], i, seed) for i in wanted
            if original_id(i) in decoded}


def cycle_kinds(kinds: Sequence[str], n: int, offset: int = 0) -> list[str]:
    """``n`` kinds taken in turn from ``kinds`` starting at ``offset`` (wraps around)."""
    if not kinds:
        raise ValueError("no degradation kinds given")
    return [kinds[(offset + i) % len(kinds)] for i in range(n)]


def parse_strengths(value: Mapping[str, float] | None) -> dict[str, float]:
    """Per-kind strengths with defaults filled in (checked)."""
    out = {k: DEFAULT_STRENGTH for k in DEGRADE_KINDS}
    for k, v in (value or {}).items():
        _check(k, v)
        out[k] = float(v)
    return out
