"""Zarr v3 stores: the reader, and the appender that writes whole shards.

Codec (measured by `benchmarks/codec_choice.py`, 2-core shared machine, float16):
features of a random-weight CLIP ViT-B/32 compress 1.09x with zstd (byte shuffle adds
nothing), a LayerNorm-like synthetic (1024, 16, 16) map 1.08x with zstd and 1.17x with
blosc-zstd clevel 5 + byte shuffle. Every compressor cost read speed: TensorStore random
single-row reads fell from ~7,700 to ~4,300-5,200 rows/s (ViT; a second run: 16,200 to
7,000-8,300) and from ~3,500 to ~1,000-1,900 rows/s (1024x16x16); zarr-python 10-50 %
slower; writes up to 3x slower.
Features are read many times (every epoch) and saved <= 17 % of disk, so `features` is
stored uncompressed (the `bytes` codec inside the sharding codec; the shard index keeps
its crc32c). Masks and strings compress 5x or more and are tiny: zstd.

Shards: each shard holds `shard_rows` rows, the largest power of two within 64 MiB (512
rows of (768, 7, 7) float16, 128 of (1024, 16, 16)). Every commit costs a fixed ~15 ms of
zarr-python work (resizing five arrays, four small chunks, the attributes), so bigger
shards write faster: rows of (1024, 16, 16) float16 went from ~950 rows/s with 32-row
shards to ~1,400 with 128-row ones (tmpfs, 2-core machine; `benchmarks/store_write.py`),
which matters when a GPU makes ~2,000 rows/s. The writer buffers one shard in memory and
loses at most one shard of work in a crash. `masks`, `keys`, `sources` and `orig_size_hw` use chunks of the
same `shard_rows` rows, so each commit writes exactly one object per array.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featstore.batches import EncodingInfo
from featstore.errors import CorruptStoreError, StoreError
from featstore.store._direct import ChunkedRows, ShardedRows, ShardFile, remove_partials, zarr_rows
from featstore.store.base import (
    ARRAYS,
    FEATURES,
    KEYS,
    MASKS,
    ORIG_SIZE,
    SOURCES,
    FeatureStore,
    check_arrays,
    step_rows,
)

STRING_ARRAYS = (KEYS, SOURCES)
TS_CACHE_BYTES = 8 * 2**20
DIRECT_WRITES = True  # write feature shards without zarr-python when the layout allows (benchmarks turn it off)


def default_shard_rows(info: EncodingInfo) -> int:
    """Rows per shard of a new store: up to 64 MiB (see the module docstring).

    Looked up by the writer at open time: tests/test_reliability.py patches it to get
    small shards through the CLI."""
    return step_rows(info)


def _dtype_name(dtype: Any) -> str:
    dt = np.dtype(dtype)
    return "str" if dt.kind in "OTU" else dt.name


def _strings(values: Sequence[str]) -> np.ndarray:
    # StringDType keeps trailing NULs that numpy's fixed-width "U" would drop.
    return np.array(list(values), dtype=np.dtypes.StringDType())


def create_zarr_store(path: Path, attrs: dict[str, Any], info: EncodingInfo, shard_rows: int) -> None:
    """An empty store (0 rows). Callers create it under a temporary name and rename it."""
    import zarr
    from zarr.codecs import ZstdCodec

    c, g, s = info.hidden_dim, info.grid, shard_rows
    root = zarr.open_group(path, mode="w-", zarr_format=3, attributes=attrs)
    root.create_array(
        FEATURES, shape=(0, c, g, g), dtype=info.dtype, chunks=(1, c, g, g), shards=(s, c, g, g), compressors=None
    )
    root.create_array(MASKS, shape=(0, g, g), dtype="uint8", chunks=(s, g, g), compressors=ZstdCodec(level=3))
    for name in STRING_ARRAYS:
        root.create_array(name, shape=(0,), dtype=str, chunks=(s,))
    root.create_array(ORIG_SIZE, shape=(0, 2), dtype="int32", chunks=(s, 2))


def _open_group(path: Path, mode: str) -> Any:
    import zarr

    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        raise CorruptStoreError(f"{path}: not a Zarr v3 group, or damaged ({type(e).__name__}: {e})") from None
    except Exception as e:  # zarr's own errors (GroupNotFoundError, metadata validation)
        raise CorruptStoreError(f"{path}: not a Zarr v3 group, or damaged ({type(e).__name__}: {e})") from None


def _arrays(root: Any, path: Path) -> dict[str, Any]:
    import zarr

    out = {}
    for name in ARRAYS:
        try:
            node = root[name]
        except KeyError:
            continue
        except Exception as e:
            raise CorruptStoreError(f"{path}: array '{name}' cannot be opened ({type(e).__name__}: {e})") from None
        if isinstance(node, zarr.Array):
            out[name] = node
    return out


_ts_pid: int | None = None  # the process in which featstore started using TensorStore
_inherited: list[Any] = []  # TensorStore handles a forked child must neither use nor destroy


def _tensorstore() -> Any:
    """The tensorstore module, or None: not installed, turned off, or unusable in this process.

    TensorStore aborts a forked child that uses it after its parent did ("fork() use
    detected"), so such a child (a DataLoader worker, say) reads with zarr-python.
    """
    if os.environ.get("FEATSTORE_NO_TENSORSTORE"):
        return None
    if _ts_pid is not None and _ts_pid != os.getpid():
        return None
    try:
        import tensorstore
    except ImportError:
        return None
    return tensorstore


def _run(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


ENGINES = ("direct", "tensorstore", "zarr")


def _engine_order(engine: str | Sequence[str]) -> tuple[str, ...]:
    order = ENGINES if engine == "auto" else (engine,) if isinstance(engine, str) else tuple(engine)
    unknown = [e for e in order if e not in ENGINES]
    if unknown or not order:
        raise ValueError(f"engine must be 'auto', one of {ENGINES} or a sequence of them, not {engine!r}")
    return order


class ZarrFeatureStore(FeatureStore):
    """Reads a Zarr v3 store.

    Engines, tried in this order by `engine="auto"`:
    - "direct": rows read by byte offset from the shard files (`featstore.store._direct`),
      for local stores with featstore's layout (uncompressed features); fastest, and
      safe in forked processes;
    - "tensorstore": when installed (`pip install featstore[fast]`), concurrent per-row
      reads; a forked child of a process that used it cannot (see `_tensorstore`);
    - "zarr": zarr-python's async API (`asyncio.gather` of per-row reads).
    `engine` may name one (an error if it cannot read this store) or a sequence to try
    in order. Env FEATSTORE_NO_TENSORSTORE=1 takes TensorStore out of the choice.
    """

    format = "zarr"

    def __init__(self, path: Path, *, engine: str | Sequence[str] = "auto") -> None:
        order = _engine_order(engine)
        root = _open_group(path, "r")
        super().__init__(path, dict(root.attrs))
        self._z = _arrays(root, path)
        found = {name: (tuple(a.shape), _dtype_name(a.dtype)) for name, a in self._z.items()}
        check_arrays(path, self._info, self._n, found)
        self._ts_module = None
        self._ts: dict[str, Any] = {}
        self._direct: tuple[ShardedRows | ChunkedRows, ShardedRows | ChunkedRows] | None = None
        self._engine = self._choose(order, explicit=isinstance(engine, str) and engine != "auto")

    def _choose(self, order: tuple[str, ...], *, explicit: bool) -> str:
        for name in order:
            if name == "direct":
                c, g = self._info.hidden_dim, self._info.grid
                feats = zarr_rows(self.path / FEATURES, (c, g, g), chunked=False)
                masks = zarr_rows(self.path / MASKS, (g, g))
                if feats is not None and masks is not None:
                    self._direct = (feats, masks)
                    return name
                if explicit:
                    raise StoreError(f"{self.path}: engine 'direct' cannot read this layout (compressed features?)")
            elif name == "tensorstore":
                self._ts_module = _tensorstore()
                if self._ts_module is not None:
                    return name
                if explicit:
                    raise ImportError(
                        "engine 'tensorstore' needs the tensorstore package (pip install featstore[fast])"
                    )
            else:
                return name
        raise StoreError(f"{self.path}: none of the engines {order} can read this store")

    @property
    def engine(self) -> str:
        return "tensorstore" if self._use_ts() else "zarr" if self._engine == "tensorstore" else self._engine

    def _use_ts(self) -> bool:
        if self._ts_module is None:
            return False
        if _ts_pid is not None and _ts_pid != os.getpid():  # a forked child: see _tensorstore()
            _inherited.append(self._ts)
            self._ts, self._ts_module = {}, None
            return False
        return True

    @property
    def shard_rows(self) -> int:
        shards = self._z[FEATURES].shards
        return int(shards[0]) if shards else int(self._z[FEATURES].chunks[0])

    def _ts_array(self, name: str) -> Any:
        global _ts_pid
        if name not in self._ts:
            ts = self._ts_module
            _ts_pid = os.getpid()
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}
            if "context" not in self._ts:
                # A small cache keeps shard indexes: 1.3-1.5x more random rows/s in 64-row batches.
                self._ts["context"] = ts.Context({"cache_pool": {"total_bytes_limit": TS_CACHE_BYTES}})  # type: ignore[union-attr]
            opened = ts.open(spec, read=True, open=True, context=self._ts["context"])  # type: ignore[union-attr]
            self._ts[name] = opened.result()
        return self._ts[name]

    def _read_direct(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self._direct is not None
        c, g = self._info.hidden_dim, self._info.grid
        feats = np.empty((len(indices), c, g, g), dtype=self._info.dtype)
        masks = np.empty((len(indices), g, g), dtype=np.uint8)
        self._direct[0].read(indices, feats)
        self._direct[1].read(indices, masks)
        return feats, masks

    def _read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._direct is not None:
            return self._read_direct(indices)
        if self._use_ts():
            feats, masks = self._ts_array(FEATURES), self._ts_array(MASKS)
            futures = [feats[int(i)].read() for i in indices]
            mask_future = masks[indices].read()
            return np.stack([f.result() for f in futures]), mask_future.result()
        return _run(self._gather(indices))

    async def _gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats, masks = self._z[FEATURES].async_array, self._z[MASKS].async_array
        rows, mask = await asyncio.gather(
            asyncio.gather(*(feats.getitem(int(i)) for i in indices)),
            masks.get_orthogonal_selection((indices,)),
        )
        return np.stack(rows), np.asarray(mask)

    def _read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if self._direct is not None:
            return self._read_direct(np.arange(start, stop, dtype=np.int64))
        if self._use_ts():
            return (
                self._ts_array(FEATURES)[start:stop].read().result(),
                self._ts_array(MASKS)[start:stop].read().result(),
            )
        return np.asarray(self._z[FEATURES][start:stop]), np.asarray(self._z[MASKS][start:stop])

    def _read_column(self, name: str) -> Any:
        values = self._z[name][: self._n]
        return [str(v) for v in values.tolist()] if name in STRING_ARRAYS else np.asarray(values)

    def array_details(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, a in self._z.items():
            out[name] = {
                "shape": list(a.shape),
                "dtype": _dtype_name(a.dtype),
                "chunks": list(a.chunks),
                "shards": list(a.shards) if a.shards else None,
                "codecs": _codec_names(a.metadata.to_dict().get("codecs", ())),
            }
        return out

    def close(self) -> None:
        self._use_ts()  # in a forked child, sets inherited TensorStore handles aside first
        self._ts.clear()
        if self._direct is not None:
            for reader in self._direct:
                reader.close()


def _codec_names(codecs: Sequence[Any]) -> list[str]:
    names = []
    for c in codecs:
        c = c if isinstance(c, dict) else {"name": str(c)}
        conf = c.get("configuration") or {}
        if c["name"] == "sharding_indexed":
            names.append(f"sharding_indexed[{', '.join(_codec_names(conf.get('codecs', ())))}]")
        elif c["name"] in ("zstd", "blosc", "gzip"):
            level = conf.get("level", conf.get("clevel"))
            names.append(f"{c['name']}({conf.get('cname', '')}{'' if level is None else level})")
        else:
            names.append(c["name"])
    return names


class ZarrAppender:
    """Adds rows to an existing Zarr store, a whole shard per write, committing after each.

    The rows of the shard being filled are collected: features stream into the shard's
    temporary file (`_direct.ShardFile`; zarr-python layouts other than featstore's own
    are buffered in memory instead), the small arrays are buffered. When the shard is full
    the arrays are resized to end at it, the shard file is renamed into place, the
    matching chunk of every other array is written, and only then `num_rows` is raised
    in the group's attributes. A store whose last shard is partial has that shard's rows
    read back first, so the shard is rewritten whole, never patched row by row: each
    shard object is written once per commit, by one writer (the lock).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = _open_group(path, "r+")
        self.attrs = dict(self.root.attrs)
        self.z = _arrays(self.root, path)
        feats = self.z[FEATURES]
        self.shard_rows = int(feats.shards[0]) if feats.shards else int(feats.chunks[0])
        self.num_rows = int(self.attrs["num_rows"])
        self.start = self.num_rows - self.num_rows % self.shard_rows  # first row of the open shard
        c, g = feats.shape[1], feats.shape[2]
        s = self.shard_rows
        # Features: featstore writes shard files itself when the layout is its own (3-7x
        # zarr-python's speed, see `_direct.ShardFile`); else buffered for zarr-python.
        self._shards = zarr_rows(path / FEATURES, (c, g, g), chunked=False) if DIRECT_WRITES else None
        self._file: ShardFile | None = None
        self.features = None if isinstance(self._shards, ShardedRows) else np.empty((s, c, g, g), feats.dtype)
        self.masks = np.empty((s, g, g), dtype=np.uint8)
        self.orig = np.empty((s, 2), dtype=np.int32)
        self.keys: list[str] = []
        self.sources: list[str] = []
        if isinstance(self._shards, ShardedRows):
            remove_partials(self._shards.shard_path(self.start // s).parent)  # left by a killed writer
        if self.start < self.num_rows:
            rows = slice(self.start, self.num_rows)
            k = self.num_rows - self.start
            self._add_features(0, feats[rows])
            self.masks[:k] = self.z[MASKS][rows]
            self.orig[:k] = self.z[ORIG_SIZE][rows]
            self.keys = [str(v) for v in self.z[KEYS][rows].tolist()]
            self.sources = [str(v) for v in self.z[SOURCES][rows].tolist()]

    def _add_features(self, at: int, rows: np.ndarray) -> None:
        """Rows `at`.. of the open shard (`at` is the number of rows it holds so far)."""
        if self.features is not None:
            self.features[at : at + len(rows)] = rows
            return
        assert isinstance(self._shards, ShardedRows)
        if self._file is None:
            self._file = ShardFile(self._shards, self.start // self.shard_rows)
            if at:  # reopened after a commit of this partial shard: its rows first
                self._file.add(np.asarray(self.z[FEATURES][self.start : self.start + at]))
        self._file.add(rows)

    def committed_keys(self) -> list[str]:
        return [str(v) for v in self.z[KEYS][: self.num_rows].tolist()]

    @property
    def buffered(self) -> int:
        return len(self.keys)

    @property
    def total(self) -> int:
        """Committed rows plus buffered ones."""
        return self.start + len(self.keys)

    def append(
        self, keys: list[str], sources: list[str], features: np.ndarray, masks: np.ndarray, orig: np.ndarray
    ) -> None:
        done = 0
        while done < len(keys):
            k = min(len(keys) - done, self.shard_rows - len(self.keys))
            at = len(self.keys)
            self._add_features(at, features[done : done + k])
            self.masks[at : at + k] = masks[done : done + k]
            self.orig[at : at + k] = orig[done : done + k]
            self.keys += keys[done : done + k]
            self.sources += sources[done : done + k]
            done += k
            if len(self.keys) == self.shard_rows:
                self._write_open_shard({})
                self.start += self.shard_rows
                self.keys, self.sources = [], []

    def commit(self, attrs: dict[str, Any]) -> None:
        """Write the partial last shard (if it has new rows) and these attributes."""
        if self.total > self.num_rows:
            self._write_open_shard(attrs)
        elif attrs:
            self.root.attrs.update(attrs)
            self.attrs.update(attrs)

    def _write_open_shard(self, attrs: dict[str, Any]) -> None:
        k = len(self.keys)
        end = self.start + k
        rows = slice(self.start, end)
        values: dict[str, Any] = {
            MASKS: self.masks[:k],
            ORIG_SIZE: self.orig[:k],
            KEYS: _strings(self.keys),
            SOURCES: _strings(self.sources),
        }
        if self.features is not None:  # (zarr-python 3.1 reads an existing shard file before replacing it)
            values[FEATURES] = self.features[:k]
        elif self._file is not None:
            self._file.finish()  # the shard file in place, holding rows start..end-1
            self._file = None
        # Arrays end exactly at this shard, so one write per array covers every in-bounds
        # row of it. All in one call into zarr's event loop: each call costs a thread
        # hand-off (~2 ms on a busy machine), and a commit used to make ten.
        _run(self._resize_and_write(end, rows, values))
        update = {**attrs, "num_rows": end}
        self.root.attrs.update(update)  # the commit point: LocalStore writes zarr.json by temp + rename
        self.attrs.update(update)
        self.num_rows = end

    async def _resize_and_write(self, end: int, rows: slice, values: dict[str, Any]) -> None:
        resized = [a.async_array.resize((end, *a.shape[1:])) for a in self.z.values() if a.shape[0] != end]
        await asyncio.gather(*resized)
        await asyncio.gather(*(self.z[name].async_array.setitem(rows, v) for name, v in values.items()))
