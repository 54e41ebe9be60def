"""Random-access read speed: feature stores (Zarr via TensorStore / zarr-python, HDF5)
against one .npy file per image, and write speed of each writer.

Run:  .venv/bin/python benchmarks/random_access.py [--rows 2000] [--shape 768,7,7]

Prints, per layout: write rows/s (through the pipeline's writers), random single-row
reads/s, random 64-row `get_batch` rows/s, and one shuffled epoch through
DataLoader(num_workers=2, batch_size=64) rows/s. The files were just written, so reads
come from the page cache ("warm"); on a shared machine numbers move +-25 %.

One run (2 shared cores, TensorStore 0.1.86, zarr 3.1.6, h5py 3.16), rows/s:

    2000 x (768, 7, 7)    write  1 random row  get_batch(64)  DataLoader w=2 b=64
    zarr + tensorstore     1216          2098           8805                 3472
    zarr + zarr-python        -           241            537                 1044
    hdf5                    691          2125           3085                 2866
    npy files               638          3322           3150                 3134

    2000 x (1024, 16, 16)
    zarr + tensorstore      251          1175           2134                 1119
    zarr + zarr-python        -           309            390                  429
    hdf5                    133          2059           1648                 1399
    npy files               362          2944           2458                 1523

HDF5 writes include staging in Zarr and writing the file at close (see writer.py).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_info(c: int, g: int):  # type: ignore[no-untyped-def]
    from featstore.batches import EncodingInfo

    return EncodingInfo(
        model="bench",
        model_source={"kind": "hf", "id": "bench", "revision": "0"},
        family="clip",
        feature_type="clip_vit_last_layer",
        clip_output="raw",
        size=g * 32,
        grid=g,
        hidden_dim=c,
        dtype="float16",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


def batches(rows: int, c: int, g: int, size: int = 64):  # type: ignore[no-untyped-def]
    from featstore.batches import EncodedBatch, ImageItem

    rng = np.random.default_rng(0)
    for s in range(0, rows, size):
        n = min(size, rows - s)
        yield EncodedBatch(
            items=[ImageItem(f"d{i // 500}/img{i:06d}.png", f"in/d{i // 500}/img{i:06d}.png") for i in range(s, s + n)],
            features=rng.normal(size=(n, c, g, g)).astype(np.float16),
            masks=rng.integers(0, 2, (n, g, g)).astype(np.uint8),
            orig_size_hw=np.full((n, 2), 480, np.int32),
        )


def write(writer, rows: int, c: int, g: int) -> float:  # type: ignore[no-untyped-def]
    data = list(batches(rows, c, g))
    t0 = time.perf_counter()
    writer.pending([it.key for b in data for it in b.items])
    for b in data:
        writer.write(b)
    writer.close()
    return rows / (time.perf_counter() - t0)


class NpyDataset:
    """The baseline: one `<stem>.npy` + `<stem>_mask.npy` per image."""

    def __init__(self, root: Path, keys: list[str]) -> None:
        self.paths = [str(root / k[: -len(".png")]) for k in keys]
        self.keys = keys

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        import torch

        p = self.paths[i]
        return {
            "features": torch.from_numpy(np.load(p + ".npy")),
            "mask": torch.from_numpy(np.load(p + "_mask.npy")),
            "key": self.keys[i],
        }


def epoch(dataset, workers: int = 2, batch: int = 64) -> float:  # type: ignore[no-untyped-def]
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=False)
    t0 = time.perf_counter()
    n = sum(len(b["key"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--shape", default="768,7,7", help="C,g,g of the float16 features")
    ap.add_argument("--reads", type=int, default=1000, help="random single-row reads per layout")
    args = ap.parse_args()
    c, g, _ = (int(x) for x in args.shape.split(","))

    from featstore.npy import NpyWriter
    from featstore.store import open_store, open_store_writer
    from featstore.torch import FeatureDataset

    info = make_info(c, g)
    tmp = Path(tempfile.mkdtemp(prefix="featstore-ra-"))
    rng = np.random.default_rng(1)
    results: dict[str, dict[str, float]] = {}
    try:
        zarr_path, h5_path, npy_dir = tmp / "f.zarr", tmp / "f.h5", tmp / "npy"
        results["zarr + tensorstore"] = {
            "write": write(open_store_writer(zarr_path, info, overwrite=False), args.rows, c, g)
        }
        results["zarr + zarr-python"] = {}
        results["hdf5"] = {"write": write(open_store_writer(h5_path, info, overwrite=False), args.rows, c, g)}
        results["npy files"] = {
            "write": write(NpyWriter(npy_dir, info, save_meta=False, overwrite=False), args.rows, c, g)
        }
        with open_store(zarr_path, engine="zarr") as s:
            keys = s.keys()
        # Epochs first: workers fork from this process, which must not have used TensorStore yet.
        results["zarr + zarr-python"]["loader"] = epoch(FeatureDataset(zarr_path, engine="zarr"))
        results["zarr + tensorstore"]["loader"] = epoch(FeatureDataset(zarr_path))
        results["hdf5"]["loader"] = epoch(FeatureDataset(h5_path))
        results["npy files"]["loader"] = epoch(NpyDataset(npy_dir, keys))

        idx = rng.integers(0, args.rows, args.reads)
        batches64 = [rng.choice(args.rows, 64, replace=False) for _ in range(max(1, args.reads // 64))]

        for name, path, engine in [
            ("zarr + tensorstore", zarr_path, "tensorstore"),
            ("zarr + zarr-python", zarr_path, "zarr"),
            ("hdf5", h5_path, "auto"),
        ]:
            with open_store(path, engine=engine) as s:
                s[0]
                t0 = time.perf_counter()
                for i in idx:
                    s[int(i)]
                results[name]["single"] = len(idx) / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                for b in batches64:
                    s.get_batch(b)
                results[name]["batch64"] = 64 * len(batches64) / (time.perf_counter() - t0)

        stems = [str(npy_dir / k[: -len(".png")]) for k in keys]
        t0 = time.perf_counter()
        for i in idx:
            np.load(stems[i] + ".npy"), np.load(stems[i] + "_mask.npy")
        results["npy files"]["single"] = len(idx) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in batches64:
            np.stack([np.load(stems[i] + ".npy") for i in b]), np.stack([np.load(stems[i] + "_mask.npy") for i in b])
        results["npy files"]["batch64"] = 64 * len(batches64) / (time.perf_counter() - t0)

    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mib = c * g * g * 2 / 2**20
    print(f"{args.rows} rows of ({c}, {g}, {g}) float16 ({mib * 1024:.0f} KiB/row), warm page cache, rows/s")
    print(f"{'layout':<20} {'write':>8} {'1 random row':>13} {'get_batch(64)':>14} {'DataLoader w=2 b=64':>20}")
    for name, r in results.items():
        w = f"{r['write']:8.0f}" if "write" in r else f"{'(same)':>8}"
        print(f"{name:<20} {w} {r['single']:13.0f} {r['batch64']:14.0f} {r['loader']:20.0f}")


if __name__ == "__main__":
    main()
