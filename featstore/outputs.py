"""Checks on a build's outputs that `build` makes before it loads the model.

Loading a model takes seconds to minutes; an output that cannot be written should be
refused before that, in one line, not after. Checked here: a local store or `--npy-dir`
whose path runs through a file, or whose nearest existing folder cannot be written; an
`--npy-dir` that is a file; a store that is a file where a folder is expected (Zarr) or
a folder where a file is (HDF5); an object-storage store whose bucket is missing or
unreachable. Nothing is created: the writers create what they need once the model is
loaded (and report a disk that fills up meanwhile themselves).
"""

from __future__ import annotations

import os
from pathlib import Path

from featstore.errors import OutputError
from featstore.store.location import Location


def _nearest_existing(path: Path) -> Path:
    """`path` or the closest ancestor that exists (a file or a folder)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, what: str) -> None:
    """`path` (absent) can be made as a folder or file: every existing ancestor is a
    folder, and the nearest one can be written."""
    near = _nearest_existing(path.parent)
    if not near.is_dir():
        raise OutputError(f"cannot create {what} {path}: {near} is a file, not a folder")
    if not os.access(near, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {what} {path}: the folder {near} cannot be written")


def check_npy_dir(npy_dir: Path) -> None:
    path = Path(os.path.abspath(npy_dir))
    if not os.path.lexists(path):
        _check_creatable(path, "--npy-dir")
    elif not path.is_dir():
        raise OutputError(f"--npy-dir {path} is a file, not a folder")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to --npy-dir {path}: the folder cannot be written")


def check_store(location: Location) -> None:
    if not location.is_local:
        from featstore.store._blobs import RemoteBlobs, open_blobs

        blobs = open_blobs(location)
        try:
            if isinstance(blobs, RemoteBlobs):
                blobs.check_reachable()  # a missing bucket, wrong credentials: one line naming it
        finally:
            blobs.close()
        return
    path = location.path
    fmt = location.format  # also refuses a suffix that is neither Zarr nor HDF5
    if not os.path.lexists(path):
        _check_creatable(path, "store")
        return
    if fmt == "zarr" and not path.is_dir():
        raise OutputError(f"store {path} is a file; a .zarr store is a folder")
    if fmt == "hdf5" and path.is_dir():
        raise OutputError(f"store {path} is a folder; an .h5 store is a file")
    writable = path if fmt == "zarr" else path.parent  # HDF5 is rewritten by rename in its folder
    if not os.access(writable, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write store {path}: the folder {writable} cannot be written")


def check_outputs(store: Location | None, npy_dir: Path | None) -> None:
    """Raise OutputError (one line) for an output that cannot be written; creates nothing."""
    if npy_dir is not None:
        check_npy_dir(npy_dir)
    if store is not None:
        check_store(store)
