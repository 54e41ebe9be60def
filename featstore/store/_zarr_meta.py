"""A Zarr store's metadata documents, written so that other tools open the store as
their users expect (xarray, dask, zarr-python, TensorStore).

- Every array names its dimensions (`dimension_names`, which xarray requires). The row
  dimension is `key`; the `key` array (the keys again, written with each shard) is its
  coordinate: `ds.sel(key=[...])`. The others: `channel`, `y`, `x` (and `layer` with
  several layers) for the features, `hw` for the original sizes, `embedding_dim` for the
  pooled embedding. (`keys` stays the commit record; a coordinate of that name would
  shadow `Mapping.keys` in xarray.)
- `key_hash` (uint64, one per row) indexes rows by key for readers without Zarr's
  variable-length strings (TensorStore): the first 8 bytes of SHA-256 of the key's
  UTF-8, little-endian; 0 on rows without a key. It is written with each shard, before
  the shard's commit record, like every other array.
- The group's `zarr.json` carries consolidated metadata (every array's document inline,
  zarr-python's format: what xarray and zarr-python read first, one request) and
  `num_rows`, the committed rows. The store's metadata writer rewrites it after the
  arrays' own documents whenever their shapes or the attributes change (after each
  commit of a single-process build, at a distributed build's finalize), so it never
  says less than the arrays' documents said a moment before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from featstore.batches import EncodingInfo
from featstore.store.base import EMBEDDING, FEATURES, KEY, KEYS, MASKS, ORIG_SIZE, ROWS, SOURCES
from featstore.store.base import dimension_names as row_dimensions

KEY_HASH = "key_hash"
CLAIMS = "claims"  # one chunk per shard: the writer that owns it (see ZarrShardWriter)
STRING_ARRAYS = (KEYS, SOURCES)
DERIVED = (KEY, KEY_HASH)  # arrays computed from the keys, absent in stores made before them

# Coordination arrays of a distributed build (`featstore.store.plans`, `leases`).
COORDINATION_DIMENSIONS = {"plans": ("plan",), "units": ("unit",), "leases": ("lease_unit", "lease_generation")}


def dimension_names(name: str, info: EncodingInfo) -> tuple[str, ...] | None:
    """The dimension names of one of the store's arrays (None: not one of featstore's)."""
    dims = {KEY_HASH: (ROWS,), CLAIMS: ("shard",), **COORDINATION_DIMENSIONS}
    return dims[name] if name in dims else row_dimensions(name, info)


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """uint64 per key: SHA-256 of its UTF-8, first 8 bytes little-endian (0 for an empty key)."""
    out = [
        int.from_bytes(hashlib.sha256(k.encode("utf-8", "surrogateescape")).digest()[:8], "little") if k else 0
        for k in keys
    ]
    return np.array(out, dtype=np.uint64)


def key_hash(key: str) -> int:
    """The `key_hash` value of one key (what a TensorStore reader looks for)."""
    return int(key_hashes([key])[0])


def metadata_documents(attrs: dict[str, Any], info: EncodingInfo, shard_rows: int) -> dict[str, dict[str, Any]]:
    """key -> zarr.json document of a new, empty store, as zarr-python itself writes them
    (the group's with consolidated metadata)."""
    import zarr
    from zarr.codecs import BytesCodec, VLenUTF8Codec, ZstdCodec
    from zarr.storage import MemoryStore

    store = MemoryStore()
    shape, g, s = tuple(info.feature_shape()), info.grid, shard_rows
    root = zarr.open_group(store, mode="w", zarr_format=3, attributes=attrs)

    def dims(name: str) -> tuple[str, ...]:
        return dimension_names(name, info) or ()

    root.create_array(
        FEATURES,
        shape=(0, *shape),
        dtype=info.dtype,
        chunks=(1, *shape),
        shards=(s, *shape),
        compressors=None,
        dimension_names=dims(FEATURES),
    )
    zstd = ZstdCodec(level=3)
    root.create_array(
        MASKS, shape=(0, g, g), dtype="uint8", chunks=(s, g, g), compressors=zstd, dimension_names=dims(MASKS)
    )
    for name in (*STRING_ARRAYS, KEY):
        root.create_array(
            name,
            shape=(0,),
            dtype=str,
            chunks=(s,),
            serializer=VLenUTF8Codec(),
            compressors=zstd,
            dimension_names=dims(name),
        )
    root.create_array(
        ORIG_SIZE, shape=(0, 2), dtype="int32", chunks=(s, 2), compressors=zstd, dimension_names=dims(ORIG_SIZE)
    )
    root.create_array(
        KEY_HASH,
        shape=(0,),
        dtype="uint64",
        chunks=(s,),
        serializer=BytesCodec(),
        compressors=None,
        dimension_names=dims(KEY_HASH),
    )
    root.create_array(
        CLAIMS,
        shape=(0,),
        dtype=str,
        chunks=(1,),
        serializer=VLenUTF8Codec(),
        compressors=None,
        dimension_names=dims(CLAIMS),
    )
    if info.embedding_dim:
        e = info.embedding_dim
        root.create_array(
            EMBEDDING,
            shape=(0, e),
            dtype="float32",
            chunks=(s, e),
            serializer=BytesCodec(),
            compressors=None,
            dimension_names=dims(EMBEDDING),
        )
    docs = {k: json.loads(v.to_bytes()) for k, v in store._store_dict.items() if k.endswith("zarr.json")}
    arrays = {k.removesuffix("/zarr.json"): v for k, v in docs.items() if k != "zarr.json"}
    docs["zarr.json"] = group_document(attrs, arrays, num_rows=0)
    return docs


def with_dimension_names(name: str, doc: dict[str, Any], info: EncodingInfo) -> bool:
    """Give an array's document its dimension names if it has none; True if it changed."""
    dims = dimension_names(name, info)
    if dims is None or doc.get("dimension_names") or len(dims) != len(doc.get("shape", ())):
        return False
    doc["dimension_names"] = list(dims)
    return True


def group_document(attrs: Mapping[str, Any], arrays: Mapping[str, dict[str, Any]], *, num_rows: int) -> dict[str, Any]:
    """The group's zarr.json: the attributes (with `num_rows`) and every array's document inline."""
    return {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {**attrs, "num_rows": num_rows},
        "consolidated_metadata": {
            "kind": "inline",
            "must_understand": False,
            "metadata": {name: arrays[name] for name in sorted(arrays)},
        },
    }


def put_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")
