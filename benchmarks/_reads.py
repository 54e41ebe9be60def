"""Decode throughput per worker, and reading rows back: store reader vs per-image .npy files."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featstore.batches import ImageItem
from featstore.images import load_sample
from featstore.npy import output_stem

# ---------------------------------------------------------------- 4. decode


def decode_rate(files: list[Path], *, size: int, grid: int, min_seconds: float) -> dict[str, Any]:
    """images/s of `featstore.images.load_sample` in this one process (what one worker does)."""
    items = [ImageItem(key=f.name, path=str(f)) for f in files]
    first = load_sample(items[0], size=size, grid=grid)  # warm-up (imports, codec tables)
    if first.error:
        return {"error": first.error}
    done, errors = 0, 0
    t0 = time.perf_counter()
    while True:
        for it in items:
            errors += load_sample(it, size=size, grid=grid).error is not None
        done += len(items)
        seconds = time.perf_counter() - t0
        if seconds >= min_seconds:
            break
    return {
        "images": done,
        "errors": errors,
        "seconds": seconds,
        "images_per_s": done / seconds,
        "ms_per_image": 1000 * seconds / done,
        "distinct_files": len(items),
    }


# ---------------------------------------------------------------- 5. reads


def drop_caches() -> bool:
    """Empty the page cache (root only; containers often refuse). True if it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_usage(path: Path) -> dict[str, int]:
    """Files, bytes (apparent) and bytes allocated on disk under `path` (a file or folder)."""
    paths = [path] if path.is_file() else [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
    stats = [p.stat() for p in paths]
    return {
        "files": len(stats),
        "bytes": sum(s.st_size for s in stats),
        "disk_bytes": sum(getattr(s, "st_blocks", 0) * 512 for s in stats),
    }


class NpyRows(Dataset[Any]):
    """The per-image .npy files of the same rows, read with np.load (features, and mask if wanted)."""

    def __init__(self, feature_files: list[str], mask_files: list[str] | None) -> None:
        self.features, self.masks = feature_files, mask_files

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> Any:
        if self.masks is None:
            return np.load(self.features[i])
        return np.load(self.features[i]), np.load(self.masks[i])


def npy_paths(npy_dir: Path, keys: list[str]) -> tuple[list[str], list[str]]:
    stems = [output_stem(npy_dir, k) for k in keys]
    return [str(s.with_name(s.name + ".npy")) for s in stems], [str(s.with_name(s.name + "_mask.npy")) for s in stems]


def _has_mask(row: Any) -> bool:
    """Whether a store row carries more than the feature array (then .npy reads load the mask too)."""
    return not isinstance(row, np.ndarray | torch.Tensor)


def loader_rates(
    dataset: Dataset[Any], *, shuffle: bool, epochs: int, cold: bool, batch_size: int = 64, workers: int = 2
) -> dict[str, Any]:
    """rows/s of a DataLoader epoch: warm (best of `epochs` after a warm-up epoch) and cold.

    Workers are persistent: they start (and the page cache fills) in the warm-up
    epoch; the cold epoch runs on the same workers after the page cache was dropped.
    """
    rows = len(dataset)  # type: ignore[arg-type]
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )

    def epoch() -> float:
        t0 = time.perf_counter()
        for _ in loader:
            pass
        return rows / (time.perf_counter() - t0)

    epoch()
    out: dict[str, Any] = {"rows": rows, "warm_rows_per_s": max(epoch() for _ in range(epochs))}
    if cold:
        drop_caches()
        out["cold_rows_per_s"] = epoch()
    return out


Groups = list[list[int]]


def _rows_per_s(fn: Callable[[Groups], None], groups: Groups) -> float:
    t0 = time.perf_counter()
    fn(groups)
    return sum(map(len, groups)) / (time.perf_counter() - t0)


def _compare(
    store_fn: Callable[[Any, Groups], None],
    npy_fn: Callable[[Groups], None],
    open_fn: Callable[[], Any],
    warm: Groups,
    cold: Groups | None,
) -> dict[str, Any]:
    """rows/s, store vs .npy: warm (same rows read once before, store already open) and,
    when `cold` is given, on other rows after the page cache was dropped and the store reopened."""
    store = open_fn()
    store_fn(store, warm)
    npy_fn(warm)
    out: dict[str, Any] = {
        "store": {"warm_rows_per_s": _rows_per_s(lambda g: store_fn(store, g), warm)},
        "npy": {"warm_rows_per_s": _rows_per_s(npy_fn, warm)},
    }
    _close(store)
    if cold is not None:
        drop_caches()
        store = open_fn()
        out["store"]["cold_rows_per_s"] = _rows_per_s(lambda g: store_fn(store, g), cold)
        _close(store)
        drop_caches()
        out["npy"]["cold_rows_per_s"] = _rows_per_s(npy_fn, cold)
    return out


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if callable(close):
        close()


def _draw(rng: np.random.Generator, pool: np.ndarray, groups: int, size: int) -> Groups:
    """`groups` lists of `size` distinct rows from `pool` (rows may repeat across lists)."""
    size = min(size, len(pool))
    return [[int(i) for i in rng.choice(pool, size=size, replace=False)] for _ in range(groups)]


def read_store(
    path: Path, npy_dir: Path, *, single_reads: int, batches: int, epochs: int, cold: bool, seed: int = 0
) -> dict[str, Any]:
    """Store reader vs per-image .npy, on the same rows, for one store (.zarr or .h5)."""
    from featstore.store import open_store
    from featstore.torch import FeatureDataset

    store = open_store(path)  # featstore's layout: the "direct" engine, which forked workers can use too
    n = len(store)
    keys = [str(k) for k in store.keys()]  # noqa: SIM118  (the FeatureStore API)
    feats, masks = npy_paths(npy_dir, keys)
    with_mask = _has_mask(store[0])
    npy_ds = NpyRows(feats, masks if with_mask else None)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"rows": n, "engine": getattr(store, "engine", None), "npy_loads_mask_too": with_mask}

    # DataLoader, batch 64, 2 workers: random (shuffle) and sequential; store first, then npy.
    for name, shuffle in (("loader_random", True), ("loader_sequential", False)):
        out[name] = {
            "store": loader_rates(FeatureDataset(path), shuffle=shuffle, epochs=epochs, cold=cold),
            "npy": loader_rates(npy_ds, shuffle=shuffle, epochs=epochs, cold=cold),
        }

    # In this process: single random rows (store[i] vs np.load), and get_batch of 64
    # random rows vs 64 np.loads. Cold reads use rows the warm reads did not touch.
    def single(st: Any, groups: Groups) -> None:
        for g in groups:
            st[g[0]]

    def batch(st: Any, groups: Groups) -> None:
        for g in groups:
            st.get_batch(g)

    def npy(groups: Groups) -> None:
        for g in groups:
            for i in g:
                npy_ds[i]

    all_rows = np.arange(n)
    warm_single = _draw(rng, all_rows, 1, single_reads)[0]
    warm_batches = _draw(rng, all_rows, batches, 64)
    touched = set(warm_single).union(*map(set, warm_batches))
    untouched = np.array(sorted(set(range(n)) - touched)) if len(touched) < n else all_rows
    sorted_needed = False
    try:
        store.get_batch(warm_batches[0])
    except Exception:  # a reader may insist on increasing indices (h5py does)
        sorted_needed = True
    _close(store)
    cold_single = _draw(rng, untouched, 1, single_reads)[0] if cold else None
    cold_batches = _draw(rng, untouched, batches, 64) if cold else None
    if sorted_needed:
        warm_batches = [sorted(g) for g in warm_batches]
        cold_batches = [sorted(g) for g in cold_batches] if cold_batches else None

    out["single_random"] = {
        "reads": len(warm_single),
        **_compare(
            single,
            npy,
            lambda: open_store(path),
            [[i] for i in warm_single],
            [[i] for i in cold_single] if cold_single else None,
        ),
    }
    out["get_batch_64"] = {
        "batches": len(warm_batches),
        "needed_sorted_indices": sorted_needed,
        **_compare(batch, npy, lambda: open_store(path), warm_batches, cold_batches),
    }
    return out
