"""HDF5 stores: the reader, and `write_hdf5`, which writes a whole file in one go.

An HDF5 file is never modified in place. HDF5 updates its metadata (B-trees, the
global heap of variable-length strings, object headers) in place and not atomically:
in a test that SIGKILLed an h5py writer doing resize / write / attrs / `flush()` loops,
1-2 of 40 killed files could not be read back ("addr overflow") and about 20 of 80
reruns failed while appending ("bad heap index"). So a build stages its rows in a
Zarr store beside the file and `write_hdf5` writes the complete file under a temporary
name, which is then renamed over the old one (`Hdf5Writer`). HDF5 stays on local disk:
it needs a file system that renames.

Layout: `features` and `masks` are contiguous and uncompressed, so row i is at a fixed
byte offset and the reader takes it with one `pread` (`featstore.store._direct`;
h5py's own reads cost ~0.3 ms per call). Measured with `benchmarks/codec_choice.py`:
gzip-1 + shuffle saved 12-14 % but wrote at ~30 MiB/s (vs ~1,000) and read 4-12x fewer
random rows/s; lzf saved nothing. Every array is contiguous (the file is written
whole, so nothing needs to grow). Earlier files chunked the arrays (features one row
per chunk): still read, through h5py. Attributes are stored as JSON strings (HDF5 attributes cannot hold
nested dicts and lists of dicts), all of them, so reading is uniform.

For netCDF readers (h5netcdf, xarray): every array's dimensions are HDF5 dimension
scales named as in Zarr (`featstore.store.base.dimension_names`): `key` (a copy of the
keys) is the scale of the row dimension, so the keys are its coordinate; the others are netCDF's
"dimension without a variable" scales. Files written before have none (h5netcdf then
shows `phony_dim_*`); `featstore upgrade FILE.h5` adds them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from featstore.batches import EncodedBatch, EncodingInfo
from featstore.errors import CorruptStoreError
from featstore.store._direct import hdf5_rows
from featstore.store.base import (
    ARRAYS,
    EMBEDDING,
    FEATURES,
    KEY,
    KEYS,
    MASKS,
    ORIG_SIZE,
    ROWS,
    SOURCES,
    FeatureStore,
    check_arrays,
    dimension_names,
    step_rows,
)
from featstore.store.location import Location

STRING_ARRAYS = (KEYS, SOURCES)


def _dtype_name(ds: Any) -> str:
    import h5py

    return "str" if h5py.check_string_dtype(ds.dtype) is not None else ds.dtype.name


def _runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """(first row, stop row, position in output) of each run of consecutive sorted indices."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return [(int(indices[a]), int(indices[b - 1]) + 1, int(a)) for a, b in zip(starts, stops, strict=True)]


class Hdf5FeatureStore(FeatureStore):
    """Reads an HDF5 store: by byte offset when `features` and `masks` are contiguous
    (engine "direct"), else with h5py (one `read_direct` per run of consecutive rows).

    The file is opened with the process's HDF5 file-locking setting (h5py's default,
    `HDF5_USE_FILE_LOCKING`), so that h5py or h5netcdf can hold it open in the same
    process, before or after featstore; see `open_hdf5`.
    """

    format = "hdf5"

    def __init__(self, location: Location) -> None:
        import h5py

        path = location.path
        self._file = open_hdf5(path)
        try:
            attrs = {str(k): json.loads(v) for k, v in self._file.attrs.items()}
        except (TypeError, ValueError) as e:
            self._file.close()
            raise CorruptStoreError(f"{path}: attributes are not featstore's JSON ({e})") from None
        try:
            n = attrs.get("num_rows")
            super().__init__(location, attrs, n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else -1)
            if self._n < 0:
                raise CorruptStoreError(f"{path}: num_rows {n!r} is not a non-negative integer")
            self._ds = {n: self._file[n] for n in ARRAYS if isinstance(self._file.get(n), h5py.Dataset)}
            found = {n: (tuple(d.shape), _dtype_name(d)) for n, d in self._ds.items()}
            check_arrays(path, self._info, self._n, found)
            direct = tuple(hdf5_rows(self._file, self._ds[n], f"{path}:{n}") for n in (FEATURES, MASKS))
            self._direct = direct if None not in direct else None
        except BaseException:
            self._file.close()
            raise

    @property
    def shard_rows(self) -> int:
        return step_rows(self._info)

    def _read(self, name: str, indices: np.ndarray) -> np.ndarray:
        ds = self._ds[name]
        out = np.empty((len(indices), *ds.shape[1:]), dtype=ds.dtype)
        for first, stop, at in _runs(indices):
            ds.read_direct(out, np.s_[first:stop], np.s_[at : at + stop - first])
        return out

    @property
    def engine(self) -> str:
        return "direct" if self._direct is not None else "h5py"

    def _read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        emb = self._read(EMBEDDING, indices) if self._info.embedding_dim else None
        if self._direct is None:
            return self._read(FEATURES, indices), self._read(MASKS, indices), emb
        g = self._info.grid
        feats = np.empty((len(indices), *self._info.feature_shape()), dtype=self._info.dtype)
        masks = np.empty((len(indices), g, g), dtype=np.uint8)
        self._direct[0].read(indices, feats)  # type: ignore[union-attr]
        self._direct[1].read(indices, masks)  # type: ignore[union-attr]
        return feats, masks, emb

    def _read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self._direct is not None:
            return self._read_rows(np.arange(start, stop, dtype=np.int64))
        emb = self._ds[EMBEDDING][start:stop] if self._info.embedding_dim else None
        return self._ds[FEATURES][start:stop], self._ds[MASKS][start:stop], emb

    def _read_column(self, name: str) -> Any:
        ds = self._ds[name]
        if name in STRING_ARRAYS:
            return list(ds.asstr()[: self._n]) if self._n else []
        return ds[: self._n]

    def array_details(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, d in self._ds.items():
            filters = [f for f in (d.compression, "shuffle" if d.shuffle else None) if f]
            out[name] = {
                "shape": list(d.shape),
                "dtype": _dtype_name(d),
                "chunks": list(d.chunks) if d.chunks else None,
                "shards": None,
                "codecs": filters or ["none"],
            }
        return out

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


LOCKING_MISMATCH = "flag values don't match"  # also "file locking 'ignore disabled locks' flag ..."
LOCK_FAILED = "unable to lock file"


def open_hdf5(path: Path) -> Any:
    """`path` as a read-only h5py file, beside any other opening of it in this process.

    HDF5 shares one open file per process and refuses a second opening with other
    file-locking flags ("file locking flag values don't match"). featstore first opens
    with the process's default (what h5py and h5netcdf use unless told otherwise); if
    the file is open with other flags, it uses those; if the file system cannot lock
    (some network file systems) or a writer holds a lock, it opens without locking, as
    it did always (featstore replaces files by rename, never writes one in place).
    Errors: StoreError naming the cause and `HDF5_USE_FILE_LOCKING`; CorruptStoreError
    only for a file that is not HDF5.
    """
    import h5py

    from featstore.errors import StoreError

    first = ""
    for locking in (None, False, True, "best-effort"):
        try:
            return h5py.File(path, "r", locking=locking)
        except OSError as e:
            text = str(e)
            if LOCKING_MISMATCH not in text and LOCK_FAILED not in text:
                raise CorruptStoreError(f"{path}: not an HDF5 file, or damaged ({e})") from None
            first = first or text  # open here with other flags, or no locks on this file system: try the next
    raise StoreError(
        f"{path}: HDF5 cannot open it beside the other opening of it in this process ({first}); "
        "open both with the same file locking (h5py.File(..., locking=...)) or set HDF5_USE_FILE_LOCKING=FALSE"
    )


def write_hdf5(
    path: Path, attrs: dict[str, Any], info: EncodingInfo, batches: Iterable[EncodedBatch], rows: int
) -> int:
    """Write a complete store of `rows` rows to `path` (which must not exist); returns `rows`.

    The batches must hold exactly `rows` rows: `features` and `masks` are contiguous, so
    their size is fixed when they are created. `attrs["num_rows"]` is set to `rows`.
    """
    import h5py

    g = info.grid
    text = h5py.string_dtype("utf-8")
    n = 0
    with h5py.File(path, "w-") as f:
        ds = {
            FEATURES: f.create_dataset(FEATURES, shape=(rows, *info.feature_shape()), dtype=info.dtype),
            MASKS: f.create_dataset(MASKS, shape=(rows, g, g), dtype="uint8"),
            KEYS: f.create_dataset(KEYS, shape=(rows,), dtype=text),
            KEY: f.create_dataset(KEY, shape=(rows,), dtype=text),  # the row dimension's coordinate
            SOURCES: f.create_dataset(SOURCES, shape=(rows,), dtype=text),
            ORIG_SIZE: f.create_dataset(ORIG_SIZE, shape=(rows, 2), dtype="int32"),
        }
        if info.embedding_dim:
            ds[EMBEDDING] = f.create_dataset(EMBEDDING, shape=(rows, info.embedding_dim), dtype="float32")
        for batch in batches:
            k = len(batch)
            if k == 0:
                continue
            if n + k > rows:
                raise ValueError(f"write_hdf5: the batches hold more than the {rows} rows announced")
            rows_ = np.s_[n : n + k]
            ds[FEATURES][rows_] = batch.features
            ds[MASKS][rows_] = batch.masks
            ds[ORIG_SIZE][rows_] = batch.orig_size_hw
            ds[KEYS][rows_] = ds[KEY][rows_] = np.array([it.key for it in batch.items], dtype=object)
            ds[SOURCES][rows_] = np.array([it.path for it in batch.items], dtype=object)
            if info.embedding_dim:
                if batch.embedding is None:
                    raise ValueError("write_hdf5: the store has embeddings, a batch has none")
                ds[EMBEDDING][rows_] = batch.embedding
            n += k
        if n != rows:
            raise ValueError(f"write_hdf5: the batches held {n} rows, {rows} were announced")
        attach_dimension_scales(f, info)
        for name, value in {**attrs, "num_rows": n}.items():
            f.attrs[name] = json.dumps(value)  # ASCII: safe for any key in "failed"
    return n


NETCDF_DIMENSION = "This is a netCDF dimension but not a netCDF variable.%10d"  # netCDF-4's own marker


def attach_dimension_scales(f: Any, info: EncodingInfo) -> None:
    """Name every array's dimensions with HDF5 dimension scales, as netCDF-4 does: `key`
    (a copy of `keys`, made here if missing) is the row dimension's scale, so a coordinate
    for h5netcdf / xarray; the others are dimensions without a variable (small empty
    datasets named like the dimension)."""
    if KEY not in f:
        f.create_dataset(KEY, data=f[KEYS][...], dtype=f[KEYS].dtype)
    scales: dict[str, Any] = {ROWS: f[KEY]}
    for name in ARRAYS:
        dims = dimension_names(name, info)
        if name not in f or dims is None:
            continue
        ds = f[name]
        for axis, dim in enumerate(dims):
            if dim not in scales:
                size = ds.shape[axis]
                scale = f[dim] if dim in f else f.create_dataset(dim, shape=(size,), dtype="float32")
                scale.make_scale(NETCDF_DIMENSION % size)
                scales[dim] = scale
            if not scales[dim].is_scale:
                scales[dim].make_scale(dim)
            if scales[dim] != ds:  # `key` is its own scale
                ds.dims[axis].attach_scale(scales[dim])


class StoreLock:
    """An exclusive `flock` on `.NAME.featstore-lock` beside an HDF5 store, holding our pid.

    HDF5 files are local and rewritten whole by rename (see the module docstring), so two
    writers would lose each other's rows: the lock refuses the second one at once.
    """

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store.with_name(f".{store.name}.featstore-lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        import os

        from featstore.store.guard import busy, locked_by

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if (pid := locked_by(fd)) is not None:
                os.close(fd)
                raise busy(self.store, pid)
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

    def check_free(self) -> None:
        """Raise StoreLockedError if a build holds the lock now; takes nothing, creates nothing."""
        import os

        from featstore.store.guard import busy, locked_by

        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return  # no lock file (or no folder yet): nobody is writing it
        try:
            pid = locked_by(fd)
        finally:
            os.close(fd)  # also releases our flock, if we got it
        if pid is not None:
            raise busy(self.store, pid)

    def release(self) -> None:
        import os

        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it; see acquire
            os.close(self.fd)
            self.fd = None


def upgrade_hdf5(location: Location) -> bool:
    """Give a file written before dimension scales its scales; False if it had them.

    Like every HDF5 change, on a copy renamed over the file (a kill leaves the old file),
    under the build lock (a build would replace the file meanwhile).
    """
    import os
    import shutil

    import h5py

    path = location.path
    lock = StoreLock(path)
    lock.acquire()
    try:
        store = Hdf5FeatureStore(location)
        try:
            info, with_scales = store.info, len(store._ds[FEATURES].dims[0]) > 0
        finally:
            store.close()
        if with_scales:
            return False
        tmp = Path(str(path) + TMP_SUFFIX)
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            attach_dimension_scales(f, info)
        os.replace(tmp, path)
        return True
    finally:
        lock.release()


TMP_SUFFIX = ".featstore-tmp"
STAGE_SUFFIX = ".featstore-stage.zarr"


class Hdf5Sink:
    """The HDF5 backend's side of `StoreWriter`: rows staged in a Zarr store beside the file
    (`PATH.featstore-stage.zarr`, resumed by a rerun after a crash); `finish` writes the old
    rows plus the staged ones into `PATH.featstore-tmp`, renames it over PATH and deletes
    the stage. So every run that adds rows rewrites the whole file: grow big stores in Zarr.
    """

    def __init__(
        self, location: Location, info: EncodingInfo, *, version: str, overwrite: bool, shard_rows: int
    ) -> None:
        from featstore.errors import StoreError as _StoreError
        from featstore.store._blobs import LocalBlobs
        from featstore.store._zarr import ZarrSink, delete_store
        from featstore.store.base import check_compatible

        self.path = location.path
        self.lock = StoreLock(self.path)
        self.lock.acquire()
        self.base: Hdf5FeatureStore | None = None
        try:
            Path(str(self.path) + TMP_SUFFIX).unlink(missing_ok=True)
            stage = location.sibling(STAGE_SUFFIX)
            if overwrite and stage.exists():
                delete_store(LocalBlobs(stage))
            if self.path.exists() and not overwrite:
                self.base = Hdf5FeatureStore(location)
                check_compatible(self.path, self.base.info, info)
            try:
                self.stage = ZarrSink(
                    stage, info, version=version, overwrite=False, shard_rows=shard_rows, guarded=True
                )
            except CorruptStoreError:  # a crash while creating it: it held no rows
                delete_store(LocalBlobs(stage))
                self.stage = ZarrSink(
                    stage, info, version=version, overwrite=False, shard_rows=shard_rows, guarded=True
                )
            except _StoreError:
                raise
            self.old_failures = self.base.failed if self.base is not None else []
            self.present = self.stage.present | (set(self.base.keys()) if self.base is not None else set())
        except BaseException:
            self.abort()
            raise

    def append(self, *args: Any) -> None:
        self.stage.append(*args)

    def finish(self, failed: list[dict[str, str]]) -> None:
        import os
        from itertools import chain

        from featstore.store._blobs import LocalBlobs
        from featstore.store._zarr import ZarrFeatureStore, delete_store
        from featstore.store.base import encoded_batches, info_from_attrs

        try:
            stage = self.stage
            stage.commit({})
            stage.close()
            base = self.base
            old_failed = base.attrs["failed"] if base is not None else None
            if base is None or stage.committed > 0 or failed != old_failed:
                attrs = base.attrs if base is not None else dict(stage.attrs)
                attrs["failed"] = failed
                tmp = Path(str(self.path) + TMP_SUFFIX)
                tmp.unlink(missing_ok=True)
                with ZarrFeatureStore(stage.location) as staged:
                    info = info_from_attrs(attrs, self.path)
                    base_keys = frozenset(base.keys()) if base is not None else frozenset()
                    # A crash after the rename below but before the stage is deleted leaves
                    # staged rows that are already in the file: skip them.
                    rows = chain(
                        encoded_batches(base) if base is not None else (),
                        encoded_batches(staged, skip_keys=base_keys),
                    )
                    count = len(base_keys) + sum(k not in base_keys for k in staged.keys())  # noqa: SIM118
                    write_hdf5(tmp, attrs, info, rows, count)
                os.replace(tmp, self.path)
            delete_store(LocalBlobs(stage.location))
        finally:
            self.abort()

    def abort(self) -> None:
        if self.base is not None:
            self.base.close()
            self.base = None
        if hasattr(self, "stage"):
            self.stage.close()
        self.lock.release()
