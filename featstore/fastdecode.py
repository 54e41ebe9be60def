"""A faster decoder for the commonest input, 8-bit RGB/RGBA PNGs (renders), or nothing.

`png(source, max_pixels=...)` returns the pixels Pillow's path would return for a plain
8-bit, non-interlaced RGB or RGBA PNG: libspng (through pyspng) decodes them to the same
values (tested on every corpus kind) in about two thirds of Pillow's time, straight into
a numpy array (Pillow's path adds an array copy of the whole image). It returns None for
everything else, and the caller decodes with Pillow as before, with Pillow's messages:
other formats, palette, grayscale or 16-bit PNGs, interlaced or animated files, a colour
key (tRNS), anything that may carry an EXIF orientation (eXIf, an EXIF or XMP text
chunk), images over `max_pixels`, files far larger than their pixels, a chunk that runs
past the end or fails its checksum, no IEND, and any error libspng raises. So a file is
refused, or read as truncated, exactly where Pillow refuses it.

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
    import pyspng
except ImportError:  # no wheel for this platform: Pillow decodes everything
    pyspng = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEAD = 8 + 8 + 13 + 4  # signature, IHDR length and type, IHDR data, its CRC
_CHANNELS = {2: 3, 6: 4}  # PNG colour types read here: RGB, RGBA
_DECLINED = frozenset({b"acTL", b"eXIf", b"tRNS"})  # animation, EXIF orientation, colour key
# text chunks whose content Pillow reads an EXIF orientation from (Image.getexif)
_ORIENTATION_TEXT = (b"Raw profile type exif\x00", b"XML:com.adobe.xmp\x00")
_SLACK = 1 << 16  # bytes a valid PNG may hold beyond its raw pixels (headers, text, zlib framing)


def available() -> bool:
    return pyspng is not None


def png(
    source: str | bytes, *, max_pixels: int, max_bytes: int | None = None
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(H, W, 3|4) uint8 pixels and (H, W) of a plain 8-bit RGB/RGBA PNG, or None: decode
    it the usual way (see the module docstring). A file over `max_bytes` is left to the
    usual way too, which refuses it by name before reading it."""
    if pyspng is None:
        return None
    try:
        data = _read(source, max_pixels, max_bytes)
        if data is None or not _plain(data):
            return None
        pixels = pyspng.load(data)
        w, h, color_type = struct.unpack(">IIxB", data[16:26])
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


def _plain(data: bytes) -> bool:
    """Every chunk whole with a good checksum (IDAT's are libspng's to check), ending in
    IEND, none that this decoder leaves to Pillow."""
    pos, end, idat = 8, len(data), False
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if body + length + 4 > end or kind in _DECLINED:
            return False
        if kind == b"IDAT":
            idat = True
        else:
            stored = struct.unpack_from(">I", data, body + length)[0]
            if zlib.crc32(data[pos + 4 : body + length]) != stored:
                return False
            if kind == b"IEND":
                return idat
            if kind in (b"tEXt", b"zTXt", b"iTXt") and data[body : body + length].startswith(_ORIENTATION_TEXT):
                return False
        pos = body + length + 4
    return False
