"""HDF5 stores: the reader, and `write_hdf5`, which writes a whole file in one go.

An HDF5 file is never modified in place. HDF5 updates its metadata (B-trees, the
global heap of variable-length strings, object headers) in place and not atomically:
in a test that SIGKILLed an h5py writer doing resize / write / attrs / `flush()` loops,
1-2 of 40 killed files could not be read back ("addr overflow") and about 20 of 80
reruns failed while appending ("bad heap index"). So a build stages its rows in a
Zarr store beside the file and `write_hdf5` writes the complete file under a temporary
name, which is then renamed over the old one (see `featstore.store.writer`).

Layout: `features` and `masks` are contiguous and uncompressed, so row i is at a fixed
byte offset and the reader takes it with one `pread` (`featstore.store._direct`;
h5py's own reads cost ~0.3 ms per call). Measured with `benchmarks/codec_choice.py`:
gzip-1 + shuffle saved 12-14 % but wrote at ~30 MiB/s (vs ~1,000) and read 4-12x fewer
random rows/s; lzf saved nothing. Every array is contiguous (the file is written
whole, so nothing needs to grow). Earlier files chunked the arrays (features one row
per chunk): still read, through h5py. Attributes are stored as JSON strings (HDF5 attributes cannot hold
nested dicts and lists of dicts), all of them, so reading is uniform.
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

    The file is opened without HDF5 file locking: featstore never writes a file that
    can be open for reading (writers replace it by rename), and locking fails on some
    network file systems.
    """

    format = "hdf5"

    def __init__(self, path: Path) -> None:
        import h5py

        try:
            self._file = h5py.File(path, "r", locking=False)
        except OSError as e:
            raise CorruptStoreError(f"{path}: not an HDF5 file, or damaged ({e})") from None
        try:
            attrs = {str(k): json.loads(v) for k, v in self._file.attrs.items()}
        except (TypeError, ValueError) as e:
            self._file.close()
            raise CorruptStoreError(f"{path}: attributes are not featstore's JSON ({e})") from None
        try:
            super().__init__(path, attrs)
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

    def _read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._direct is None:
            return self._read(FEATURES, indices), self._read(MASKS, indices)
        c, g = self._info.hidden_dim, self._info.grid
        feats = np.empty((len(indices), c, g, g), dtype=self._info.dtype)
        masks = np.empty((len(indices), g, g), dtype=np.uint8)
        self._direct[0].read(indices, feats)  # type: ignore[union-attr]
        self._direct[1].read(indices, masks)  # type: ignore[union-attr]
        return feats, masks

    def _read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if self._direct is not None:
            return self._read_rows(np.arange(start, stop, dtype=np.int64))
        return self._ds[FEATURES][start:stop], self._ds[MASKS][start:stop]

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


def write_hdf5(
    path: Path, attrs: dict[str, Any], info: EncodingInfo, batches: Iterable[EncodedBatch], rows: int
) -> int:
    """Write a complete store of `rows` rows to `path` (which must not exist); returns `rows`.

    The batches must hold exactly `rows` rows: `features` and `masks` are contiguous, so
    their size is fixed when they are created. `attrs["num_rows"]` is set to `rows`.
    """
    import h5py

    c, g = info.hidden_dim, info.grid
    text = h5py.string_dtype("utf-8")
    n = 0
    with h5py.File(path, "w-") as f:
        ds = {
            FEATURES: f.create_dataset(FEATURES, shape=(rows, c, g, g), dtype=info.dtype),
            MASKS: f.create_dataset(MASKS, shape=(rows, g, g), dtype="uint8"),
            KEYS: f.create_dataset(KEYS, shape=(rows,), dtype=text),
            SOURCES: f.create_dataset(SOURCES, shape=(rows,), dtype=text),
            ORIG_SIZE: f.create_dataset(ORIG_SIZE, shape=(rows, 2), dtype="int32"),
        }
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
            ds[KEYS][rows_] = np.array([it.key for it in batch.items], dtype=object)
            ds[SOURCES][rows_] = np.array([it.path for it in batch.items], dtype=object)
            n += k
        if n != rows:
            raise ValueError(f"write_hdf5: the batches held {n} rows, {rows} were announced")
        for name, value in {**attrs, "num_rows": n}.items():
            f.attrs[name] = json.dumps(value)  # ASCII: safe for any key in "failed"
    return n
