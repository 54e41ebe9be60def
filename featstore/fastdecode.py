"""A faster decoder for the commonest input, 8-bit RGB/RGBA PNGs (renders), or nothing.

`png(source, max_pixels=...)` returns the pixels Pillow's path would return for a plain
8-bit, non-interlaced RGB or RGBA PNG, in well under half of Pillow's time (measured on
512x512 RGBA renders: 1.5 ms against Pillow's 3.7 ms to decode, see benchmarks/feed.py):

- libdeflate (the `deflate` package) inflates the pixel data, 2.5x faster than zlib, and
  checks the stream (its Adler-32, as Pillow does); a stream that does not inflate to
  exactly the image's filtered scanlines (corrupt, short or long) is declined;
- libspng (through pyspng) is handed the same PNG with those scanlines stored
  uncompressed: it checks the file, removes the row filters and returns the pixels
  straight into a numpy array (Pillow's path adds a copy of the whole image).

It returns None for everything else, and the caller decodes with Pillow as before, with
Pillow's messages: other formats, palette, grayscale or 16-bit PNGs, interlaced or
animated files, a colour key (tRNS), anything that may carry an EXIF orientation (eXIf,
an EXIF or XMP text chunk), images over `max_pixels`, files far larger than their pixels,
a chunk that runs past the end or fails its checksum (IDAT's are not checked, by Pillow
either), no IEND, and any error libspng raises. So a file is refused, or read as
truncated, exactly where Pillow refuses it (tested on every corpus kind and on broken
pixel data). Without both packages (no wheel for the platform) Pillow decodes everything.

The many buffers of one image each fault their pages in afresh unless the process keeps
freed memory: decode workers do (`featstore.heap`).

Decoding only: resizing and premultiplying are `featstore.images`' (one decode could
feed several models' preprocessing).
"""

from __future__ import annotations

import os
import stat
import struct
import zlib

import numpy as np

try:
    import deflate
    import pyspng
except ImportError:  # no wheel for this platform: Pillow decodes everything
    deflate = None  # type: ignore[assignment]
    pyspng = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEAD = 8 + 8 + 13 + 4  # signature, IHDR length and type, IHDR data, its CRC
_CHANNELS = {2: 3, 6: 4}  # PNG colour types read here: RGB, RGBA
_DECLINED = frozenset({b"acTL", b"eXIf", b"tRNS"})  # animation, EXIF orientation, colour key
# text chunks whose content Pillow reads an EXIF orientation from (Image.getexif)
_ORIENTATION_TEXT = (b"Raw profile type exif\x00", b"XML:com.adobe.xmp\x00")
_SLACK = 1 << 16  # bytes a valid PNG may hold beyond its raw pixels (headers, text, zlib framing)


def available() -> bool:
    return pyspng is not None and deflate is not None


def png(
    source: str | bytes, *, max_pixels: int, max_bytes: int | None = None
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(H, W, 3|4) uint8 pixels and (H, W) of a plain 8-bit RGB/RGBA PNG, or None: decode
    it the usual way (see the module docstring). A file over `max_bytes` is left to the
    usual way too, which refuses it by name before reading it."""
    if not available():
        return None
    try:
        data = _read(source, max_pixels, max_bytes)
        idat = None if data is None else _plain(data)
        if data is None or idat is None:
            return None
        w, h, color_type = struct.unpack(">IIxB", data[16:26])
        stored = _inflated(data, idat, h * (w * _CHANNELS[color_type] + 1))
        if stored is None:
            return None
        pixels = pyspng.load(stored)
        if pixels.dtype != np.uint8 or pixels.shape != (h, w, _CHANNELS[color_type]):
            return None
    except Exception:  # whatever libspng or the file system says: Pillow's path decides
        return None
    return pixels, (h, w)


def _read(source: str | bytes, max_pixels: int, max_bytes: int | None) -> bytes | None:
    """The file's bytes if its header says a plain 8-bit RGB/RGBA PNG within the limits."""
    if isinstance(source, bytes):
        if max_bytes is not None and len(source) > max_bytes:
            return None
        return source if _header_ok(source[:_HEAD], len(source), max_pixels) else None
    st = os.stat(source)  # never open what is not a regular file (a FIFO would block)
    if not stat.S_ISREG(st.st_mode) or (max_bytes is not None and st.st_size > max_bytes):
        return None
    with open(source, "rb") as f:
        head = f.read(_HEAD)
        if not _header_ok(head, st.st_size, max_pixels):
            return None
        return head + f.read()


def _header_ok(head: bytes, size: int, max_pixels: int) -> bool:
    if len(head) < _HEAD or not head.startswith(SIGNATURE) or head[8:16] != b"\x00\x00\x00\x0dIHDR":
        return False
    w, h, depth, color_type, compression, filtering, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if depth != 8 or color_type not in _CHANNELS or (compression, filtering, interlace) != (0, 0, 0):
        return False
    if not 0 < w * h <= max_pixels:  # over the limit: Pillow's path refuses it with the message
        return False
    return size <= 2 * h * (w * _CHANNELS[color_type] + 1) + _SLACK  # a bloated file: Pillow's path bounds it


def _plain(data: bytes) -> list[tuple[int, int]] | None:
    """Every chunk whole with a good checksum (but IDAT's, which Pillow does not check
    either), ending in IEND, none that this decoder leaves to Pillow: the IDAT
    chunks' (start, end) of their data, in order; None where Pillow's path decodes it."""
    pos, end, idat = 8, len(data), []
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if body + length + 4 > end or kind in _DECLINED:
            return None
        if kind == b"IDAT":
            idat.append((body, body + length))
        else:
            stored = struct.unpack_from(">I", data, body + length)[0]
            if zlib.crc32(data[pos + 4 : body + length]) != stored:
                return None
            if kind == b"IEND":
                return idat or None
            if kind in (b"tEXt", b"zTXt", b"iTXt") and data[body : body + length].startswith(_ORIENTATION_TEXT):
                return None
        pos = body + length + 4
    return None


_STORED_BLOCK = 0xFFFF  # the most bytes one stored deflate block holds


def _inflated(data: bytes, idat: list[tuple[int, int]], nbytes: int) -> bytes | None:
    """The same PNG with its pixel data inflated by libdeflate and stored uncompressed
    (the header, one IDAT chunk of stored deflate blocks, IEND), for libspng to check,
    unfilter and return: None where the stream does not inflate to exactly `nbytes` (the
    image's filtered scanlines)."""
    assert deflate is not None
    view = memoryview(data)  # IDAT checksums are not checked: neither Pillow nor libspng (as pyspng runs it) does
    stream = view[idat[0][0] : idat[0][1]] if len(idat) == 1 else b"".join(view[a:b] for a, b in idat)
    try:
        raw = deflate.zlib_decompress(stream, nbytes)
    except deflate.DeflateError:
        return None
    if len(raw) != nbytes:
        return None
    scan = memoryview(raw)
    blocks = range(0, nbytes, _STORED_BLOCK)
    parts: list[bytes | memoryview] = [b"IDAT\x78\x01"]  # the chunk's type, then the zlib header
    for at in blocks:
        block = scan[at : at + _STORED_BLOCK]
        parts += [struct.pack("<BHH", at + _STORED_BLOCK >= nbytes, len(block), len(block) ^ 0xFFFF), block]
    parts.append(struct.pack(">I", deflate.adler32(raw)))
    crc = 0
    for part in parts:
        crc = deflate.crc32(part, crc)
    length = struct.pack(">I", 2 + 5 * len(blocks) + nbytes + 4)
    return b"".join([view[:_HEAD], length, *parts, struct.pack(">I", crc), _IEND])


_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
