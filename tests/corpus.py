"""A corpus of bad and awkward image files, generated (never downloaded) into a folder.

`make_corpus(root)` writes every case and returns {key: Case}: what featstore must do
with that file (decode it to the given RGBA, or fail with a reason containing the given
words, or not list it at all). tests/test_reliability.py checks each case through
`load_sample` and through whole builds; the README's "What happens when..." table lists
the same cases.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32  # the tiny test models' input size: images of this size are not resized


@dataclass(frozen=True)
class Case:
    key: str  # POSIX path relative to the corpus root
    what: str  # one line for the README table
    reason: str | None = None  # None: decodes; otherwise a substring of the failure reason
    rgba: np.ndarray | None = None  # expected decoded RGBA (before resizing), when it decodes
    atol: int = 0  # lossy formats: allowed difference per channel
    orig_size_hw: tuple[int, int] | None = None  # expected size after EXIF orientation

    @property
    def decodes(self) -> bool:
        return self.reason is None


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes], extra: bytes = b"") -> bytes:
    """A PNG written byte by byte (so it can say anything, e.g. a size it does not hold)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _streamed_png(width: int, height: int, row: bytes) -> bytes:
    """A real, valid 8-bit grayscale PNG of `height` identical rows, compressed as it goes
    (a 13,500 x 13,500 image costs 180 MB to decode but a few ms of memory to write)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(1)
    parts = [comp.compress(b"\x00" + row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _opaque(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)


def _gray(g: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    a = np.full_like(g, 255) if alpha is None else alpha
    return np.stack([g, g, g, a], axis=2)


def _noise(h: int, w: int, c: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _quadrants() -> np.ndarray:
    """32x32 RGB: red, green / blue, white quadrants (aligned to JPEG blocks)."""
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[:16, :16] = (255, 0, 0)
    rgb[:16, 16:] = (0, 255, 0)
    rgb[16:, :16] = (0, 0, 255)
    rgb[16:, 16:] = (255, 255, 255)
    return rgb


def make_corpus(root: Path, *, huge: bool = True) -> dict[str, Case]:
    """Write the corpus under `root` (created); `huge=False` leaves out the 13,500^2 PNG."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(key: str, what: str, **kw: object) -> None:
        cases.append(Case(key, what, **kw))  # type: ignore[arg-type]

    # --- decodes
    ok = _noise(SIZE, SIZE, 4, 1)
    ok[:, :8, 3] = 0
    Image.fromarray(ok).save(root / "ok_rgba.png")
    add("ok_rgba.png", "an ordinary RGBA PNG (control)", rgba=ok)

    lie = _opaque(_noise(SIZE, SIZE, 3, 2))
    Image.fromarray(lie[..., :3]).save(root / "png_named.jpg", format="PNG")
    add("png_named.jpg", "a PNG named `.jpg` (the extension lies)", rgba=lie)

    v16 = (np.arange(SIZE * SIZE * 3).reshape(SIZE, SIZE, 3) * 977 % 65536).astype(np.uint16)
    (root / "rgb16.png").write_bytes(_png(SIZE, SIZE, 16, 2, [r.astype(">u2").tobytes() for r in v16]))
    add("rgb16.png", "16-bit RGB PNG", rgba=_opaque((v16 >> 8).astype(np.uint8)))

    v16a = (np.arange(SIZE * SIZE * 4).reshape(SIZE, SIZE, 4) * 4099 % 65536).astype(np.uint16)
    v16a[:, :8, 3] = 0
    (root / "rgba16.png").write_bytes(_png(SIZE, SIZE, 16, 6, [r.astype(">u2").tobytes() for r in v16a]))
    add("rgba16.png", "16-bit RGBA PNG", rgba=(v16a >> 8).astype(np.uint8))

    g16 = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 61).astype(np.uint16)
    Image.fromarray(g16).save(root / "gray16.png")
    add("gray16.png", "16-bit grayscale PNG", rgba=_gray((g16 >> 8).astype(np.uint8)))

    Image.fromarray(_quadrants()).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    add("cmyk.jpg", "CMYK JPEG (Adobe, inverted)", rgba=_opaque(_quadrants()), atol=12)

    idx = (np.arange(SIZE)[None, :] // 8 + np.zeros((SIZE, 1), int)).astype(np.uint8)  # columns of 0..3
    pal = Image.fromarray(idx, mode="P")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 200)]
    pal.putpalette([c for rgb in colours for c in rgb])
    pal.save(root / "palette_trns.png", transparency=bytes([0, 128, 255, 255]))
    exp = np.array([(*c, a) for c, a in zip(colours, [0, 128, 255, 255], strict=True)], np.uint8)[idx]
    add("palette_trns.png", "palette PNG with per-entry alpha (tRNS)", rgba=exp)

    key_rgb = _opaque(_noise(SIZE, SIZE, 3, 3))
    key_rgb[:, :10, :3] = (1, 2, 3)
    Image.fromarray(key_rgb[..., :3]).save(root / "rgb_colour_key.png", transparency=(1, 2, 3))
    exp = key_rgb.copy()
    exp[:, :10, 3] = 0
    add("rgb_colour_key.png", "RGB PNG with a transparent colour key (tRNS)", rgba=exp)

    la = _noise(SIZE, SIZE, 2, 4)
    Image.fromarray(la, mode="LA").save(root / "la.png")
    add("la.png", "grayscale + alpha (LA) PNG", rgba=_gray(la[..., 0], la[..., 1]))

    bits = (np.indices((SIZE, SIZE)).sum(axis=0) // 4) % 2 == 0
    Image.fromarray(bits).save(root / "one_bit.png")
    add("one_bit.png", "1-bit PNG", rgba=_gray(bits.astype(np.uint8) * 255))

    f = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    f[0, 0] = np.nan
    Image.fromarray(f).save(root / "float32.tif")
    expected_f = np.rint(np.nan_to_num(f.astype(np.float64)) * 255).astype(np.uint8)
    add("float32.tif", "32-bit float TIFF in [0, 1] (NaN -> 0)", rgba=_gray(expected_f))

    page1, page2 = _noise(SIZE, SIZE, 3, 5), _noise(SIZE, SIZE, 3, 6)
    Image.fromarray(page1).save(root / "multipage.tif", save_all=True, append_images=[Image.fromarray(page2)])
    add("multipage.tif", "multi-page TIFF (first page)", rgba=_opaque(page1))

    frame0 = Image.fromarray(idx, mode="P")
    frame0.putpalette([c for rgb in colours for c in rgb])
    frame1 = Image.new("P", (SIZE, SIZE), 2)
    frame1.putpalette([c for rgb in colours for c in rgb])
    frame0.save(root / "animated_gif.gif", save_all=True, append_images=[frame1], duration=100, loop=0, transparency=0)
    exp = np.array([(*c, 255) for c in colours], np.uint8)[idx]
    exp[idx == 0, 3] = 0
    add("animated_gif.gif", "animated GIF, transparent index (first frame)", rgba=exp)

    w0, w1 = _noise(SIZE, SIZE, 4, 7), _noise(SIZE, SIZE, 4, 8)
    w0[..., 3] = 255
    w0[:8, :, 3] = 0
    Image.fromarray(w0).save(
        root / "animated_webp.webp", save_all=True, append_images=[Image.fromarray(w1)], lossless=True, duration=100
    )
    add("animated_webp.webp", "animated lossless WebP with alpha (first frame)", rgba=w0)

    stored = np.zeros((SIZE, 48, 3), np.uint8)  # stored 32 high, 48 wide; left third white
    stored[:, :16] = 255
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    im.save(root / "exif_rotated.jpg", exif=exif, quality=95)
    shown = np.rot90(stored, k=-1)  # 48 high, 32 wide, top third white
    add(
        "exif_rotated.jpg",
        "JPEG with EXIF orientation 6 (rotated on decode)",
        rgba=_opaque(np.ascontiguousarray(shown)),
        atol=12,
        orig_size_hw=(48, 32),
    )

    strip = _opaque(_noise(1, 3000, 3, 9))
    Image.fromarray(strip[..., :3]).save(root / "strip_1x3000.png")
    add("strip_1x3000.png", "a 1 x 3000 strip (extreme aspect ratio: only the kept center is resampled)", rgba=strip)

    for key, seed in [("name with spaces.png", 10), ("ünïcødé 日本語 ☃.png", 11), ("sub dir/é.png", 12)]:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        arr = _opaque(_noise(SIZE, SIZE, 3, seed))
        Image.fromarray(arr[..., :3]).save(root / key)
        add(key, "file name with spaces / non-ASCII characters", rgba=arr)

    (root / "folder.png").mkdir()
    inner = _opaque(_noise(SIZE, SIZE, 3, 13))
    Image.fromarray(inner[..., :3]).save(root / "folder.png" / "inner.png")
    add("folder.png/inner.png", "an image inside a folder named `folder.png`", rgba=inner)

    Image.fromarray(_quadrants()).save(root / "same.jpg", quality=95, subsampling=0)
    add("same.jpg", "`same.jpg` and `same.png` (both would write `same.npy`)", rgba=_opaque(_quadrants()), atol=12)
    same_b = _opaque(_noise(SIZE, SIZE, 3, 15))
    Image.fromarray(same_b[..., :3]).save(root / "same.png")
    add("same.png", "`same.png` next to `same.jpg`: npy mode refuses it, the store keeps both", rgba=same_b)

    # --- fails, with a reason
    (root / "empty.png").write_bytes(b"")
    add("empty.png", "zero-byte file", reason="empty file")

    buf = io.BytesIO()
    Image.fromarray(_noise(SIZE, SIZE, 3, 16)).save(buf, format="PNG")
    (root / "truncated_png.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    add("truncated_png.png", "truncated PNG (cut at 60%)", reason="truncated")

    buf = io.BytesIO()
    Image.fromarray(_noise(SIZE, SIZE, 3, 17)).save(buf, format="JPEG", quality=95)
    (root / "truncated_jpg.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    add("truncated_jpg.jpg", "truncated JPEG (cut at 50%)", reason="truncated")

    # data that stops short of its header: Pillow decodes these without a word
    (root / "short_13000.png").write_bytes(_png(13_000, 13_000, 8, 0, [bytes(13_000)]))
    add("short_13000.png", "a 100-byte PNG declaring 13000 x 13000 over one row (a complete zlib stream)",
        reason="truncated file (the PNG header says 13000x13000")  # fmt: skip

    half = _noise(20, 40, 3, 20)
    (root / "short_rows.png").write_bytes(_png(40, 40, 8, 2, [r.tobytes() for r in half]))
    add("short_rows.png", "a 40 x 40 PNG whose zlib stream ends after 20 rows",
        reason="truncated file (the PNG header says 40x40; its image data holds 20 of 40 rows)")  # fmt: skip

    buf = io.BytesIO()
    Image.fromarray(_noise(30, 40, 3, 21)).save(buf, format="JPEG")
    jpeg = bytearray(buf.getvalue())
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 3000, 4000)
    (root / "short_scan.jpg").write_bytes(bytes(jpeg))
    add("short_scan.jpg", "a JPEG whose header says 4000 x 3000 over a 40 x 30 scan (and an end marker)",
        reason="truncated file (the JPEG header says 4000x3000")  # fmt: skip

    buf = io.BytesIO()
    Image.fromarray(_noise(64, 96, 3, 22)).save(buf, format="JPEG", restart_marker_blocks=4)
    whole = buf.getvalue()
    marks = [
        i for i in range(whole.find(b"\xff\xda"), len(whole) - 1) if whole[i] == 0xFF and 0xD0 <= whole[i + 1] <= 0xD7
    ]
    (root / "cut_restarts.jpg").write_bytes(whole[: marks[len(marks) // 2]] + b"\xff\xd9")
    add("cut_restarts.jpg", "a JPEG cut half-way through its scan, an end marker appended",
        reason="truncated file (the JPEG header says 96x64; a scan ends after")  # fmt: skip

    def _chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", SIZE, SIZE, 8, 2, 0, 0, 0))
    with open(root / "sparse_3gib.png", "wb") as f:  # 3 GiB apparent, a few KB on disk
        f.write(ihdr + struct.pack(">I", 0x7FFFFFF0) + b"abCd")
        f.truncate(3 << 30)
    add("sparse_3gib.png", "a sparse 3 GiB file: PNG signature, IHDR, an unknown chunk of 0x7FFFFFF0 bytes",
        reason="bytes per image, not read (raise it with --max-image-bytes)")  # fmt: skip

    (root / "chunk_past_end.png").write_bytes(ihdr + struct.pack(">I", 0x7FFFFFF0) + b"abCd" + bytes(64))
    add("chunk_past_end.png", "a PNG chunk declaring 2 GiB in a 100-byte file",
        reason="truncated file (PNG chunk 'abCd' declares 2,147,483,632 bytes")  # fmt: skip

    with open(root / "sparse_chunk.png", "wb") as f:  # 100 MiB of unknown chunk, under the file limit
        f.write(ihdr + struct.pack(">I", 100 << 20) + b"abCd")
        f.truncate(len(ihdr) + 12 + (100 << 20) + 12)
    add("sparse_chunk.png", "a sparse PNG whose unknown chunk holds 100 MiB",
        reason="PNG chunk 'abCd' of 104,857,600 bytes is over the limit of 67,108,864 bytes")  # fmt: skip

    (root / "text.png").write_text("just some notes, saved with the wrong name\n")
    add("text.png", "a text file named `.png`", reason="a text file")

    (root / "error_page.jpg").write_text(
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
    )
    add("error_page.jpg", "an HTML error page named `.jpg`", reason="an HTML page")

    (root / "garbage.webp").write_bytes(bytes(np.random.default_rng(18).integers(0, 256, 4096, dtype=np.uint8)))
    add("garbage.webp", "random bytes named `.webp`", reason="not a recognised image format")

    (root / "bomb.png").write_bytes(_png(100_000, 100_000, 8, 2, [b"\x00" * 30] * 4))
    add("bomb.png", "decompression bomb: PNG header says 100000 x 100000, 200 bytes of data", reason="--max-pixels")

    if huge:
        (root / "huge_13500.png").write_bytes(_streamed_png(13_500, 13_500, bytes(range(256)) * 52 + bytes(188)))
        add("huge_13500.png", "a real, valid 13500 x 13500 PNG (182 Mpixel)", reason="--max-pixels")

    os.symlink(root / "does-not-exist.png", root / "broken_link.png")
    add("broken_link.png", "a broken symlink", reason="broken symlink")

    os.symlink("loop.png", root / "loop.png")
    add("loop.png", "a symlink to itself", reason="symlink loop")

    os.mkfifo(root / "fifo.png")
    add("fifo.png", "a FIFO named `.png` (opening it would block forever)", reason="not a regular file (a FIFO)")

    if os.geteuid() != 0:  # root reads a chmod 000 file anyway: see test_unreadable_file_*
        Image.fromarray(_noise(SIZE, SIZE, 3, 19)).save(root / "unreadable.png")
        (root / "unreadable.png").chmod(0)
        add("unreadable.png", "a file without read permission", reason="permission denied")

    return {c.key: c for c in cases}
