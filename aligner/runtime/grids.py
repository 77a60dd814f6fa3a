"""Image grids for people to look at: a PNG (matplotlib, Agg) and a self-contained HTML page.

Both take *items* (an image plus its caption, score, aesthetic and a short label), either as
one flat list wrapped into ``cols`` columns, or as labelled rows
(``[("base", items), ("aligned", items)]``) - one row per system or per query, which is how
search results and the evaluation report's side-by-side comparisons are shown. An item is a
:class:`GridItem` or a dict with the same keys (``image`` may be encoded bytes, a PIL image or
``None`` for a missing image).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

ImageLike = bytes | Image.Image | None
_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif",
         b"RIFF": "image/webp"}


@dataclasses.dataclass
class GridItem:
    """One cell of a grid.

    Attributes:
        image: encoded bytes (PNG/JPEG/...), a PIL image, or None (drawn as a placeholder).
        caption: free text under the image (wrapped).
        score: retrieval score, shown as ``score 0.812``.
        aesthetic: aesthetic score, shown as ``aes 0.53``.
        label: a short first line (rank and id, a system name ...).
    """

    image: ImageLike = None
    caption: str = ""
    score: float | None = None
    aesthetic: float | None = None
    label: str = ""

    @classmethod
    def of(cls, item: GridItem | Mapping[str, Any]) -> GridItem:
        """A GridItem from a GridItem or a dict (unknown keys are ignored; ``id`` -> label)."""
        if isinstance(item, GridItem):
            return item
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in item.items() if k in names and v is not None}
        if "label" not in kw and item.get("id") is not None:
            kw["label"] = str(item["id"])
        return cls(**kw)

    def text(self, width: int = 28, caption_lines: int = 3) -> str:
        """The lines shown under the image."""
        lines = [self.label] if self.label else []
        nums = [f"score {self.score:.3f}" if self.score is not None else "",
                f"aes {self.aesthetic:.2f}" if self.aesthetic is not None else ""]
        if any(nums):
            lines.append("  ".join(n for n in nums if n))
        if self.caption:
            lines += textwrap.wrap(self.caption, width)[:caption_lines]
        return "\n".join(lines)


Row = tuple[str, Sequence[GridItem | Mapping[str, Any]]]


def to_pil(image: ImageLike) -> Image.Image | None:
    """Decode bytes / pass a PIL image through, as RGB; None (logged) if it cannot be decoded."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decode error means "show a placeholder"
        log.warning("cannot decode an image (%d bytes): %s", len(image), e)
        return None


def _as_rows(items_or_rows: Sequence[Any], cols: int) -> list[tuple[str, list[GridItem]]]:
    """Labelled rows as given, or a flat item list wrapped into rows of ``cols``."""
    seq = list(items_or_rows)
    if seq and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in seq):
        return [(label, [GridItem.of(i) for i in items]) for label, items in seq]
    flat = [GridItem.of(i) for i in seq]
    return [("", flat[i:i + cols]) for i in range(0, len(flat), max(cols, 1))]


def _draw_png(rows: list[tuple[str, list[GridItem]]], path: Path, title: str | None,
              thumb: float, dpi: int) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg via savefig

    if not rows or not any(items for _, items in rows):
        raise ValueError("nothing to draw: no images")
    ncols = max(len(items) for _, items in rows)
    texts = [[it.text() for it in items] for _, items in rows]
    text_h = [0.16 * max((t.count("\n") + 1 for t in row), default=1) for row in texts]
    fig = Figure(figsize=(ncols * thumb + 0.4, sum(thumb + h for h in text_h) + 0.5))
    axes = fig.subplots(len(rows), ncols, squeeze=False,
                        gridspec_kw={"height_ratios": [thumb + h for h in text_h]})
    for r, (row_label, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.set_visible(False)
                continue
            im = to_pil(items[c].image)
            if im is None:
                ax.imshow(Image.new("RGB", (8, 8), (217, 217, 217)))  # square, like the others
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes)
            else:
                ax.imshow(im)
            ax.set_xlabel(texts[r][c], fontsize=7, loc="left")
        if row_label:  # long labels (queries) wrap to the row's height
            wrapped = "\n".join(textwrap.wrap(row_label, max(12, int(thumb * 11)))[:4])
            axes[r][0].set_ylabel(wrapped, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def image_grid_png(images: Sequence[ImageLike], labels: Sequence[str], path: str | Path,
                   cols: int = 5, title: str | None = None, thumb: float = 2.0,
                   dpi: int = 100) -> Path:
    """Write a PNG grid of images with a label under each, ``cols`` per row.

    Args:
        images: PIL images or encoded bytes (None: placeholder).
        labels: one text per image (may hold newlines).
        path: the PNG to write.
        cols: images per row.
        title: drawn above the grid.
        thumb: cell size in inches.
        dpi: resolution.

    Raises:
        ValueError: ``images`` and ``labels`` differ in length, or both are empty.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    items = [GridItem(image=im, label=lab) for im, lab in zip(images, labels, strict=True)]
    return _draw_png(_as_rows(items, cols), Path(path), title, thumb, dpi)


def rows_grid_png(rows: Sequence[Row] | Sequence[GridItem | Mapping[str, Any]], path: str | Path,
                  title: str | None = None, cols: int = 5, thumb: float = 2.0,
                  dpi: int = 100) -> Path:
    """Write a PNG of labelled rows of items (label at the left of each row).

    Args:
        rows: ``[(row_label, items), ...]`` or a flat list of items (wrapped at ``cols``).
        path: the PNG to write.
        title: drawn above the grid.
        cols: columns when ``rows`` is a flat list.
        thumb: cell size in inches.
        dpi: resolution.
    """
    return _draw_png(_as_rows(rows, cols), Path(path), title, thumb, dpi)


def data_uri(image: ImageLike, max_side: int = 256) -> str | None:
    """An image as a ``data:`` URI: encoded bytes as they are unless larger than ``max_side``
    (then re-encoded as a PNG thumbnail); None for a missing or undecodable image."""
    if image is None:
        return None
    if isinstance(image, bytes):
        mime = next((m for magic, m in _MIME.items() if image.startswith(magic)), None)
        im = to_pil(image)
        if im is None:
            return None
        if mime and max(im.size) <= max_side:
            return f"data:{mime};base64,{base64.b64encode(image).decode()}"
        image = im
    im = image.convert("RGB")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


_CSS = """body{font-family:sans-serif;margin:1em}h1{font-size:1.3em}h2{font-size:1.05em}
.row{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:1.2em}
figure{margin:0;width:170px;font-size:12px}
figure img,.missing{width:160px;height:160px;object-fit:contain;background:#ddd;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#666}
figcaption{white-space:pre-line;margin-top:3px}"""


def image_grid_html(rows: Sequence[Row] | Sequence[GridItem | Mapping[str, Any]],
                    path: str | Path, title: str = "", cols: int = 5, max_side: int = 256) -> Path:
    """Write a self-contained HTML page (images as base64 data URIs) of items or labelled rows.

    Args:
        rows: ``[(row_label, items), ...]`` or a flat list of items (dicts with ``image``
            bytes, ``caption``, ``score``, ``aesthetic``, ``label``/``id``).
        path: the HTML file to write.
        title: page title and heading.
        cols: items per row when ``rows`` is a flat list.
        max_side: images larger than this are shrunk to PNG thumbnails.
    """
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    if title:
        parts.append(f"<h1>{html.escape(title)}</h1>")
    for label, items in _as_rows(rows, cols):
        if label:
            parts.append(f"<h2>{html.escape(label)}</h2>")
        parts.append("<div class='row'>")
        for it in items:
            uri = data_uri(it.image, max_side)
            img = (f"<img src='{uri}' alt='{html.escape(it.label)}'>" if uri
                   else "<div class='missing'>no image</div>")
            parts.append(f"<figure>{img}<figcaption>{html.escape(it.text(40, 6))}"
                         "</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
