"""Direct reads (and shard writes): rows taken from a local store's files by byte offset.

featstore stores features uncompressed, so each row is a run of bytes at a place that
is known without decoding anything:
- Zarr: `features` is sharded with one row per inner chunk and only the `bytes` codec
  inside; a shard's index (at its end, crc32c-checked) gives each row's offset. The
  index is read once per open shard and kept with the shard's file descriptor, so both
  always describe the same file even if a writer replaces the shard meanwhile.
- HDF5: `features` and `masks` are contiguous datasets, so row i sits at
  `base + i * row_bytes`.
Zarr `masks` (chunks of many rows, zstd) are decoded a chunk at a time and kept.

A read is one `preadv` per run of rows adjacent on disk, straight into the output
array: no decoder, no copies, no library state, so forked DataLoader workers read with
it too. A batch of rows first tells the kernel about all of them
(`posix_fadvise(WILLNEED)`) so that cold rows are fetched from the disk concurrently.

Writes go the same way round (`ShardFile`): a shard's rows stream into a file as they
come and the index follows; zarr-python encodes a shard chunk by chunk, which capped a
store build at ~650 rows/s of (1024, 16, 16) float16 (ViT-L/14 at 224) on the 2-core
machine, against ~3,100 this way (`benchmarks/store_write.py`, tmpfs).

Measured against the other engines by `benchmarks/run.py` (read section) and
`benchmarks/random_access.py`. Layouts this does not cover (compressed features,
stores written by other tools, remote paths) are read by TensorStore, zarr-python or
h5py: `zarr_rows` / `hdf5_rows` return None for them.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from featstore.errors import CorruptStoreError

OPEN_SHARDS = 64  # file descriptors kept open per array
MASK_CHUNKS = 256  # decoded mask chunks kept per store
EMPTY = np.uint64(2**64 - 1)  # a shard index entry of a chunk that was never written
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
PARTIAL = ".partial"  # suffix of shard files being written (zarr-python's LocalStore uses it too)


def _read_runs(fd: int, out: np.ndarray, at: np.ndarray, offsets: np.ndarray, row_bytes: int, name: str) -> None:
    """out[at[k]] = the `row_bytes` bytes at offsets[k] of `fd`; offsets ascending.

    One `preadv` per run of rows that follow each other both on disk and in `out`.
    """
    if len(at) == 0:
        return
    joins = (np.diff(offsets) == row_bytes) & (np.diff(at) == 1)
    breaks = (np.flatnonzero(~joins) + 1).tolist()
    runs = list(zip([0, *breaks], [*breaks, len(at)], strict=True))
    if _WILLNEED is not None and len(runs) > 1:
        for a, b in runs:
            os.posix_fadvise(fd, int(offsets[a]), (b - a) * row_bytes, _WILLNEED)
    flat = out.reshape(len(out), -1).view(np.uint8)
    for a, b in runs:
        first = int(at[a])
        want = (b - a) * row_bytes
        got = _pread_into(fd, flat[first : first + b - a], int(offsets[a]))
        if got != want:
            raise CorruptStoreError(f"{name}: {want} bytes expected at offset {int(offsets[a])}, the file has {got}")


def _pread_into(fd: int, out: np.ndarray, offset: int) -> int:
    """Read len(out) bytes at `offset` into `out`; the number read."""
    if hasattr(os, "preadv"):  # straight into the array
        return os.preadv(fd, [out], offset)
    data = os.pread(fd, out.nbytes, offset)  # platforms without preadv: read, then copy
    out.reshape(-1)[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return len(data)


class _FdCache:
    """Open files by path, the least recently used closed beyond `limit`; values carry extra data."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str, load: Callable[[int], Any]) -> tuple[int, Any]:
        if self._pid != os.getpid():  # a forked child: its copies of the parent's descriptors, closed here
            self.close()
            self._pid = os.getpid()
        hit = self._open.get(path)
        if hit is not None:
            self._open.move_to_end(path)
            return hit
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            entry = (fd, load(fd))
        except BaseException:
            os.close(fd)
            raise
        self._open[path] = entry
        while len(self._open) > self.limit:
            _, (old, _) = self._open.popitem(last=False)
            os.close(old)
        return entry

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)  # in a forked child, only the child's copy: the parent's stays open
        self._open.clear()


class ShardFile:
    """One shard being written: rows stream into a temporary file as they come, and
    `finish` adds the index and renames it into place.

    The bytes zarr-python writes for the same rows (data in row order, then the index
    and its crc32c), but without per-chunk encoding and without a copy into a buffer:
    ~3-7x zarr-python's speed (`benchmarks/store_write.py`). Renamed into place like
    zarr's LocalStore does, so readers see the old shard or the new one, whole. A killed
    writer leaves `*.partial` files, which `remove_partials` deletes under the lock.
    """

    def __init__(self, spec: ShardedRows, shard: int) -> None:
        self.spec = spec
        self.path = spec.shard_path(shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}{PARTIAL}")
        self.rows = 0
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish/abort
        if not spec.index_at_end:
            self._f.write(bytes(spec.index_bytes))  # filled in by finish

    def add(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.spec.row_shape or self.rows + len(rows) > self.spec.shard_rows:
            raise ValueError(f"a shard holds up to {self.spec.shard_rows} rows of {self.spec.row_shape}")
        self._f.write(np.ascontiguousarray(rows, dtype=self.spec.dtype).reshape(-1).view(np.uint8).data)
        self.rows += len(rows)

    def finish(self) -> None:
        index = self.spec.index_bytes_for(self.rows)
        if not self.spec.index_at_end:
            self._f.seek(0)
        self._f.write(index)
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def remove_partials(folder: Path) -> None:
    """Delete the temporary files of shard writes that never finished (call holding the store's lock)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.endswith(PARTIAL):
                p.unlink(missing_ok=True)


def _chunk_key(meta: dict[str, Any], coords: tuple[int, ...]) -> str | None:
    enc = meta.get("chunk_key_encoding") or {}
    sep = (enc.get("configuration") or {}).get("separator")
    if enc.get("name") == "default":
        return "/".join(["c", *map(str, coords)]) if (sep or "/") == "/" else ".".join(["c", *map(str, coords)])
    if enc.get("name") == "v2":
        return (sep or ".").join(map(str, coords))
    return None


def _little_endian_bytes(codec: Any) -> bool:
    """A `bytes` codec whose bytes are this machine's (little-endian) layout."""
    if sys.byteorder != "little" or not isinstance(codec, dict) or codec.get("name") != "bytes":
        return False
    return (codec.get("configuration") or {}).get("endian", "little") in ("little", None)


def _metadata(array_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


class ShardedRows:
    """Rows of a local Zarr array sharded along rows, one raw row per inner chunk."""

    def __init__(self, array_dir: Path, meta: dict[str, Any], shard_rows: int, row_shape: tuple[int, ...]) -> None:
        self.dir = array_dir
        self.meta = meta
        self.shard_rows = shard_rows
        self.row_shape = row_shape
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.row_bytes = int(np.prod(row_shape)) * self.dtype.itemsize
        conf = meta["codecs"][0]["configuration"]
        self.index_at_end = conf.get("index_location", "end") == "end"
        self.checksum = len(conf["index_codecs"]) == 2
        self.index_bytes = shard_rows * 16 + (4 if self.checksum else 0)
        self.fill = meta.get("fill_value", 0)
        self._shards = _FdCache(OPEN_SHARDS)
        self._key_tail = (0,) * len(row_shape)

    def _load_index(self, fd: int, path: str) -> np.ndarray | None:
        size = os.fstat(fd).st_size
        if size < self.index_bytes:
            raise CorruptStoreError(f"{path}: {size} bytes, shorter than its shard index ({self.index_bytes})")
        raw = os.pread(fd, self.index_bytes, size - self.index_bytes if self.index_at_end else 0)
        body = raw[: self.shard_rows * 16]
        if self.checksum:
            import google_crc32c  # a dependency of zarr

            if google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
                raise CorruptStoreError(f"{path}: shard index checksum mismatch (damaged shard)")
        index = np.frombuffer(body, dtype="<u8").reshape(self.shard_rows, 2)
        written = index[:, 0] != EMPTY
        bad = written & ((index[:, 1] != self.row_bytes) | (index[:, 0] + index[:, 1] > size))
        if bad.any():
            raise CorruptStoreError(f"{path}: shard index points outside the file or at rows of the wrong size")
        return index

    def shard_path(self, shard: int) -> Path:
        return self.dir / _chunk_key(self.meta, (shard, *self._key_tail))  # type: ignore[operator]

    def index_bytes_for(self, rows: int) -> bytes:
        """The encoded shard index (+ crc32c) of a shard whose first `rows` rows are written in order."""
        first = 0 if self.index_at_end else self.index_bytes
        index = np.full((self.shard_rows, 2), EMPTY, dtype="<u8")
        index[:rows, 0] = first + np.arange(rows, dtype=np.uint64) * np.uint64(self.row_bytes)
        index[:rows, 1] = self.row_bytes
        body = index.tobytes()
        if self.checksum:
            import google_crc32c  # a dependency of zarr

            body += google_crc32c.value(body).to_bytes(4, "little")
        return body

    def write_shard(self, shard: int, rows: np.ndarray) -> None:
        """Replace shard `shard` with these rows (its first len(rows) rows; the rest unwritten)."""
        out = ShardFile(self, shard)
        try:
            out.add(rows)
            out.finish()
        except BaseException:
            out.abort()
            raise

    def read(self, indices: np.ndarray, out: np.ndarray) -> None:
        """out[k] = row indices[k]; `indices` sorted ascending."""
        shard_of = indices // self.shard_rows
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for part in np.split(np.arange(len(indices)), bounds):
            if len(part) == 0:
                continue
            path = str(self.shard_path(int(shard_of[part[0]])))
            try:
                fd, index = self._shards.get(path, lambda fd, p=path: self._load_index(fd, p))
            except FileNotFoundError:  # a shard of only fill values is not written
                out[part] = self.fill
                continue
            offsets = index[indices[part] % self.shard_rows, 0]
            empty = offsets == EMPTY
            if empty.any():
                out[part[empty]] = self.fill
                part, offsets = part[~empty], offsets[~empty]
            offsets = offsets.astype(np.int64)
            order = np.argsort(offsets, kind="stable")
            _read_runs(fd, out, part[order], offsets[order], self.row_bytes, path)

    def close(self) -> None:
        self._shards.close()


class ChunkedRows:
    """Rows of a local Zarr array chunked along rows (bytes, then optionally zstd); decoded chunks kept."""

    def __init__(self, array_dir: Path, meta: dict[str, Any], chunk_rows: int, row_shape: tuple[int, ...]) -> None:
        self.dir = array_dir
        self.meta = meta
        self.chunk_rows = chunk_rows
        self.row_shape = row_shape
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.compressed = len(meta["codecs"]) == 2
        self.fill = meta.get("fill_value", 0)
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._key_tail = (0,) * len(row_shape)

    def _chunk(self, k: int) -> np.ndarray:
        hit = self._chunks.get(k)
        if hit is not None:
            self._chunks.move_to_end(k)
            return hit
        path = self.dir / _chunk_key(self.meta, (k, *self._key_tail))  # type: ignore[operator]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            chunk = np.full((self.chunk_rows, *self.row_shape), self.fill, dtype=self.dtype)
        else:
            if self.compressed:
                from numcodecs import Zstd

                data = Zstd().decode(data)
            chunk = np.frombuffer(data, dtype=self.dtype)
            if chunk.size != self.chunk_rows * int(np.prod(self.row_shape)):
                raise CorruptStoreError(f"{path}: {chunk.size} values, a chunk holds {self.chunk_rows} rows")
            chunk = chunk.reshape(self.chunk_rows, *self.row_shape)
        self._chunks[k] = chunk
        while len(self._chunks) > MASK_CHUNKS:
            self._chunks.popitem(last=False)
        return chunk

    def read(self, indices: np.ndarray, out: np.ndarray) -> None:
        chunk_of = indices // self.chunk_rows
        for k in np.unique(chunk_of).tolist():
            sel = np.flatnonzero(chunk_of == k)
            out[sel] = self._chunk(k)[indices[sel] % self.chunk_rows]

    def close(self) -> None:
        self._chunks.clear()


def zarr_rows(array_dir: Path, row_shape: tuple[int, ...], *, chunked: bool = True) -> ShardedRows | ChunkedRows | None:
    """A direct reader for this Zarr array, or None if its layout needs a real Zarr library.

    Sharded arrays qualify with shards of whole rows, inner chunks of one row and only a
    little-endian `bytes` codec inside (index: `bytes` + optional crc32c); with `chunked`,
    unsharded ones too, with chunks of whole rows and `bytes` (+ optional zstd), read and
    kept a chunk at a time (right for small rows such as masks, not for features).
    """
    meta = _metadata(array_dir)
    if meta is None or meta.get("zarr_format") != 3 or meta.get("storage_transformers"):
        return None
    try:
        np.dtype(meta["data_type"])
        chunk = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
    except (KeyError, TypeError, ValueError):
        return None
    if chunk[1:] != list(row_shape) or _chunk_key(meta, (0,)) is None:
        return None
    first = codecs[0] if codecs else {}
    if isinstance(first, dict) and first.get("name") == "sharding_indexed" and len(codecs) == 1:
        conf = first.get("configuration") or {}
        inner, index_codecs = conf.get("codecs", []), conf.get("index_codecs", [])
        if (
            list(conf.get("chunk_shape", [])) != [1, *row_shape]
            or len(inner) != 1
            or not _little_endian_bytes(inner[0])
            or not 1 <= len(index_codecs) <= 2
            or not _little_endian_bytes(index_codecs[0])
            or (len(index_codecs) == 2 and index_codecs[1].get("name") != "crc32c")
            or conf.get("index_location", "end") not in ("start", "end")
        ):
            return None
        return ShardedRows(array_dir, meta, int(chunk[0]), row_shape)
    if chunked and 1 <= len(codecs) <= 2 and _little_endian_bytes(codecs[0]):
        if len(codecs) == 2 and not (isinstance(codecs[1], dict) and codecs[1].get("name") == "zstd"):
            return None
        return ChunkedRows(array_dir, meta, int(chunk[0]), row_shape)
    return None


class ContiguousRows:
    """Rows of a contiguous (unchunked, unfiltered) HDF5 dataset: row i at base + i * row_bytes."""

    def __init__(self, fd: int, base: int, row_shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
        self.fd = fd  # h5py's own descriptor of the file: valid while the h5py file is open
        self.base = base
        self.row_shape = row_shape
        self.row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        self.name = name

    def read(self, indices: np.ndarray, out: np.ndarray) -> None:
        offsets = self.base + indices.astype(np.int64) * self.row_bytes
        _read_runs(self.fd, out, np.arange(len(indices)), offsets, self.row_bytes, self.name)

    def close(self) -> None:
        pass


def hdf5_rows(file: Any, ds: Any, name: str) -> ContiguousRows | None:
    """A direct reader for a contiguous, unfiltered h5py dataset in a file opened with the sec2 driver."""
    if ds.chunks is not None or ds.compression or ds.dtype.byteorder == ">" or file.driver != "sec2":
        return None
    base = ds.id.get_offset()
    if base is None:  # nothing allocated: no rows
        return None
    return ContiguousRows(int(file.id.get_vfd_handle()), int(base), tuple(ds.shape[1:]), ds.dtype, name)
