"""How fast the writers take rows: can the store keep up with a GPU?

A GPU encodes ViT-L/14 at ~2,000 images/s (perf-facts); each row of (1024, 16, 16)
float16 is 512 KiB, so the writer must take ~1 GB/s, in one Python thread, beside the
encoder. This measures `StoreWriter` (Zarr, HDF5) and the per-image `NpyWriter` alone,
fed batches of 64 ready rows, side by side in one run (best of `--repeats`, interleaved):

- zarr, 8 / 24 / 64 MiB shards: whole shards written as single objects (layout 2; 64 MiB
  is the default), to show what the per-commit cost does at each shard size;
- h5: the HDF5 path (staged in Zarr, the file written at close);
- npy: the reference's per-image files.

    .venv/bin/python benchmarks/store_write.py                   # temp folder on /tmp
    .venv/bin/python benchmarks/store_write.py --dir /dev/shm    # memory: the software alone
"""

from __future__ import annotations

import argparse
import json
import math
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

from featstore.batches import EncodedBatch, EncodingInfo, ImageItem
from featstore.npy import NpyWriter
from featstore.store.writer import open_store_writer

SHAPES = {"ViT-B/32 fp16": (768, 7, 7), "ViT-L/14 fp16": (1024, 16, 16)}
DEFAULT_ROWS = {"ViT-B/32 fp16": 8192, "ViT-L/14 fp16": 2048}  # ~600 MiB and 1 GiB: several 64 MiB shards
BATCH = 64


def rows_within(limit: int, row_bytes: int) -> int:
    return max(8, min(1024, 2 ** int(math.log2(max(1.0, limit / row_bytes)))))


def batches(info: EncodingInfo, n: int) -> list[EncodedBatch]:
    rng = np.random.default_rng(0)
    c, g = info.hidden_dim, info.grid
    feats = rng.standard_normal((BATCH, c, g, g), dtype=np.float32).astype(np.float16)
    masks = rng.integers(0, 2, (BATCH, g, g), dtype=np.uint8)
    orig = np.full((BATCH, 2), 512, np.int32)
    out = []
    for b in range(n // BATCH):
        items = [
            ImageItem(f"d{b:04d}/img{b * BATCH + i:07d}.png", f"/in/img{b * BATCH + i:07d}.png") for i in range(BATCH)
        ]
        out.append(EncodedBatch(items, feats, masks, orig))
    return out


def timed(make_writer: Callable[[], Any], data: list[EncodedBatch]) -> dict[str, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    w = make_writer()
    w.pending([it.key for b in data for it in b.items])  # as the pipeline does
    for b in data:
        w.write(b)
    w.close()
    wall = time.perf_counter() - t0
    rows = sum(len(b) for b in data)
    mib = rows * data[0].features[0].nbytes / 2**20
    return {"rows_per_s": rows / wall, "mib_per_s": mib / wall, "cpu_s": time.process_time() - c0, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder under /tmp)")
    ap.add_argument("--rows", type=int, default=None, help="rows per run (default: 8192 ViT-B/32, 2048 ViT-L/14)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON output")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featstore-write-", dir=args.dir))
    variants: dict[str, Callable[[EncodingInfo, Path], Callable[[], Any]]] = {}

    def zarr_variant(shard_bytes: int) -> Callable[[EncodingInfo, Path], Callable[[], Any]]:
        def make(info: EncodingInfo, out: Path) -> Callable[[], Any]:
            rows = rows_within(shard_bytes, info.hidden_dim * info.grid**2 * 2)
            return lambda: open_store_writer(out / "s.zarr", info, overwrite=False, shard_rows=rows)

        return make

    variants["zarr, 8 MiB shards"] = zarr_variant(8 * 2**20)
    variants["zarr, 24 MiB shards"] = zarr_variant(24 * 2**20)
    variants["zarr, 64 MiB shards (default)"] = zarr_variant(64 * 2**20)
    variants["h5"] = lambda info, out: lambda: open_store_writer(out / "s.h5", info, overwrite=False)
    variants["npy (2 files per row)"] = lambda info, out: (
        lambda: NpyWriter(out / "npy", info, save_meta=False, overwrite=False)
    )

    results: dict[str, dict[str, list[dict[str, float]]]] = {s: {v: [] for v in variants} for s in SHAPES}
    try:
        for shape_name, (c, g, _) in SHAPES.items():
            info = make_info(c, g)
            data = batches(info, args.rows or DEFAULT_ROWS[shape_name])
            for _ in range(args.repeats):
                for name, make in variants.items():
                    out = work / "run"
                    out.mkdir()
                    results[shape_name][name].append(timed(make(info, out), data))
                    shutil.rmtree(out)
                    r = results[shape_name][name][-1]
                    print(
                        f"{shape_name:<14} {name:<32} {r['rows_per_s']:8.0f} rows/s {r['mib_per_s']:7.0f} MiB/s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nbest of {args.repeats}, batches of {BATCH} rows, written under {args.dir or '/tmp'}")
    print(f"{'rows':<14} {'writer':<32} {'rows/s':>8} {'MiB/s':>7} {'cpu s / wall s':>15}")
    best: dict[str, dict[str, dict[str, float]]] = {}
    for shape_name, by in results.items():
        best[shape_name] = {}
        for name, runs in by.items():
            b = max(runs, key=lambda r: r["rows_per_s"])
            best[shape_name][name] = b
            print(
                f"{shape_name:<14} {name:<32} {b['rows_per_s']:8.0f} {b['mib_per_s']:7.0f} "
                f"{b['cpu_s']:6.2f} / {b['wall_s']:.2f}"
            )
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "dir": args.dir or "/tmp",
        },
        "rows": {s: args.rows or DEFAULT_ROWS[s] for s in SHAPES},
        "batch": BATCH,
        "best": best,
        "runs": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
