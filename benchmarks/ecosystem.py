"""A full reduction over every row of a store: featstore's own reader against the array
ecosystem reading the same local Zarr store (xarray + dask, dask.array.from_zarr), and what
a Hugging Face `datasets` view of it costs.

Every path computes the same float64 sum over all rows of `features` (checked equal),
from a store written once by `StoreWriter` (synthetic float16 rows):

- featstore: `store.iter_batches()` (a shard per batch, direct byte-range reads), numpy sum;
- xarray + dask, shard chunks: `xr.open_zarr(path, chunks={"key": shard_rows})` (what the
  README shows), threaded scheduler;
- xarray + dask, default chunks: `xr.open_zarr(path)`: dask takes the Zarr inner chunk,
  one row per task (the cost of not passing `chunks`);
- dask.array.from_zarr(..., chunks="auto"): chunks from the shards;
- datasets: `featstore.hf.to_hf_dataset` (the Arrow copy, rows/s of building it) and the
  streaming `IterableDataset` (rows/s of one pass).

    .venv/bin/python benchmarks/ecosystem.py                        # 4096 ViT-B/32-sized rows
    .venv/bin/python benchmarks/ecosystem.py --rows 256 --repeats 1 --out /tmp/eco.json   # smoke run

Writes `benchmarks/results/cpu-ecosystem.json` by default (best of `--repeats` per path,
interleaved) and prints one table. Reads come from the page cache (the store was just
written); on a shared machine numbers move +-25 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from random_access import make_info  # the same synthetic EncodingInfo

from featstore.batches import EncodedBatch, ImageItem
from featstore.store import open_store, open_store_writer

RESULTS = Path(__file__).resolve().parent / "results" / "cpu-ecosystem.json"


def write_store(path: Path, rows: int, shape: tuple[int, int, int]) -> int:
    """A store of `rows` synthetic rows; returns its shard rows."""
    c, g, _ = shape
    info = make_info(c, g)
    rng = np.random.default_rng(0)
    with open_store_writer(path, info, overwrite=True) as w:
        for start in range(0, rows, 256):
            n = min(256, rows - start)
            keys = [f"img{i:07d}.png" for i in range(start, start + n)]
            w.write(
                EncodedBatch(
                    items=[ImageItem(k, k) for k in keys],
                    features=rng.standard_normal((n, *shape), dtype=np.float32).astype(np.float16),
                    masks=np.ones((n, g, g), np.uint8),
                    orig_size_hw=np.full((n, 2), 512, np.int32),
                )
            )
    with open_store(path) as s:
        return s.shard_rows


def featstore_sum(path: Path) -> np.ndarray:
    with open_store(path) as s:
        return sum(b.features.astype(np.float64).sum(axis=0) for b in s.iter_batches())  # type: ignore[return-value]


def xarray_sum(path: Path, chunks: Any) -> np.ndarray:
    import xarray as xr

    kwargs = {} if chunks == "default" else {"chunks": chunks}
    ds = xr.open_zarr(path, **kwargs)
    return np.asarray(ds["features"].astype("float64").sum("key").compute(scheduler="threads"))


def dask_sum(path: Path) -> np.ndarray:
    import dask.array as da

    arr = da.from_zarr(str(path), component="features", chunks="auto")
    return np.asarray(arr.astype("float64").sum(axis=0).compute(scheduler="threads"))


def hf_build(path: Path, cache: Path) -> np.ndarray:
    from featstore.hf import to_hf_dataset

    shutil.rmtree(cache, ignore_errors=True)  # a fresh copy each time
    ds = to_hf_dataset(path, cache_dir=str(cache)).with_format("numpy", dtype=None)
    total = np.zeros(ds.features["features"].shape, np.float64)
    for batch in ds.iter(batch_size=256):
        total += batch["features"].astype(np.float64).sum(axis=0)
    return total


def hf_stream(path: Path) -> np.ndarray:
    from featstore.hf import to_hf_dataset

    it = to_hf_dataset(path, streaming=True).with_format("numpy")  # (no dtype= here: float16 arrives as float32)
    total = None
    for row in it:
        f = row["features"].astype(np.float64)
        total = f if total is None else total + f
    return total  # type: ignore[return-value]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--shape", default="768,7,7", help="C,g,g of a row (default: ViT-B/32 at 224)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    ap.add_argument("--skip", default="", help="comma-separated paths to leave out, e.g. 'xarray default,hf'")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    c, g, g2 = (int(x) for x in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="featstore-eco-", dir=args.dir))
    try:
        path = work / "s.zarr"
        shard_rows = write_store(path, args.rows, (c, g, g2))
        paths: dict[str, Callable[[], np.ndarray]] = {
            "featstore iter_batches": lambda: featstore_sum(path),
            "xarray+dask, shard chunks": lambda: xarray_sum(path, {"key": shard_rows}),
            "xarray+dask, default chunks": lambda: xarray_sum(path, "default"),
            "dask from_zarr chunks=auto": lambda: dask_sum(path),
            "hf Dataset (build + pass)": lambda: hf_build(path, work / "hf-cache"),
            "hf IterableDataset (pass)": lambda: hf_stream(path),
        }
        skip = [s.strip() for s in args.skip.split(",") if s.strip()]
        paths = {k: v for k, v in paths.items() if not any(k.startswith(s) for s in skip)}
        import dask.array  # noqa: F401  (imported before timing: import time is not reading time)
        import datasets  # noqa: F401
        import xarray  # noqa: F401

        best: dict[str, float] = {}
        reference: np.ndarray | None = None
        for _ in range(args.repeats):  # interleaved, so drift hits every path alike
            for name, run in paths.items():
                t = time.perf_counter()
                got = run()
                wall = time.perf_counter() - t
                if reference is None:
                    reference = got
                np.testing.assert_allclose(got, reference, rtol=1e-9)  # the same reduction
                best[name] = min(best.get(name, float("inf")), wall)
        mib = args.rows * c * g * g2 * 2 / 2**20
        base = best.get("featstore iter_batches", float("nan"))
        results = {
            name: {"wall_s": w, "rows_per_s": args.rows / w, "mib_per_s": mib / w, "time_vs_featstore": w / base}
            for name, w in best.items()
        }
        report = {
            "machine": {"cpu": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "rows": args.rows,
            "shape": [c, g, g2],
            "shard_rows": shard_rows,
            "repeats": args.repeats,
            "results": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(
            f"{args.rows} rows x {(c, g, g2)} float16 ({mib:.0f} MiB), shards of {shard_rows}, best of {args.repeats}"
        )
        print(f"{'path':32} {'wall s':>8} {'rows/s':>10} {'MiB/s':>8} {'time/featstore':>14}")
        for name, r in results.items():
            line = f"{name:32} {r['wall_s']:8.2f} {r['rows_per_s']:10.0f} {r['mib_per_s']:8.1f}"
            print(f"{line} {r['time_vs_featstore']:14.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
