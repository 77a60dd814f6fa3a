"""A folder corpus of the odd files real folders hold: colour modes, bit depths, EXIF rotation,
extreme sizes, multi-frame files, broken files and files that are not images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

#: file -> what a reader must make of it
GOOD = ("rgb.jpg", "cmyk.jpg", "grey.png", "deep16.png", "palette.png", "rgba.png",
        "rotated.jpg", "one_pixel.png", "wide_4000x2.png", "photo.webp", "animated.gif",
        "pages.tif", "old.bmp", "sub/la.png")
BROKEN = {"truncated.jpg": "truncated", "empty.png": "empty", "html.jpg": "not_an_image",
          "noise.png": "not_an_image", "badcrc.png": "not_an_image"}
CAPTIONS = ("rgb.txt",)
SKIPPED = {".DS_Store": "hidden", "README.txt": "caption_without_image",
           "notes.pdf": "not_an_image"}


def write_odd_folder(root: Path) -> Path:
    """Write the 23 files (14 images, 5 broken, 1 caption, 3 not data) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)

    def arr(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    Image.fromarray(arr(80, 60)).save(root / "rgb.jpg", quality=90)
    Image.fromarray(arr(40, 40)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(arr(50, 70)).convert("L").save(root / "grey.png")
    Image.fromarray(rng.integers(0, 65535, (30, 30)).astype(np.uint16)).save(root / "deep16.png")
    Image.fromarray(arr(32, 32)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "palette.png", transparency=0)
    Image.fromarray(np.dstack([arr(20, 20), np.full((20, 20, 1), 128, np.uint8)])).save(
        root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(arr(30, 60)).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(arr(1, 1)).save(root / "one_pixel.png")
    Image.fromarray(arr(2, 4000)).save(root / "wide_4000x2.png")
    Image.fromarray(arr(40, 40)).save(root / "photo.webp")
    frames = [Image.fromarray(arr(24, 24)) for _ in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    pages = [Image.fromarray(arr(24, 24)) for _ in range(2)]
    pages[0].save(root / "pages.tif", save_all=True, append_images=pages[1:])
    Image.fromarray(arr(16, 16)).save(root / "old.bmp")
    Image.fromarray(arr(20, 20)).convert("LA").save(root / "sub" / "la.png")
    data = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "html.jpg").write_bytes(b"<html><body>not found</body></html>")
    (root / "noise.png").write_bytes(os.urandom(300))
    png = bytearray((root / "grey.png").read_bytes())
    png[40:60] = b"\x00" * 20
    (root / "badcrc.png").write_bytes(bytes(png))
    (root / "rgb.txt").write_text("a noisy photo")
    (root / "README.txt").write_text("this folder holds odd files")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "notes.pdf").write_bytes(b"%PDF-1.4\n%...")
    return root
