"""Zarr v3 stores, local or on object storage: the reader and the shard writer.

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

import datetime as dt
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from featstore.batches import EncodingInfo
from featstore.errors import CorruptStoreError, StoreError, StoreLockedError
from featstore.store._blobs import Blobs, LocalBlobs, RemoteBlobs, open_blobs
from featstore.store._direct import ChunkedRows, ShardedRows, zarr_rows
from featstore.store.base import (
    ARRAYS,
    EMBEDDING,
    FEATURES,
    KEYS,
    LAYOUT_VERSION,
    MASKS,
    ORIG_SIZE,
    SOURCES,
    FeatureStore,
    check_arrays,
    check_compatible,
    expected_arrays,
    info_from_attrs,
    step_rows,
)
from featstore.store.location import Location
from featstore.store.plans import close_plans, plans_end

STRING_ARRAYS = (KEYS, SOURCES)
CLAIMS = "claims"  # one chunk per shard: the writer that owns it (see ZarrShardWriter)
TS_CACHE_BYTES = 8 * 2**20


def default_shard_rows(info: EncodingInfo) -> int:
    """Rows per shard of a new store: the largest power of two within 64 MiB of features.

    Looked up by the writer at open time (tests patch it to get small shards through the CLI).
    """
    return step_rows(info)


# ---------------------------------------------------------------------------------------
# metadata


def _metadata_documents(attrs: dict[str, Any], info: EncodingInfo, shard_rows: int) -> dict[str, dict[str, Any]]:
    """key -> zarr.json document of a new, empty store, as zarr-python itself writes them."""
    import zarr
    from zarr.codecs import BytesCodec, VLenUTF8Codec, ZstdCodec
    from zarr.storage import MemoryStore

    store = MemoryStore()
    shape, g, s = tuple(info.feature_shape()), info.grid, shard_rows
    root = zarr.open_group(store, mode="w", zarr_format=3, attributes=attrs)
    root.create_array(
        FEATURES, shape=(0, *shape), dtype=info.dtype, chunks=(1, *shape), shards=(s, *shape), compressors=None
    )
    root.create_array(MASKS, shape=(0, g, g), dtype="uint8", chunks=(s, g, g), compressors=ZstdCodec(level=3))
    for name in STRING_ARRAYS:
        root.create_array(
            name, shape=(0,), dtype=str, chunks=(s,), serializer=VLenUTF8Codec(), compressors=ZstdCodec(level=3)
        )
    root.create_array(ORIG_SIZE, shape=(0, 2), dtype="int32", chunks=(s, 2), compressors=ZstdCodec(level=3))
    root.create_array(CLAIMS, shape=(0,), dtype=str, chunks=(1,), serializer=VLenUTF8Codec(), compressors=None)
    if info.embedding_dim:
        e = info.embedding_dim
        root.create_array(
            EMBEDDING, shape=(0, e), dtype="float32", chunks=(s, e), serializer=BytesCodec(), compressors=None
        )
    return {k: json.loads(v.to_bytes()) for k, v in store._store_dict.items() if k.endswith("zarr.json")}


def _doc(data: bytes | None, what: str) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise CorruptStoreError(f"{what}: not JSON ({e})") from None
    return doc if isinstance(doc, dict) else None


def _dtype_name(meta: dict[str, Any]) -> str:
    return "str" if meta.get("data_type") == "string" else str(np.dtype(meta["data_type"]))


def _row_shape(name: str, info: EncodingInfo) -> tuple[int, ...]:
    return expected_arrays(info)[name][0] if name in expected_arrays(info) else ()


class Layout:
    """An opened Zarr store's metadata and committed shards: what readers and writers share.

    `commits=False` reads the metadata only (no listing, no keys chunks: the shards
    committed are then unknown until `load_commits()`), for a distributed build's
    processes, which read the commits of the units they take."""

    def __init__(self, blobs: Blobs, *, commits: bool = True) -> None:
        self.blobs = blobs
        self.location = blobs.location
        group = _doc(blobs.read("zarr.json"), f"{self.location}/zarr.json")
        if group is None:
            raise StoreError(f"no store at {self.location}")
        if group.get("zarr_format") != 3 or group.get("node_type") != "group":
            raise CorruptStoreError(f"{self.location}: not a Zarr v3 group, or damaged")
        self.attrs: dict[str, Any] = dict(group.get("attributes") or {})
        self.info = info_from_attrs(self.attrs, self.location)
        self.version = int(self.attrs["layout_version"])
        docs = blobs.read_many([f"{name}/zarr.json" for name in (*ARRAYS, CLAIMS)])
        self.claims_meta = _doc(docs.pop(), f"{self.location}/{CLAIMS}/zarr.json")
        self.meta: dict[str, dict[str, Any]] = {}
        for name, data in zip(ARRAYS, docs, strict=True):
            doc = _doc(data, f"{self.location}/{name}/zarr.json")
            if doc is not None and doc.get("node_type") == "array":
                self.meta[name] = doc
        try:
            found = {n: (tuple(m["shape"]), _dtype_name(m)) for n, m in self.meta.items()}
        except (KeyError, TypeError) as e:
            raise CorruptStoreError(f"{self.location}: damaged array metadata ({e})") from None
        check_arrays(self.location, self.info, self.attrs.get("num_rows", 0) if self.version == 1 else 0, found)
        self.readers: dict[str, ShardedRows | ChunkedRows | None] = {
            name: zarr_rows(blobs, name, self.meta.get(name), _row_shape(name, self.info), chunked=name != FEATURES)
            for name in expected_arrays(self.info)
        }
        feats = self.meta[FEATURES]
        shards = feats["codecs"][0] if feats.get("codecs") else {}
        grid = list(feats["chunk_grid"]["configuration"]["chunk_shape"])
        # Layout 2 records it; layout 1 had the features' shards (or chunks) of that many rows.
        self.shard_rows = int(self.attrs.get("shard_rows") or grid[0])
        self.sharded = isinstance(shards, dict) and shards.get("name") == "sharding_indexed"
        if commits:
            self.load_commits()

    def load_commits(self) -> None:
        """Which shards hold committed rows, and how many: `shards` (sorted) and `counts`."""
        s = self.shard_rows
        if self.version == 1:  # featstore 0.1: the first num_rows rows, whatever the chunks hold
            n = int(self.attrs["num_rows"])
            self.shards = np.arange(math.ceil(n / s), dtype=np.int64)
            self.counts = np.full(len(self.shards), s, dtype=np.int64)
            if n % s:
                self.counts[-1] = n % s
        else:
            keys = self.readers[KEYS]
            if not isinstance(keys, ChunkedRows) or keys.chunk_rows != s:
                raise CorruptStoreError(f"{self.location}: keys are not chunked a shard at a time (layout 2)")
            ids = sorted(_chunk_ids(self.blobs.list(f"{KEYS}/c")))
            chunks = keys.chunks(ids)
            self.shards = np.array(ids, dtype=np.int64)
            self.counts = np.array([_committed(c) for c in chunks], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_rows = int(self.starts[-1])

    def physical(self, indices: np.ndarray) -> np.ndarray:
        """Row numbers in the arrays of these committed rows (sorted in, sorted out)."""
        pos = np.searchsorted(self.starts, indices, side="right") - 1
        return self.shards[pos] * self.shard_rows + (indices - self.starts[pos])

    @property
    def extent(self) -> int:
        """Rows the arrays must span to hold every committed row."""
        if not len(self.shards):
            return 0
        return int(self.shards[-1] * self.shard_rows + self.counts[-1])


def _chunk_ids(keys: Sequence[str]) -> list[int]:
    out = []
    for k in keys:
        last = k.rsplit("/", 1)[-1]
        if last.isdigit():
            out.append(int(last))
    return out


def _committed(chunk: np.ndarray) -> int:
    """Rows of a keys chunk: those before the first empty key (keys are never empty)."""
    empty = np.flatnonzero(chunk == "")
    return int(empty[0]) if len(empty) else len(chunk)


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
    """The store as a zarr-python group (how zarr users open it too)."""
    import zarr

    try:
        if location.is_local:
            return zarr.open_group(location.url, mode=mode, zarr_format=3)  # type: ignore[arg-type]
        from zarr.storage import FsspecStore

        from featstore.store.location import fsspec_options, limit_retries

        store = FsspecStore.from_url(location.url, storage_options=fsspec_options(location), read_only=mode == "r")
        limit_retries(store.fs)
        return zarr.open_group(store, mode=mode, zarr_format=3)  # type: ignore[arg-type]
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


# ---------------------------------------------------------------------------------------
# writing


def new_attrs(info: EncodingInfo, featstore_version: str, shard_rows: int) -> dict[str, Any]:
    return {
        "featstore_version": featstore_version,
        "layout_version": LAYOUT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **info.to_attrs(),
        "embedding_dim": info.embedding_dim,
        "shard_rows": shard_rows,
        "failed": [],
    }


def _put_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")


def delete_store(blobs: Blobs) -> None:
    """Remove a store so that it never looks half-deleted: every shard's commit record (keys
    chunk) first, so readers see whole shards vanish; then the group's zarr.json (no store
    from here on; leftovers are invisible and overwritten by a new store); then the rest."""
    blobs.delete_many(blobs.list(f"{KEYS}/c"))
    blobs.delete_many(["zarr.json"])
    if isinstance(blobs, LocalBlobs):
        import shutil

        shutil.rmtree(blobs.location.path, ignore_errors=True)
    else:
        blobs.delete_many(blobs.list(""))


def create_store(blobs: Blobs, attrs: dict[str, Any], info: EncodingInfo, shard_rows: int) -> bool:
    """Write a new empty store; False if another writer created one meanwhile.

    The arrays' metadata first, then the group's `zarr.json` by a conditional create:
    the store exists from that one write on.
    """
    docs = _metadata_documents(attrs, info, shard_rows)
    blobs.write_many({k: _put_json(v) for k, v in docs.items() if k != "zarr.json"})
    return blobs.create("zarr.json", _put_json(docs["zarr.json"]))


def _running_here(claim: str) -> int | None:
    """The pid in a claim made on this host by a process that still runs, else None.

    Claims name host and pid (see `ZarrShardWriter._init_claims`) and are deleted by the
    writer when it closes, so one that remains belongs to a running build or a killed one.
    A claim of another host cannot be checked from here: it counts as left by a killed build.
    """
    import socket

    fields = dict(f.split("=", 1) for f in claim.split()[1:] if "=" in f)
    if fields.get("host") != socket.gethostname() or not fields.get("pid", "").isdigit():
        return None
    pid = int(fields["pid"])
    if pid == os.getpid():  # another writer object in this process (a writer releases its claims on close)
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: it runs
        pass
    return pid


def live_writer(blobs: Blobs, *, leases: bool = True) -> int | None:
    """The pid of a build that writes the store at `blobs` now, or None: a build on this
    host that claimed an unfinished shard and still runs, or (`leases`) a process of a
    distributed build holding a live lease on a unit (see `featstore.store.leases`)."""
    if leases:
        from featstore.store.leases import live_holder

        if (holder := live_holder(blobs)) is not None:
            return holder.pid
    ids = _chunk_ids(blobs.list(f"{CLAIMS}/c"))
    if not ids:
        return None
    meta = _doc(blobs.read(f"{CLAIMS}/zarr.json"), f"{blobs.location}/{CLAIMS}/zarr.json")
    claims = zarr_rows(blobs, CLAIMS, meta, ()) if meta is not None else None
    if not isinstance(claims, ChunkedRows):
        return None
    committed = _chunk_ids(blobs.list(f"{KEYS}/c"))
    last = max(committed) if committed else 0  # the last committed shard may be refilled
    open_ids = [i for i in ids if i >= last]
    for found in claims.chunks(open_ids) if open_ids else []:
        if (pid := _running_here(str(found[0]))) is not None:
            return pid
    return None


def open_for_writing(
    location: Location,
    info: EncodingInfo,
    *,
    version: str,
    overwrite: bool,
    shard_rows: int,
    guarded: bool = False,
    sole: bool = True,
    commits: bool = True,
) -> tuple[Blobs, Layout]:
    """Open the store at `location` for writing rows made as `info` says, creating it
    (metadata first, then the group by a conditional create) if there is none.

    Refuses a store a running build on this host writes (unless `guarded`), one of an
    older layout, and one whose rows were made differently. `overwrite` deletes the old
    store first. `sole`: no other process writes the store now, so temporary files
    found are a killed writer's and are deleted (a distributed build's processes leave
    them to the one that finalizes). `commits`: see `Layout`.
    """
    blobs = open_blobs(location)
    try:
        if isinstance(blobs, RemoteBlobs):
            blobs.check_reachable()
        exists = blobs.read("zarr.json") is not None
        if exists and not guarded and (pid := live_writer(blobs, leases=sole)) is not None:  # before touching
            raise StoreLockedError(f"{location} is being written by another featstore build (pid {pid})")
        if exists and overwrite:
            delete_store(blobs)
            exists = False
        if not exists:
            if isinstance(blobs, LocalBlobs) and sole:
                blobs.remove_partials("")
            attrs = new_attrs(info, version, shard_rows)
            create_store(blobs, attrs, info, shard_rows)  # if another won the race, we open its store
        layout = Layout(blobs, commits=commits)
        if layout.version == LAYOUT_VERSION:
            check_compatible(location, layout.info, info)
        if isinstance(blobs, LocalBlobs) and sole:
            blobs.remove_partials("")  # temporary files of a killed writer's unfinished writes
    except BaseException:
        blobs.close()
        raise
    return blobs, layout


class ZarrShardWriter:
    """Appends rows to a Zarr store (layout 2), a whole shard at a time.

    This writer owns the shards from the store's last partial one on: it refills that
    shard (its committed rows read back first, so the object is rewritten whole, never
    patched) and then writes new shards in order. The shard's commit record is created
    conditionally, so a second writer of the same shard fails instead of overwriting.
    It is also the store's metadata writer: it raises the arrays' shapes after each
    commit (for plain Zarr readers) and writes the group attributes at `commit`.
    """

    def __init__(
        self,
        location: Location,
        info: EncodingInfo,
        *,
        version: str,
        overwrite: bool,
        shard_rows: int,
        guarded: bool = False,
    ) -> None:
        """`guarded`: the caller already holds a lock that keeps other writers out (the
        HDF5 backend's stage), so claims found at open are never a running writer's."""
        self.location = location
        self.blobs, self.layout = open_for_writing(
            location, info, version=version, overwrite=overwrite, shard_rows=shard_rows, guarded=guarded
        )
        self._setup()
        self.committed_keys: list[str] = self._read_keys()
        self.extent = self.layout.extent
        self._init_claims()
        shards, counts = self.layout.shards, self.layout.counts
        s = self.shard_rows
        start = plans_end(self.blobs)  # a distributed build's planned shards stay its own
        if len(shards) and counts[-1] < s and int(shards[-1]) >= start:  # refill the last, partial shard
            self.shard = int(shards[-1])
            self.shard_committed = int(counts[-1])
            self._reload(self.shard, self.shard_committed)
        else:
            self.shard = max(int(shards[-1]) + 1 if len(shards) else 0, start)
            self.shard_committed = 0
        if start:
            close_plans(self.blobs)  # this writer's keys are not in the plans: a later plan starts anew
        # Claims on shards not yet complete, as found now: their writers are gone (one build
        # per store at a time), so this writer may take exactly these over.
        ids = [i for i in _chunk_ids(self.blobs.list(f"{CLAIMS}/c")) if i >= self.shard]
        found = self.claims.chunks(ids) if ids else []
        self.stale_claims = {i: str(c[0]) for i, c in zip(ids, found, strict=True)}
        self.my_claims: set[int] = set()
        self._claim(self.shard)  # from now on a second build on this host is refused at once

    def _setup(self) -> None:
        """Readers and the open shard's buffers, from `self.layout`."""
        location = self.location
        check = self.layout
        if check.version != LAYOUT_VERSION:
            raise StoreError(
                f"{location} has layout {check.version} (featstore 0.1): run `featstore upgrade {location}` "
                "once to append to it (reading works as is)"
            )
        feats = self.layout.readers[FEATURES]
        if not isinstance(feats, ShardedRows) or not feats.index_at_end or not self.layout.readers[MASKS]:
            raise StoreError(f"{location}: this store's layout was not written by featstore; convert it first")
        self.feats: ShardedRows = feats
        self.chunked = {n: r for n, r in self.layout.readers.items() if isinstance(r, ChunkedRows)}
        if len(self.chunked) != len(self.layout.readers) - 1:
            raise StoreError(f"{location}: this store's layout was not written by featstore; convert it first")
        self.info = self.layout.info
        self.attrs = dict(self.layout.attrs)
        s = self.shard_rows = self.layout.shard_rows
        g, e = self.info.grid, self.info.embedding_dim
        self.row_bytes = feats.row_bytes
        self._buf = bytearray(s * self.row_bytes + feats.index_bytes)
        self._rows = np.frombuffer(self._buf, dtype=feats.dtype, count=s * int(np.prod(feats.row_shape)))
        self._rows = self._rows.reshape(s, *feats.row_shape)
        self.masks = np.zeros((s, g, g), dtype=np.uint8)
        self.orig = np.zeros((s, 2), dtype=np.int32)
        self.emb = np.zeros((s, e), dtype=np.float32) if e else None
        self.keys: list[str] = []
        self.sources: list[str] = []

    def _init_claims(self) -> None:
        import socket
        import uuid

        meta = self.layout.claims_meta
        if meta is None:  # a store upgraded from layout 1: the claims array comes now
            docs = _metadata_documents(self.attrs, self.info, self.shard_rows)
            meta = docs[f"{CLAIMS}/zarr.json"]
            self.blobs.write_many({f"{CLAIMS}/zarr.json": _put_json(meta)})
        self.claims_meta = meta
        reader = zarr_rows(self.blobs, CLAIMS, meta, ())
        if not isinstance(reader, ChunkedRows):
            raise StoreError(f"{self.location}: claims array of an unknown layout")
        self.claims = reader
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.claim_text = f"{uuid.uuid4().hex} host={socket.gethostname()} pid={os.getpid()} since={now}"

    def _holder(self, shard: int) -> str | None:
        key = self.claims.key(shard)
        data = self.blobs.read(key)
        return None if data is None else str(self.claims.decode(data, key)[0])

    def _claim(self, shard: int) -> None:
        """Own `shard` before writing any of its objects: create its claim, or find it ours,
        or take over one that was stale when this writer opened; else StoreLockedError."""
        key, mine = self.claims.key(shard), self.claims.encode([self.claim_text])
        if self.blobs.create(key, mine):
            self.my_claims.add(shard)
            return
        holder = self._holder(shard)
        if holder == self.claim_text:
            return
        if holder is None or self.stale_claims.get(shard) == holder:
            self.blobs.write_many({key: mine})
            self.my_claims.add(shard)
            return
        raise StoreLockedError(
            f"{self.location}: shard {shard} is being written by another writer ({holder.split(' since')[0]}); "
            "one build per store at a time"
        )

    def _read_keys(self) -> list[str]:
        reader = self.chunked[KEYS]
        out: list[str] = []
        for chunk, k in zip(reader.chunks(self.layout.shards.tolist()), self.layout.counts.tolist(), strict=True):
            out += [str(v) for v in chunk[:k].tolist()]
        return out

    def _reload(self, shard: int, k: int) -> None:
        rows = np.arange(shard * self.shard_rows, shard * self.shard_rows + k, dtype=np.int64)
        r = self.chunked
        self.feats.read(rows, self._rows[:k])
        r[MASKS].read(rows, self.masks[:k])
        r[ORIG_SIZE].read(rows, self.orig[:k])
        if self.emb is not None:
            r[EMBEDDING].read(rows, self.emb[:k])
        for name, dest in ((KEYS, self.keys), (SOURCES, self.sources)):
            out = np.empty(k, dtype=object)
            r[name].read(rows, out)
            dest += [str(v) for v in out.tolist()]

    @property
    def committed(self) -> int:
        return len(self.committed_keys)

    def append(
        self,
        keys: list[str],
        sources: list[str],
        features: np.ndarray,
        masks: np.ndarray,
        orig: np.ndarray,
        embedding: np.ndarray | None,
    ) -> None:
        done = 0
        while done < len(keys):
            at = len(self.keys)
            k = min(len(keys) - done, self.shard_rows - at)
            self._rows[at : at + k] = features[done : done + k]
            self.masks[at : at + k] = masks[done : done + k]
            self.orig[at : at + k] = orig[done : done + k]
            if self.emb is not None and embedding is not None:
                self.emb[at : at + k] = embedding[done : done + k]
            self.keys += keys[done : done + k]
            self.sources += sources[done : done + k]
            done += k
            if len(self.keys) == self.shard_rows:
                self._commit_shard()

    def _commit_shard(self) -> None:
        """Write the open shard's objects, then its commit record; start the next shard."""
        k, s, r = len(self.keys), self.shard, self.chunked
        if k > self.shard_committed:
            end = k * self.row_bytes
            index = self.feats.index_for(k)
            self._buf[end : end + len(index)] = index
            objects: dict[str, bytes | memoryview] = {
                self.feats.key(s): memoryview(self._buf)[: end + len(index)],
                r[MASKS].key(s): r[MASKS].encode(self.masks[:k]),
                r[ORIG_SIZE].key(s): r[ORIG_SIZE].encode(self.orig[:k]),
                r[SOURCES].key(s): r[SOURCES].encode(self.sources),
            }
            if self.emb is not None:
                objects[r[EMBEDDING].key(s)] = r[EMBEDDING].encode(self.emb[:k])
            self._own(s)
            self.blobs.write_many(objects)
            if not self._still_own(s):  # taken over meanwhile: the new owner rewrites it all
                raise StoreLockedError(f"{self.location}: shard {s} was taken over by another writer meanwhile")
            record = r[KEYS].encode(self.keys)
            if self.shard_committed:  # a rewrite of this writer's own shard: replaces the record
                self.blobs.write_many({r[KEYS].key(s): record})
            elif not self.blobs.create(r[KEYS].key(s), record):
                raise StoreLockedError(
                    f"{self.location}: shard {s} was committed by another writer meanwhile "
                    "(two builds of one store at once?); nothing of this shard was kept"
                )
            self.committed_keys += self.keys[self.shard_committed :]
            self.shard_committed = k
            self.extent = max(self.extent, s * self.shard_rows + k)
            self._after_commit()
        if k == self.shard_rows:
            self.shard += 1
            self.shard_committed = 0
            self.keys, self.sources = [], []
            self.masks[:] = 0
            self.orig[:] = 0

    # Ownership and metadata: this single writer claims shard by shard and raises the
    # shapes after each commit; a distributed build's unit writer overrides these.
    def _own(self, shard: int) -> None:
        self._claim(shard)

    def _still_own(self, shard: int) -> bool:
        return self._holder(shard) == self.claim_text

    def _after_commit(self) -> None:
        self._update_shapes()

    def _update_shapes(self) -> None:
        docs = {}
        for name, meta in self.layout.meta.items():
            if meta["shape"][0] != self.extent:
                meta["shape"] = [self.extent, *meta["shape"][1:]]
                docs[f"{name}/zarr.json"] = _put_json(meta)
        shards = math.ceil(self.extent / self.shard_rows)
        if self.claims_meta["shape"][0] < shards:
            self.claims_meta["shape"] = [shards]
            docs[f"{CLAIMS}/zarr.json"] = _put_json(self.claims_meta)
        self.blobs.write_many(docs)

    def commit(self, attrs: dict[str, Any]) -> None:
        """Commit the open (partial) shard if it has new rows, then write these group attributes."""
        if len(self.keys) > self.shard_committed:
            self._commit_shard()
        if attrs:
            self.attrs.update(attrs)
            group = _doc(self.blobs.read("zarr.json"), "zarr.json") or {"zarr_format": 3, "node_type": "group"}
            group["attributes"] = self.attrs
            self.blobs.write_many({"zarr.json": _put_json(group)})

    def close(self) -> None:
        """Release this writer's claims (those still its own), so that the next build finds
        none of a running writer, then the connection."""
        try:
            mine = [self.claims.key(s) for s in sorted(self.my_claims) if self._holder(s) == self.claim_text]
            self.blobs.delete_many(mine)
        except Exception:
            pass
        self.my_claims.clear()
        self.blobs.close()


def upgrade_store(location: Location) -> tuple[int, int]:
    """Turn a layout-1 store (featstore 0.1) into layout 2 in place; (old, new) layout versions.

    Data objects stay; only commit records change: the last shard's keys chunk is cut to
    the committed rows, keys chunks beyond them are deleted, and then the attributes say
    layout 2 (the switch: a single write). Shapes are set to the committed rows last.
    """
    blobs = open_blobs(location)
    try:
        layout = Layout(blobs)
        if layout.version == LAYOUT_VERSION:
            return LAYOUT_VERSION, LAYOUT_VERSION
        keys = layout.readers[KEYS]
        if not isinstance(keys, ChunkedRows) or keys.chunk_rows != layout.shard_rows:
            raise StoreError(f"{location}: keys are not chunked a shard at a time; use `featstore convert` instead")
        s, n = layout.shard_rows, layout.num_rows
        last = math.ceil(n / s)
        if n % s:
            (chunk,) = keys.chunks([last - 1])
            blobs.write_many({keys.key(last - 1): keys.encode([str(v) for v in chunk[: n % s].tolist()])})
        blobs.delete_many(k for k in blobs.list(f"{KEYS}/c") if _chunk_ids([k]) and _chunk_ids([k])[0] >= last)
        attrs = dict(layout.attrs)
        attrs.pop("num_rows", None)
        attrs.update(layout_version=LAYOUT_VERSION, shard_rows=s, embedding_dim=layout.info.embedding_dim)
        blobs.write_many({"zarr.json": _put_json({"zarr_format": 3, "node_type": "group", "attributes": attrs})})
        docs = {}
        for name, meta in layout.meta.items():
            meta["shape"] = [n, *meta["shape"][1:]]
            docs[f"{name}/zarr.json"] = _put_json(meta)
        blobs.write_many(docs)
        return layout.version, LAYOUT_VERSION
    finally:
        blobs.close()


class ZarrSink(ZarrShardWriter):
    """The Zarr backend's side of `StoreWriter`."""

    def __init__(self, location: Location, info: EncodingInfo, **options: Any) -> None:
        super().__init__(location, info, **options)  # version, overwrite, shard_rows, guarded: see there
        from featstore.store.base import failures_from_attrs

        self.old_failures = failures_from_attrs(self.attrs)
        self.present: set[str] = set(self.committed_keys) | set(self.keys)

    def finish(self, failed: list[dict[str, str]]) -> None:
        self.commit({"failed": failed})
        self.close()

    def abort(self) -> None:
        self.close()
