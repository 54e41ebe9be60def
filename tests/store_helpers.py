"""Test data for the store tests: an EncodingInfo and deterministic batches, no model code."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from featstore.batches import EncodedBatch, EncodingInfo, ImageItem

C, G = 16, 4


def make_info(**changes: Any) -> EncodingInfo:
    fields: dict[str, Any] = dict(
        model="ViT-B/32",
        model_source={"kind": "hf", "id": "openai/clip-vit-base-patch32", "revision": "x"},
        family="clip",
        feature_type="clip_vit_last_layer",
        clip_output="raw",
        size=224,
        grid=G,
        hidden_dim=C,
        dtype="float16",
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
    )
    fields.update(changes)
    return EncodingInfo(**fields)


def row_values(key: str, c: int = C, g: int = G, dtype: str = "float16") -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Features, mask and orig size that depend only on the key (so reruns can be compared)."""
    seed = int.from_bytes(key.encode("utf-8", "surrogateescape")[-8:].rjust(8, b"\0"), "little") ^ len(key)
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(c, g, g)).astype(dtype)
    mask = rng.integers(0, 2, (g, g)).astype(np.uint8)
    return feats, mask, [int(x) for x in rng.integers(1, 4000, 2)]


def embedding_values(key: str, e: int) -> np.ndarray:
    """A pooled embedding that depends only on the key."""
    seed = sum(key.encode("utf-8", "surrogateescape")) + 7 * len(key)
    return np.random.default_rng(seed).normal(size=(e,)).astype(np.float32)


def make_batch(keys: Sequence[str], root: str = "imgs", info: EncodingInfo | None = None) -> EncodedBatch:
    c, g, dtype = (info.hidden_dim, info.grid, info.dtype) if info else (C, G, "float16")
    e = info.embedding_dim if info else 0
    values = [row_values(k, c, g, dtype) for k in keys]
    return EncodedBatch(
        items=[ImageItem(k, f"{root}/{k}") for k in keys],
        features=np.stack([v[0] for v in values]) if values else np.empty((0, c, g, g), dtype),
        masks=np.stack([v[1] for v in values]) if values else np.empty((0, g, g), np.uint8),
        orig_size_hw=np.array([v[2] for v in values], dtype=np.int32).reshape(-1, 2),
        embedding=np.stack([embedding_values(k, e) for k in keys]).reshape(-1, e) if e else None,
    )


def blobs(where: Any) -> Any:
    """The store's objects, local or remote (to change a store behind featstore's back)."""
    from featstore.store._blobs import open_blobs
    from featstore.store.location import as_location

    return open_blobs(as_location(where))


def edit_attrs(path: Any, **changes: Any) -> None:
    """Change a store's attributes behind featstore's back."""
    if str(path).endswith(".zarr"):
        b = blobs(path)
        meta = json.loads(b.read("zarr.json"))
        meta["attributes"].update(changes)
        b.write_many({"zarr.json": json.dumps(meta).encode()})
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            for k, v in changes.items():
                f.attrs[k] = json.dumps(v)


def delete_array(path: Any, name: str) -> None:
    if str(path).endswith(".zarr"):
        b = blobs(path)
        b.delete_many(b.list(name))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            del f[name]
