"""Rows by byte range: featstore's own reader (and chunk encoder) for its Zarr layout, on
any backend (`featstore.store._blobs`), and for contiguous HDF5 datasets.

featstore stores features uncompressed, so each row is a run of bytes at a place that
is known without decoding anything:
- Zarr: `features` is sharded with one row per inner chunk and only the `bytes` codec
  inside; a shard's index (at its end, crc32c-checked) gives each row's offset. The
  index is read once per open shard and kept (for local files, with the descriptor it
  was read from, so both describe the same file even if a writer replaces the shard).
- HDF5: `features` and `masks` are contiguous datasets, so row i sits at
  `base + i * row_bytes`.
A read is one request per run of rows adjacent in the shard (a `preadv` locally, a
ranged GET remotely, all of a batch's runs issued together). The small arrays (masks,
keys, sources, sizes, embeddings) are chunked a shard's rows at a time and decoded a
chunk at a time (`bytes` or `vlen-utf8`, then optionally `zstd`), kept in a small cache.
No library state is involved, so forked DataLoader workers read with it too.

Layouts this does not cover (compressed features, stores written by other tools) are
read by TensorStore or zarr-python: `zarr_rows` returns None for them.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import numpy as np

from featstore.errors import CorruptStoreError
from featstore.store._blobs import Blobs, pread_runs

OPEN_SHARDS = 256  # shard indexes kept per array
CACHED_CHUNKS = 256  # decoded chunks kept per array
EMPTY = np.uint64(2**64 - 1)  # a shard index entry of a chunk that was never written


def chunk_key(meta: dict[str, Any], coords: tuple[int, ...]) -> str | None:
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


class ShardedRows:
    """Rows of a Zarr array sharded along rows, one raw row per inner chunk."""

    def __init__(self, blobs: Blobs, array: str, meta: dict[str, Any], row_shape: tuple[int, ...]) -> None:
        self.blobs = blobs
        self.array = array
        self.meta = meta
        self.shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.row_shape = row_shape
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.row_bytes = int(np.prod(row_shape)) * self.dtype.itemsize
        conf = meta["codecs"][0]["configuration"]
        self.index_at_end = conf.get("index_location", "end") == "end"
        self.checksum = len(conf["index_codecs"]) == 2
        self.index_bytes = self.shard_rows * 16 + (4 if self.checksum else 0)
        self.fill = meta.get("fill_value", 0)
        self._key_tail = (0,) * len(row_shape)
        self._indexes: OrderedDict[int, np.ndarray | None] = OrderedDict()

    def key(self, shard: int) -> str:
        return f"{self.array}/{chunk_key(self.meta, (shard, *self._key_tail))}"

    def _load_indexes(self, shards: list[int]) -> None:
        """Read the indexes of these shards (not yet cached) together: one request each, concurrent."""
        missing = [sh for sh in shards if sh not in self._indexes]
        if missing and self.index_at_end:
            got = self.blobs.read_tails([self.key(sh) for sh in missing], self.index_bytes)
        else:
            got = []
            for sh in missing:
                raw = self.blobs.read(self.key(sh))
                got.append(None if raw is None else (raw[: self.index_bytes], len(raw)))
        for sh, tail in zip(missing, got, strict=True):
            name = f"{self.blobs.location}/{self.key(sh)}"
            self._indexes[sh] = None if tail is None else self._decode_index(tail[0], tail[1], name)
        for sh in shards:
            self._indexes.move_to_end(sh)
        while len(self._indexes) > max(OPEN_SHARDS, len(shards)):
            self._indexes.popitem(last=False)

    def _decode_index(self, raw: bytes, size: int | None, name: str) -> np.ndarray:
        if len(raw) < self.index_bytes:
            raise CorruptStoreError(f"{name}: {len(raw)} bytes, shorter than its shard index ({self.index_bytes})")
        body = raw[: self.shard_rows * 16]
        if self.checksum:
            import google_crc32c  # a dependency of zarr

            if google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
                raise CorruptStoreError(f"{name}: shard index checksum mismatch (damaged shard)")
        index = np.frombuffer(body, dtype="<u8").reshape(self.shard_rows, 2)
        written = index[:, 0] != EMPTY
        # Without the object's size (a suffix read), a row beyond its end shows as a short read.
        end = index[:, 0] + index[:, 1] > (size if size is not None else 2**63)
        if (written & ((index[:, 1] != self.row_bytes) | end)).any():
            raise CorruptStoreError(f"{name}: shard index points outside the file or at rows of the wrong size")
        return index

    def index_for(self, count: int) -> bytes:
        """The index (+ crc32c) of a shard whose first `count` rows are written in order (index at the end)."""
        index = np.full((self.shard_rows, 2), EMPTY, dtype="<u8")
        index[:count, 0] = np.arange(count, dtype=np.uint64) * np.uint64(self.row_bytes)
        index[:count, 1] = self.row_bytes
        body = index.tobytes()
        if self.checksum:
            import google_crc32c

            body += google_crc32c.value(body).to_bytes(4, "little")
        return body

    def forget(self, shard: int) -> None:
        self._indexes.pop(shard, None)

    def read(self, indices: np.ndarray, out: np.ndarray) -> None:
        """out[k] = row indices[k] (physical rows, sorted ascending): the shards' indexes
        first (together), then every run of rows of every shard (together)."""
        shard_of = indices // self.shard_rows
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        parts = [p for p in np.split(np.arange(len(indices)), bounds) if len(p)]
        shards = [int(shard_of[p[0]]) for p in parts]
        self._load_indexes(shards)
        requests = []
        for shard, part in zip(shards, parts, strict=True):
            index = self._indexes[shard]
            if index is None:  # a shard of only fill values is not written
                out[part] = self.fill
                continue
            offsets = index[indices[part] % self.shard_rows, 0]
            empty = offsets == EMPTY
            if empty.any():
                out[part[empty]] = self.fill
                part, offsets = part[~empty], offsets[~empty]
            offsets = offsets.astype(np.int64)
            order = np.argsort(offsets, kind="stable")
            requests.append((self.key(shard), out, part[order], offsets[order], self.row_bytes))
        try:
            self.blobs.read_runs(requests)
        except FileNotFoundError:
            raise CorruptStoreError(f"{self.blobs.location}: a shard of {self.array} vanished") from None

    def close(self) -> None:
        self._indexes.clear()


class ChunkedRows:
    """Rows of a Zarr array chunked along rows (`bytes` or `vlen-utf8`, then optionally zstd)."""

    def __init__(self, blobs: Blobs, array: str, meta: dict[str, Any], row_shape: tuple[int, ...]) -> None:
        self.blobs = blobs
        self.array = array
        self.meta = meta
        self.chunk_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.row_shape = row_shape
        codecs = meta["codecs"]
        self.strings = codecs[0]["name"] == "vlen-utf8"
        self.dtype = np.dtype(object) if self.strings else np.dtype(meta["data_type"]).newbyteorder("<")
        self.zstd_level = (codecs[1].get("configuration") or {}).get("level", 0) if len(codecs) == 2 else None
        self.fill = "" if self.strings else meta.get("fill_value", 0)
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._key_tail = (0,) * len(row_shape)

    def key(self, chunk: int) -> str:
        return f"{self.array}/{chunk_key(self.meta, (chunk, *self._key_tail))}"

    def decode(self, data: bytes | None, name: str) -> np.ndarray:
        if data is None:
            return np.full((self.chunk_rows, *self.row_shape), self.fill, dtype=self.dtype)
        if self.zstd_level is not None:
            from numcodecs import Zstd

            data = Zstd().decode(data)
        if self.strings:
            from numcodecs import VLenUTF8

            chunk = VLenUTF8().decode(data)
        else:
            chunk = np.frombuffer(data, dtype=self.dtype)
        if chunk.size != self.chunk_rows * int(np.prod(self.row_shape)):
            raise CorruptStoreError(f"{name}: {chunk.size} values, a chunk holds {self.chunk_rows} rows")
        return chunk.reshape(self.chunk_rows, *self.row_shape)

    def encode(self, values: np.ndarray | list[str]) -> bytes:
        """One whole chunk: `values` (up to chunk_rows rows), padded with the fill value."""
        k = len(values)
        full = np.full((self.chunk_rows, *self.row_shape), self.fill, dtype=self.dtype)
        if k:
            full[:k] = np.asarray(values, dtype=self.dtype) if not self.strings else np.array(values, dtype=object)
        if self.strings:
            from numcodecs import VLenUTF8

            data = bytes(VLenUTF8().encode(full))
        else:
            data = full.tobytes()
        if self.zstd_level is not None:
            from numcodecs import Zstd

            data = bytes(Zstd(level=self.zstd_level).encode(data))
        return data

    def forget(self, chunk: int) -> None:
        """Drop a cached chunk (another writer may have replaced it)."""
        self._chunks.pop(chunk, None)

    def chunks(self, ids: list[int]) -> list[np.ndarray]:
        """Decoded chunks (missing ones first fetched together)."""
        missing = [k for k in ids if k not in self._chunks]
        if missing:
            for k, data in zip(missing, self.blobs.read_many([self.key(k) for k in missing]), strict=True):
                self._chunks[k] = self.decode(data, self.key(k))
        out = []
        for k in ids:
            self._chunks.move_to_end(k)
            out.append(self._chunks[k])
        while len(self._chunks) > max(CACHED_CHUNKS, len(ids)):
            self._chunks.popitem(last=False)
        return out

    def read(self, indices: np.ndarray, out: np.ndarray) -> None:
        chunk_of = indices // self.chunk_rows
        ids = np.unique(chunk_of).tolist()
        for k, chunk in zip(ids, self.chunks(ids), strict=True):
            sel = np.flatnonzero(chunk_of == k)
            out[sel] = chunk[indices[sel] % self.chunk_rows]

    def close(self) -> None:
        self._chunks.clear()


def zarr_rows(
    blobs: Blobs, array: str, meta: dict[str, Any] | None, row_shape: tuple[int, ...], *, chunked: bool = True
) -> ShardedRows | ChunkedRows | None:
    """A direct reader for this Zarr array, or None if its layout needs a real Zarr library.

    Sharded arrays qualify with shards of whole rows, inner chunks of one row and only a
    little-endian `bytes` codec inside (index: `bytes` + optional crc32c); with `chunked`,
    unsharded ones too, with chunks of whole rows and `bytes` or `vlen-utf8` (+ optional zstd),
    read a chunk at a time (right for small rows such as masks, not for features).
    """
    if meta is None or meta.get("zarr_format") != 3 or meta.get("storage_transformers"):
        return None
    try:
        if meta["data_type"] != "string":
            np.dtype(meta["data_type"])
        chunk = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
    except (KeyError, TypeError, ValueError):
        return None
    if chunk[1:] != list(row_shape) or chunk_key(meta, (0,)) is None or not codecs:
        return None
    first = codecs[0] if isinstance(codecs[0], dict) else {}
    if first.get("name") == "sharding_indexed" and len(codecs) == 1:
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
        return ShardedRows(blobs, array, meta, row_shape)
    if not chunked or len(codecs) > 2:
        return None
    strings = first.get("name") == "vlen-utf8" and meta["data_type"] == "string"
    if not (strings or _little_endian_bytes(first)):
        return None
    if len(codecs) == 2 and not (isinstance(codecs[1], dict) and codecs[1].get("name") == "zstd"):
        return None
    return ChunkedRows(blobs, array, meta, row_shape)


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
        pread_runs(self.fd, out, np.arange(len(indices)), offsets, self.row_bytes, self.name)

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
