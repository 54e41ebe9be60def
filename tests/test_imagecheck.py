"""featstore.imagecheck: the per-image byte limit, the PNG chunk walk and the truncation checks,
against real files (tests/corpus.py has the hostile ones; these are their edges)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from featstore.batches import ImageItem
from featstore.errors import ImageError
from featstore.images import _decode, load_sample
from tests.corpus import _png, make_corpus


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_oversized_files_and_chunks_are_refused_before_any_decoder_opens_them(tmp_path, monkeypatch):
    cases = make_corpus(tmp_path, huge=False)

    def no_decoder(*a, **kw):
        raise AssertionError("Pillow was asked to open a file the checks should have refused")

    monkeypatch.setattr(PIL.Image, "open", no_decoder)
    for key in ("sparse_3gib.png", "chunk_past_end.png", "sparse_chunk.png", "short_13000.png"):
        if key == "short_13000.png":
            continue  # refused after Pillow reads its header (the pixel limit comes first)
        got = load_sample(ImageItem(key, str(tmp_path / key)), size=32, grid=4)
        assert got.error is not None and cases[key].reason in got.error, (key, got.error)


def test_the_byte_limit_can_be_raised_and_the_metadata_chunk_limit_still_holds(tmp_path):
    make_corpus(tmp_path, huge=False)
    path = str(tmp_path / "sparse_3gib.png")
    with pytest.raises(ImageError, match="raise it with --max-image-bytes"):
        _decode(path, size=32, max_pixels=10**9)
    with pytest.raises(ImageError, match="over the limit of 67,108,864 bytes for non-image data, not read"):
        _decode(path, size=32, max_pixels=10**9, max_bytes=4 << 30)
    small = tmp_path / "ok_rgba.png"
    with pytest.raises(ImageError, match="over the limit of 100 bytes per image"):
        _decode(str(small), size=32, max_pixels=10**9, max_bytes=100)
    with pytest.raises(ImageError, match="over the limit of 100 bytes per image"):
        _decode(small.read_bytes(), size=32, max_pixels=10**9, max_bytes=100)  # fetched bytes too


def test_the_pixel_limit_is_named_before_truncation(tmp_path):
    (tmp_path / "b.png").write_bytes(_png(20_000, 20_000, 8, 0, [bytes(20_000)]))
    with pytest.raises(ImageError, match="--max-pixels"):
        _decode(str(tmp_path / "b.png"), size=32, max_pixels=178_956_970)
    with pytest.raises(ImageError, match="truncated file"):
        _decode(str(tmp_path / "b.png"), size=32, max_pixels=10**9)


@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "P", "1", "I;16"])
def test_complete_images_ending_in_zero_rows_decode(tmp_path, mode, interlace):
    # zero last rows: the case where the stream is inflated and counted; it must pass
    arr = np.random.default_rng(1).integers(0, 255, (37, 29, 4), dtype=np.uint8)
    arr[-5:] = 0
    im = Image.fromarray(arr, "RGBA")
    im = im.convert(mode) if mode != "I;16" else Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    im.save(tmp_path / "z.png", interlace=interlace)
    _, hw = _decode(str(tmp_path / "z.png"), size=32, max_pixels=10**9)
    assert hw == (37, 29)


def test_interlaced_png_cut_short_is_truncated(tmp_path):
    arr = np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", interlace=1, compress_level=0)
    data = buf.getvalue()
    # re-compress the IDAT stream's first half as a complete zlib stream
    start = data.find(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    raw = zlib.decompress(data[start + 8 : start + 8 + length])
    short = zlib.compress(raw[: len(raw) // 2])
    rest = data[start + 12 + length :]
    (tmp_path / "i.png").write_bytes(data[:start] + _chunk(b"IDAT", short) + rest)
    with pytest.raises(ImageError, match="truncated file"):
        _decode(str(tmp_path / "i.png"), size=32, max_pixels=10**9)


@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"subsampling": 0}, {"restart_marker_rows": 1}])
def test_ordinary_jpegs_pass_the_scan_checks(tmp_path, kw):
    arr = np.zeros((300, 400, 3), np.uint8)  # flat: the fewest bits per block a real encoder writes
    Image.fromarray(arr).save(tmp_path / "f.jpg", quality=50, **kw)
    _, hw = _decode(str(tmp_path / "f.jpg"), size=32, max_pixels=10**9, draft=False)
    assert hw == (300, 400)


def test_a_cli_build_takes_max_image_bytes(tiny_models, tmp_path, capsys):
    from tests.test_reliability import _cli

    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(d / "a.png")
    args = ["build", "-i", str(d), "-m", tiny_models["dino"], "--size", "32", "--device", "cpu", "--workers", "0"]
    code, err = _cli([*args, "--npy-dir", str(tmp_path / "o1"), "--max-image-bytes", "10"], capsys)
    assert (
        code == 0
        and "failed 1" in err
        and "--max-image-bytes" in Path(tmp_path / "o1").joinpath("featstore_failures.jsonl").read_text("utf-8")
    )
    code, err = _cli([*args, "--npy-dir", str(tmp_path / "o2")], capsys)
    assert code == 0 and "encoded 1" in err
