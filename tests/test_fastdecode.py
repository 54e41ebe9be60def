"""The fast PNG decoder (featstore.fastdecode), the exact integer premultiply and the
optional torch resizer: same pixels and masks as Pillow's path wherever the fast path
is taken, Pillow's path (and its messages) for everything it declines."""

import io
import os
import struct
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from featstore import fastdecode
from featstore.batches import EncodingInfo, ImageItem
from featstore.errors import IncompatibleStoreError
from featstore.images import AUTO_MARK, DEFAULT_MAX_PIXELS, TORCH_MARK, Preprocess, _decode, load_sample, premultiply
from featstore.models.presets import TRELLIS_PREPROCESS
from featstore.pipeline import BuildOptions, build
from featstore.store.base import resized_by
from tests.corpus import _png, make_corpus
from tests.fake_featstore import FakeEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _images

GRID = {224: 16, 518: 37, 64: 8}  # patch 14 (and 8 at 64)

pytestmark = pytest.mark.skipif(not fastdecode.available(), reason="pyspng or deflate is not installed")


def _pillow_pixels(source) -> np.ndarray:
    pixels, _ = _decode(source, size=32, max_pixels=DEFAULT_MAX_PIXELS)
    return np.asarray(pixels)


def _without_fast_path(monkeypatch):
    monkeypatch.setattr(fastdecode, "deflate", None)


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> Path:
    """512 RGBA renders, an RGB PNG, a non-square RGBA PNG with soft alpha, a tEXt chunk."""
    d = tmp_path_factory.mktemp("renders")
    rng = np.random.default_rng(7)
    for i in range(3):
        Image.fromarray(_images.render(rng), "RGBA").save(d / f"render_{i}.png")
    Image.fromarray(_images.photo(rng, (300, 410)), "RGB").save(d / "photo.png")
    soft = _images.render(rng, 180)[:, :150].copy()
    soft[..., 3] = np.clip(soft[..., 3].astype(int) // 3 + rng.integers(0, 3, soft.shape[:2]), 0, 255)
    Image.fromarray(soft, "RGBA").save(d / "soft_150x180.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "Blender")
    Image.fromarray(_images.render(rng, 64), "RGBA").save(d / "with_text.png", pnginfo=info)
    return d


def test_fast_path_is_taken_and_pixels_equal_pillow(renders):
    for p in sorted(renders.iterdir()):
        got = fastdecode.png(str(p), max_pixels=DEFAULT_MAX_PIXELS)
        assert got is not None, p.name
        pixels, hw = got
        np.testing.assert_array_equal(pixels, _pillow_pixels(str(p)), err_msg=p.name)
        assert hw == pixels.shape[:2]
        from_bytes = fastdecode.png(p.read_bytes(), max_pixels=DEFAULT_MAX_PIXELS)  # tar members, objects
        assert from_bytes is not None and np.array_equal(from_bytes[0], pixels)


def test_every_corpus_file_the_fast_path_takes_decodes_to_pillows_pixels(tmp_path):
    cases = make_corpus(tmp_path / "c", huge=False)
    taken = set()
    for key, case in cases.items():
        path = str(tmp_path / "c" / key)
        got = fastdecode.png(path, max_pixels=DEFAULT_MAX_PIXELS)  # must not block on the FIFO either
        if got is None:
            continue
        taken.add(key)
        assert case.decodes, key
        np.testing.assert_array_equal(got[0], _pillow_pixels(path), err_msg=key)
    assert {"ok_rgba.png", "png_named.jpg", "strip_1x3000.png"} <= taken
    # every odd kind is Pillow's: 16-bit, palette, grayscale, 1-bit, colour key, truncated, bombs, ...
    for key in ("rgb16.png", "rgba16.png", "gray16.png", "palette_trns.png", "rgb_colour_key.png", "la.png"):
        assert key not in taken
    assert not taken & {k for k, c in cases.items() if not c.decodes}


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _rgba_png(extra: bytes = b"", *, w: int = 8, h: int = 8, interlace: int = 0) -> bytes:
    rows = [bytes(range(w * 4)) for _ in range(h)]
    data = _png(w, h, 8, 6, rows, extra)
    if interlace:  # the header says Adam7 (the data need not match: it is never decoded here)
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 1)
        data = data[:8] + _chunk(b"IHDR", ihdr) + data[33:]
    return data


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def _apng() -> bytes:
    buf = io.BytesIO()
    a, b = Image.new("RGBA", (8, 8), (255, 0, 0, 255)), Image.new("RGBA", (8, 8), (0, 255, 0, 128))
    a.save(buf, format="PNG", save_all=True, append_images=[b])
    return buf.getvalue()


def _exif_png(orientation: int) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(np.zeros((4, 8, 4), np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(buf, format="PNG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("plain (control)", _rgba_png()),
        ("interlaced", _rgba_png(interlace=1)),
        ("APNG", _apng()),
        ("eXIf orientation", _exif_png(6)),
        ("EXIF in a text chunk", _rgba_png(_chunk(b"tEXt", b"Raw profile type exif\x00\nexif\n 0\n"))),
        ("XMP", _rgba_png(_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00<x/>"))),
        ("colour key", _png(8, 8, 8, 2, [bytes(24)] * 8, _chunk(b"tRNS", b"\x00\x01\x00\x02\x00\x03"))),
        ("bad checksum", _rgba_png(_chunk(b"tEXt", b"a\x00b", crc=1))),
        ("truncated", _rgba_png()[:-20]),
        ("no IEND", _rgba_png()[:-12]),
        ("bloated", _rgba_png(_chunk(b"tEXt", b"junk\x00" + bytes(200_000)))),
        ("16-bit", _png(4, 4, 16, 6, [bytes(32)] * 4)),
        ("palette", _png(4, 4, 8, 3, [bytes(4)] * 4, _chunk(b"PLTE", bytes(3)))),
        ("gray", _png(4, 4, 8, 0, [bytes(4)] * 4)),
        ("GIF", _gif()),
        ("empty", b""),
    ],
)
def test_declines_what_it_does_not_read_exactly_as_pillow(name, data):
    got = fastdecode.png(data, max_pixels=DEFAULT_MAX_PIXELS)
    assert (got is not None) == (name == "plain (control)"), name


def _split_idat(data: bytes, pieces: int, edit=None) -> bytes:
    """`data` (one IDAT chunk) with its zlib stream, after `edit`, in `pieces` IDAT chunks."""
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    stream = data[start + 8 : start + 8 + length]
    stream = edit(stream) if edit else stream
    step = -(-len(stream) // pieces)
    chunks = b"".join(_chunk(b"IDAT", stream[i : i + step]) for i in range(0, len(stream), step))
    return data[:start] + chunks + data[start + 12 + length :]


def _rows(w: int, h: int, filters: bytes = b"\x00\x01\x02\x03\x04") -> bytes:
    """Filtered RGBA scanlines, every PNG filter in turn, of a noisy gradient."""
    rng = np.random.default_rng(w * h)
    return b"".join(
        bytes([filters[y % len(filters)]]) + rng.integers(0, 256, w * 4, dtype=np.uint8).tobytes() for y in range(h)
    )


def _idat_png(scanlines: bytes, w: int = 40, h: int = 30, after: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return (
        fastdecode.SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(scanlines) + after)
        + _chunk(b"IEND", b"")
    )


_SCAN = _rows(40, 30)


@pytest.mark.parametrize(
    ("name", "data", "taken"),
    [
        ("every filter (control)", _idat_png(_SCAN), True),
        ("in 7 IDAT chunks", _split_idat(_idat_png(_SCAN), 7), True),
        ("bytes after the zlib stream", _idat_png(_SCAN, after=b"\x00junk"), True),
        ("an IDAT checksum wrong", _idat_png(_SCAN)[:-16] + bytes(4) + _idat_png(_SCAN)[-12:], True),  # as Pillow
        ("a scanline short", _idat_png(_SCAN[:-1]), False),
        ("a scanline long", _idat_png(_SCAN + b"\x00"), False),
        ("a row short", _idat_png(_SCAN[: -40 * 4 - 1]), False),
        ("the stream cut", _split_idat(_idat_png(_SCAN), 1, lambda z: z[: len(z) // 2]), False),
        ("a corrupt stream", _split_idat(_idat_png(_SCAN), 2, lambda z: z[:40] + b"\xff" + z[41:]), False),
        ("a bad Adler-32", _split_idat(_idat_png(_SCAN), 1, lambda z: z[:-1] + bytes([z[-1] ^ 1])), False),
        ("an unknown filter", _idat_png(_rows(40, 30, b"\x00\x05")), False),
    ],
)
def test_pixel_data_is_inflated_and_checked_as_pillows_path_reads_it(name, data, taken, monkeypatch):
    """Whatever the pixel data holds, the fast path gives Pillow's pixels or declines, and
    a declined file gets exactly what Pillow's path gives it (pixels or its message)."""
    got = fastdecode.png(data, max_pixels=DEFAULT_MAX_PIXELS)
    assert (got is not None) == taken, name
    item = ImageItem("x.png", "x.png")
    fast = load_sample(item, size=16, grid=2, data=data)
    _without_fast_path(monkeypatch)
    slow = load_sample(item, size=16, grid=2, data=data)
    assert fast.error == slow.error, name
    if got is not None:
        np.testing.assert_array_equal(got[0], _pillow_pixels(data), err_msg=name)
    if slow.error is None:
        np.testing.assert_array_equal(fast.pixels, slow.pixels, err_msg=name)
        np.testing.assert_array_equal(fast.mask, slow.mask, err_msg=name)


def test_declined_files_keep_pillows_behaviour(tmp_path):
    """Through load_sample: the rotation, the first frame and the messages are Pillow's."""
    (tmp_path / "r.png").write_bytes(_exif_png(6))
    s = load_sample(ImageItem("r.png", str(tmp_path / "r.png")), size=16, grid=2)
    assert s.error is None and s.orig_size_hw == (8, 4)  # rotated: the displayed size
    (tmp_path / "a.png").write_bytes(_apng())
    s = load_sample(ImageItem("a.png", str(tmp_path / "a.png")), size=8, grid=1)
    assert s.error is None and s.pixels[0, 0].tolist() == [255, 0, 0]  # the first frame
    big = _rgba_png(w=64, h=64)
    s = load_sample(ImageItem("big.png", "big.png"), size=8, grid=1, max_pixels=100, data=big)
    assert s.error is not None and "64x64 = 4,096 pixels is over the limit of 100" in s.error
    s = load_sample(ImageItem("t.png", "t.png"), size=8, grid=1, data=_rgba_png(w=64, h=64)[:200])
    assert s.error is not None and "truncated" in s.error
    os.mkfifo(tmp_path / "fifo.png")
    assert fastdecode.png(str(tmp_path / "fifo.png"), max_pixels=DEFAULT_MAX_PIXELS) is None  # did not block


@pytest.mark.parametrize("size", [224, 518, 64])
@pytest.mark.parametrize("preprocess", [Preprocess(), Preprocess("squash", "bicubic"), TRELLIS_PREPROCESS])
def test_samples_and_masks_equal_the_pillow_path(renders, monkeypatch, size, preprocess):
    """Fast decode + integer premultiply == today's path (Pillow decode, float64 premultiply)."""
    items = [ImageItem(p.name, str(p)) for p in sorted(renders.iterdir())]
    grid = GRID[size]
    fast = [load_sample(it, size=size, grid=grid, preprocess=preprocess) for it in items]
    with monkeypatch.context() as m:
        _without_fast_path(m)
        m.setattr("featstore.images.premultiply", _float64_premultiply)
        slow = [load_sample(it, size=size, grid=grid, preprocess=preprocess) for it in items]
    for a, b in zip(fast, slow, strict=True):
        assert a.error is None and b.error is None
        assert a.pixels.dtype == b.pixels.dtype and np.array_equal(a.pixels, b.pixels), a.item.key
        assert np.array_equal(a.mask, b.mask) and a.orig_size_hw == b.orig_size_hw


def _float64_premultiply(rgba: np.ndarray) -> np.ndarray:
    """featstore's premultiply before the integer one (the reference's float64 lines)."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    return (rgb / 255 * alpha / 255 * 255).astype(np.uint8)


def test_integer_premultiply_needs_its_correction_on_exactly_12_pairs():
    """The exhaustive check is in test_images; this shows it can fail: the plain integer
    quotient differs from the float64 truncation on 12 of the 65,536 pairs."""
    v, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = np.stack([v, v, v, a], axis=2)
    plain = (rgba[..., :3].astype(np.uint16) * rgba[..., 3:4] // 255).astype(np.uint8)
    assert int((plain != _float64_premultiply(rgba))[..., 0].sum()) == 12
    np.testing.assert_array_equal(premultiply(rgba), _float64_premultiply(rgba))


def test_torch_resizer_is_recorded_and_keeps_unresized_images_byte_identical(renders):
    torch_pre = Preprocess(resizer="torch")
    assert TORCH_MARK in torch_pre.describe_resize() and TORCH_MARK not in Preprocess().describe_resize()
    assert Preprocess().describe_resize() == "shorter-side bicubic (antialiased), center crop"  # as stores hold
    with pytest.raises(ValueError, match="torch resizer"):
        Preprocess("squash", "lanczos", resizer="torch")
    with pytest.raises(ValueError, match="torch resizer"):
        replace(TRELLIS_PREPROCESS, resample="bicubic", resizer="torch")
    for p in sorted(renders.iterdir()):
        item = ImageItem(p.name, str(p))
        with Image.open(p) as im:
            size = im.width if im.width == im.height else None
        if size is None:
            continue
        a = load_sample(item, size=size, grid=8, preprocess=torch_pre)
        b = load_sample(item, size=size, grid=8)
        assert a.pixels.tobytes() == b.pixels.tobytes() and np.array_equal(a.mask, b.mask)


def test_torch_resizer_stays_within_its_documented_bound_on_renders_and_photos(renders):
    """Not Pillow's pixels (why it is not the default): at most 2 levels off on these."""
    for p in sorted(renders.iterdir()):
        item = ImageItem(p.name, str(p))
        for size in (224, 518, 64):
            a = load_sample(item, size=size, grid=GRID[size], preprocess=Preprocess(resizer="torch"))
            b = load_sample(item, size=size, grid=GRID[size])
            assert a.pixels.shape == b.pixels.shape
            assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 2, (p.name, size)


def _torch_encoder() -> FakeEncoder:
    enc = FakeEncoder(size=32)
    enc.preprocess = Preprocess(resizer="torch")
    enc._info = replace(enc.info, resize=enc.preprocess.describe_resize())  # info is read-only (a property)
    return enc


def _store_attrs(store: Path) -> dict:
    import json

    return json.loads((store / "zarr.json").read_text())["attributes"]


@pytest.mark.parametrize("ext", [".zarr", ".h5"])
def test_appending_across_resizers_is_refused_with_one_line(image_dir, tmp_path, ext):
    """A store records its resizer; rows of the other one are refused (pixels differ
    slightly), and a store made before the torch resizer existed is a Pillow store."""
    opts = BuildOptions(model="fake", size=32, workers=0, device="cpu")
    first = [p for p in sorted(image_dir.rglob("*.png"))][:2]
    part = tmp_path / "part"
    part.mkdir()
    for p in first:
        (part / p.name).write_bytes(p.read_bytes())
    pillow_store, torch_store = tmp_path / f"pillow{ext}", tmp_path / f"torch{ext}"
    build(part, opts, store=pillow_store, encoder=FakeEncoder(size=32))
    build(part, opts, store=torch_store, encoder=_torch_encoder())
    if ext == ".zarr":
        assert TORCH_MARK in _store_attrs(torch_store)["preprocessing"]["resize"]
        assert TORCH_MARK not in _store_attrs(pillow_store)["preprocessing"]["resize"]
    with pytest.raises(IncompatibleStoreError, match="resized by pillow but this build resizes with torch") as e:
        build(image_dir, opts, store=pillow_store, encoder=_torch_encoder())
    assert "\n" not in str(e.value)
    with pytest.raises(IncompatibleStoreError, match="resized by torch but this build resizes with pillow"):
        build(image_dir, opts, store=torch_store, encoder=FakeEncoder(size=32))
    done = build(image_dir, opts, store=torch_store, encoder=_torch_encoder())  # the same resizer appends
    assert done.encoded == 5 - len(first)


def test_stores_recorded_before_the_torch_resizer_read_as_pillow():
    attrs = {"model": "m", "family": "clip", "feature_type": "t", "size": 32, "grid": 4, "hidden_dim": 8}
    old = EncodingInfo.from_attrs({**attrs, "dtype": "float32", "preprocessing": {"name": "x"}})
    assert resized_by(old) == "pillow"
    assert resized_by(replace(old, resize=Preprocess(resizer="torch").describe_resize())) == "torch"


def test_cli_resizer_torch_is_recorded_a_plain_append_keeps_it_and_pillow_is_refused(
    tiny_models, image_dir, tmp_path, capsys
):
    """`build --resizer torch` through the real CLI and model loading: the store records the
    torch resizer; the same command without --resizer (auto) appends with torch's; an
    explicit `--resizer pillow` is refused with one line."""
    from tests.test_reliability import _cli

    store = tmp_path / "t.zarr"
    args = ["build", "-i", str(image_dir), "-m", tiny_models["dino"], "--size", "32", "--device", "cpu"]
    part = tmp_path / "part"
    part.mkdir()
    for p in sorted(image_dir.rglob("*.png"))[:2]:
        (part / p.name).write_bytes(p.read_bytes())
    code, err = _cli(
        [*args[:1], "-i", str(part), *args[3:], "--store", str(store), "--resizer", "torch", "--workers", "0"], capsys
    )
    assert code == 0, err
    assert TORCH_MARK in _store_attrs(store)["preprocessing"]["resize"]
    code, err = _cli([*args, "--store", str(store), "--workers", "0"], capsys)
    assert code == 0, err
    resize = _store_attrs(store)["preprocessing"]["resize"]
    assert TORCH_MARK in resize and AUTO_MARK not in resize
    code, err = _cli([*args, "--store", str(store), "--workers", "0", "--resizer", "pillow", "--overwrite"], capsys)
    assert code == 0, err  # --overwrite: a new store, Pillow's
    code, err = _cli([*args, "--store", str(store), "--workers", "0", "--resizer", "torch"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "resized by pillow but this build resizes with torch" in lines[0], err
    code, err = _cli([*args, "--store", str(tmp_path / "u.zarr"), "--resizer", "opencv"], capsys)
    assert code == 2 and "--resizer 'opencv'" in err and not (tmp_path / "u.zarr").exists(), err
