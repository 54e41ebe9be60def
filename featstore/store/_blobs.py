"""Objects of a store by key: the only I/O the Zarr backend does, local or remote.

Both implementations give the primitives the commit protocol needs (see
`featstore.store`) and nothing more: read a whole object or byte ranges of it, write a
whole object atomically (readers see the old one or the new one), create one only if
it does not exist yet (the conditional write), list a prefix, delete.

- `LocalBlobs`: files under a folder. Writes go through zarr's `LocalStore` (a
  temporary file renamed into place; exclusive creates by `link`); ranged reads are one
  `preadv` per run straight into the caller's array, on descriptors kept open per file.
- `RemoteBlobs`: fsspec (s3fs for `s3://`). Ranged reads of a batch go out together
  (`cat_ranges`, concurrent); the conditional create is S3's `If-None-Match: *`.

Fork safety is handled here once: both re-create their per-process state (descriptors,
the fsspec filesystem) when they find themselves in a new process. fsspec's
filesystems notice a fork (a new instance per pid) and its event loop is reset in
the child; obstore's is not (a forked child hangs on its first request once the parent
has used it), which is why remote I/O goes through fsspec.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featstore.errors import CorruptStoreError, StorageTimeoutError, StoreError
from featstore.store.location import Location, fsspec_options, is_timeout, no_answer, remote_fs

OPEN_FILES = 64  # descriptors kept open per store
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


class Blobs(ABC):
    """Objects under one root, by `/`-separated key."""

    is_local: bool
    location: Location

    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """The whole object, or None if there is none."""

    def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.read(k) for k in keys]

    @abstractmethod
    def read_into(self, key: str, out: np.ndarray, at: np.ndarray, offsets: np.ndarray, row_bytes: int) -> None:
        """out[at[k]] = the `row_bytes` bytes at offsets[k] of object `key` (offsets ascending).

        One read per run of rows adjacent in the object and in `out`. FileNotFoundError if absent.
        """

    @abstractmethod
    def size(self, key: str) -> int | None: ...

    @abstractmethod
    def read_tail(self, key: str, nbytes: int) -> tuple[bytes, int]:
        """The last `nbytes` of the object and its size. FileNotFoundError if absent."""

    def read_tails(self, keys: Sequence[str], nbytes: int) -> list[tuple[bytes, int | None] | None]:
        """`read_tail` of several objects at once (None for absent ones; the size when known)."""
        out: list[tuple[bytes, int | None] | None] = []
        for k in keys:
            try:
                out.append(self.read_tail(k, nbytes))
            except FileNotFoundError:
                out.append(None)
        return out

    def read_runs(self, requests: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, int]]) -> None:
        """Several `read_into(key, out, at, offsets, row_bytes)` at once."""
        for key, out, at, offsets, row_bytes in requests:
            self.read_into(key, out, at, offsets, row_bytes)

    @abstractmethod
    def write_many(self, objects: Mapping[str, bytes | memoryview]) -> None:
        """Write each object whole (atomically per object), all at once."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist (atomically); False if it did."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix/` (relative to the root), sorted."""

    @abstractmethod
    def delete_many(self, keys: Iterable[str]) -> None: ...

    def close(self) -> None:
        return None


def _runs(at: np.ndarray, offsets: np.ndarray, row_bytes: int) -> list[tuple[int, int]]:
    joins = (np.diff(offsets) == row_bytes) & (np.diff(at) == 1)
    breaks = (np.flatnonzero(~joins) + 1).tolist()
    return list(zip([0, *breaks], [*breaks, len(at)], strict=True))


def pread_runs(fd: int, out: np.ndarray, at: np.ndarray, offsets: np.ndarray, row_bytes: int, name: str) -> None:
    """`Blobs.read_into` on an open file descriptor."""
    if len(at) == 0:
        return
    runs = _runs(at, offsets, row_bytes)
    if _WILLNEED is not None and len(runs) > 1:  # cold rows fetched from the disk concurrently
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
    if hasattr(os, "preadv"):  # straight into the array
        return os.preadv(fd, [out], offset)  # type: ignore[list-item]
    data = os.pread(fd, out.nbytes, offset)  # platforms without preadv: read, then copy
    out.reshape(-1)[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return len(data)


class _FdCache:
    """Open files by path, the least recently used closed beyond `limit`; reopened after a fork."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked child: its copies of the parent's descriptors
            self.close()
            self._pid = os.getpid()
        fd = self._open.get(path)
        if fd is not None:
            self._open.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._open[path] = fd
        while len(self._open) > self.limit:
            _, old = self._open.popitem(last=False)
            os.close(old)
        return fd

    def forget(self, path: str) -> None:
        fd = self._open.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)  # in a forked child, only the child's copy: the parent's stays open
        self._open.clear()


def _sync(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


class LocalBlobs(Blobs):
    is_local = True

    def __init__(self, location: Location) -> None:
        self.location = location
        self.root = location.path
        self._files = _FdCache(OPEN_FILES)
        self._zarr_store: Any = None
        self._pid = os.getpid()

    def _store(self) -> Any:
        if self._zarr_store is None or self._pid != os.getpid():
            from zarr.storage import LocalStore

            self._zarr_store, self._pid = LocalStore(self.root), os.getpid()
        return self._zarr_store

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def read(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            return None

    def read_into(self, key: str, out: np.ndarray, at: np.ndarray, offsets: np.ndarray, row_bytes: int) -> None:
        path = self._path(key)
        pread_runs(self._files.get(path), out, at, offsets, row_bytes, path)

    def size(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_tail(self, key: str, nbytes: int) -> tuple[bytes, int]:
        # A fresh descriptor: a shard replaced since it was last opened must be read anew,
        # and the one kept for its rows must describe the same file as its index.
        path = self._path(key)
        self._files.forget(path)
        fd = self._files.get(path)
        size = os.fstat(fd).st_size
        return os.pread(fd, min(nbytes, size), max(0, size - nbytes)), size

    def write_many(self, objects: Mapping[str, bytes | memoryview]) -> None:
        from zarr.core.buffer import default_buffer_prototype

        store, proto = self._store(), default_buffer_prototype()

        async def put_all() -> None:
            import asyncio

            await asyncio.gather(*(store.set(k, proto.buffer.from_bytes(v)) for k, v in objects.items()))

        _sync(put_all())

    def create(self, key: str, data: bytes) -> bool:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage._local import _put

        try:  # zarr's exclusive write: a temporary file linked into place, refused if the name exists
            _put(Path(self._path(key)), default_buffer_prototype().buffer.from_bytes(data), exclusive=True)
        except FileExistsError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        out = []
        for dirpath, _, names in os.walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            out += [f"{rel}/{n}" for n in names if not n.endswith(".partial")]
        return sorted(out)

    def delete_many(self, keys: Iterable[str]) -> None:
        for k in keys:
            with _suppress_missing():
                os.unlink(self._path(k))

    def remove_partials(self, prefix: str) -> None:
        """Temporary files of writes a killed process never finished (zarr's `*.partial`)."""
        for dirpath, _, names in os.walk(self._path(prefix)):
            for n in names:
                if n.endswith(".partial"):
                    with _suppress_missing():
                        os.unlink(os.path.join(dirpath, n))

    def close(self) -> None:
        self._files.close()


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, t: Any, e: Any, tb: Any) -> bool:
        return t is not None and issubclass(t, FileNotFoundError | NotADirectoryError)


class RemoteBlobs(Blobs):
    is_local = False

    def __init__(self, location: Location) -> None:
        self.location = location
        self.root = location.url.split("://", 1)[1]
        self._options = fsspec_options(location)
        self._fs_cached: Any = None
        self._pid = -1

    @property
    def fs(self) -> Any:
        if self._fs_cached is None or self._pid != os.getpid():
            try:
                self._fs_cached = remote_fs(self.location.protocol, self._options)
            except (ImportError, ValueError) as e:
                raise StoreError(f"{self.location}: cannot reach {self.location.protocol}:// ({e})") from None
            self._pid = os.getpid()
        return self._fs_cached

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _error(self, e: BaseException, what: str) -> StoreError | StorageTimeoutError:
        if is_timeout(e):
            return StorageTimeoutError(no_answer(f"{self.location}: cannot {what}"))
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, PermissionError):
            text += "; check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --storage-option)"
        return StoreError(f"{self.location}: cannot {what} ({text})")

    def read(self, key: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._error(e, f"read {key}") from None

    def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        paths = [self._path(k) for k in keys]
        try:
            got = self._get_all(paths)
        except Exception as e:
            raise self._error(e, "read") from None
        out: list[bytes | None] = []
        for p in paths:
            v = got.get(p)
            if isinstance(v, FileNotFoundError):
                out.append(None)
            elif isinstance(v, BaseException):
                raise self._error(v, f"read {p}")
            else:
                out.append(bytes(v) if v is not None else None)
        return out

    def _get_all(self, paths: list[str]) -> dict[str, Any]:
        """path -> bytes or the exception, one GET each, concurrently. (fsspec's `cat`
        first checks every path, one HEAD or listing each: twice the requests.)"""
        fs = self.fs
        if not getattr(fs, "async_impl", False):
            return dict(fs.cat(paths, on_error="return"))
        import asyncio

        from fsspec.asyn import sync

        async def one(p: str) -> Any:
            try:
                return await fs._cat_file(p)
            except Exception as e:
                return e

        async def all_of() -> list[Any]:
            return await asyncio.gather(*(one(p) for p in paths))

        return dict(zip(paths, sync(fs.loop, all_of), strict=True))

    def read_into(self, key: str, out: np.ndarray, at: np.ndarray, offsets: np.ndarray, row_bytes: int) -> None:
        if len(at) == 0:
            return
        runs = _runs(at, offsets, row_bytes)
        path = self._path(key)
        starts = [int(offsets[a]) for a, _ in runs]
        ends = [int(offsets[a]) + (b - a) * row_bytes for a, b in runs]
        try:
            parts = self.fs.cat_ranges([path] * len(runs), starts, ends)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._error(e, f"read {key}") from None
        flat = out.reshape(len(out), -1).view(np.uint8)
        for (a, b), data in zip(runs, parts, strict=True):
            if isinstance(data, BaseException):
                raise self._error(data, f"read {key}")
            if len(data) != (b - a) * row_bytes:
                raise CorruptStoreError(f"{path}: {(b - a) * row_bytes} bytes expected, got {len(data)}")
            first = int(at[a])
            flat[first : first + b - a] = np.frombuffer(data, dtype=np.uint8).reshape(b - a, -1)

    def read_tails(self, keys: Sequence[str], nbytes: int) -> list[tuple[bytes, int | None] | None]:
        if not keys:
            return []
        try:  # suffix ranges ("bytes=-N"): no HEAD request first
            got = self.fs.cat_ranges([self._path(k) for k in keys], [-nbytes] * len(keys), [None] * len(keys))
        except Exception as e:
            raise self._error(e, "read shard indexes") from None
        out: list[tuple[bytes, int | None] | None] = []
        for k, data in zip(keys, got, strict=True):
            if isinstance(data, FileNotFoundError):
                out.append(None)
            elif isinstance(data, BaseException):
                raise self._error(data, f"read {k}")
            else:
                out.append((bytes(data), None))
        return out

    def read_runs(self, requests: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, int]]) -> None:
        """Every run of every request as one concurrent `cat_ranges` call."""
        paths: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        places: list[tuple[np.ndarray, int, int, int]] = []  # (flat out, first row, rows, row_bytes)
        for key, out, at, offsets, row_bytes in requests:
            if len(at) == 0:
                continue
            flat = out.reshape(len(out), -1).view(np.uint8)
            for a, b in _runs(at, offsets, row_bytes):
                paths.append(self._path(key))
                starts.append(int(offsets[a]))
                ends.append(int(offsets[a]) + (b - a) * row_bytes)
                places.append((flat, int(at[a]), b - a, row_bytes))
        if not paths:
            return
        try:
            parts = self.fs.cat_ranges(paths, starts, ends)
        except Exception as e:
            raise self._error(e, "read rows") from None
        for path, (flat, first, rows, row_bytes), data in zip(paths, places, parts, strict=True):
            if isinstance(data, BaseException):
                raise self._error(data, f"read {path}")
            if len(data) != rows * row_bytes:
                raise CorruptStoreError(f"{path}: {rows * row_bytes} bytes expected, got {len(data)}")
            flat[first : first + rows] = np.frombuffer(data, dtype=np.uint8).reshape(rows, -1)

    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.info(self._path(key))["size"])
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._error(e, f"read {key}") from None

    def read_tail(self, key: str, nbytes: int) -> tuple[bytes, int]:
        size = self.size(key)
        if size is None:
            raise FileNotFoundError(self._path(key))
        start = max(0, size - nbytes)
        try:
            return bytes(self.fs.cat_file(self._path(key), start=start, end=size)), size
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._error(e, f"read {key}") from None

    def write_many(self, objects: Mapping[str, bytes | memoryview]) -> None:
        if not objects:
            return
        try:
            self.fs.pipe({self._path(k): bytes(v) if isinstance(v, memoryview) else v for k, v in objects.items()})
        except Exception as e:
            raise self._error(e, "write") from None

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._path(key), data, mode="create")
        except FileExistsError:
            return False
        except Exception as e:
            text = f"{e!r} {e}".lower()
            if "precondition" in text or "pre-condition" in text or "412" in text:
                return False
            raise self._error(e, f"write {key}") from None
        return True

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self._error(e, f"list {prefix}") from None
        n = len(self.root) + 1
        return sorted(p[n:] for p in found)

    def delete_many(self, keys: Iterable[str]) -> None:
        paths = [self._path(k) for k in keys]
        if paths:
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                pass
            except Exception as e:
                raise self._error(e, "delete") from None

    def check_reachable(self) -> None:
        """A one-line StoreError naming what is wrong: the bucket, or the credentials."""
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StoreError(f"{self.location}: bucket {bucket!r} does not exist") from None
        except PermissionError as e:
            raise self._error(e, f"access bucket {bucket!r}") from None
        except Exception as e:
            raise self._error(e, f"access bucket {bucket!r}") from None


def open_blobs(location: Location) -> Blobs:
    return LocalBlobs(location) if location.is_local else RemoteBlobs(location)
