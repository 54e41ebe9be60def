"""`StartGuard`: one build of a store per machine, decided before the model loads.

A store's own ownership records (Zarr shard claims, the HDF5 lock, distributed leases)
are taken when its writer opens, which needs the loaded model's description. Two
builds started at the same instant would both pass `refuse_busy_store` and load their
models, and the second would be refused only then. The guard closes that window on one
machine: an exclusive `flock` on a file named after the store, in a folder of the
temporary directory, taken before the model loads and held until the build returns.
The kernel drops it when the process dies, so a killed build leaves nothing to clean
up; the lock files (empty but for a pid) stay, which keeps the lock on one inode.

Not covered: builds of one store from two machines (a shared filesystem, object
storage). There the second is refused when its writer opens, after its model loaded.
Processes of one distributed build share their store and do not take the guard.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from featstore.errors import StoreLockedError
from featstore.store.location import Location


def locked_by(fd: int) -> str | None:
    """Take `fd`'s exclusive flock without waiting: None when taken, else the pid its
    holder wrote in the file ("unknown" if none). The caller closes `fd` either way."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    return None


def busy(where: object, pid: str) -> StoreLockedError:
    return StoreLockedError(f"{where} is being written by another featstore build (pid {pid})")


def _lock_dir() -> Path:
    # per user: another user's folder in a shared /tmp could not be written
    return Path(tempfile.gettempdir()) / f"featstore-locks-{os.getuid() if hasattr(os, 'getuid') else 0}"


def output_identity(location: Location) -> str:
    # the same local store reached through a symlink or a relative path is one store
    return os.path.realpath(location.url) if location.is_local else location.url.rstrip("/")


class StartGuard:
    """Use as a context manager; `StoreLockedError` if another build on this machine holds it."""

    def __init__(self, location: Location) -> None:
        self.location = location
        digest = hashlib.sha256(output_identity(location).encode()).hexdigest()[:24]
        self.path = _lock_dir() / f"{digest}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if (pid := locked_by(fd)) is not None:
            os.close(fd)
            raise busy(self.location, pid)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def __enter__(self) -> StartGuard:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
