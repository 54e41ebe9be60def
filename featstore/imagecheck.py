"""What an image file costs and whether it holds what its header says, checked without decoding.

Two steps, both on an open binary file (a path's file or a `BytesIO` of fetched bytes):

- `preflight(f, nbytes, max_bytes=...)`, before any decoder reads the file: the file's
  size against a limit the user can raise (`--max-image-bytes`), and for PNG a walk of
  the chunk headers (seeks, no data read) that refuses a chunk running past the end of
  the file and non-image chunks over `MAX_METADATA_CHUNK` bytes (Pillow reads a chunk it
  does not know whole into memory: a sparse file with a 2 GiB chunk cost 4.4 GB). Any
  decoder, fast path or Pillow, should run it first.
- `check_complete(f, layout, nbytes)` before Pillow decodes and `check_decoded(...)`
  after: the image data against the header. Pillow fills what a stream does not hold
  without a word (a PNG whose zlib stream ends after 20 of 40 rows: the rest black; a
  JPEG whose scan ends early: libjpeg's "Premature end of JPEG file" warning, which
  Pillow silences, and grey), so: PNG, a free bound first (deflate cannot expand more
  than 1032:1, so a 130-byte file cannot hold 13000 x 13000 pixels: refused without
  decoding), then, when the decoded image ends in zero rows, the decompressed size of
  the IDAT stream (inflated and counted, never kept) against the rows the header
  declares; JPEG, the scans' entropy-coded bytes against one bit per 8x8 block (the least
  a Huffman-coded block can take) and the restart markers against the count the restart
  interval implies.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from featstore.errors import ImageError

DEFAULT_MAX_IMAGE_BYTES = 1 << 30  # 1 GiB: above a 178,956,970-pixel 8-bit RGBA TIFF stored raw (716 MB)
MAX_METADATA_CHUNK = 64 << 20  # a PNG chunk other than image data (ICC profiles, XMP, C2PA: a few MB)
_DEFLATE_MAX_RATIO = 1100  # deflate's limit is about 1032:1; a little slack
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IMAGE_DATA = (b"IDAT", b"fdAT")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_READ = 1 << 20  # bytes read (and inflated) at a time


@dataclass(frozen=True, slots=True)
class PngLayout:
    """What the chunk walk found: the header's fields and where the first image's data is."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    interlaced: bool
    idat: tuple[tuple[int, int], ...]  # (offset, length) of each IDAT chunk's data

    def raw_bytes(self) -> int:
        """Bytes the decompressed IDAT stream must hold: each pass's rows, plus a filter byte per row."""
        bits = self.bit_depth * _PNG_CHANNELS.get(self.color_type, 1)
        if not self.interlaced:
            return self.height * (1 + math.ceil(self.width * bits / 8))
        total = 0
        for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2)):
            w, h = _count(self.width, x0, dx), _count(self.height, y0, dy)
            total += h * (1 + math.ceil(w * bits / 8)) if w else 0
        w, h = self.width, _count(self.height, 1, 2)  # pass 7: every odd row, whole
        return total + (h * (1 + math.ceil(w * bits / 8)) if w else 0)

    def row_bytes(self) -> int:
        return 1 + math.ceil(self.width * self.bit_depth * _PNG_CHANNELS.get(self.color_type, 1) / 8)


def _count(n: int, start: int, step: int) -> int:
    return max(0, (n - start + step - 1) // step)


def preflight(f: BinaryIO, nbytes: int, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> PngLayout | None:
    """Refuse (ImageError) a file over `max_bytes`, or a PNG whose chunks run past the file's
    end or would make a decoder read over `MAX_METADATA_CHUNK` bytes of metadata; read
    nothing but headers. Returns a PNG's layout (None for other formats). Leaves `f` at 0."""
    check_size(nbytes, max_bytes)
    try:
        f.seek(0)
        if f.read(8) != _PNG_SIGNATURE:
            return None
        return _walk_png(f, nbytes)
    finally:
        f.seek(0)


def check_size(nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise ImageError(
            f"file of {nbytes:,} bytes is over the limit of {max_bytes:,} bytes per image, not read "
            "(raise it with --max-image-bytes)"
        )


def _walk_png(f: BinaryIO, nbytes: int) -> PngLayout | None:
    pos = 8
    header: tuple[int, int, int, int, int] | None = None
    idat: list[tuple[int, int]] = []
    idat_ended = False
    while pos + 8 <= nbytes:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        name = kind.decode("latin-1")
        if length > 0x7FFFFFFF:
            raise ImageError(f"corrupt PNG: chunk {name!r} declares {length:,} bytes (over PNG's limit of 2^31-1)")
        end = pos + 12 + length
        if end > nbytes:
            raise ImageError(
                f"truncated file (PNG chunk {name!r} declares {length:,} bytes; the file ends "
                f"{nbytes - pos - 8:,} bytes after its start)"
            )
        if kind not in _PNG_IMAGE_DATA and length > MAX_METADATA_CHUNK:
            raise ImageError(
                f"PNG chunk {name!r} of {length:,} bytes is over the limit of {MAX_METADATA_CHUNK:,} bytes "
                "for non-image data, not read"
            )
        if kind == b"IHDR" and header is None and length >= 13:
            f.seek(pos + 8)
            w, h, depth, ctype, _c, _f, interlace = struct.unpack(">IIBBBBB", f.read(13))
            header = (w, h, depth, ctype, interlace)
        elif kind == b"IDAT":
            if not idat_ended:  # IDAT chunks are consecutive: a later one is not the image's
                idat.append((pos + 8, length))
        elif idat:
            idat_ended = True
        if kind == b"IEND":
            break
        pos = end
    if header is None:
        return None
    w, h, depth, ctype, interlace = header
    return PngLayout(w, h, depth, ctype, interlace == 1, tuple(idat))


def check_complete(f: BinaryIO, layout: PngLayout | None, nbytes: int) -> None:
    """Before decoding: refuse (ImageError "truncated file (...)") image data that cannot
    hold what its header declares: PNG by the deflate bound (free), JPEG by its scans.
    Leaves `f` at 0."""
    try:
        if layout is not None:
            need, stored = layout.raw_bytes(), sum(n for _, n in layout.idat)
            if layout.idat and need > stored * _DEFLATE_MAX_RATIO + 4096:
                raise ImageError(
                    f"truncated file (the PNG header says {layout.width}x{layout.height}, {need:,} bytes of "
                    f"pixel rows; its {stored:,} bytes of compressed data cannot hold them)"
                )
            return
        f.seek(0)
        if f.read(2) == b"\xff\xd8":
            f.seek(0)
            _check_jpeg(f.read(nbytes))
    finally:
        f.seek(0)


def check_decoded(f: BinaryIO, layout: PngLayout | None, last_rows: bytes) -> None:
    """After Pillow decoded a PNG: refuse one whose zlib stream ended before the last row.

    Pillow's decoder stops quietly at the stream's end and leaves the rows it never got
    zero (its new images are zeroed). So only when one of the last two rows is all zero
    (`last_rows`, their bytes: the last row, or with interlacing the last odd row, is
    written last) is the IDAT stream inflated and counted: about half a decode's time,
    paid by images that end in black or transparent rows only. Leaves `f` at 0.
    """
    if layout is None or not layout.idat or layout.width == 0 or layout.height == 0:
        return
    half = len(last_rows) // 2
    if layout.height > 2 and all(last_rows[i : i + half].strip(b"\x00") for i in (0, half)):
        return
    try:
        _check_png(f, layout)
    finally:
        f.seek(0)


def _check_png(f: BinaryIO, layout: PngLayout) -> None:
    need = layout.raw_bytes()
    inflate = zlib.decompressobj()
    got = 0
    try:
        for offset, length in layout.idat:
            f.seek(offset)
            left = length
            while left > 0 and not inflate.eof:
                data = f.read(min(left, _READ))
                if not data:
                    break
                left -= len(data)
                while data and not inflate.eof:  # inflated a megabyte at a time, counted, dropped
                    got += len(inflate.decompress(data, _READ))
                    if got >= need:
                        return
                    data = inflate.unconsumed_tail
            if inflate.eof:
                break
    except zlib.error:
        return  # a corrupt stream: Pillow's decoder names it
    if got < need:
        rows = f"{got // layout.row_bytes():,} of {layout.height:,} rows" if not layout.interlaced else "part"
        raise ImageError(
            f"truncated file (the PNG header says {layout.width}x{layout.height}; its image data holds {rows})"
        )


_SOF_HUFFMAN = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive (Huffman); arithmetic coding can be denser
_SOF_ANY = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _check_jpeg(data: bytes) -> None:
    """Scan data against the frame: at least one bit per block (Huffman), and every restart marker."""
    pos, n = 2, len(data)
    frame: tuple[int, int, int, list[tuple[int, int, int]]] | None = None  # sof, height, width, [(id, h, v)]
    interval = 0
    scan_bytes = 0
    marks: tuple[np.ndarray, np.ndarray] | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return  # not where a marker should be: let the decoder judge
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if marker in _SOF_ANY and frame is None and len(body) >= 6:
            h, w, nc = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            comps = [(body[6 + 3 * i], body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(nc)]
            if len(body) < 6 + 3 * nc:
                return
            frame = (marker, h, w, comps)
        elif marker == 0xDD and len(body) >= 2:
            interval = int.from_bytes(body[:2], "big")
        pos += 2 + length
        if marker != 0xDA:
            continue
        if frame is None or len(body) < 1:
            return
        # the scan's entropy-coded data runs to the next marker that is not a stuffed 0xFF00 or a restart
        if marks is None:
            if not interval and frame[0] in _SOF_HUFFMAN and (n - pos) * 8 >= _blocks(frame):
                return  # without restart markers only the bit bound could fail, and the rest of the file meets it
            marks = _markers(data)
        start = pos
        real, restarts_at = marks
        i = int(np.searchsorted(real, start))
        pos = int(real[i]) if i < len(real) else n
        restarts = int(np.searchsorted(restarts_at, pos) - np.searchsorted(restarts_at, start))
        scan_bytes += pos - start
        if interval and frame[1]:
            units = _scan_units(frame, [body[1 + 2 * i] for i in range(body[0]) if 2 + 2 * i < len(body)])
            expected = math.ceil(units / interval) - 1
            if restarts < expected:
                raise ImageError(
                    f"truncated file (the JPEG header says {frame[2]}x{frame[1]}; a scan ends after "
                    f"{restarts + 1:,} of its {expected + 1:,} restart intervals)"
                )
    cut = pos < n and data[pos : pos + 2] != b"\xff\xd9"
    if frame is None or frame[0] not in _SOF_HUFFMAN or frame[1] == 0 or cut:
        return  # a cut file: Pillow says "image file is truncated"
    blocks = _blocks(frame)
    if scan_bytes * 8 < blocks:
        raise ImageError(
            f"truncated file (the JPEG header says {frame[2]}x{frame[1]}, {blocks:,} blocks of 8x8; "
            f"its {scan_bytes:,} bytes of scan data hold at most {scan_bytes * 8:,})"
        )


def _markers(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the markers that end entropy-coded data, and of the restart markers: one
    vectorised pass (a Python loop over a photo's stuffed 0xFF00 bytes cost as much as decoding it)."""
    arr = np.frombuffer(data, np.uint8)
    ff = np.flatnonzero(arr[:-1] == 0xFF)
    after = arr[ff + 1]
    restart = (after >= 0xD0) & (after <= 0xD7)
    return ff[(after != 0) & (after != 0xFF) & ~restart], ff[restart]


def _blocks(frame: tuple[int, int, int, list[tuple[int, int, int]]]) -> int:
    return sum(_component_blocks(frame, i) for i in range(len(frame[3])))


def _component_blocks(frame: tuple[int, int, int, list[tuple[int, int, int]]], i: int) -> int:
    _, h, w, comps = frame
    hmax, vmax = max(c[1] for c in comps) or 1, max(c[2] for c in comps) or 1
    _, hs, vs = comps[i]
    return math.ceil(math.ceil(w * hs / hmax) / 8) * math.ceil(math.ceil(h * vs / vmax) / 8)


def _scan_units(frame: tuple[int, int, int, list[tuple[int, int, int]]], ids: list[int]) -> int:
    """MCUs of an interleaved scan, blocks of a one-component scan: what a restart interval counts."""
    _, h, w, comps = frame
    if len(ids) == 1:
        index = next((i for i, c in enumerate(comps) if c[0] == ids[0]), 0)
        return _component_blocks(frame, index)
    hmax, vmax = max(c[1] for c in comps) or 1, max(c[2] for c in comps) or 1
    return math.ceil(w / (8 * hmax)) * math.ceil(h / (8 * vmax))
