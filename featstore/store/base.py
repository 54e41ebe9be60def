"""The layout every featstore store follows, and the `FeatureStore` reader interface.

A store is a Zarr v3 group (`*.zarr`, local or on object storage) or an HDF5 file
(`*.h5`, `*.hdf5`, local) holding these arrays, one row per image:

    features      (N, *feature_shape)  float16 | float32  the patch-feature map(s): (C, g, g) or (L, C, g, g)
    masks         (N, g, g)     uint8               1 where the patch is foreground
    keys          (N,)          str                 image path relative to the input root
    sources       (N,)          str                 image path as written into "source"
    orig_size_hw  (N, 2)        int32               the image's size before resizing
    embedding     (N, E)        float32             optional: the pooled embedding (E = embedding_dim)

and attributes: `featstore_version`, `layout_version`, `created`, `failed` (a list of
{key, reason}), `shard_rows`, `embedding_dim`, `num_rows` and everything from
`EncodingInfo.to_attrs()`. For other tools, every array's dimensions are named
(`dimension_names` below), and `key` (the keys again, the row dimension's coordinate) and,
in Zarr, `key_hash` are written beside them (see `featstore.store._zarr_meta`).
Which rows exist (are committed) is the backend's business: see `featstore.store`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from featstore.batches import EncodedBatch, EncodingInfo, Failure, ImageItem
from featstore.errors import CorruptStoreError, IncompatibleStoreError, StoreError
from featstore.images import AUTO_MARK, TORCH_MARK
from featstore.store.location import Format, Location, as_location

LAYOUT_VERSION = 2  # 1: featstore 0.1 (a num_rows attribute); 2: shards commit themselves

FEATURES = "features"
MASKS = "masks"
KEYS = "keys"
SOURCES = "sources"
ORIG_SIZE = "orig_size_hw"
EMBEDDING = "embedding"
ARRAYS = (FEATURES, MASKS, KEYS, SOURCES, ORIG_SIZE, EMBEDDING)

# Dimension names (Zarr's `dimension_names`, HDF5 dimension scales). The row dimension is
# `key`, and a copy of the keys named like it (`KEY`, written with each shard) is its
# coordinate for xarray and netCDF readers: a coordinate named `keys` would shadow
# `Mapping.keys` on xarray objects (xarray's apply_ufunc, hence `astype`, fails on it).
ROWS = KEY = "key"


def dimension_names(name: str, info: EncodingInfo) -> tuple[str, ...] | None:
    """The dimensions of one of the layout's row arrays (None: not one of them)."""
    grid = ("y", "x")
    feature_dims = ("layer", "channel", *grid) if len(info.feature_shape()) == 4 else ("channel", *grid)
    dims = {
        FEATURES: (ROWS, *feature_dims),
        MASKS: (ROWS, *grid),
        KEYS: (ROWS,),
        KEY: (ROWS,),
        SOURCES: (ROWS,),
        ORIG_SIZE: (ROWS, "hw"),
        EMBEDDING: (ROWS, "embedding_dim"),
    }
    return dims.get(name)


STORE_ATTRS = ("featstore_version", "layout_version", "created", "failed")
INFO_ATTRS = ("model", "model_source", "family", "feature_type", "size", "grid", "hidden_dim", "dtype")
FEATURE_DTYPES = ("float16", "float32")

# Rows per Zarr shard, and per step when reading a whole store: up to 64 MiB (see _zarr.py).
STEP_BYTES = 64 * 2**20
MIN_STEP_ROWS, MAX_STEP_ROWS = 8, 1024


def store_format(where: str | os.PathLike[str] | Location) -> Format:
    """The format a store location names, by its suffix."""
    return as_location(where).format


def step_rows(info: EncodingInfo) -> int:
    """The largest power of two number of rows within 64 MiB of features (8 to 1024 rows)."""
    row_bytes = int(np.prod(info.feature_shape())) * np.dtype(info.dtype).itemsize
    rows = 2 ** int(math.log2(max(1.0, STEP_BYTES / row_bytes)))
    return max(MIN_STEP_ROWS, min(MAX_STEP_ROWS, rows))


@dataclass(frozen=True, slots=True)
class Row:
    """One image's row of a store."""

    key: str
    index: int
    features: np.ndarray  # (C, g, g), or (L, C, g, g) with several layers
    mask: np.ndarray  # (g, g) uint8
    orig_size_hw: tuple[int, int]
    source: str
    embedding: np.ndarray | None = None  # (E,), when the store has embeddings


@dataclass(frozen=True, slots=True)
class RowBatch:
    """Several rows, stacked, in the order they were asked for."""

    keys: list[str]
    indices: np.ndarray  # (B,) int64
    features: np.ndarray  # (B, *feature_shape)
    masks: np.ndarray  # (B, g, g) uint8
    orig_size_hw: np.ndarray  # (B, 2) int32
    embedding: np.ndarray | None = None  # (B, E), when the store has embeddings

    def __len__(self) -> int:
        return len(self.keys)


def info_from_attrs(attrs: dict[str, Any], path: object) -> EncodingInfo:
    """Check the attributes a reader needs and build the `EncodingInfo`; CorruptStoreError if off."""
    missing = [a for a in (*STORE_ATTRS, *INFO_ATTRS) if a not in attrs]
    if missing:
        raise CorruptStoreError(f"{path}: not a featstore store, or damaged: attributes missing: {', '.join(missing)}")
    version = attrs["layout_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptStoreError(f"{path}: layout_version {version!r} is not a positive integer")
    if version > LAYOUT_VERSION:
        raise StoreError(f"{path}: layout version {version} is newer than this featstore reads ({LAYOUT_VERSION})")
    if version == 1:
        n = attrs.get("num_rows")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise CorruptStoreError(f"{path}: num_rows {n!r} is not a non-negative integer")
    try:
        info = EncodingInfo.from_attrs(attrs)
        e = int(attrs.get("embedding_dim", 0) or 0)
        if e != info.embedding_dim:
            info = dataclasses.replace(info, embedding_dim=e)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptStoreError(f"{path}: bad encoding attributes ({e})") from None
    if info.dtype not in FEATURE_DTYPES:
        raise CorruptStoreError(f"{path}: dtype attribute {info.dtype!r} is not one of {FEATURE_DTYPES}")
    if info.grid < 1 or info.hidden_dim < 1 or info.embedding_dim < 0:
        raise CorruptStoreError(f"{path}: grid {info.grid} / hidden_dim {info.hidden_dim} must be positive")
    if not isinstance(attrs["failed"], list):
        raise CorruptStoreError(f"{path}: attribute 'failed' is not a list")
    return info


def expected_arrays(info: EncodingInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape after the row axis, dtype kind) as the layout defines them."""
    g = info.grid
    out = {
        FEATURES: (tuple(info.feature_shape()), info.dtype),
        MASKS: ((g, g), "uint8"),
        KEYS: ((), "str"),
        SOURCES: ((), "str"),
        ORIG_SIZE: ((2,), "int32"),
    }
    if info.embedding_dim:
        out[EMBEDDING] = ((info.embedding_dim,), "float32")
    return out


def check_arrays(
    path: object, info: EncodingInfo, num_rows: int, found: dict[str, tuple[tuple[int, ...], str]]
) -> None:
    """Arrays as found (name -> (shape, dtype)) against the attributes; CorruptStoreError if off.

    String arrays are reported with dtype "str" by the backends. `num_rows`: the rows the
    arrays must at least hold (layout 1; 0 where commits, not shapes, say which rows exist).
    """
    for name, (tail, dtype) in expected_arrays(info).items():
        if name not in found:
            raise CorruptStoreError(f"{path}: array '{name}' is missing")
        shape, got = found[name]
        if tuple(shape[1:]) != tail or len(shape) != 1 + len(tail):
            raise CorruptStoreError(
                f"{path}: array '{name}' has rows of shape {tuple(shape[1:])}, the attributes say {tail}"
            )
        if got != dtype:
            raise CorruptStoreError(f"{path}: array '{name}' has dtype {got}, expected {dtype}")
        if shape[0] < num_rows:
            raise CorruptStoreError(f"{path}: array '{name}' holds {shape[0]} rows but num_rows is {num_rows}")


def resized_by(info: EncodingInfo) -> str:
    """Which resizer made a store's rows: its recorded resize names auto's or torch's, or
    Pillow's (every store made before the torch resizer existed)."""
    if AUTO_MARK in info.resize:
        return "auto"
    return "torch" if TORCH_MARK in info.resize else "pillow"


def check_compatible(path: object, stored: EncodingInfo, requested: EncodingInfo) -> None:
    """Refuse to mix rows made differently in one store (IncompatibleStoreError)."""
    for name in EncodingInfo.COMPATIBILITY_FIELDS:
        have, want = getattr(stored, name), getattr(requested, name)
        if have != want:
            raise IncompatibleStoreError(
                f"{path} holds {name}={have!r} but this build makes {name}={want!r}; "
                "write to another store or pass --overwrite"
            )
    if stored.embedding_dim != requested.embedding_dim:
        raise IncompatibleStoreError(
            f"{path} holds embedding_dim={stored.embedding_dim} but this build makes "
            f"embedding_dim={requested.embedding_dim}; write to another store or pass --overwrite"
        )
    # Rows imported from .npy files have no known weights: only the fields above can be checked.
    imported = "imported" in (stored.model_source.get("kind"), requested.model_source.get("kind"))
    if not imported and resized_by(stored) != resized_by(requested):
        raise IncompatibleStoreError(
            f"{path} holds rows resized by {resized_by(stored)} but this build resizes with "
            f"{resized_by(requested)} (pixels differ slightly); write to another store or pass --overwrite"
        )
    if not imported and not same_weights(stored.model_source, requested.model_source):
        raise IncompatibleStoreError(
            f"{path} holds features of {describe_model(stored)}, but this build uses other weights: "
            f"{describe_model(requested)}; write to another store or pass --overwrite"
        )


def same_weights(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two model sources name the same weights: by content where both record its
    hash (any path, a copy, the hub cache), else (stores made before) by where they came from."""
    from featstore.fingerprint import CONTENT_KEY

    if a.get(CONTENT_KEY) and b.get(CONTENT_KEY):
        return a[CONTENT_KEY] == b[CONTENT_KEY] and a.get("preset") == b.get("preset")
    strip = {CONTENT_KEY}
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def describe_model(info: EncodingInfo) -> str:
    """A model source as words: "model 'x' (the folder /m, weights 1a2b3c4d5e6f)"."""
    from featstore.fingerprint import CONTENT_KEY

    src = info.model_source
    kind = src.get("kind", "")
    where = {
        "hf": f"Hugging Face {src.get('id')}" + (f" at revision {src['revision'][:12]}" if src.get("revision") else ""),
        "local": f"the folder {src.get('id')}",
        "openai-checkpoint": f"the checkpoint {src.get('path')}",
        "random": f"random weights, seed {src.get('seed')}",
    }.get(kind, f"{kind or 'unknown'} {src.get('id', '')}".strip())
    if src.get("preset"):
        where += f", preset {src['preset']}"
    content = src.get(CONTENT_KEY) or src.get("sha256")
    weights = f", weights {content[:12]}" if content else ", weights not hashed"
    return f"model {info.model!r} ({where}{weights})"


def failures_from_attrs(attrs: dict[str, Any]) -> list[Failure]:
    failed = attrs.get("failed", [])
    return [Failure(str(f["key"]), str(f.get("reason", ""))) for f in failed if isinstance(f, dict) and "key" in f]


class FeatureStore(ABC):
    """A read-only view of a store's committed rows (a snapshot taken at open).

    Rows are addressed by position (`store[3]`, `store[-1]`) or by key
    (`store["cats/a.png"]`); `get_batch` reads many rows at once.
    Use as a context manager, or call `close()`.
    """

    format: ClassVar[Format]

    def __init__(self, location: Location, attrs: dict[str, Any], num_rows: int) -> None:
        self.location = location
        self.path: Path | str = location.path if location.is_local else location.url
        self._attrs = attrs
        self._info = info_from_attrs(attrs, location)
        self._n = num_rows
        self._keys: list[str] | None = None
        self._sources: list[str] | None = None
        self._orig: np.ndarray | None = None
        self._index: dict[str, int] | None = None

    # -- what a backend provides -------------------------------------------------------

    @abstractmethod
    def _read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(features, masks, embedding or None) of these rows: sorted, unique, all < len(self)."""

    @abstractmethod
    def _read_column(self, name: str) -> Any:
        """The first len(self) entries of a small array (keys, sources, orig_size_hw); strings as a list."""

    @abstractmethod
    def array_details(self) -> dict[str, dict[str, Any]]:
        """name -> shape, dtype, chunks, codecs (for `featstore info`)."""

    @property
    @abstractmethod
    def shard_rows(self) -> int:
        """Rows per unit of writing (a shard in Zarr); reading in these steps is efficient."""

    @abstractmethod
    def close(self) -> None: ...

    def _read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self._read_rows(np.arange(start, stop, dtype=np.int64))

    # -- the interface ---------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's attributes (a copy)."""
        return copy.deepcopy(self._attrs)

    @property
    def info(self) -> EncodingInfo:
        return self._info

    @property
    def has_embedding(self) -> bool:
        return self._info.embedding_dim > 0

    @property
    def failed(self) -> list[Failure]:
        """Images that could not be encoded in the last run(s)."""
        return failures_from_attrs(self._attrs)

    def __len__(self) -> int:
        return self._n

    def keys(self) -> list[str]:
        """Keys of the committed rows, in row order."""
        return list(self._key_list())

    def sources(self) -> list[str]:
        """Source paths of the committed rows, in row order."""
        return list(self._source_list())

    def orig_sizes(self) -> np.ndarray:
        """(N, 2) int32: each image's height and width before resizing."""
        return self._orig_sizes().copy()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._key_index()

    def index_of(self, key: str) -> int:
        try:
            return self._key_index()[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None

    def __getitem__(self, item: int | str) -> Row:
        i = self._position(item)
        feats, masks, emb = self._read_rows(np.array([i], dtype=np.int64))
        return Row(
            self._key_list()[i],
            i,
            feats[0],
            masks[0],
            self._orig_tuple(i),
            self._source_list()[i],
            None if emb is None else emb[0],
        )

    def __iter__(self) -> Iterator[Row]:
        """Every row in order (read a shard at a time). `key in store` tests keys."""
        sources = self._source_list()
        for b in self.iter_batches():
            for j, i in enumerate(b.indices):
                emb = None if b.embedding is None else b.embedding[j]
                yield Row(b.keys[j], int(i), b.features[j], b.masks[j], self._orig_tuple(int(i)), sources[i], emb)

    def get_batch(self, items: Sequence[int | str] | np.ndarray) -> RowBatch:
        """Rows by position or key (mixed is fine, repeats too), stacked in the order given."""
        indices = np.fromiter((self._position(x) for x in items), dtype=np.int64, count=len(items))
        if len(indices) == 0:
            return self._empty_batch()
        unique, inverse = np.unique(indices, return_inverse=True)
        feats, masks, emb = self._read_rows(unique)
        if len(unique) != len(indices) or not np.array_equal(unique, indices):
            feats, masks = feats[inverse], masks[inverse]
            emb = None if emb is None else emb[inverse]
        keys = self._key_list()
        return RowBatch([keys[i] for i in indices], indices, feats, masks, self._orig_sizes()[indices], emb)

    def iter_batches(self, batch_size: int | None = None) -> Iterator[RowBatch]:
        """All rows in order, `batch_size` at a time (default: a shard at a time)."""
        step = batch_size or self.shard_rows
        keys = self._key_list()
        for start in range(0, self._n, step):
            stop = min(start + step, self._n)
            feats, masks, emb = self._read_range(start, stop)
            yield RowBatch(keys[start:stop], np.arange(start, stop), feats, masks, self._orig_sizes()[start:stop], emb)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        info = self._info
        return (
            f"<FeatureStore {self.format} {str(self.path)!r}: {self._n} rows of {info.feature_shape()} "
            f"{info.dtype}, {info.model}>"
        )

    # -- helpers -----------------------------------------------------------------------

    def _empty_batch(self) -> RowBatch:
        info = self._info
        g = info.grid
        emb = np.empty((0, info.embedding_dim), np.float32) if info.embedding_dim else None
        feats = np.empty((0, *info.feature_shape()), info.dtype)
        return RowBatch(
            [], np.empty(0, np.int64), feats, np.empty((0, g, g), np.uint8), np.empty((0, 2), np.int32), emb
        )

    def _position(self, item: int | str) -> int:
        if isinstance(item, str):
            return self.index_of(item)
        try:
            i = operator.index(item)
        except TypeError:
            raise TypeError(f"rows are addressed by int position or str key, not {type(item).__name__}") from None
        if not -self._n <= i < self._n:
            raise IndexError(f"row {i} out of range: {self.path} holds {self._n} rows")
        return i + self._n if i < 0 else i

    def _key_list(self) -> list[str]:
        if self._keys is None:
            self._keys = list(self._read_column(KEYS))
        return self._keys

    def _key_index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self._key_list())}
            if len(self._index) != self._n:
                raise CorruptStoreError(f"{self.path}: keys are not unique ({self._n - len(self._index)} repeats)")
        return self._index

    def _orig_sizes(self) -> np.ndarray:
        if self._orig is None:
            self._orig = np.asarray(self._read_column(ORIG_SIZE), dtype=np.int32).reshape(-1, 2)
        return self._orig

    def _orig_tuple(self, i: int) -> tuple[int, int]:
        h, w = self._orig_sizes()[i]
        return int(h), int(w)

    def _source_list(self) -> list[str]:
        if self._sources is None:
            self._sources = list(self._read_column(SOURCES))
        return self._sources


def encoded_batches(store: FeatureStore, skip_keys: frozenset[str] | set[str] = frozenset()) -> Iterator[EncodedBatch]:
    """A store's rows in order as `EncodedBatch`es (what writers take), a shard at a time."""
    sources = store.sources()
    for batch in store.iter_batches():
        keep = [j for j, k in enumerate(batch.keys) if k not in skip_keys]
        if not keep:
            continue
        rows = slice(None) if len(keep) == len(batch) else np.asarray(keep)  # a slice: no copy
        yield EncodedBatch(
            items=[ImageItem(batch.keys[j], sources[int(batch.indices[j])]) for j in keep],
            features=batch.features[rows],
            masks=batch.masks[rows],
            orig_size_hw=batch.orig_size_hw[rows],
            embedding=None if batch.embedding is None else batch.embedding[rows],
        )
