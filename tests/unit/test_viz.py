"""Image grids (aligner.runtime.grids): PNGs that PIL opens, with placeholders for missing images, and a
self-contained HTML page whose images are base64 data URIs and whose text is escaped."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from aligner.runtime.grids import GridItem, data_uri, image_grid_html, image_grid_png, rows_grid_png

RED, BLUE = (255, 0, 0), (0, 0, 255)
PLACEHOLDER = (217, 217, 217)  # matplotlib grey "0.85" behind "no image"


def png_bytes(color=RED, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(color=BLUE, size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def colour_count(im: Image.Image, rgb: tuple[int, int, int], tol: int = 8) -> int:
    a = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=2) <= tol).sum())


def open_png(path) -> Image.Image:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    im = Image.open(path)
    im.load()
    assert im.format == "PNG"
    return im


def test_image_grid_png_draws_images_and_a_placeholder(tmp_path):
    images = [png_bytes(RED), None, Image.new("RGB", (32, 32), BLUE), b"not an image"]
    path = image_grid_png(images, ["red", "missing", "blue", "broken"], tmp_path / "g" / "a.png",
                          cols=2, title="grid", thumb=1.5, dpi=50)
    im = open_png(path)
    w, h = im.size
    assert w == pytest.approx((2 * 1.5 + 0.4) * 50, abs=2)  # 2 columns of 1.5 in at 50 dpi
    assert h > 2 * 1.5 * 50  # 2 rows of cells plus text
    # the red and blue images are drawn; the two unreadable cells are grey placeholders
    assert colour_count(im, RED) > 500 and colour_count(im, BLUE) > 500
    assert colour_count(im, PLACEHOLDER, tol=2) > 2 * 500
    only_images = image_grid_png([png_bytes(RED)], ["red"], tmp_path / "b.png", dpi=50)
    assert colour_count(open_png(only_images), PLACEHOLDER, tol=2) < 50


def test_image_grid_png_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        image_grid_png([None, None], ["x"], tmp_path / "a.png")
    with pytest.raises(ValueError, match="nothing to draw"):
        image_grid_png([], [], tmp_path / "a.png")


def test_rows_grid_png_ragged_rows(tmp_path):
    rows = [("query one", [{"image": png_bytes(RED), "id": "a", "score": 0.91234,
                            "aesthetic": 0.5, "caption": "a red square " * 8},
                           GridItem(image=None, label="#2 missing", score=0.5)]),
            ("a much longer second query that has to wrap over several lines of the label",
             [{"image": jpeg_bytes(BLUE), "id": "b"}])]
    im = open_png(rows_grid_png(rows, tmp_path / "rows.png", title="results", dpi=50))
    assert colour_count(im, RED) > 500 and colour_count(im, BLUE, tol=30) > 500
    assert colour_count(im, PLACEHOLDER, tol=2) > 500
    one_row = open_png(rows_grid_png(rows[:1], tmp_path / "one.png", dpi=50))
    assert im.height > one_row.height + 80 and im.width == one_row.width
    flat = open_png(rows_grid_png([{"image": png_bytes(RED)}] * 7, tmp_path / "flat.png",
                                  cols=3, dpi=50))
    assert flat.height > flat.width * 0.8  # 7 items in rows of 3: three rows


def test_grid_item_text():
    item = GridItem.of({"id": "img-7", "score": 0.81234, "aesthetic": 0.5, "caption": "c",
                        "unknown": 1})
    assert item.text() == "img-7\nscore 0.812  aes 0.50\nc"
    assert GridItem(caption="word " * 40).text(width=20, caption_lines=2).count("\n") == 1


def test_image_grid_html_data_uris_and_escaping(tmp_path):
    red, blue = png_bytes(RED), jpeg_bytes(BLUE)
    big = Image.new("RGB", (600, 300), (0, 200, 0))
    rows = [("<b>q1</b> & more", [
        {"image": red, "id": "r'1", "caption": "<script>alert('x')</script>", "score": 0.5},
        {"image": None, "id": "gone", "caption": "no image here"},
        {"image": blue, "id": "b", "aesthetic": 0.25},
        {"image": big, "id": "big"},
    ])]
    path = image_grid_html(rows, tmp_path / "out" / "page.html", title="T <i>", max_side=128)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    # nothing from the data is left unescaped
    assert "<script>" not in text and "<b>" not in text and "<i>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;q1&lt;/b&gt; &amp; more" in text
    assert "alt='r&#x27;1'" in text
    assert "no image</div>" in text and "src=''" not in text and "None" not in text

    uris = re.findall(r"src='(data:image/[a-z]+;base64,[A-Za-z0-9+/=]+)'", text)
    assert len(uris) == 3
    # small images are embedded as they are (same bytes, same type) ...
    assert uris[0] == "data:image/png;base64," + base64.b64encode(red).decode()
    assert uris[1] == "data:image/jpeg;base64," + base64.b64encode(blue).decode()
    # ... a large one as a PNG thumbnail no larger than max_side
    assert uris[2].startswith("data:image/png;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(uris[2].split(",", 1)[1])))
    assert thumb.size == (128, 64)


def test_data_uri_edge_cases():
    assert data_uri(None) is None
    assert data_uri(b"\x89PNG but broken") is None
    big = png_bytes(RED, (300, 200))
    uri = data_uri(big, max_side=256)
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(im.size) == 256 and im.getpixel((10, 10)) == RED
