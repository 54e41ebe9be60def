"""`StoreWriter`: the pipeline stage that writes a store (the `Writer` protocol).

It keeps what every format shares (each key once, names that cannot be keys become
failures, failures merged across runs) and hands rows to the backend's sink, which
owns durability: `featstore.store._zarr.ZarrSink` (shard-owned commits, local or object
storage; see `featstore.store`) or `featstore.store._hdf5.Hdf5Sink` (a staged rewrite
of a local file).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from featstore.batches import EncodedBatch, EncodingInfo, Failure
from featstore.errors import OutputError, StoreError, StoreLockedError
from featstore.store.location import Location, as_location


class RowSink(Protocol):
    """What a backend provides to `StoreWriter`."""

    present: set[str]  # keys already in the store
    old_failures: list[Failure]

    def append(
        self,
        keys: list[str],
        sources: list[str],
        features: np.ndarray,
        masks: np.ndarray,
        orig: np.ndarray,
        embedding: np.ndarray | None,
    ) -> None: ...

    def finish(self, failed: list[dict[str, str]]) -> None:
        """Commit every row appended and store `failed`."""

    def abort(self) -> None:
        """Release what the sink holds; committed rows stay."""


def _sink_class(fmt: str) -> Any:
    from featstore.store._hdf5 import Hdf5Sink
    from featstore.store._zarr import ZarrSink

    return {"zarr": ZarrSink, "hdf5": Hdf5Sink}[fmt]


def merge_failures(old: Iterable[Failure], new: Iterable[Failure], present: Any) -> list[dict[str, str]]:
    """Failures of earlier runs and this one, minus keys now in the store; the latest reason wins."""
    merged: dict[str, str] = {}
    for f in chain(old, new):
        if f.key not in present:
            merged.pop(f.key, None)
            merged[f.key] = f.reason
    return [{"key": k, "reason": r} for k, r in merged.items()]


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def refuse_busy_store(where: str | os.PathLike[str] | Location, *, leases: bool = True) -> None:
    """Raise StoreLockedError if a build on this machine is writing the store now: the
    check a build makes before it loads its model (seconds to minutes). Creates nothing.
    The writer checks again when it opens. `leases=False`: a process of a distributed
    build, which shares the store with the other processes' leases."""
    location = as_location(where)
    if location.format == "hdf5":
        from featstore.store._hdf5 import StoreLock

        StoreLock(location.path).check_free()
        return
    from featstore.store._blobs import open_blobs
    from featstore.store._zarr import live_writer

    blobs = open_blobs(location)
    if blobs.read("zarr.json") is not None and (pid := live_writer(blobs, leases=leases)) is not None:
        raise StoreLockedError(f"{location} is being written by another featstore build (pid {pid})")


def _make_parent(location: Location) -> None:
    """The folder a local store goes in, created if needed; OutputError if it cannot be written."""
    if not location.is_local:
        return
    try:
        location.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {location.path.parent}: {e}") from None
    if os.path.isdir(location.path.parent) and not os.access(location.path.parent, os.W_OK):
        raise OutputError(f"cannot create {location}: the folder {location.path.parent} cannot be written")


def open_store_writer(
    where: str | os.PathLike[str] | Location,
    info: EncodingInfo,
    *,
    overwrite: bool,
    shard_rows: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    featstore_version: str = "unknown",
) -> StoreWriter:
    """Open (creating if needed) the store at `where` for appending rows made as `info` describes.

    `shard_rows` applies to a new store (default: shards of up to 64 MiB); an existing one
    keeps its own. `featstore_version` is recorded in a new store's attributes.
    Raises IncompatibleStoreError if the store holds rows made differently,
    StoreLockedError if another build writes it, CorruptStoreError if it is damaged
    (pass overwrite=True to replace it), OutputError if it cannot be created.
    """
    location = as_location(where, storage_options)
    fmt = location.format
    if shard_rows is not None and shard_rows < 1:
        raise StoreError(f"shard_rows must be positive, not {shard_rows}")
    _make_parent(location)
    from featstore.store import _zarr

    rows = shard_rows or _zarr.default_shard_rows(info)
    try:
        sink = _sink_class(fmt)(location, info, version=featstore_version, overwrite=overwrite, shard_rows=rows)
    except OSError as e:
        if location.is_local and not os.path.isdir(location.url):  # it could not even be created
            raise OutputError(
                f"cannot create {location}: the folder {location.path.parent} cannot be written ({e.strerror or e})"
            ) from None
        raise _write_error(location, e) from None
    return StoreWriter(location, info, sink)


def recorded_resizer(where: str | os.PathLike[str] | Location) -> str | None:
    """The resizer that made the rows of the store at `where` (`base.resized_by`), or None
    where there is no readable store yet (what the build's own opening then says)."""
    from featstore.store import open_store
    from featstore.store.base import resized_by

    try:
        with open_store(where) as store:
            return resized_by(store.info)
    except Exception:  # no store, one being made, a damaged one: the writer's checks speak
        return None


def has_open_plan(where: str | os.PathLike[str] | Location) -> bool:
    """Whether the Zarr store at `where` has a distributed build's plan not yet finalized
    (a build of it should go on unit by unit, whatever the number of processes)."""
    location = as_location(where)
    if location.format != "zarr" or (location.is_local and not os.path.isdir(location.url)):
        return False
    from featstore.store._blobs import open_blobs
    from featstore.store.plans import latest_plan

    blobs = open_blobs(location)
    try:
        plan = latest_plan(blobs)
        if plan is None or plan.closed:
            return False
        from featstore.store._zarr import _doc

        group = _doc(blobs.read("zarr.json"), "zarr.json") or {}
        return (group.get("attributes") or {}).get("plan") != plan.index
    finally:
        blobs.close()


def open_unit_store(
    where: str | os.PathLike[str] | Location,
    info: EncodingInfo,
    *,
    storage_options: Mapping[str, Any] | None = None,
    featstore_version: str = "unknown",
) -> Any:
    """Open (creating if needed) a Zarr store for one process of a distributed build:
    a `featstore.store.units.UnitStore` (plan, leases, the unit writer stage, finalize)."""
    location = as_location(where, storage_options)
    if location.format != "zarr":
        raise StoreError(f"{location}: a distributed build writes Zarr stores (.zarr) only")
    _make_parent(location)
    from featstore.store import _zarr
    from featstore.store.units import UnitStore

    try:
        return UnitStore.open(location, info, version=featstore_version, shard_rows=_zarr.default_shard_rows(info))
    except OSError as e:
        raise _write_error(location, e) from None


def _write_error(location: Location, e: OSError) -> OutputError:
    """The README's one line for a store write that failed (disk full, read-only, ...)."""
    reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return OutputError(f"cannot write output {location}: {reason}; work committed before this point is kept")


class StoreWriter:
    """Appends encoded rows to a store; see the module docstring. Use `open_store_writer`."""

    def __init__(self, location: Location, info: EncodingInfo, sink: RowSink) -> None:
        self.location = location
        self.path = location.path if location.is_local else location.url
        self.info = info
        self._sink = sink
        self._present = sink.present
        self._new_failures: list[Failure] = []
        self._closed = False

    # -- the Writer protocol -------------------------------------------------------------

    def pending(self, keys: Sequence[str]) -> set[str]:
        """Keys not yet in the store."""
        return {k for k in keys if k not in self._present}

    def write(self, batch: EncodedBatch) -> None:
        """Add the rows of keys not yet in the store; each key once."""
        self._check_batch(batch)
        take: list[int] = []
        for i, item in enumerate(batch.items):
            if item.key in self._present:
                continue
            try:
                item.key.encode("utf-8")
                item.path.encode("utf-8")
            except UnicodeEncodeError:
                reason = "the file name is not valid UTF-8, so it cannot be a store key"
                self._new_failures.append(Failure(_printable(item.key), reason))
                continue
            if not item.key:
                self._new_failures.append(Failure(item.key, "an empty key cannot be stored"))
                continue
            self._present.add(item.key)
            take.append(i)
        if not take:
            return
        rows = slice(None) if len(take) == len(batch.items) else np.asarray(take)  # a slice: no copy
        try:
            self._sink.append(
                [batch.items[i].key for i in take],
                [batch.items[i].path for i in take],
                batch.features[rows],
                np.asarray(batch.masks[rows], dtype=np.uint8),
                np.asarray(batch.orig_size_hw[rows], dtype=np.int32),
                None
                if batch.embedding is None or not self.info.embedding_dim
                else np.asarray(batch.embedding[rows], dtype=np.float32),
            )
        except OSError as e:
            raise _write_error(self.location, e) from None

    def record_failures(self, failures: Sequence[Failure]) -> None:
        self._new_failures.extend(Failure(_printable(f.key), f.reason) for f in failures)

    def close(self) -> None:
        """Commit every row written and store the failures."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sink.finish(merge_failures(self._sink.old_failures, self._new_failures, self._present))
        except OSError as e:
            raise _write_error(self.location, e) from None
        finally:
            self._sink.abort()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _check_batch(self, batch: EncodedBatch) -> None:
        b, shape = len(batch.items), tuple(self.info.feature_shape())
        g = self.info.grid
        if batch.features.shape != (b, *shape) or batch.features.dtype != np.dtype(self.info.dtype):
            raise StoreError(
                f"{self.location}: batch features {batch.features.shape} {batch.features.dtype} do not match the "
                f"store's ({b}, {', '.join(map(str, shape))}) {self.info.dtype}"
            )
        if batch.masks.shape != (b, g, g) or np.shape(batch.orig_size_hw) != (b, 2):
            raise StoreError(
                f"{self.location}: batch masks {batch.masks.shape} / orig_size_hw {np.shape(batch.orig_size_hw)} "
                f"do not match ({b}, {g}, {g}) / ({b}, 2)"
            )
        e = self.info.embedding_dim
        got = None if batch.embedding is None else np.shape(batch.embedding)
        if e and got != (b, e):  # (a store without embeddings ignores them)
            raise StoreError(f"{self.location}: batch embedding {got} does not match the store's ({b}, {e or 'none'})")
