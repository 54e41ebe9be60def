"""Feature stores: one row per image (features, mask, key, source, original size and,
optionally, a pooled embedding) in Zarr v3 (`*.zarr`, on local disk or object storage)
or HDF5 (`*.h5`, `*.hdf5`, local), behind one reader interface.

    with open_store("feats.zarr") as store:            # or "s3://bucket/prefix/feats.zarr"
        row = store["cats/a.png"]          # or store[0], store[-1]
        batch = store.get_batch([0, 5, "dogs/b.jpg"])

Writing goes through `open_store_writer` (a single-process build's store stage) or
`open_unit_store` (one process of a distributed build). Modules: the array layout and
the reader interface (`base`), where a store lives (`location`), object I/O local and
remote (`_blobs`), byte-range rows (`_direct`), the backends (Zarr: `_zarr` the reader,
`_zarr_layout` what readers and writers share, `_zarr_write` the writer, `_zarr_meta` the
metadata documents other tools read; HDF5: `_hdf5`), the
writer facade (`writer`), and for distributed builds the work plans (`plans`), the
unit leases (`leases`) and the unit writer with the finalize step (`units`).

The commit protocol (Zarr, layout 2)
------------------------------------
It needs only what object storage gives: a single PUT is atomic and visible whole, a
PUT can be conditional (`If-None-Match: *`), a prefix can be listed. No rename, no lock.

- The shard is the unit of writing and of commit. Shard `s` holds rows
  `s*shard_rows ...` of every array: one object per array (`features/c/s/0/0/0`, a
  sharded Zarr chunk; `masks/c/s/0/0`, `sources/c/s`, `orig_size_hw/c/s/0`,
  `embedding/c/s/0`, and the keys again for other tools, `key/c/s` and `key_hash/c/s`),
  each written whole, by the one writer that owns the shard.
- The shard's `keys` chunk (`keys/c/s`) is written last and is its commit record: the
  rows of shard `s` that exist are those it names (up to the first empty key; keys are
  never empty). A reader lists `keys/c/`, reads those chunks, and sees exactly the
  committed rows, in shard order; data objects without a keys chunk are invisible.
- A shard has one owner. Before writing any of shard `s`'s objects, a writer claims it
  by creating `claims/c/s` (a chunk of the `claims` array holding the writer's id, host,
  pid and start time) with a conditional create (S3 `If-None-Match: *`, an exclusive
  link on local disk). A claim it finds already there stops it, before it writes
  anything, unless the claim is its own or was already there, on a shard not yet
  complete, when this writer opened the store: that one's writer is gone (a killed
  build; one build writes a store at a time) and is taken over. New shards' keys
  chunks are also created conditionally, as a second guard.
- A writer claims the shard it will write first as soon as it opens the store, and
  deletes its claims when it closes. So a claim that remains belongs to a running
  writer or a killed one: one made on this host by a process that still runs (or by
  this process) refuses the new writer before it touches anything (and a build checks
  this before it loads its model); one of another host cannot be checked and counts as
  a killed build's.
- A writer that reopens a store refills its last, partial shard: it reads the committed
  rows back and rewrites every object of that shard whole (replacing, never adding a
  copy), the keys chunk last. Committed rows keep their bytes and offsets in the new
  objects, so a reader that saw the old record reads the same rows from either version
  of an object.
- Metadata (the group's and arrays' `zarr.json`) is written by one process, the
  store's metadata writer: the build that creates the store writes the arrays' metadata
  and then the group's `zarr.json` by a conditional create (the store exists from that
  write on); afterwards the single-process build raises the arrays' shapes after each
  commit (so that zarr-python, xarray and TensorStore see the rows too), then rewrites
  the group's `zarr.json` with `num_rows` and the consolidated metadata (every array's
  document: `featstore.store._zarr_meta`), and writes the attributes (`failed`) when it
  closes. Readers never depend on the shapes; featstore never reads the consolidated copy.
- Progress is recorded by shard, never by process. A distributed build (many
  processes, many nodes: `featstore.store.units`) cuts its sorted image list into a
  plan of units of whole shards (`featstore.store.plans`, kept in the `plans` array);
  each unit's shards are written by the holder of the unit's lease (`leases`, with an
  expiry and takeover, `featstore.store.leases`) exactly as above, a finished unit gets
  a record (`units`: its failures), and the process that sees every unit finished
  writes the metadata (failures merged, shapes, consolidated). Rows are ordered by shard, so gaps
  between shards are allowed (plain Zarr readers see them as empty keys). A
  single-process writer never writes into a plan's shards: it starts after them.

Failures it survives: a writer killed at any moment (before its keys chunk, the shard
does not exist; after it, it is complete; a rerun refills the partial shard, skips
committed keys, so no key is ever stored twice); a crash while creating the store
(no group `zarr.json`: no store; the rerun creates it); two builds of one store on one
host (the second is refused when it opens; a build started after another was killed
takes over its claims); readers at any instant (they see a prefix of whole
shards). Local writes go through zarr's LocalStore (a temporary file renamed into place)
and a killed writer's temporary files are deleted by the next writer.
`--overwrite` deletes the old store first, commit records first (readers see whole shards
vanish, never half rows), and builds anew: readers open during an overwrite must reopen.

Layout 1 (featstore 0.1: a `num_rows` attribute raised after each shard) still opens
and reads; `featstore upgrade STORE` turns it into layout 2 in place (only the commit
records change) so that builds can append to it. HDF5 files are written whole and
renamed into place (see `featstore.store._hdf5`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from featstore.errors import StoreError
from featstore.store.base import (
    LAYOUT_VERSION,
    FeatureStore,
    Row,
    RowBatch,
    store_format,
)
from featstore.store.location import Location, as_location
from featstore.store.writer import StoreWriter, open_store_writer

__all__ = [
    "LAYOUT_VERSION",
    "FeatureStore",
    "Location",
    "Row",
    "RowBatch",
    "StoreWriter",
    "as_location",
    "disk_usage",
    "engine_order",
    "open_store",
    "open_store_writer",
    "store_format",
    "upgrade_store",
]


def open_store(
    where: str | os.PathLike[str] | Location,
    mode: str = "r",
    *,
    engine: str | Sequence[str] = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> FeatureStore:
    """Open a store for reading: its committed rows, as of now.

    `where`: a path, or a URL such as `s3://bucket/prefix/x.zarr` (`storage_options`:
    fsspec's options for it; see `featstore.store.location`).
    `engine` (Zarr; HDF5 picks by itself): "auto" tries "direct" (byte ranges into
    featstore's own layout, any backend), then "tensorstore" (local, when installed), then
    "zarr"; name one to insist on it, or give a sequence to try in order.
    Raises StoreError if there is no store there, CorruptStoreError if its arrays
    and attributes disagree.
    """
    if mode != "r":
        raise StoreError(f"stores open read-only (mode 'r'), not {mode!r}; write with `featstore build --store`")
    location = as_location(where, storage_options)
    fmt = location.format
    if location.is_local and not os.path.lexists(location.url):
        stage = location.url + ".featstore-stage.zarr"
        if fmt == "hdf5" and os.path.lexists(stage):
            raise StoreError(
                f"no store at {location} yet: a first build is in progress (or was interrupted; "
                f"its rows are staged in {os.path.basename(stage)} and the file is written when it ends)"
            )
        raise StoreError(f"no store at {location}")
    if fmt == "zarr":
        from featstore.store._zarr import ZarrFeatureStore

        if not location.is_local:
            _check_remote(location)
        return ZarrFeatureStore(location, engine=engine)
    from featstore.store._hdf5 import Hdf5FeatureStore

    return Hdf5FeatureStore(location)


def _check_remote(location: Location) -> None:
    from featstore.store._blobs import RemoteBlobs

    blobs = RemoteBlobs(location)
    if blobs.read("zarr.json") is None:
        blobs.check_reachable()  # names a missing bucket or refused credentials
        raise StoreError(f"no store at {location}")


def disk_usage(where: str | os.PathLike[str] | Location) -> tuple[int, int]:
    """(bytes, objects) a store takes up: files on disk, or objects under its prefix."""
    location = as_location(where)
    if not location.is_local:
        from featstore.store._blobs import RemoteBlobs

        blobs = RemoteBlobs(location)
        sizes = blobs.fs.du(blobs.root, total=False)
        return sum(sizes.values()), len(sizes)
    path = location.path
    if path.is_file():
        return path.stat().st_size, 1
    total = files = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(dirpath, n))
            files += 1
    return total, files


def engine_order(engine: str | Sequence[str]) -> tuple[str, ...]:
    """The read engines an `engine=` argument names, in order (ValueError if unknown)."""
    from featstore.store._zarr import engine_order as order

    return order(engine)


def upgrade_store(where: str | os.PathLike[str] | Location, storage_options: Mapping[str, Any] | None = None) -> int:
    """Bring a store to the current layout and metadata in place; returns the layout it had.

    Zarr: layout 1 to 2, then what older stores lack (dimension names, `key_hash`,
    consolidated metadata, `num_rows`). HDF5: dimension scales. Rows are not rewritten."""
    location = as_location(where, storage_options)
    if location.format != "zarr":
        from featstore.store._hdf5 import upgrade_hdf5

        upgrade_hdf5(location)
        return LAYOUT_VERSION
    from featstore.store._zarr import upgrade_store as run

    return run(location)[0]
