"""A store as a Hugging Face `datasets.Dataset` or `IterableDataset` (needs `pip install datasets`).

    from featstore.hf import to_hf_dataset, store_attrs
    ds = to_hf_dataset("feats.zarr")                   # Arrow copy in the datasets cache, memory-mapped
    it = to_hf_dataset("feats.zarr", streaming=True)   # no copy: rows read from the store as you iterate
    ds[0]["features"]                                  # (C, g, g) Array3D (Array4D with several layers)
    store_attrs(ds)["model"]                           # the store's attributes

Columns: `key`, `source` (strings), `features` (Array3D / Array4D of the store's dtype),
`mask` (Array2D uint8), `orig_size_hw` (2 int32) and, when the store has them,
`embedding` (E float32). The store's attributes travel in the dataset's
`info.description` as JSON (the one free-form field `DatasetInfo` keeps through
`save_to_disk` and the hub), read back with `store_attrs`.

Copies: `streaming=True` copies nothing (each shard is read when iterated, in the
process that iterates, so DataLoader workers each open the store themselves: the
dataset has one shard per store shard). `streaming=False` writes the rows once into
the datasets cache as Arrow (that is how `datasets.Dataset` holds data) and then reads
them memory-mapped; a store that changed (rows appended, rebuilt) gets a new cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from featstore.store import Location, open_store

DESCRIPTION_PREFIX = "featstore store attributes: "


def _features(store: Any) -> Any:
    import datasets

    info = store.info
    shape = tuple(info.feature_shape())
    array = datasets.Array4D if len(shape) == 4 else datasets.Array3D
    columns = {
        "key": datasets.Value("string"),
        "source": datasets.Value("string"),
        "features": array(shape=shape, dtype=info.dtype),
        "mask": datasets.Array2D(shape=(info.grid, info.grid), dtype="uint8"),
        "orig_size_hw": datasets.Sequence(datasets.Value("int32"), length=2),
    }
    if info.embedding_dim:
        columns["embedding"] = datasets.Sequence(datasets.Value("float32"), length=info.embedding_dim)
    return datasets.Features(columns)


def _rows(
    where: str, storage_options: Mapping[str, Any] | None, ranges: list[tuple[int, int]], fingerprint: str = ""
) -> Iterator[dict[str, Any]]:
    """The rows of these (start, stop) ranges; opens the store in the process that iterates."""
    with open_store(where, storage_options=storage_options) as store:
        sources = store.sources()
        for start, stop in ranges:
            batch = store.get_batch(np.arange(start, stop))  # a shard: one read per array
            for j, i in enumerate(batch.indices.tolist()):
                row = {
                    "key": batch.keys[j],
                    "source": sources[i],
                    "features": batch.features[j],
                    "mask": batch.masks[j],
                    "orig_size_hw": batch.orig_size_hw[j],
                }
                if batch.embedding is not None:
                    row["embedding"] = batch.embedding[j]
                yield row


def to_hf_dataset(
    where: str | os.PathLike[str] | Location,
    *,
    storage_options: Mapping[str, Any] | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Any:
    """The store's committed rows as a `datasets.Dataset` (`streaming=True`: an
    `IterableDataset`), with typed columns and the store's attributes (see the module
    docstring). `storage_options`: fsspec's options for a URL such as `s3://b/x.zarr`."""
    import datasets

    url = where.url if isinstance(where, Location) else os.fspath(where)
    opts = dict(storage_options) if storage_options else None
    with open_store(url, storage_options=opts) as store:
        features = _features(store)
        attrs = store.attrs
        step = store.shard_rows
        ranges = [(start, min(start + step, len(store))) for start in range(0, len(store), step)]
        # What the rows are: their keys (a store only appends; --overwrite changes `created`).
        digest = hashlib.sha256("\n".join([json.dumps(attrs, sort_keys=True), *store.keys()]).encode()).hexdigest()
    info = datasets.DatasetInfo(
        description=DESCRIPTION_PREFIX + json.dumps(attrs, ensure_ascii=False),
        features=features,
        dataset_name=os.path.basename(url.rstrip("/")),
    )
    if streaming:
        # A list in gen_kwargs is what datasets splits into shards (one per store shard here).
        kwargs = {"where": url, "storage_options": opts, "ranges": [[r] for r in ranges]}
        it = datasets.IterableDataset.from_generator(_shard_rows, features=features, gen_kwargs=kwargs)
        it.info.description = info.description
        it.info.dataset_name = info.dataset_name
        return it
    ds = datasets.Dataset.from_generator(
        _rows,
        features=features,
        cache_dir=cache_dir,
        gen_kwargs={"where": url, "storage_options": opts, "ranges": ranges, "fingerprint": digest},
    )
    ds.info.description = info.description
    ds.info.dataset_name = info.dataset_name
    return ds


def _shard_rows(
    where: str, storage_options: Mapping[str, Any] | None, ranges: list[list[tuple[int, int]]]
) -> Iterator[dict[str, Any]]:
    """`_rows` for the list of shards datasets hands one worker."""
    yield from _rows(where, storage_options, [r for shard in ranges for r in shard])


def store_attrs(dataset: Any) -> dict[str, Any]:
    """The store's attributes kept by `to_hf_dataset` (ValueError if the dataset has none)."""
    text = dataset.info.description or ""
    if not text.startswith(DESCRIPTION_PREFIX):
        raise ValueError("this dataset was not made by featstore.hf.to_hf_dataset")
    attrs: dict[str, Any] = json.loads(text[len(DESCRIPTION_PREFIX) :])
    return attrs
