"""An opened Zarr store's metadata and committed shards: what its readers and writers share.

`Layout` reads the group's and arrays' `zarr.json` documents (never the consolidated copy)
and, from the keys chunks (the shards' commit records), which rows are committed. The
commit protocol is described in `featstore.store`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from featstore.batches import EncodingInfo
from featstore.errors import CorruptStoreError, StoreError
from featstore.store._blobs import Blobs
from featstore.store._direct import ChunkedRows, ShardedRows, zarr_rows
from featstore.store._zarr_meta import CLAIMS, COORDINATION_DIMENSIONS, DERIVED, group_document
from featstore.store.base import (
    ARRAYS,
    FEATURES,
    KEYS,
    LAYOUT_VERSION,
    check_arrays,
    expected_arrays,
    info_from_attrs,
)


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
        self.consolidated = "consolidated_metadata" in group
        self.info = info_from_attrs(self.attrs, self.location)
        self.version = int(self.attrs["layout_version"])
        names = (*ARRAYS, *DERIVED, CLAIMS, *COORDINATION_DIMENSIONS)
        found_docs = {}
        for name, data in zip(names, blobs.read_many([f"{name}/zarr.json" for name in names]), strict=True):
            doc = _doc(data, f"{self.location}/{name}/zarr.json")
            if doc is not None and doc.get("node_type") == "array":
                found_docs[name] = doc
        self.claims_meta = found_docs.pop(CLAIMS, None)
        # The distributed build's arrays (featstore.store.units): only listed in the group's document here.
        self.coordination = {n: found_docs.pop(n) for n in COORDINATION_DIMENSIONS if n in found_docs}
        self.meta: dict[str, dict[str, Any]] = found_docs  # the row arrays (key_hash: absent in older stores)
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

    def documents(self) -> dict[str, dict[str, Any]]:
        """Every array's zarr.json document as read (what the group's consolidated metadata holds)."""
        claims = {CLAIMS: self.claims_meta} if self.claims_meta is not None else {}
        return {**self.meta, **claims, **self.coordination}

    def group_document(self) -> dict[str, Any]:
        """The group's zarr.json for these attributes and documents (`num_rows`: needs the commits)."""
        return group_document(self.attrs, self.documents(), num_rows=self.num_rows)

    @property
    def current(self) -> bool:
        """Whether the metadata is as this featstore writes it: dimension names on every
        array, `key_hash`, a consolidated group document (see `featstore.store._zarr_meta`)."""
        return (
            self.version == LAYOUT_VERSION
            and all(name in self.meta for name in DERIVED)
            and all(d.get("dimension_names") for d in self.documents().values())
            and self.consolidated
        )

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
