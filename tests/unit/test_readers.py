"""Corpus readers and decode helpers, without Ray: shard plans, streamed rows, failure rows."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aligner.data.corpus_plan import Shard, detect_format, plan_shards
from aligner.data.corpus_shards import iter_shard, read_shard_columns, split_key
from aligner.data.images import ImageError, decode_image, image_info, to_uint8


def encode(color=(200, 30, 30), size=(64, 64), fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, fmt)
    return buf.getvalue()


def noisy_png(seed: int = 0, size: int = 64) -> bytes:
    """A PNG that does not compress to almost nothing (so truncating it cuts pixel data)."""
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + chunk(b"IEND", b""))


def all_rows(shards: list[Shard], batch_rows: int = 4) -> pa.Table:
    return pa.concat_tables([t for s in shards for t in iter_shard(s, batch_rows)])


# ------------------------------------------------------------------------ decode helpers

def test_decode_valid_formats_to_rgb():
    for fmt in ("PNG", "JPEG", "WEBP"):
        im = decode_image(encode(fmt=fmt))
        assert im.mode == "RGB" and im.size == (64, 64)
    grey = decode_image(encode(fmt="PNG", mode="L"))
    assert grey.mode == "RGB"
    rgba = io.BytesIO()
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(rgba, "PNG")
    assert decode_image(rgba.getvalue()).mode == "RGB"


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"hello, I am a text file\n" * 20, "not_an_image"),
    (b"<html><body>404</body></html>", "not_an_image"),
])
def test_decode_rejects_non_images(data, reason):
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_decode_truncated_png():
    data = noisy_png()
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason == "truncated"


def test_decode_corrupt_png():
    data = bytearray(noisy_png())
    start = data.index(b"IDAT") + 40
    data[start:start + 200] = bytes(200)  # zeroed compressed stream: zlib error or bad CRC
    with pytest.raises(ImageError) as e:
        decode_image(bytes(data))
    assert e.value.reason in ("corrupt", "truncated")


def test_decode_oversized_checked_before_decoding():
    with pytest.raises(ImageError) as e:
        decode_image(encode(size=(300, 200)), max_pixels=50_000)
    assert e.value.reason == "too_large" and "300x200" in str(e.value)
    # Decompression bombs: ~100-byte PNGs whose headers claim 12000^2 (432 MB of RGB) and
    # 40000^2 pixels. The first is caught by our header check, the second by PIL's own guard.
    bomb = bomb_png(12_000, 12_000)
    info = image_info(bomb)
    assert (info.format, info.width, info.height) == ("PNG", 12_000, 12_000)
    with pytest.raises(ImageError, match="max_pixels") as e:
        decode_image(bomb)  # default max_pixels (64M); must not try to allocate
    assert e.value.reason == "too_large"
    with pytest.raises(ImageError) as e:
        decode_image(bomb_png(40_000, 40_000), max_pixels=10**10)
    assert e.value.reason == "too_large"


def test_to_uint8_only_shrinks():
    im = Image.new("RGB", (400, 200), (10, 20, 30))
    assert to_uint8(im, 100).shape == (50, 100, 3)
    assert to_uint8(Image.new("RGB", (32, 16)), 100).shape == (16, 32, 3)
    assert to_uint8(im).dtype == np.uint8


# ------------------------------------------------------------------------ parquet

def write_corpus(path: Path, n: int = 25, row_group_size: int = 7, **extra) -> list[bytes]:
    images = [encode((i * 9 % 255, 40, 90)) for i in range(n)]
    cols = {"id": [f"im{i:03d}" for i in range(n)], "image": images,
            "caption": [f"caption {i}" for i in range(n)], **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return images


def test_parquet_shards_are_row_ranges_and_stable(tmp_path):
    write_corpus(tmp_path / "c" / "a.parquet", 25, split=["train"] * 20 + ["test"] * 5)
    write_corpus(tmp_path / "c" / "b.parquet", 5)
    (tmp_path / "c" / "_SUCCESS").write_text("")
    shards = plan_shards(str(tmp_path / "c"), "auto", rows_per_shard=10)
    assert [(Path(s.paths[0]).name, s.start, s.stop, s.num_rows) for s in shards] == [
        ("a.parquet", 0, 10, 10), ("a.parquet", 10, 20, 10), ("a.parquet", 20, 25, 5),
        ("b.parquet", 0, 5, 5)]
    again = plan_shards(str(tmp_path / "c"), "parquet", rows_per_shard=10)
    assert [s.shard_id for s in again] == [s.shard_id for s in shards]
    assert len({s.shard_id for s in shards}) == 4
    assert Shard.from_json(shards[1].to_json()) == shards[1]
    # A rewritten file (other size) gets new ids; the other file keeps its own.
    write_corpus(tmp_path / "c" / "b.parquet", 6)
    changed = plan_shards(str(tmp_path / "c"), rows_per_shard=10)
    assert changed[0].shard_id == shards[0].shard_id
    assert changed[3].shard_id != shards[3].shard_id


def test_parquet_rows_stream_in_small_batches_with_totals(tmp_path):
    images = write_corpus(tmp_path / "c" / "a.parquet", 25)
    shards = plan_shards(str(tmp_path / "c"), rows_per_shard=10)
    for shard in shards:
        tables = list(iter_shard(shard, batch_rows=4))
        assert all(t.num_rows <= 4 for t in tables)
        t = pa.concat_tables(tables)
        assert t.num_rows == shard.num_rows
        assert t.column("row").to_pylist() == list(range(shard.num_rows))
        # only the last batch carries the shard's total
        assert set(tables[-1].column("shard_total").to_pylist()) == {shard.num_rows}
        assert all(set(x.column("shard_total").to_pylist()) == {-1} for x in tables[:-1])
    t = all_rows(shards)
    assert t.column("id").to_pylist() == [f"im{i:03d}" for i in range(25)]
    assert t.column("data").to_pylist() == images
    assert t.column("caption").to_pylist()[3] == "caption 3"
    assert t.column("source").to_pylist()[12].endswith("a.parquet#row=12")
    assert set(t.column("reason").to_pylist()) == {""}


def test_parquet_extra_columns_by_row_range(tmp_path):
    write_corpus(tmp_path / "c.parquet", 25, split=[f"s{i}" for i in range(25)])
    shards = plan_shards(str(tmp_path / "c.parquet"), rows_per_shard=10)
    extra = read_shard_columns(shards[1], ["split", "nope"])
    assert extra.column_names == ["split"]
    assert extra.column("split").to_pylist() == [f"s{i}" for i in range(10, 20)]


def test_parquet_uri_column_fetches_and_records_failures(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(encode())
    (tmp_path / "img" / "b.png").write_bytes(encode((0, 0, 255)))
    uris = ["img/a.png", str(tmp_path / "img" / "b.png"), "img/missing.png", None]
    pq.write_table(pa.table({"id": ["a", "b", "m", "n"], "uri": uris}), tmp_path / "c.parquet")
    t = all_rows(plan_shards(str(tmp_path / "c.parquet")))
    rows = {r["id"]: r for r in t.to_pylist()}
    assert rows["a"]["data"] == encode() and rows["a"]["reason"] == ""
    assert rows["b"]["data"] == encode((0, 0, 255))
    assert rows["m"]["data"] is None and rows["m"]["stage"] == "fetch"
    assert rows["m"]["reason"].startswith("fetch_error")
    assert rows["n"]["reason"].startswith("missing_uri")


def test_parquet_wrong_schema_names_columns(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "pixels": [b"x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"found columns \['key', 'pixels'\]"):
        plan_shards(str(tmp_path / "bad.parquet"))
    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), tmp_path / "noimg.parquet")
    with pytest.raises(ValueError, match="'image'.*'uri'"):
        plan_shards(str(tmp_path / "noimg.parquet"), "parquet")
    pq.write_table(pa.table({"id": ["a"], "image": [3]}), tmp_path / "int.parquet")
    with pytest.raises(ValueError, match="encoded bytes"):
        plan_shards(str(tmp_path / "int.parquet"))


@pytest.mark.parametrize("fmt", ["auto", "parquet", "folder", "webdataset"])
def test_missing_input_is_a_clear_error(tmp_path, fmt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_shards(str(tmp_path / "nowhere"), fmt)


def test_bad_corpus_rows_are_kept_for_the_decoder(tmp_path):
    """Zero-byte, non-image, truncated, oversized and null images stay rows (decode fails)."""
    good = encode()
    trunc = noisy_png()[:300]
    data = [good, b"", b"plain text", trunc, encode(size=(500, 500)), None]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "image": data}),
                   tmp_path / "c.parquet")
    t = all_rows(plan_shards(str(tmp_path / "c.parquet")))
    assert t.num_rows == 6
    got = []
    for raw in t.column("data").to_pylist():
        try:
            decode_image(raw, max_pixels=100_000)
            got.append("ok")
        except ImageError as e:
            got.append(e.reason)
    assert got == ["ok", "empty", "not_an_image", "truncated", "too_large", "empty"]


# ------------------------------------------------------------------------ folders

def make_folder(root: Path) -> None:
    (root / "b").mkdir(parents=True)
    (root / "a.png").write_bytes(encode())
    (root / "a.txt").write_text("  a red square \n")
    (root / "b" / "c.JPG").write_bytes(encode(fmt="JPEG"))
    (root / "b" / "d.webp").write_bytes(encode(fmt="WEBP"))
    (root / "b" / "d.json").write_text(json.dumps({"caption": "a webp"}))
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("not really a jpeg")
    (root / "b" / "trunc.png").write_bytes(noisy_png()[:500])
    (root / "notes.md").write_text("not an image, not listed")
    (root / ".hidden.png").write_bytes(encode())


def test_folder_shards_sorted_chunks_with_relative_ids(tmp_path):
    make_folder(tmp_path / "f")
    assert detect_format(str(tmp_path / "f")) == "folder"
    shards = plan_shards(str(tmp_path / "f"), rows_per_shard=4)
    assert [s.num_rows for s in shards] == [4, 2]
    assert shards[0].paths == ("a.png", "b/c.JPG", "b/d.webp", "b/empty.png")
    t = all_rows(shards, batch_rows=3)
    ids = t.column("id").to_pylist()
    assert ids == ["a.png", "b/c.JPG", "b/d.webp", "b/empty.png", "b/text.jpg", "b/trunc.png"]
    caps = dict(zip(ids, t.column("caption").to_pylist(), strict=True))
    assert caps["a.png"] == "a red square" and caps["b/d.webp"] == "a webp"
    assert caps["b/c.JPG"] == ""
    assert t.column("data").to_pylist()[3] == b""
    assert [s.shard_id for s in plan_shards(str(tmp_path / "f"), rows_per_shard=4)] == [
        s.shard_id for s in shards]


def test_folder_without_images(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="no image files"):
        plan_shards(str(tmp_path), "folder")


# ------------------------------------------------------------------------ webdataset

def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path: Path, n: int = 3, start: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            add(tar, f"shard/{i:06d}.png", encode((i * 40 % 255, 0, 0)))
            if i % 2:
                add(tar, f"shard/{i:06d}.json", json.dumps({"caption": f"json {i}"}).encode())
            else:
                add(tar, f"shard/{i:06d}.txt", f"text {i}".encode())


def test_webdataset_groups_samples_by_key(tmp_path):
    assert split_key("dir/000123.seg.jpg") == ("dir/000123", "seg.jpg")
    make_tar(tmp_path / "w" / "a.tar", 3)
    make_tar(tmp_path / "w" / "b.tar", 2, start=3)
    shards = plan_shards(str(tmp_path / "w"))
    assert [s.kind for s in shards] == ["tar", "tar"] and shards[0].num_rows is None
    t = all_rows(shards, batch_rows=2)
    assert t.column("id").to_pylist() == [f"shard/{i:06d}" for i in range(5)]
    assert t.column("caption").to_pylist() == ["text 0", "json 1", "text 2", "json 3", "text 4"]
    assert t.column("data").to_pylist()[1] == encode((40, 0, 0))
    last = [x for x in iter_shard(shards[0], 2)][-1]
    assert set(last.column("shard_total").to_pylist()) == {3}


def test_webdataset_bad_samples_and_bad_tars(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add(tar, "000001.jpg", encode(fmt="JPEG"))
        add(tar, "000002.txt", b"caption without an image")
        add(tar, "000003.png", b"")
    rows = all_rows(plan_shards(str(tmp_path / "a.tar"))).to_pylist()
    assert [r["id"] for r in rows] == ["000001", "000002", "000003"]
    assert rows[1]["reason"].startswith("no_image") and rows[1]["stage"] == "read"
    assert rows[2]["reason"] == "" and rows[2]["data"] == b""  # the decoder will fail it
    # a truncated tar: the samples before the cut are kept, the rest is one failure row
    make_tar(tmp_path / "full.tar", 6)
    raw = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        header = tar.getmembers()[6].offset  # a cut exactly at a header: stream mode is quiet
    (tmp_path / "cut").mkdir()
    for cut in (len(raw) // 2 + 100, header):
        (tmp_path / "cut" / "cut.tar").write_bytes(raw[:cut])
        rows = all_rows(plan_shards(str(tmp_path / "cut"), "webdataset")).to_pylist()
        assert rows[-1]["reason"].startswith("tar_error") and rows[-1]["stage"] == "read"
        assert 1 <= len(rows) - 1 < 6 and all(r["reason"] == "" for r in rows[:-1])
    # an empty tar still completes, with one failure row
    with tarfile.open(tmp_path / "e.tar", "w"):
        pass
    rows = all_rows(plan_shards(str(tmp_path / "e.tar"))).to_pylist()
    assert len(rows) == 1 and rows[0]["reason"].startswith("empty_shard")
    assert rows[0]["shard_total"] == 1


def test_every_file_of_an_odd_folder_is_planned_or_skipped_with_a_reason(tmp_path):
    from aligner.data.corpus_plan import plan_corpus
    from tests.helpers.odd_folder import BROKEN, CAPTIONS, GOOD, SKIPPED, write_odd_folder

    root = write_odd_folder(tmp_path / "odd")
    plan = plan_corpus(str(root))
    assert plan.format == "folder"
    planned = [p for s in plan.shards for p in s.paths]
    assert sorted(planned) == sorted([*GOOD, *BROKEN])  # GIF, TIFF and BMP are images too
    assert {s.path: s.reason.split(":")[0] for s in plan.skipped} == SKIPPED
    assert plan.captions == len(CAPTIONS)
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    assert plan.files == n_files == len(planned) + plan.captions + len(plan.skipped)
    caption_of = dict(zip(plan.shards[0].paths, plan.shards[0].captions, strict=True))
    assert caption_of["rgb.jpg"] == "rgb.txt" and caption_of["grey.png"] == ""


def test_odd_images_decode_or_fail_with_their_reason(tmp_path):
    from tests.helpers.odd_folder import BROKEN, GOOD, write_odd_folder

    root = write_odd_folder(tmp_path / "odd")
    for name in GOOD:
        im = decode_image((root / name).read_bytes())
        assert im.mode == "RGB" and min(im.size) >= 1
    assert decode_image((root / "rotated.jpg").read_bytes()).size == (30, 60)  # EXIF applied
    assert decode_image((root / "wide_4000x2.png").read_bytes()).size == (4000, 2)
    for name, reason in BROKEN.items():
        with pytest.raises(ImageError) as e:
            decode_image((root / name).read_bytes())
        assert e.value.reason == reason, name
