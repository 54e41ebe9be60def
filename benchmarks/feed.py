"""Feed the GPU: what one decode worker delivers, against Pillow's bare decode of the same files.

    python benchmarks/feed.py             # the full run (about 10 minutes on an idle 2-core machine)
    python benchmarks/feed.py --quick     # does every part run? (tiny counts, about 1-2 minutes)

1. choices: per-image milliseconds on one thread of every option compared (decoders,
   resizers, premultiplies, and featstore's whole `load_sample` with each resizer), on
   each input kind, with how far each resizer's pixels (and `alpha > 0`) are from Pillow's;
   measured in a forked process set up as a decode worker is (it keeps freed memory,
   `featstore.heap`), and the decoders again in a new process with glibc's default thresholds.
2. builds: `featstore.pipeline.build` with one decode worker on the CPU, one torch thread
   in the main process, batch 16, into a .zarr store, through the encoder seam with the
   tiny random-weight model's encoder (`_memory.tiny_spec`: 2-layer, 64-wide DINOv2) whose
   forward pass is replaced by zeros of its output shape, so that the worker is the limit
   (even the tiny model costs the main process more per image than a worker at 518; the
   rows "tiny model" run it, as the issue measured, and one row with torch's own thread
   count in the main process, as `featstore build` starts, where `featstore.cputhreads`
   decides; and the row "featstore build, tiny model": the CLI as a user runs it, a new
   process per build with the tiny model saved to a folder and torch's own thread count,
   its marginal rate from the loop times of a build of the images and one of `CLI_SCALE`
   times as many); for every input kind (512 and 1024 RGBA renders,
   0.5 MP and 12 MP JPEG photos, RGB PNGs), size (224, 518), source (a folder, WebDataset
   tar shards, the test S3 server) and resizer (auto, the default: torch's where both
   sides shrink 2x or more, Pillow's elsewhere, masks Pillow's; pillow; torch: from the
   folder only; the other sources with the default). The S3 server runs only for the S3
   builds (idle, it still takes CPU from the worker: about a quarter of its rate on 512
   renders here, 0.82x against 1.08x in two runs).
   The rate is the worker's marginal one: images over the time between the first
   batch's arrival and the last's (start-up left out), from the build's progress
   callbacks; each kind's inputs are written back to disk (`os.sync`) and built once
   unmeasured before its measured builds (the first build of a run was otherwise up to
   30% slower). Beside it Pillow's bare decode (`Image.open(p).load()`) of the same files,
   best of the repeats, and the ratio. "main ms" is what the main process spends per
   image besides the model (the loop's time neither waiting for the reader nor encoding:
   receiving batches, host copy, queueing writes, progress): it must stay below the
   worker's ms per image, or the main process is the limit.
3. GPU workers: for ViT-B/32, ViT-L/14 and dinov2-large at 224 and 518 (ViT-B/32 at 512:
   518 is not a multiple of its 32-pixel patch), the images/s a card reaches at the
   README's target MFU, and the decode workers of this machine's measured per-worker
   rate (512 RGBA renders from a folder) that it takes to feed it.

Writes benchmarks/results/feed-<time>[-quick].json (`--out`). Absolute numbers move with
the machine's load; compare within one run (machine.load_average_* in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.s3_server starts the local S3 server

import _compute  # noqa: E402
import _images  # noqa: E402
import _memory  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from inputs import make_shards  # noqa: E402
from PIL import Image  # noqa: E402
from run import machine_info  # noqa: E402

from featstore import fastdecode  # noqa: E402
from featstore.batches import ImageItem  # noqa: E402
from featstore.heap import keep_freed_memory  # noqa: E402
from featstore.images import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    RESIZERS,
    Preprocess,
    _decode,
    load_sample,
    prepare,
    resize,
)
from featstore.loading import random_model  # noqa: E402
from featstore.models import lookup  # noqa: E402
from featstore.pipeline import BuildOptions, build, model_encoder  # noqa: E402
from featstore.sources import as_source  # noqa: E402

# ---------------------------------------------------------------- figures copied, with their source

# An 8192^3 bf16 matmul measured 798 TFLOP/s on an H100 (the project's perf notes; NVIDIA's
# dense bf16 peak for the H100 SXM is 989). The README's CUDA target is 45% MFU of the
# card's measured matmul rate (benchmarks/README.md, "Targets").
H100_BF16_MEASURED_TFLOPS = 798.0
TARGET_MFU = 0.45
FAST = "featstore fastdecode (libdeflate + libspng)"  # the decode rows' name of featstore's fast path
TORCH_THREADS = torch.get_num_threads()  # torch's own default here, before this script sets 1
GPU_MODELS = (("ViT-B/32", (224, 512)), ("ViT-L/14", (224, 518)), ("dinov2-large", (224, 518)))

CLI_SCALE = 5  # the second `featstore build` of the marginal rate: this many times the images

KINDS: dict[str, dict[str, Any]] = {  # images per build at --images 1.0 (about 2-4 s of work each)
    "render512": {"what": "512x512 RGBA PNG renders", "images": 160},
    "render1024": {"what": "1024x1024 RGBA PNG renders", "images": 48},
    "photo05": {"what": "0.5 MP JPEG photos (816x612, quality 90)", "images": 160},
    "photo12": {"what": "12 MP JPEG photos (4000x3000, quality 90)", "images": 24},
    "rgbpng": {"what": "RGB PNGs (640x480 photos as PNG)", "images": 96},
}


def make_pool(folder: Path, kind: str, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct images of `kind` (see KINDS) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        if kind.startswith("render"):
            p = folder / f"{kind}_{i:03d}.png"
            Image.fromarray(_images.render(rng, int(kind.removeprefix("render"))), "RGBA").save(p, compress_level=6)
        elif kind == "rgbpng":
            p = folder / f"{kind}_{i:03d}.png"
            Image.fromarray(_images.photo(rng, (480, 640)), "RGB").save(p, compress_level=6)
        else:
            hw = (612, 816) if kind == "photo05" else (3000, 4000)
            small = _images.photo(rng, (hw[0] // 4, hw[1] // 4)) if kind == "photo12" else _images.photo(rng, hw)
            im = Image.fromarray(small, "RGB")
            if kind == "photo12":  # a large photo from a small one, with fresh sensor noise at full size
                big = np.asarray(im.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)).astype(np.int16)
                big += rng.integers(-6, 7, big.shape, dtype=np.int16)
                im = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8), "RGB")
            p = folder / f"{kind}_{i:03d}.jpg"
            im.save(p, quality=90)
        paths.append(p)
    return paths


# ---------------------------------------------------------------- 1. the choices, one thread


def per_image_ms(fn: Any, args: list[Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in args:
            fn(a)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / len(args)


def _pillow_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def decoders(paths: list[Path], repeats: int) -> dict[str, float | None]:
    """ms per image of each decoder that reads these files (None: not installed / declines)."""
    datas = [p.read_bytes() for p in paths]
    out: dict[str, float | None] = {
        "pillow open+load (the bare decode)": per_image_ms(lambda p: Image.open(p).load(), paths, repeats),
        "pillow open + np.asarray": per_image_ms(_pillow_array, paths, repeats),
        "featstore Pillow path (_decode)": per_image_ms(
            lambda p: _decode(str(p), size=224, max_pixels=DEFAULT_MAX_PIXELS), paths, repeats
        ),
    }
    fast = fastdecode.png(str(paths[0]), max_pixels=DEFAULT_MAX_PIXELS)
    out[FAST] = (
        per_image_ms(lambda p: fastdecode.png(str(p), max_pixels=DEFAULT_MAX_PIXELS), paths, repeats)
        if fast is not None
        else None
    )
    out["pyspng alone (libspng inflates with zlib)"] = (
        per_image_ms(lambda p: fastdecode.pyspng.load(p.read_bytes()), paths, repeats) if fast is not None else None
    )
    try:
        import imagecodecs

        out["imagecodecs imread"] = per_image_ms(imagecodecs.imread, datas, repeats)
    except Exception:  # not installed, or not a format it reads here
        out["imagecodecs imread"] = None
    try:
        import cv2

        out["opencv imdecode (BGR order)"] = per_image_ms(
            lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED), datas, repeats
        )
    except ImportError:
        out["opencv imdecode (BGR order)"] = None
    return out


def in_worker(fn: Any, *args: Any, keep: bool = True) -> Any:
    """`fn(*args)` in a forked process set up as a decode worker is (`featstore.heap`
    keeps freed memory), or in a new one with glibc's default malloc thresholds (`keep=False`)."""
    import multiprocessing

    # a fresh interpreter for glibc's defaults: a forked one inherits the thresholds glibc
    # has already adapted in this process (it raises them as large blocks are freed)
    context = multiprocessing.get_context("fork" if keep else "spawn")
    with context.Pool(1, initializer=keep_freed_memory if keep else None) as pool:
        return pool.apply(fn, args)


def decode_defaults(pools: dict[str, list[Path]], repeats: int) -> dict[str, Any]:
    """The decode rows again, in a process that hands freed memory back to the system."""
    return {kind: decoders(paths, repeats) for kind, paths in pools.items()}


def _torch_float(pixels: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


def resizers(arrays: list[np.ndarray], size: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Shorter side to `size` + center crop: ms per image and distance from Pillow's pixels."""
    pillow = Preprocess()
    ref = [resize(a, size, pillow) for a in arrays]
    square = all(a.shape[0] == a.shape[1] for a in arrays)
    options: dict[str, Any] = {
        "auto (default)": lambda a: resize(a, size, Preprocess(resizer="auto")),
        "pillow": lambda a: resize(a, size, pillow),
        "torch uint8 antialiased": lambda a: resize(a, size, Preprocess(resizer="torch")),
    }
    if square:  # the float32 variant is only for comparison (no crop geometry)
        options["torch float32 antialiased"] = lambda a: _torch_float(a, size)
    out = {}
    for name, fn in options.items():
        got = [fn(a) for a in arrays]
        diff = np.concatenate([np.abs(g.astype(int) - r.astype(int)).ravel() for g, r in zip(got, ref, strict=True)])
        alpha = [
            int(((g[..., 3] > 0) != (r[..., 3] > 0)).sum()) if g.shape[2] == 4 else 0
            for g, r in zip(got, ref, strict=True)
        ]
        out[name] = {
            "ms": per_image_ms(fn, arrays, repeats),
            "max_levels_off": int(diff.max()),
            "share_of_values_off": float((diff > 0).mean()),
            "alpha_gt0_pixels_differing": int(sum(alpha)),
        }
    grid = size // 14
    for name, resizer in (("auto (default)", "auto"), ("torch uint8 antialiased", "torch")):
        # the masks featstore writes (Pillow's, computed exactly beside torch's resize)
        pre = Preprocess(resizer=resizer)
        out[name]["patch_masks_differing"] = sum(
            not np.array_equal(prepare(a, size=size, grid=grid, preprocess=pre)[1], prepare(a, size=size, grid=grid)[1])
            for a in arrays
        )
    return out


def _float64_premultiply(rgba: np.ndarray) -> np.ndarray:
    return (rgba[..., :3] / 255 * rgba[..., 3:4] / 255 * 255).astype(np.uint8)


def choices(pools: dict[str, list[Path]], sizes: list[int], repeats: int) -> dict[str, Any]:
    from featstore.images import premultiply

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for kind, paths in pools.items():
        entry: dict[str, Any] = {"decode_ms": decoders(paths, repeats)}
        arrays = [np.asarray(Image.open(p).convert("RGBA")) for p in paths] if kind != "photo12" else []
        for size in sizes:
            if arrays:
                entry[f"resize_{size}"] = resizers(arrays, size, repeats)
            items = [ImageItem(p.name, str(p)) for p in paths]
            g = size // 14
            entry[f"load_sample_{size}_ms"] = {
                r: per_image_ms(
                    lambda it, r=r, s=size, g=g: load_sample(it, size=s, grid=g, preprocess=Preprocess(resizer=r)),
                    items,
                    repeats,
                )
                for r in RESIZERS
            }
            if kind.startswith("render"):
                resized = [resize(a, size) for a in arrays]
                entry[f"premultiply_{size}_ms"] = {
                    "float64 (before)": per_image_ms(_float64_premultiply, resized, repeats),
                    "integer, exact (now)": per_image_ms(premultiply, resized, repeats),
                }
        out[kind] = entry
    return out


# ---------------------------------------------------------------- 2. builds, one worker


class _WithResizer:
    """A loaded model's encoder with another resizer (the store records it); `null`: the
    model is not run, zeros of its output shape are written (so the worker is the limit)."""

    def __init__(self, inner: Any, resizer: str, *, null: bool) -> None:
        self.inner, self.device, self.embedding_dim, self.null = inner, inner.device, inner.embedding_dim, null
        self.preprocess = replace(inner.preprocess, resizer=resizer)
        self.info = replace(inner.info, resize=self.preprocess.describe_resize())

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.null:
            return torch.zeros((len(pixels), *self.info.feature_shape()), dtype=torch.float32)
        return self.inner.encode(pixels)

    def encode_batch(self, pixels: torch.Tensor) -> Any:
        return self.inner.encode_batch(pixels)


@contextmanager
def _recorder(log: list[tuple[float, int, bool]]) -> Any:
    yield lambda r: log.append((time.perf_counter(), r.encoded, r.finished))


def build_rate(source: Any, loaded: Any, size: int, resizer: str, out: Path, *, null: bool = True) -> dict[str, Any]:
    options = BuildOptions(
        model="tiny", size=size, device="cpu", precision="fp32", batch_size=16, workers=1, overwrite=True
    )
    encoder = _WithResizer(model_encoder(options, loaded, embedding=False), resizer, null=null)
    log: list[tuple[float, int, bool]] = []
    t0 = time.perf_counter()
    result = build(source, options, store=out, encoder=encoder, progress_factory=lambda _n: _recorder(log))
    wall = time.perf_counter() - t0
    steps = [(t, n) for t, n, finished in log if not finished]
    (t_first, n_first), (t_last, n_last) = steps[0], steps[-1]
    rate = (n_last - n_first) / (t_last - t_first) if t_last > t_first else float("nan")
    st = result.stages
    # the main loop's own time per image: neither waiting for the worker nor in the model
    main_s = result.seconds - st.decode_wait - st.commit - st.encode
    return {
        "images": result.encoded,
        "failed": result.failed,
        "worker_images_per_s": rate,
        "worker_ms_per_image": 1e3 / rate if rate else None,
        "main_ms_per_image": 1e3 * main_s / max(result.encoded, 1),
        "model_ms_per_image": 1e3 * st.encode / max(result.encoded, 1),
        "wall_s": wall,
        "stages": st.as_dict(),
    }


def _best(
    source: Any,
    loaded: Any,
    size: int,
    resizer: str,
    work: Path,
    args: argparse.Namespace,
    bare: float,
    null: bool = True,
) -> dict[str, Any]:
    shown = getattr(source, "text", source)
    print(f"build: {shown} {size} {resizer}{'' if null else ' (tiny model)'} ...", file=sys.stderr)
    runs = [build_rate(source, loaded, size, resizer, work / "out.zarr", null=null) for _ in range(args.repeats)]
    return _fastest(runs, bare)


def _fastest(runs: list[dict[str, Any]], bare: float) -> dict[str, Any]:
    """The run with the highest worker rate, with its ratio to Pillow's bare decode."""
    best = max(runs, key=lambda r: r["worker_images_per_s"])
    best["ratio_to_pillow_bare_decode"] = best["worker_images_per_s"] / bare
    return best


def cli_rate(small: Path, big: Path, model_dir: Path, size: int, out: Path) -> dict[str, Any]:
    """`featstore build` as a user runs it: a new process per build (torch's own thread
    count, so `featstore.cputhreads` decides), the tiny model loaded from a saved folder, one
    worker; the marginal rate of two builds (the loop times they print), so that start-up
    and the first batches (the workers' head start, the threads' decision) fall out."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    loops = []
    for folder in (small, big):
        cmd = [sys.executable, "-m", "featstore", "build", "-i", str(folder), "-m", str(model_dir)]
        cmd += ["--store", str(out), "--overwrite", "--size", str(size), "--device", "cpu", "--workers", "1", "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        found = re.search(r"encoded (\d+), skipped 0, failed (\d+) in ([0-9.]+) s", proc.stderr + proc.stdout)
        if proc.returncode != 0 or found is None:
            raise RuntimeError(f"featstore build failed: {(proc.stderr or proc.stdout)[-500:]}")
        loops.append((int(found[1]), int(found[2]), float(found[3])))
    (n0, f0, t0), (n1, f1, t1) = loops
    failed = f0 + f1
    rate = (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")
    return {
        "images": n0,
        "images_second_build": n1,
        "failed": failed,
        "loop_s": [t0, t1],
        "worker_images_per_s": rate,
        "worker_ms_per_image": 1e3 / rate if rate else None,
        "main_ms_per_image": None,
    }


def bare_decode_rate(folder: Path, repeats: int) -> float:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return 1e3 / per_image_ms(lambda p: Image.open(p).load(), files, repeats)


def builds(work: Path, pools: dict[str, list[Path]], args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """Every build from a folder and tar shards, then (the S3 server started only now: idle,
    it still takes CPU from the worker) from the local S3 server."""
    out: dict[str, Any] = {}
    folders: dict[str, Path] = {}
    for kind, pool in pools.items():
        count = max(32, int(KINDS[kind]["images"] * args.images))
        folder = folders[kind] = _images.fill(work / f"in-{kind}", [pool], count)
        sources: dict[str, Any] = {
            "folder": as_source(folder),
            "tar": as_source(make_shards(folder, work / f"tar-{kind}", max(8, count // 4))),
        }
        os.sync()  # the new files written back now, not during the first measured build
        build_rate(sources["folder"], loaded, args.sizes[0], args.resizers[0], work / "out.zarr")  # warm-up
        bare = bare_decode_rate(folder, args.repeats)
        entry: dict[str, Any] = {"what": KINDS[kind]["what"], "images": count, "pillow_bare_decode_per_s": bare}
        for size in args.sizes:
            for name, source in sources.items():
                for resizer in args.resizers if name == "folder" else args.resizers[:1]:
                    entry[f"{size}/{name}/{resizer}"] = _best(source, loaded, size, resizer, work, args, bare)
        if kind == "render512" and 224 in args.sizes:  # the set-up: a real (tiny) model runs
            for resizer in args.resizers:
                key = f"224/folder/{resizer}/tiny model"
                entry[key] = _best(sources["folder"], loaded, 224, resizer, work, args, bare, null=False)
            model_dir = work / "tiny-model"
            if not model_dir.exists():
                loaded.module.save_pretrained(model_dir)
            big = _images.fill(work / f"in-{kind}-x{CLI_SCALE}", [pool], CLI_SCALE * count)
            os.sync()
            print(f"build: {folder} 224 auto (featstore build, tiny model) ...", file=sys.stderr)
            runs = [cli_rate(folder, big, model_dir, 224, work / "cli.zarr") for _ in range(args.repeats)]
            entry[f"224/folder/{args.resizers[0]}/featstore build, tiny model"] = _fastest(runs, bare)
            one = torch.get_num_threads()
            torch.set_num_threads(TORCH_THREADS)  # as `featstore build` starts: featstore.cputhreads adapts
            try:
                key = f"224/folder/{args.resizers[0]}/tiny model, {TORCH_THREADS} threads"
                entry[key] = _best(sources["folder"], loaded, 224, args.resizers[0], work, args, bare, null=False)
            finally:
                torch.set_num_threads(one)
        out[kind] = entry
    if args.no_s3:
        return out
    import s3fs

    from tests.s3_server import S3Server

    server = S3Server.start(work / "s3")
    try:
        for kind, folder in folders.items():
            fs = s3fs.S3FileSystem(**server.options, skip_instance_cache=True)
            prefix = server.url(f"feed-{kind}")
            for p in sorted(folder.iterdir()):
                fs.pipe_file(f"{prefix.removeprefix('s3://')}/{p.name}", p.read_bytes())
            source = as_source(prefix + "/", storage_options=server.options)
            bare, resizer = out[kind]["pillow_bare_decode_per_s"], args.resizers[0]
            for size in args.sizes:
                out[kind][f"{size}/s3/{resizer}"] = _best(source, loaded, size, resizer, work, args, bare)
    finally:
        server.stop()
    return out


# ---------------------------------------------------------------- 3. workers a GPU needs


def gpu_workers(results: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for name, model_sizes in GPU_MODELS:
        spec = lookup(name)
        for size in model_sizes:
            flops = _compute.flops_per_image(spec, size)
            need = TARGET_MFU * H100_BF16_MEASURED_TFLOPS * 1e12 / (flops["gflops"] * 1e9)
            at = 224 if size == 224 else 518
            row: dict[str, Any] = {"model": name, "size": size, "gflops": flops["gflops"], "images_per_s": need}
            for resizer in RESIZERS:
                worker = results.get("render512", {}).get(f"{at}/folder/{resizer}", {}).get("worker_images_per_s")
                row[f"workers_{resizer}"] = math.ceil(need / worker) if worker else None
            rows.append(row)
    return rows


# ---------------------------------------------------------------- the table and main


def _f(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def print_report(report: dict[str, Any]) -> None:
    print("\n== choices (ms per image, one thread; lower is better)")
    for kind, entry in report["choices"].items():
        print(f"\n{kind}: {KINDS[kind]['what']}")
        for name, ms in entry["decode_ms"].items():
            print(f"  decode   {name:<44} {_f(ms)}")
        for name, ms in report["decode_ms_glibc_defaults"][kind].items():
            print(f"  decode   {name:<44} {_f(ms)}  (freed memory handed back: glibc's defaults)")
        for key, val in entry.items():
            if key.startswith("resize_"):
                for name, r in val.items():
                    print(
                        f"  {key:<8} {name:<38} {_f(r['ms'])}  max {r['max_levels_off']} levels off, "
                        f"{100 * r['share_of_values_off']:.2f}% of values, alpha>0 differs at "
                        f"{r['alpha_gt0_pixels_differing']} px"
                        + (
                            f"; featstore's masks differ on {r['patch_masks_differing']} images"
                            if "patch_masks_differing" in r
                            else ""
                        )
                    )
            elif key.startswith(("premultiply_", "load_sample_")):
                for name, ms in val.items():
                    print(f"  {key:<8} {name:<38} {_f(ms)}")
    print("\n== one decode worker through `featstore build` (images/s; ratio to Pillow's bare decode)")
    print(f"{'kind':<11} {'size/source/resizer':<40} {'worker/s':>9} {'ratio':>6} {'worker ms':>9} {'main ms':>8}")
    for kind, entry in report["builds"].items():
        print(f"{kind:<11} {'Pillow bare decode':<40} {entry['pillow_bare_decode_per_s']:>9.1f}")
        for key, r in entry.items():
            if isinstance(r, dict):
                print(
                    f"{'':<11} {key:<40} {r['worker_images_per_s']:>9.1f} {r['ratio_to_pillow_bare_decode']:>6.2f} "
                    f"{_f(r['worker_ms_per_image']):>9} {_f(r['main_ms_per_image']):>8}"
                )
    print(
        f"\n== decode workers to feed an H100 at {TARGET_MFU:.0%} of its measured bf16 matmul rate "
        f"({H100_BF16_MEASURED_TFLOPS:.0f} TFLOP/s), 512 RGBA renders, this machine's per-worker rate"
    )
    print(
        f"{'model':<14} {'size':>5} {'GFLOPs':>8} {'images/s':>9} {'workers (auto)':>15} {'(pillow)':>9} {'(torch)':>8}"
    )
    for r in report["gpu_workers"]:
        print(
            f"{r['model']:<14} {r['size']:>5} {r['gflops']:>8.1f} {r['images_per_s']:>9.0f} "
            f"{_f(r['workers_auto']):>15} {_f(r['workers_pillow']):>9} {_f(r['workers_torch']):>8}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=float, default=1.0, help="scale of the per-kind image counts")
    ap.add_argument("--kinds", default=",".join(KINDS), help="input kinds, comma-separated")
    ap.add_argument("--sizes", default="224,518")
    ap.add_argument("--resizers", default=",".join(RESIZERS), help="the first is used for tar shards and S3")
    ap.add_argument("--repeats", type=int, default=2, help="best of N (choices and builds)")
    ap.add_argument("--pool", type=int, default=8, help="distinct images per kind (12 MP: a quarter)")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 source (no `weed` binary)")
    ap.add_argument("--quick", action="store_true", help="tiny counts: only shows that every part runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.pool = 0.01, 1, 2
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.resizers = args.resizers.split(",")
    kinds = args.kinds.split(",")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "benchmarks" / "results" / f"feed-{stamp}{'-quick' if args.quick else ''}.json"
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine_info(torch.device("cpu")),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fast_png_decoder": "libdeflate (deflate) + libspng (pyspng)" if fastdecode.available() else None,
        "preprocessing": {r: Preprocess(resizer=r).describe_resize() for r in RESIZERS},
        "sources": {
            "h100_bf16_measured_tflops": "8192^3 bf16 matmul on an H100 (project perf notes)",
            "target_mfu": "benchmarks/README.md Targets (CUDA MFU >= 0.45)",
            "gflops": "benchmarks/_compute.flops_per_image (README arithmetic; ViT-L/14 at 224 = 162.0)",
        },
    }
    with tempfile.TemporaryDirectory(prefix="featstore-feed-") as tmp:
        work = Path(tmp)
        pools = {}
        for i, kind in enumerate(kinds):
            print(f"making {kind} ...", file=sys.stderr)
            n = max(1, args.pool // 4) if kind == "photo12" else args.pool
            pools[kind] = make_pool(work / f"pool-{kind}", kind, n, seed=i)
        print("choices, in a process set up as a decode worker ...", file=sys.stderr)
        report["choices"] = in_worker(choices, pools, args.sizes, args.repeats)
        print("decoders, with glibc's default malloc thresholds ...", file=sys.stderr)
        report["decode_ms_glibc_defaults"] = in_worker(decode_defaults, pools, args.repeats, keep=False)
        torch.set_num_threads(1)  # the main process leaves the other core to the worker
        loaded = random_model(_memory.tiny_spec())
        report["builds"] = builds(work, pools, args, loaded)
    report["gpu_workers"] = gpu_workers(report["builds"], args.sizes)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - t_start
    print_report(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
