"""Zarr v3 stores, local or on object storage: the reader (`ZarrFeatureStore` and its
read engines). Beside it: `_zarr_layout` (the metadata and committed shards readers and
writers share), `_zarr_write` (the shard writer, creating, deleting and upgrading stores)
and `_zarr_meta` (the metadata documents); their names used elsewhere are re-exported
here, where callers (and tests patching `default_shard_rows`) find them.

The commit protocol they follow is described in `featstore.store`. In short: the
shard is the unit of writing; a shard's objects (one per array) are each written
whole, and its `keys` chunk last: that chunk is the shard's commit record, and the
rows it names (up to the first empty key) are the shard's committed rows.

Codecs: `features` uncompressed inside the sharding codec (features are read many times
and compress <= 1.2x; the shard index keeps its crc32c); `masks`, `orig_size_hw` and the
strings zstd; `embedding` raw. Every small array is chunked `shard_rows` rows at a time,
so a shard's commit writes exactly one object per array. Numbers behind these choices
are in benchmarks/README.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from featstore.batches import EncodingInfo
from featstore.errors import CorruptStoreError, StoreError
from featstore.store._blobs import open_blobs
from featstore.store._direct import ChunkedRows, ShardedRows
from featstore.store._zarr_layout import Layout, _doc, _dtype_name, _row_shape
from featstore.store._zarr_meta import STRING_ARRAYS
from featstore.store._zarr_write import (
    ZarrShardWriter,
    ZarrSink,
    bring_current,
    create_store,
    delete_store,
    live_writer,
    new_attrs,
    open_for_writing,
    upgrade_store,
)
from featstore.store.base import EMBEDDING, FEATURES, MASKS, FeatureStore, step_rows
from featstore.store.location import Location

__all__ = [
    "Layout",
    "ZarrFeatureStore",
    "ZarrShardWriter",
    "ZarrSink",
    "_doc",
    "bring_current",
    "create_store",
    "default_shard_rows",
    "delete_store",
    "engine_order",
    "live_writer",
    "new_attrs",
    "open_for_writing",
    "upgrade_store",
    "zarr_group",
]

TS_CACHE_BYTES = 8 * 2**20


def default_shard_rows(info: EncodingInfo) -> int:
    """Rows per shard of a new store: the largest power of two within 64 MiB of features.

    Looked up by the writer at open time (tests patch it to get small shards through the CLI).
    """
    return step_rows(info)


# ---------------------------------------------------------------------------------------
# reading


_ts_pid: int | None = None  # the process in which featstore started using TensorStore
_inherited: list[Any] = []  # TensorStore handles a forked child must neither use nor destroy


def _tensorstore() -> Any:
    """The tensorstore module, or None: not installed, turned off, or unusable in this process.

    TensorStore aborts a forked child that uses it after its parent did ("fork() use
    detected"), so such a child (a DataLoader worker, say) reads with another engine.
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


class Engine:
    """How a store's rows are read. Capabilities say where an engine may be chosen."""

    name = ""
    remote = False  # reads object storage
    fork_safe = True  # usable in a forked child of a process that used it

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.info = layout.info

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(features, masks, embedding) of these physical rows (sorted, unique)."""
        raise NotImplementedError

    def usable(self) -> bool:
        return True

    def close(self) -> None:
        pass


class DirectEngine(Engine):
    """Byte ranges of featstore's own layout (`featstore.store._direct`): local and remote, fork-safe."""

    name = "direct"
    remote = True

    def usable(self) -> bool:
        r = self.layout.readers
        return isinstance(r[FEATURES], ShardedRows) and isinstance(r[MASKS], ChunkedRows | ShardedRows)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        info, r = self.info, self.layout.readers
        feats = np.empty((len(rows), *info.feature_shape()), dtype=info.dtype)
        masks = np.empty((len(rows), info.grid, info.grid), dtype=np.uint8)
        r[FEATURES].read(rows, feats)  # type: ignore[union-attr]
        r[MASKS].read(rows, masks)  # type: ignore[union-attr]
        return feats, masks, _embedding(self.layout, rows)


def _embedding(layout: Layout, rows: np.ndarray) -> np.ndarray | None:
    reader = layout.readers.get(EMBEDDING)
    if not layout.info.embedding_dim:
        return None
    out = np.empty((len(rows), layout.info.embedding_dim), dtype=np.float32)
    if reader is None:
        out[:] = np.asarray(ZarrEngine(layout).array(EMBEDDING).get_orthogonal_selection((rows,)))
    else:
        reader.read(rows, out)
    return out


class TensorStoreEngine(Engine):
    """TensorStore's zarr3 driver (local files only); concurrent per-row reads; not fork-safe."""

    name = "tensorstore"
    fork_safe = False

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self._ts: dict[str, Any] = {}
        self._module = _tensorstore() if layout.location.is_local else None

    def usable(self) -> bool:
        return self._module is not None

    def _array(self, name: str) -> Any:
        global _ts_pid
        if name not in self._ts:
            ts = self._module
            _ts_pid = os.getpid()
            path = os.path.join(self.layout.location.url, name)
            if "context" not in self._ts:
                # A small cache keeps shard indexes: 1.3-1.5x more random rows/s in 64-row batches.
                self._ts["context"] = ts.Context({"cache_pool": {"total_bytes_limit": TS_CACHE_BYTES}})  # type: ignore[union-attr]
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
            self._ts[name] = ts.open(spec, read=True, open=True, context=self._ts["context"]).result()  # type: ignore[union-attr]
        return self._ts[name]

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        feats, masks = self._array(FEATURES), self._array(MASKS)
        futures = [feats[int(i)].read() for i in rows]
        mask_future = masks[rows].read()
        return np.stack([f.result() for f in futures]), mask_future.result(), _embedding(self.layout, rows)

    def close(self) -> None:
        if _ts_pid is not None and _ts_pid != os.getpid():  # a forked child: set the parent's handles aside
            _inherited.append(self._ts)
        self._ts = {}


class ZarrEngine(Engine):
    """zarr-python (`asyncio.gather` of per-row reads); any layout zarr reads, local or remote."""

    name = "zarr"
    remote = True

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self._group: Any = None
        self._pid = -1

    def array(self, name: str) -> Any:
        if self._group is None or self._pid != os.getpid():
            self._group, self._pid = zarr_group(self.layout.location), os.getpid()
        return self._group[name]

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        feats, masks = self.array(FEATURES).async_array, self.array(MASKS).async_array
        emb = self.array(EMBEDDING).async_array if self.info.embedding_dim else None
        return _run(self._gather(feats, masks, emb, rows))

    @staticmethod
    async def _gather(feats: Any, masks: Any, emb: Any, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        import asyncio

        got, mask = await asyncio.gather(
            asyncio.gather(*(feats.getitem(int(i)) for i in rows)),
            masks.get_orthogonal_selection((rows,)),
        )
        e = None if emb is None else np.asarray(await emb.get_orthogonal_selection((rows,)))
        return np.stack(got), np.asarray(mask), e  # type: ignore[return-value]


def zarr_group(location: Location, mode: str = "r") -> Any:
    """The store as a zarr-python group, from the arrays' own metadata: featstore reads
    what they say, never the consolidated copy (which an edit by another tool can leave behind)."""
    import zarr

    try:
        if location.is_local:
            return zarr.open_group(location.url, mode=mode, zarr_format=3, use_consolidated=False)  # type: ignore[arg-type]
        from zarr.storage import FsspecStore

        from featstore.store.location import fsspec_options, limit_retries

        store = FsspecStore.from_url(location.url, storage_options=fsspec_options(location), read_only=mode == "r")
        limit_retries(store.fs)
        return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)  # type: ignore[arg-type]
    except Exception as e:  # zarr's own errors (GroupNotFoundError, metadata validation)
        raise CorruptStoreError(f"{location}: not a Zarr v3 group, or damaged ({type(e).__name__}: {e})") from None


ENGINES: dict[str, type[Engine]] = {"direct": DirectEngine, "tensorstore": TensorStoreEngine, "zarr": ZarrEngine}


def engine_order(engine: str | Sequence[str]) -> tuple[str, ...]:
    """The engines to try, in order, for an `engine=` argument; ValueError for unknown names."""
    order = tuple(ENGINES) if engine == "auto" else (engine,) if isinstance(engine, str) else tuple(engine)
    unknown = [e for e in order if e not in ENGINES]
    if unknown or not order:
        raise ValueError(f"engine must be 'auto', one of {tuple(ENGINES)} or a sequence of them, not {engine!r}")
    return order


def _choose(layout: Layout, order: tuple[str, ...], *, explicit: bool) -> Engine:
    """The one place an engine is chosen: the first in `order` able to read this store here."""
    for name in order:
        cls = ENGINES[name]
        if not layout.location.is_local and not cls.remote:
            if explicit:
                raise StoreError(f"{layout.location}: engine {name!r} reads local stores only")
            continue
        eng = cls(layout)
        if eng.usable():
            return eng
        if explicit:
            if name == "tensorstore":
                raise ImportError("engine 'tensorstore' needs the tensorstore package (pip install featstore[fast])")
            raise StoreError(f"{layout.location}: engine {name!r} cannot read this layout (compressed features?)")
    raise StoreError(f"{layout.location}: none of the engines {order} can read this store")


class ZarrFeatureStore(FeatureStore):
    """Reads a Zarr v3 store (layout 1 or 2), local or remote, with the engine chosen at open:
    "direct" (featstore's layout, any backend, fork-safe), "tensorstore" (local, when
    installed), "zarr" (zarr-python, any layout). `engine="auto"` tries them in that order.
    """

    format = "zarr"

    def __init__(self, location: Location, *, engine: str | Sequence[str] = "auto") -> None:
        order = engine_order(engine)
        blobs = open_blobs(location)
        try:
            self._layout = Layout(blobs)
        except BaseException:
            blobs.close()
            raise
        super().__init__(location, self._layout.attrs, self._layout.num_rows)
        self._order = order
        self._explicit = isinstance(engine, str) and engine != "auto"
        self._engine = _choose(self._layout, order, explicit=self._explicit)
        self._pid = os.getpid()

    @property
    def engine(self) -> str:
        return self._current().name

    def _current(self) -> Engine:
        if self._pid != os.getpid() and not self._engine.fork_safe:  # a forked child: see _tensorstore()
            self._engine.close()
            self._engine = _choose(
                self._layout, tuple(n for n in self._order if ENGINES[n].fork_safe) or ("zarr",), explicit=False
            )
            self._pid = os.getpid()
        return self._engine

    @property
    def shard_rows(self) -> int:
        return self._layout.shard_rows

    @property
    def layout_version(self) -> int:
        return self._layout.version

    def _read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self._current().read(self._layout.physical(indices))

    def _read_column(self, name: str) -> Any:
        rows = self._layout.physical(np.arange(self._n, dtype=np.int64))
        reader = self._layout.readers.get(name)
        if reader is None:
            values = ZarrEngine(self._layout).array(name).get_orthogonal_selection((rows,))
            return [str(v) for v in values.tolist()] if name in STRING_ARRAYS else np.asarray(values)
        tail = _row_shape(name, self._info)
        out = np.empty((len(rows), *tail), dtype=object if name in STRING_ARRAYS else np.int32)
        reader.read(rows, out)
        return [str(v) for v in out.tolist()] if name in STRING_ARRAYS else out

    def array_details(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, m in self._layout.meta.items():
            codecs = m.get("codecs", ())
            sharded = codecs and isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed"
            grid = list(m["chunk_grid"]["configuration"]["chunk_shape"])
            out[name] = {
                "shape": list(m["shape"]),
                "dtype": _dtype_name(m),
                "chunks": list(codecs[0]["configuration"]["chunk_shape"]) if sharded else grid,
                "shards": grid if sharded else None,
                "codecs": _codec_names(codecs),
            }
        return out

    def close(self) -> None:
        self._engine.close()
        for r in self._layout.readers.values():
            if r is not None:
                r.close()
        self._layout.blobs.close()


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
