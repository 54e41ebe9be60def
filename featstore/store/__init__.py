"""Feature stores: one row per image (features, mask, key, source, original size) in
Zarr v3 (`*.zarr`) or HDF5 (`*.h5`, `*.hdf5`), behind one reader interface.

    with open_store("feats.zarr") as store:
        row = store["cats/a.png"]          # or store[0], store[-1]
        batch = store.get_batch([0, 5, "dogs/b.jpg"])

Writing goes through `open_store_writer` (the pipeline's store stage); the layout is
described in `featstore.store.base`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from featstore.errors import StoreError
from featstore.store.base import (
    LAYOUT_VERSION,
    FeatureStore,
    Row,
    RowBatch,
    store_format,
)
from featstore.store.writer import StoreWriter, open_store_writer

__all__ = [
    "LAYOUT_VERSION",
    "FeatureStore",
    "Row",
    "RowBatch",
    "StoreWriter",
    "open_store",
    "open_store_writer",
    "store_format",
]


def open_store(path: str | os.PathLike[str], mode: str = "r", *, engine: str | Sequence[str] = "auto") -> FeatureStore:
    """Open a store for reading: its committed rows, as of now.

    `engine` (Zarr; HDF5 picks by itself): "auto" tries "direct" (byte offsets into
    featstore's own layout), then "tensorstore" (when installed), then "zarr"; name one
    to insist on it, or give a sequence to try in order.
    Raises StoreError if there is no store at `path`, CorruptStoreError if its arrays
    and attributes disagree.
    """
    if mode != "r":
        raise StoreError(f"stores open read-only (mode 'r'), not {mode!r}; write with `featstore build --store`")
    path = Path(path)
    fmt = store_format(path)
    if not path.exists():
        from featstore.store.writer import OLD_SUFFIX, sibling

        hint = ""
        if sibling(path, OLD_SUFFIX).exists():
            hint = f" (an interrupted rebuild left {sibling(path, OLD_SUFFIX).name}; run the build again)"
        raise StoreError(f"no store at {path}{hint}")
    if fmt == "zarr":
        from featstore.store._zarr import ZarrFeatureStore

        return ZarrFeatureStore(path, engine=engine)
    from featstore.store._hdf5 import Hdf5FeatureStore

    return Hdf5FeatureStore(path)
