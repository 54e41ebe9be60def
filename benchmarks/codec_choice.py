"""Which compressor, and how many rows per shard, for the `features` array?

Run:  .venv/bin/python benchmarks/codec_choice.py [--rows 1024] [--quick]

Data (float16, like the stores featstore writes):
- `vit-b32`: patch tokens of a random-weight CLIP ViT-B/32 vision tower (12 blocks,
  768 channels, grid 7) run on smooth random images: real LayerNorm/residual
  statistics, though without the few huge "register-like" channels of trained models.
- `ln-1024x16`: a synthetic (1024, 16, 16) map: spatially smooth noise per channel,
  LayerNorm over channels, per-channel gain/bias, a few outlier channels (DINOv2-L-like).

For each codec it prints the compression ratio, the write speed (whole shards) and the
random single-row read speed with zarr-python (and TensorStore when installed), then
HDF5 filters, then write/read speed against the shard size. Results are noisy on a
shared machine; compare columns within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def vit_features(n_unique: int, rows: int, seed: int = 0) -> np.ndarray:
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=32,
        image_size=224,
        hidden_act="quick_gelu",
    )
    model = transformers.CLIPVisionModel(cfg).eval()
    rng = np.random.default_rng(seed)
    out = []
    with torch.inference_mode():
        for start in range(0, n_unique, 16):
            b = min(16, n_unique - start)
            low = torch.from_numpy(rng.normal(size=(b, 3, 7, 7)).astype(np.float32))
            img = torch.nn.functional.interpolate(low, size=224, mode="bicubic") * 0.8
            img += 0.2 * torch.randn(b, 3, 224, 224)
            tokens = model(pixel_values=img).last_hidden_state[:, 1:]  # drop CLS
            out.append(tokens.transpose(1, 2).reshape(b, 768, 7, 7).half().numpy())
    unique = np.concatenate(out)
    return unique[np.arange(rows) % n_unique]


def layernorm_features(rows: int, c: int = 1024, g: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gain = rng.normal(1.0, 0.3, size=(c, 1, 1)).astype(np.float32)
    bias = rng.normal(0.0, 0.2, size=(c, 1, 1)).astype(np.float32)
    gain[rng.choice(c, 4, replace=False)] *= 30  # outlier channels
    out = np.empty((rows, c, g, g), np.float16)
    for i in range(rows):
        low = rng.normal(size=(c, g // 4, g // 4)).astype(np.float32)
        x = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2) + 0.5 * rng.normal(size=(c, g, g)).astype(np.float32)
        x = (x - x.mean(0, keepdims=True)) / (x.std(0, keepdims=True) + 1e-5)
        out[i] = (x * gain + bias).astype(np.float16)
    return out


def codecs() -> dict[str, Callable[[], list]]:
    import zarr.codecs as zc

    def blosc(cname: str, level: int, shuffle: str) -> Callable[[], list]:
        return lambda: [zc.BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=2)]

    return {
        "none": lambda: [],
        "zstd-1": lambda: [zc.ZstdCodec(level=1)],
        "zstd-3": lambda: [zc.ZstdCodec(level=3)],
        "blosc-zstd-3-shuffle": blosc("zstd", 3, "shuffle"),
        "blosc-zstd-5-shuffle": blosc("zstd", 5, "shuffle"),
        "blosc-lz4-5-shuffle": blosc("lz4", 5, "shuffle"),
        "blosc-zstd-5-bitshuffle": blosc("zstd", 5, "bitshuffle"),
        "Shuffle+Zstd-1 (numcodecs)": lambda: [zc.Shuffle(elementsize=2), zc.Zstd(level=1)],
    }


def dir_bytes(path: Path) -> tuple[int, int]:
    total, files = 0, 0
    for root, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(root, n))
            files += 1
    return total, files


def write_zarr(path: Path, data: np.ndarray, make_compressors: Callable[[], list], shard_rows: int) -> float:
    import warnings

    import zarr

    n, c, g, _ = data.shape
    t0 = time.perf_counter()
    root = zarr.open_group(path, mode="w", zarr_format=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numcodecs codecs outside the v3 spec
        arr = root.create_array(
            "features",
            shape=(n, c, g, g),
            dtype=data.dtype,
            chunks=(1, c, g, g),
            shards=(shard_rows, c, g, g),
            compressors=make_compressors(),
        )
    for s in range(0, n, shard_rows):
        arr[s : s + shard_rows] = data[s : s + shard_rows]
    return time.perf_counter() - t0


def read_single_zarr(path: Path, idx: np.ndarray) -> float:
    import zarr

    arr = zarr.open_array(path / "features", mode="r")
    arr[int(idx[0])]  # warm: metadata, event loop
    t0 = time.perf_counter()
    for i in idx:
        arr[int(i)]
    return len(idx) / (time.perf_counter() - t0)


def read_batch_zarr_gather(path: Path, idx: np.ndarray, batch: int = 64) -> float:
    import zarr
    from zarr.core.sync import sync

    arr = zarr.open_array(path / "features", mode="r")._async_array

    async def get(rows: np.ndarray) -> list[np.ndarray]:
        return await asyncio.gather(*(arr.getitem(int(i)) for i in rows))

    sync(get(idx[:2]))
    t0 = time.perf_counter()
    for s in range(0, len(idx), batch):
        sync(get(idx[s : s + batch]))
    return len(idx) / (time.perf_counter() - t0)


def read_tensorstore(path: Path, idx: np.ndarray, batch: int) -> float | None:
    try:
        import tensorstore as ts
    except ImportError:
        return None
    try:
        arr = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "features")}}, read=True
        ).result()
    except Exception:  # codecs TensorStore does not know (numcodecs.*)
        return None
    arr[int(idx[0])].read().result()
    t0 = time.perf_counter()
    for s in range(0, len(idx), batch):
        futures = [arr[int(i)].read() for i in idx[s : s + batch]]
        for f in futures:
            f.result()
    return len(idx) / (time.perf_counter() - t0)


def hdf5_case(path: Path, data: np.ndarray, idx: np.ndarray, **filters: object) -> tuple[float, float, float]:
    import h5py

    n, c, g, _ = data.shape
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", shape=data.shape, dtype=data.dtype, chunks=(1, c, g, g), **filters)
        for s in range(0, n, 256):
            ds[s : s + 256] = data[s : s + 256]
    wt = time.perf_counter() - t0
    out = np.empty((c, g, g), data.dtype)
    with h5py.File(path, "r") as f:
        ds = f["features"]
        t0 = time.perf_counter()
        for i in idx:
            ds.read_direct(out, np.s_[int(i)])
        rps = len(idx) / (time.perf_counter() - t0)
    return data.nbytes / os.path.getsize(path), data.nbytes / wt / 2**20, rps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024, help="rows per dataset (ViT rows repeat after --unique)")
    ap.add_argument("--unique", type=int, default=128, help="distinct ViT forwards (slow on CPU)")
    ap.add_argument("--reads", type=int, default=400, help="random reads per measurement")
    ap.add_argument("--quick", action="store_true", help="only the ViT data set, fewer codecs")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

    t0 = time.perf_counter()
    datasets = {"vit-b32 (768,7,7)": vit_features(args.unique, args.rows)}
    if not args.quick:
        datasets["ln-1024x16 (1024,16,16)"] = layernorm_features(args.rows // 2)
    print(f"data made in {time.perf_counter() - t0:.0f}s")
    tmp = Path(tempfile.mkdtemp(prefix="featstore-bench-"))
    rng = np.random.default_rng(1)
    try:
        for name, data in datasets.items():
            row_mb = data[0].nbytes / 2**20
            shard_rows = max(16, min(1024, 2 ** int(np.log2(24 / row_mb))))
            idx = rng.integers(0, len(data), args.reads)
            print(f"\n## {name}: {len(data)} rows, {data.nbytes / 2**20:.0f} MiB, shards of {shard_rows} rows")
            print(
                f"{'codec':<28} {'ratio':>6} {'write MiB/s':>11} {'zarr rows/s':>11} {'gather64':>9} {'ts rows/s':>9}"
            )
            for cname, make in codecs().items():
                if args.quick and cname.startswith(("blosc-zstd-5-bit", "blosc-lz4")):
                    continue
                p = tmp / f"{cname}.zarr"
                wt = write_zarr(p, data, make, shard_rows)
                size, _ = dir_bytes(p)
                single = read_single_zarr(p, idx)
                gather = read_batch_zarr_gather(p, idx)
                tsr = read_tensorstore(p, idx, 64)
                ts_s = f"{tsr:9.0f}" if tsr else f"{'-':>9}"
                print(
                    f"{cname:<28} {data.nbytes / size:6.3f} {data.nbytes / wt / 2**20:11.0f} {single:11.0f} "
                    f"{gather:9.0f} {ts_s}"
                )
                shutil.rmtree(p)
            print(f"\n{'hdf5 chunk (1,C,g,g)':<28} {'ratio':>6} {'write MiB/s':>11} {'rows/s':>11}")
            for fname, filt in {
                "none": {},
                "lzf+shuffle": {"compression": "lzf", "shuffle": True},
                "gzip-1+shuffle": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
            }.items():
                ratio, wmb, rps = hdf5_case(tmp / "x.h5", data, idx, **filt)
                print(f"{fname:<28} {ratio:6.3f} {wmb:11.0f} {rps:11.0f}")
                os.remove(tmp / "x.h5")

        data = next(iter(datasets.values()))
        idx = rng.integers(0, len(data), args.reads)
        print("\n## shard size (vit-b32, features uncompressed as stored)")
        print(
            f"{'rows/shard':>10} {'MiB/shard':>9} {'files':>6} {'write MiB/s':>11} {'zarr rows/s':>11} {'ts rows/s':>9}"
        )
        for s in (32, 128, 256, 512):
            p = tmp / f"s{s}.zarr"
            wt = write_zarr(p, data, codecs()["none"], s)
            _, files = dir_bytes(p)
            single = read_single_zarr(p, idx)
            tsr = read_tensorstore(p, idx, 64) or 0
            print(
                f"{s:>10} {s * data[0].nbytes / 2**20:9.1f} {files:>6} {data.nbytes / wt / 2**20:11.0f} "
                f"{single:11.0f} {tsr:9.0f}"
            )
            shutil.rmtree(p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
