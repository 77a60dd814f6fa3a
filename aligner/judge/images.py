"""What a judge is shown of a row: one composed grid image per row, or the images themselves.

The paper shows its judges rows of results; a VLM sees them best as one picture per row
(:func:`compose_row`: thumbnails side by side on a white canvas, ``cols`` per line), which
also keeps the number of image tokens per request at two, whatever the row length.
``compose="images"`` passes every image on its own instead (models that take many images).
Images are sent as PNG; :func:`data_url` wraps bytes as the ``data:image/png;base64,...`` URL
OpenAI-compatible servers take.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

COMPOSE = ("row", "images")


def to_png(data: bytes, max_side: int | None = None) -> bytes:
    """Encoded image bytes -> PNG bytes (RGB), shrunk so its longest side <= ``max_side``.

    Raises:
        aligner.data.images.ImageError: bytes that are not a decodable image.
    """
    from PIL import Image

    from aligner.data.images import decode_image

    im = decode_image(data).convert("RGB")
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def compose_row(images: Sequence[bytes], thumb: int = 224, cols: int = 5, gap: int = 8) -> bytes:
    """One PNG of a row's images: ``thumb`` x ``thumb`` cells (aspect kept, centred), at most
    ``cols`` per line, ``gap`` white pixels between them.

    Raises:
        ValueError: no images.
        aligner.data.images.ImageError: an image that cannot be decoded.
    """
    from PIL import Image

    from aligner.data.images import decode_image

    if not images:
        raise ValueError("a row needs at least one image")
    cols = max(1, min(cols, len(images)))
    lines = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * thumb + (cols - 1) * gap,
                               lines * thumb + (lines - 1) * gap), "white")
    for i, data in enumerate(images):
        im = decode_image(data).convert("RGB")
        s = thumb / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                       Image.Resampling.BICUBIC)
        r, c = divmod(i, cols)
        x = c * (thumb + gap) + (thumb - im.width) // 2
        y = r * (thumb + gap) + (thumb - im.height) // 2
        canvas.paste(im, (x, y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def row_images(images: Sequence[bytes], compose: str = "row", thumb: int = 224,
               cols: int = 5) -> list[bytes]:
    """What is shown of a row: ``[one grid PNG]`` (``row``) or each image as PNG (``images``).

    Raises:
        ValueError: an unknown ``compose`` or an empty row.
    """
    if compose == "row":
        return [compose_row(images, thumb, cols)]
    if compose == "images":
        if not images:
            raise ValueError("a row needs at least one image")
        return [to_png(b, thumb) for b in images]
    raise ValueError(f"compose must be one of {list(COMPOSE)}, not {compose!r}")


def image_mime(data: bytes) -> str:
    """The MIME type of encoded bytes from their signature (PNG, JPEG, GIF, WebP; else PNG)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def data_url(data: bytes) -> str:
    """``data:image/png;base64,...`` (the MIME type from the bytes' signature)."""
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"
