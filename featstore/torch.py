"""`FeatureDataset`: feature stores as a PyTorch map-style Dataset."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from featstore.store import FeatureStore, Location, as_location, engine_order, open_store

_inherited: list[Any] = []  # a forked child keeps its parent's handles here, unused and unclosed

Where = str | os.PathLike[str] | Location
StorePaths = Where | Sequence[Where] | Mapping[str, Where]


def _stem(location: Location) -> str:
    return os.path.splitext(location.name)[0]


def _named_paths(
    path_or_paths: StorePaths, storage_options: Mapping[str, Any] | None
) -> tuple[dict[str, Location], bool]:
    """name -> location, and whether several stores were given."""
    if isinstance(path_or_paths, str | os.PathLike | Location):
        loc = as_location(path_or_paths, storage_options)
        return {_stem(loc): loc}, False
    if isinstance(path_or_paths, Mapping):
        named = {str(k): as_location(v, storage_options) for k, v in path_or_paths.items()}
    else:
        locs = [as_location(p, storage_options) for p in path_or_paths]
        named = {_stem(loc): loc for loc in locs}
        if len(named) != len(locs):
            raise ValueError("stores with the same file name: pass a mapping {name: path} instead")
    if not named:
        raise ValueError("no store given")
    return named, True


class FeatureDataset(Dataset):
    """Rows of one feature store, or of several joined by key, as a torch Dataset.

    One store:

        ds = FeatureDataset("clip.zarr")
        ds[0] == {"features": Tensor (C, g, g), "mask": Tensor (g, g) uint8, "key": "cats/a.png"}

    Several stores (say CLIP and DINOv2 features of the same images): give a mapping
    name -> path (or a list of paths, named by their file stems). `features` and `mask`
    are then dicts by name, which the default collate function batches per name:

        ds = FeatureDataset({"clip": "clip.zarr", "dino": "dino.h5"})
        ds[0]["features"]["dino"]  # Tensor (1024, 16, 16)

    Rows: `keys` (in that order; a key missing from any store raises KeyError), else the
    keys present in every store, in the first store's order. `labels` (key -> anything)
    adds "label" to each item; with `keys=None` it also selects the rows: those labelled
    (a labelled key missing from a store raises KeyError). `with_mask=False` drops "mask".
    `with_embedding=True` adds "embedding" (E,) float32 (stores written with embeddings).
    `dtype` (e.g. torch.float32) converts the features; default: as stored.
    Stores may be paths or URLs (`s3://bucket/x.zarr`, with `storage_options`).

    Works with DataLoader workers under fork and spawn, local or on S3: the dataset
    pickles only locations and row numbers, and each process opens the stores itself on
    first use (remote I/O is fsspec's, which makes a new client in each process). Batched
    reads (`__getitems__`, used by DataLoader) read each store with one `get_batch`.

    Zarr and HDF5 stores written by featstore are read by byte offset (engine
    "direct", safe in forked workers). For other Zarr layouts, workers use TensorStore
    when installed; the main process does not by default (`engine=None`), because
    TensorStore aborts a forked process that uses it after its parent did, and forked
    DataLoader workers would then fall back to zarr-python (~10x slower). `engine`
    passes an engine choice to `open_store` instead ("auto", "direct", "tensorstore",
    "zarr", or a sequence of them).
    """

    def __init__(
        self,
        path_or_paths: StorePaths,
        keys: Sequence[str] | None = None,
        with_mask: bool = True,
        labels: Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        *,
        with_embedding: bool = False,
        engine: str | Sequence[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.paths, self.joined = _named_paths(path_or_paths, storage_options)
        if engine is not None:
            engine_order(engine)  # a bad name fails here, not in a worker
        self.engine = engine
        self.with_mask = with_mask
        self.with_embedding = with_embedding
        self.dtype = dtype
        self._stores: dict[str, FeatureStore] = {}
        self._pid = os.getpid()
        stores = self._open()
        if with_embedding:
            lacking = [name for name, st in stores.items() if not st.has_embedding]
            if lacking:
                raise ValueError(f"with_embedding=True, but store {lacking[0]!r} holds no embeddings")
        indexes = {name: {k: i for i, k in enumerate(s.keys())} for name, s in stores.items()}
        first = next(iter(indexes.values()))
        if keys is None and labels is not None:
            keys = [k for k in first if k in labels]
            keys += [k for k in labels if k not in first]  # reported as missing below
        if keys is None:
            keys = [k for k in first if all(k in idx for idx in indexes.values())]
            if self.joined and not keys and any(indexes.values()):
                names = ", ".join(f"{n!r} ({len(i)} rows)" for n, i in indexes.items())
                raise ValueError(f"the stores have no key in common: {names}; were they built from the same folder?")
        else:
            keys = list(keys)
            for name, idx in indexes.items():
                missing = [k for k in keys if k not in idx]
                if missing:
                    raise KeyError(
                        f"{len(missing)} key(s) are not in store {name!r} ({self.paths[name]}), e.g. {missing[0]!r}"
                    )
        if labels is not None:
            unlabelled = [k for k in keys if k not in labels]
            if unlabelled:
                raise KeyError(f"{len(unlabelled)} key(s) have no label, e.g. {unlabelled[0]!r}")
            self.labels: list[Any] | None = [labels[k] for k in keys]
        else:
            self.labels = None
        self.keys = keys
        self.rows = {name: np.array([idx[k] for k in keys], dtype=np.int64) for name, idx in indexes.items()}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.keys)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} rows")
        return self.__getitems__([i % n])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = np.asarray(indices, dtype=np.int64)
        feats: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        embs: dict[str, torch.Tensor] = {}
        for name, store in self._open().items():
            batch = store.get_batch(self.rows[name][idx])
            feats[name] = torch.from_numpy(batch.features)
            if self.dtype is not None:
                feats[name] = feats[name].to(self.dtype)
            masks[name] = torch.from_numpy(batch.masks)
            if self.with_embedding and batch.embedding is not None:
                embs[name] = torch.from_numpy(batch.embedding)
        items = []
        for j, i in enumerate(idx.tolist()):
            item: dict[str, Any] = {"key": self.keys[i]}
            if self.joined:
                item["features"] = {name: f[j] for name, f in feats.items()}
                if self.with_mask:
                    item["mask"] = {name: m[j] for name, m in masks.items()}
                if self.with_embedding:
                    item["embedding"] = {name: e[j] for name, e in embs.items()}
            else:
                item["features"] = next(iter(feats.values()))[j]
                if self.with_mask:
                    item["mask"] = next(iter(masks.values()))[j]
                if self.with_embedding:
                    item["embedding"] = next(iter(embs.values()))[j]
            if self.labels is not None:
                item["label"] = self.labels[i]
            items.append(item)
        return items

    def _open(self) -> dict[str, FeatureStore]:
        """This process's open stores (reopened after a fork)."""
        if self._pid != os.getpid():
            _inherited.append(self._stores)  # the parent's handles: not ours to use or close
            self._stores = {}
            self._pid = os.getpid()
        if not self._stores:
            engine = self.engine
            if engine is None:
                engine = ("direct", "zarr") if torch.utils.data.get_worker_info() is None else "auto"
            self._stores = {name: open_store(p, engine=engine) for name, p in self.paths.items()}
        return self._stores

    def close(self) -> None:
        if self._pid == os.getpid():
            for s in self._stores.values():
                s.close()
        self._stores = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stores"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
