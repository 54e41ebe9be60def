"""`StoreWriter`: the pipeline stage that writes a store (the `Writer` protocol).

Durability:
- Zarr: rows are buffered and written a whole shard at a time; `num_rows` is raised
  only after the shard is on disk (`ZarrAppender`). A crash loses at most the open
  shard; the store always opens with its committed rows, and a rerun appends the rest.
- HDF5: the file is never modified in place (HDF5 metadata does not survive a crash,
  see `featstore.store._hdf5`). Rows are staged in a Zarr store `PATH.featstore-stage.zarr`
  (crash-safe as above, resumed by a rerun) and `close()` writes the old rows plus the
  staged ones into `PATH.featstore-tmp`, renames it over PATH and deletes the stage.
  So every HDF5 run that adds rows rewrites the whole file; grow big stores in Zarr.

`overwrite=True` re-encodes everything into a new store at `PATH.featstore-tmp`; the
old store stays valid and readable until `close()`, which swaps the new one in
(HDF5: one atomic rename; Zarr directories: rename old to `PATH.featstore-old`, new
to PATH, delete old; an interrupted swap is finished by the next writer). A crash
before `close()` leaves the old store as it was; the next writer deletes the partial
new one. Zarr readers open during a swap should reopen: they read by file name.

A lock file `.NAME.featstore-lock` beside the store is held (`fcntl.flock`) for the
writer's lifetime, so two builds never write one store.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import shutil
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from featstore.batches import EncodedBatch, EncodingInfo, Failure
from featstore.errors import CorruptStoreError, OutputError, StoreError, StoreLockedError
from featstore.store.base import (
    LAYOUT_VERSION,
    FeatureStore,
    check_compatible,
    encoded_batches,
    info_from_attrs,
    store_format,
)

TMP_SUFFIX = ".featstore-tmp"
OLD_SUFFIX = ".featstore-old"
STAGE_SUFFIX = ".featstore-stage.zarr"
TRASH_SUFFIX = ".featstore-trash"


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.featstore-lock")


def new_attrs(info: EncodingInfo) -> dict[str, Any]:
    from featstore import __version__

    return {
        "featstore_version": __version__,
        "layout_version": LAYOUT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **info.to_attrs(),
        "num_rows": 0,
        "failed": [],
    }


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _discard(path: Path) -> None:
    """Delete a store all at once: a half-deleted Zarr store could open with rows missing."""
    if path.exists():
        trash = sibling(path, TRASH_SUFFIX)
        _remove(trash)
        os.rename(path, trash)
        _remove(trash)


class StoreLock:
    """An exclusive `flock` on `.NAME.featstore-lock` beside the store, holding our pid."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = lock_path(store)
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreLockedError(
                    f"{self.store} is being written by another featstore build (pid {pid})"
                ) from None
            try:  # the holder before us may have deleted the file on release: lock the current one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it; see acquire
            os.close(self.fd)
            self.fd = None


def recover(path: Path) -> None:
    """Finish an interrupted overwrite swap, and drop a partial new store (lock held)."""
    tmp, old = sibling(path, TMP_SUFFIX), sibling(path, OLD_SUFFIX)
    if old.exists():
        if not path.exists() and tmp.exists():  # old was moved away, the complete new one not yet in
            os.rename(tmp, path)
        _remove(old)
    for leftover in (tmp, sibling(path, TRASH_SUFFIX), sibling(sibling(path, STAGE_SUFFIX), TRASH_SUFFIX)):
        _remove(leftover)


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


def open_store_writer(
    path: str | os.PathLike[str], info: EncodingInfo, *, overwrite: bool, shard_rows: int | None = None
) -> StoreWriter:
    """Open (creating if needed) the store at `path` for appending rows made as `info` describes.

    `shard_rows` applies to a new store (default: shards of up to 64 MiB); an existing one keeps its own.
    Raises IncompatibleStoreError if the store holds rows made differently,
    StoreLockedError if another build writes it, CorruptStoreError if it is damaged
    (pass overwrite=True to replace it).
    """
    path = Path(path)
    fmt = store_format(path)
    if shard_rows is not None and shard_rows < 1:
        raise StoreError(f"shard_rows must be positive, not {shard_rows}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {path.parent}: {e}") from None
    lock = StoreLock(path)
    lock.acquire()
    try:
        recover(path)
        return StoreWriter(path, fmt, info, overwrite=overwrite, shard_rows=shard_rows, lock=lock)
    except BaseException:
        lock.release()
        raise


class StoreWriter:
    """Appends encoded rows to a store; see the module docstring. Use `open_store_writer`."""

    def __init__(
        self, path: Path, fmt: str, info: EncodingInfo, *, overwrite: bool, shard_rows: int | None, lock: StoreLock
    ) -> None:
        self._base: FeatureStore | None = None  # HDF5: the file being extended
        try:
            self._open(path, fmt, info, overwrite=overwrite, shard_rows=shard_rows, lock=lock)
        except BaseException:
            if self._base is not None:
                self._base.close()
            raise

    def _open(
        self, path: Path, fmt: str, info: EncodingInfo, *, overwrite: bool, shard_rows: int | None, lock: StoreLock
    ) -> None:
        from featstore.store import open_store
        from featstore.store._zarr import ZarrAppender, create_zarr_store, default_shard_rows

        self.path = path
        self.format = fmt
        self.info = info
        self.overwrite = overwrite
        self._lock = lock
        self._closed = False
        self._new_failures: list[Failure] = []
        self._old_failures: list[Failure] = []
        shard_rows = shard_rows or default_shard_rows(info)
        tmp = sibling(path, TMP_SUFFIX)

        if fmt == "zarr":
            self._swap = overwrite and path.exists()
            if overwrite or not path.exists():
                create_zarr_store(tmp, new_attrs(info), info, shard_rows)
                if not self._swap:
                    os.rename(tmp, path)  # a fresh store appears complete (0 rows) or not at all
                target = tmp if self._swap else path
            else:
                self._old_failures = self._check_existing(path, info)
                target = path
        else:
            self._swap = False
            stage = sibling(path, STAGE_SUFFIX)
            if overwrite:
                _discard(stage)
            elif path.exists():
                self._base = open_store(path)
                self._old_failures = self._base.failed
                check_compatible(path, self._base.info, info)
            if stage.exists():
                try:
                    self._check_existing(stage, info)
                except CorruptStoreError:  # a crash while creating it: it held no rows
                    _discard(stage)
            if not stage.exists():
                create_zarr_store(tmp, new_attrs(info), info, shard_rows)
                os.rename(tmp, stage)
            target = stage

        self._rows = ZarrAppender(target)
        self._present: set[str] = set(self._rows.committed_keys()) | set(self._rows.keys)
        if self._base is not None:
            self._present |= set(self._base.keys())

    @staticmethod
    def _check_existing(path: Path, info: EncodingInfo) -> list[Failure]:
        from featstore.store import open_store

        with open_store(path, engine="zarr") as existing:
            check_compatible(path, existing.info, info)
            return existing.failed

    # -- the Writer protocol -------------------------------------------------------------

    def pending(self, keys: Sequence[str]) -> set[str]:
        """Keys not yet in the store (with overwrite: not yet written by this run)."""
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
            self._present.add(item.key)
            take.append(i)
        if not take:
            return
        rows = slice(None) if len(take) == len(batch.items) else np.asarray(take)  # a slice: no copy
        try:
            self._rows.append(
                [batch.items[i].key for i in take],
                [batch.items[i].path for i in take],
                batch.features[rows],
                np.asarray(batch.masks[rows], dtype=np.uint8),
                np.asarray(batch.orig_size_hw[rows], dtype=np.int32),
            )
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None

    def record_failures(self, failures: Sequence[Failure]) -> None:
        self._new_failures.extend(Failure(_printable(f.key), f.reason) for f in failures)

    def close(self) -> None:
        """Commit every row written, store the failures, swap in a rebuilt store; release the lock."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.format == "zarr":
                self._close_zarr()
            else:
                self._close_hdf5()
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None
        finally:
            if self._base is not None:
                self._base.close()
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _check_batch(self, batch: EncodedBatch) -> None:
        b, shape = len(batch.items), self.info.feature_shape()
        g = self.info.grid
        if batch.features.shape != (b, *shape) or batch.features.dtype != np.dtype(self.info.dtype):
            raise StoreError(
                f"{self.path}: batch features {batch.features.shape} {batch.features.dtype} do not match the "
                f"store's ({b}, {', '.join(map(str, shape))}) {self.info.dtype}"
            )
        if batch.masks.shape != (b, g, g) or np.shape(batch.orig_size_hw) != (b, 2):
            raise StoreError(
                f"{self.path}: batch masks {batch.masks.shape} / orig_size_hw {np.shape(batch.orig_size_hw)} "
                f"do not match ({b}, {g}, {g}) / ({b}, 2)"
            )

    def _close_zarr(self) -> None:
        self._rows.commit({"failed": merge_failures(self._old_failures, self._new_failures, self._present)})
        if self._swap:
            tmp, old = sibling(self.path, TMP_SUFFIX), sibling(self.path, OLD_SUFFIX)
            os.rename(self.path, old)
            os.rename(tmp, self.path)
            _remove(old)

    def _close_hdf5(self) -> None:
        from featstore.store import open_store
        from featstore.store._hdf5 import write_hdf5

        stage = self._rows.path
        self._rows.commit({})
        failed = merge_failures(self._old_failures, self._new_failures, self._present)
        base = self._base
        old_failed = base.attrs["failed"] if base is not None else None
        if base is None or self._rows.num_rows > 0 or failed != old_failed:
            attrs = base.attrs if base is not None else dict(self._rows.attrs)
            attrs["failed"] = failed
            tmp = sibling(self.path, TMP_SUFFIX)
            _remove(tmp)
            with open_store(stage) as staged:
                info = info_from_attrs(attrs, self.path)
                base_keys = frozenset(base.keys()) if base is not None else frozenset()
                # A crash after the rename below but before the stage is deleted leaves
                # staged rows that are already in the file: skip them.
                rows = chain(
                    encoded_batches(base) if base is not None else (),
                    encoded_batches(staged, skip_keys=base_keys),
                )
                count = len(base_keys) + sum(k not in base_keys for k in staged.keys())  # noqa: SIM118 (rows, not keys)
                write_hdf5(tmp, attrs, info, rows, count)
            os.replace(tmp, self.path)
        _discard(stage)
