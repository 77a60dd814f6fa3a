"""Decode and validate encoded images: bytes -> RGB PIL image, or a failure with a reason.

Every image a job reads goes through :func:`decode_image`. It never raises anything but
:class:`ImageError`, whose ``reason`` is a short code that failure rows record:

==================  ============================================================
reason              when
==================  ============================================================
``empty``           zero bytes
``not_an_image``    PIL does not recognise the format (text, HTML, random bytes)
``too_large``       the header says width x height > ``max_pixels`` (checked
                    before any pixel is decoded: PIL's ``Image.open`` is lazy),
                    or PIL's own decompression-bomb guard fired
``truncated``       the file ends before the pixel data does
``corrupt``         any other decoder error (bad chunk, bad CRC, bad header)
==================  ============================================================

:func:`decode_rgb` (pixels as a uint8 array, optionally resized to a square) and
:func:`decode_batch` (a stack of them) are built on it; nothing else here decodes images.

Failure rows (``FAILURE_SCHEMA``: ``id, source, reason, stage``) are what a job writes to
``failures/`` for every input row it could not process; ``stage`` says where it failed
(``read``, ``fetch``, ``decode``, ``encode``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000  # 8k x 8k; PIL's own warning level is 89.5M, its error 179M

FAILURE_COLUMNS = ("id", "source", "reason", "stage")


def failure_schema() -> pa.Schema:
    """Arrow schema of a failure row: ``id, source, reason, stage`` (all strings)."""
    import pyarrow as pa

    return pa.schema([(c, pa.string()) for c in FAILURE_COLUMNS])


def failure_row(id_: str, source: str, reason: str, stage: str) -> dict[str, str]:
    """One failure row (see :func:`failure_schema`)."""
    return {"id": str(id_), "source": str(source), "reason": str(reason), "stage": stage}


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short code, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says, read without decoding pixels."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            # Our max_pixels check is the authority; PIL's warning level would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageError("not_an_image", f"unrecognised format ({len(data)} bytes)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # broken header
        raise ImageError("corrupt", f"{type(e).__name__}: {e}") from e


def image_info(data: bytes) -> ImageInfo:
    """Format and size from the header alone (no pixel decoding).

    Raises:
        ImageError: ``empty``, ``not_an_image``, ``too_large`` or ``corrupt``.
    """
    im = _open(data)
    return ImageInfo(im.format or "", int(im.width), int(im.height), im.mode)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> fully decoded RGB PIL image, validated.

    The header's size is checked against ``max_pixels`` before decoding, so a 50,000 x 50,000
    PNG of a few KB (a decompression bomb) costs nothing. EXIF orientation is applied; palette,
    grey, alpha and CMYK images become RGB (``convert("RGB")``, as open_clip does).

    Args:
        data: the encoded file (JPEG, PNG, WebP, GIF, BMP, TIFF ... whatever PIL reads).
        max_pixels: width x height limit.

    Returns:
        An RGB ``PIL.Image.Image`` whose pixels are loaded.

    Raises:
        ImageError: with ``reason`` one of ``empty``, ``not_an_image``, ``too_large``,
            ``truncated``, ``corrupt``.
    """
    from PIL import Image, ImageOps

    im = _open(data)
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError("corrupt", f"image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
            im = ImageOps.exif_transpose(im) or im
            rgb = im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError) as e:
        msg = f"{type(e).__name__}: {e}"
        raise ImageError("truncated" if "truncated" in str(e).lower() else "corrupt", msg) from e
    except Exception as e:  # noqa: BLE001 - plugin bugs (struct.error, ZeroDivisionError ...)
        raise ImageError("corrupt", f"{type(e).__name__}: {e}") from e
    return rgb


def to_uint8(im: Image.Image, max_side: int | None = None) -> np.ndarray:
    """RGB PIL image -> ``[H, W, 3]`` uint8 array, optionally downscaled so max(H, W) <= max_side.

    Only ever shrinks (with PIL's antialiasing ``reduce``/bicubic), so low-level statistics of
    small images are measured on their own pixels.
    """
    from PIL import Image

    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return arr


def decode_rgb(data: bytes, size: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> ``[H, W, 3]`` uint8 RGB (:func:`decode_image`), or ``[size, size, 3]``
    when ``size`` is given: shortest side resized to ``size`` (bicubic), then a centre crop
    (an image already ``size x size`` is left untouched).

    Raises:
        ImageError: as :func:`decode_image`.
    """
    from PIL import Image

    im = decode_image(data, max_pixels)
    if size is not None and im.size != (size, size):
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


def decode_batch(blobs: Sequence[bytes], size: int | None = None) -> np.ndarray:
    """Many encoded images -> ``[N, H, W, 3]`` uint8 (they must share a size, or give ``size``).

    Raises:
        ImageError: the first image that cannot be decoded (its index in the message).
        ValueError: images of different sizes without ``size``.
    """
    out = []
    for i, b in enumerate(blobs):
        try:
            out.append(decode_rgb(b, size))
        except ImageError as e:
            raise ImageError(e.reason, f"image {i}: {e.detail}") from e
    if not out:
        return np.zeros((0, size or 0, size or 0, 3), np.uint8)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)[:3]}: pass size=")
    return np.stack(out)
