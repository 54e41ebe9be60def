#!/usr/bin/env python3
"""featstore's benchmark suite: one command, one table, one JSON file.

    python benchmarks/run.py [--model ViT-B/32] [--size 224] [--batch-size N] [--precision fp32]
                             [--workers N] [--images N] [--device cpu|cuda] [--quick]
                             [--only a,b] [--out results/x.json]

Sections (see benchmarks/README.md): gpu, model, e2e, baseline, decode, read, memory.
Full-size architectures with random weights (no downloads), synthetic images in a
temp folder. Everything that is compared is measured in the same run and reported
as a ratio, because absolute numbers on a shared machine move from run to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import _compute
import _images
import _memory
import _reads
import torch

from featstore.encoder import PatchEncoder
from featstore.errors import ConfigError
from featstore.loading import random_model
from featstore.models import REGISTRY, lookup
from featstore.pipeline import BuildOptions, default_batch_size, default_precision, default_workers, resolve_device

SECTIONS = ("gpu", "model", "e2e", "baseline", "decode", "read", "memory")
E2E_WRITERS = ("zarr", "h5", "npy")
HERE = Path(__file__).resolve().parent
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="featstore benchmarks: model-only, end-to-end, baseline, decode, read, memory (and GPU MFU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model", default="ViT-B/32", help="registered model name (random weights)")
    ap.add_argument("--size", type=int, help="input size (default: the model's)")
    ap.add_argument("--batch-size", type=int, help="end-to-end batch size (default: model-only's best)")
    ap.add_argument("--batch-sizes", help="model-only sweep, e.g. 1,8,16,32 (default: by device)")
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: fp32 on CPU, fp16 on CUDA")
    ap.add_argument("--workers", type=int, help="DataLoader decode workers for builds (default: featstore's)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--images", type=int, help="images per end-to-end build (default: 256 CPU, 16384 CUDA)")
    ap.add_argument(
        "--input-kind",
        choices=("png", "jpeg", "mix"),
        default="png",
        help="end-to-end input: 512x512 RGBA PNG renders, 500x375 JPEG photos, or both alternating",
    )
    ap.add_argument(
        "--baseline-images", type=int, help="images for the one-at-a-time baseline (default: 128 CPU, 256 CUDA)"
    )
    ap.add_argument(
        "--baseline-passes",
        type=int,
        default=1,
        help="forward passes per image in the baseline (the reference scripts ran 2)",
    )
    ap.add_argument("--read-rows", type=int, help="rows in the read-benchmark stores (default 2000)")
    ap.add_argument(
        "--memory-model", help="model for the memory builds: a registered name or 'tiny' (default dinov2-small)"
    )
    ap.add_argument("--memory-size", type=int, default=112, help="input size for the memory builds")
    ap.add_argument("--memory-counts", help="two image counts for the memory builds (default 200,2000)")
    ap.add_argument("--repeats", type=int, help="rounds of model/e2e/baseline, best of each kept (default 2)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument(
        "--quick", action="store_true", help="tiny counts: checks that the suite works (numbers mean nothing)"
    )
    ap.add_argument("--only", help=f"comma list of sections: {','.join(SECTIONS)}")
    ap.add_argument("--skip", help="comma list of sections to leave out")
    ap.add_argument("--no-cold", action="store_true", help="do not drop the page cache for cold reads")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/<time>-<device>-<model>.json)")
    ap.add_argument("--tmp", help="work folder (default: a new temp folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    return ap.parse_args(argv)


def _ints(text: str | None) -> list[int] | None:
    return [int(x) for x in text.split(",") if x.strip()] if text else None


def _sections(args: argparse.Namespace) -> list[str]:
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    skipped = {s.strip() for s in args.skip.split(",")} if args.skip else set()
    unknown = [s for s in [*chosen, *skipped] if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen and s not in skipped]


def settings(args: argparse.Namespace) -> dict[str, Any]:
    spec = lookup(args.model)
    if spec is None:
        raise SystemExit(f"--model {args.model!r} is not registered; choose from: {', '.join(REGISTRY)}")
    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    cuda = device.type == "cuda"
    q = args.quick
    size = args.size or spec.default_size
    try:
        spec.grid(size)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    threads = args.threads or torch.get_num_threads()
    gpu_sweep, cpu_sweep = ([8, 32], [1, 8]) if q else ([32, 64, 128, 256, 512], [1, 8, 16, 32])
    sweep = _ints(args.batch_sizes) or (gpu_sweep if cuda else cpu_sweep)
    if args.batch_size and args.batch_size not in sweep:
        sweep = sorted([*sweep, args.batch_size])
    images = args.images or (16 if q else 16384 if cuda else 256)
    memory_counts = _ints(args.memory_counts) or ([20, 200] if q else [200, 2000])
    if len(memory_counts) != 2:
        raise SystemExit("--memory-counts takes two counts, e.g. 200,2000")
    return {
        "model": spec.name,
        "size": size,
        "grid": spec.grid(size),
        "device": str(device),
        "precision": args.precision or default_precision(device),
        "threads": threads,
        "workers": default_workers(device) if args.workers is None else args.workers,
        "batch_size": args.batch_size,  # None: featstore's default batch, filled in later
        "batch_sizes": sweep,
        "images": images,
        "input_kind": args.input_kind,
        "baseline_images": min(images, args.baseline_images or (6 if q else 256 if cuda else 128)),
        "baseline_passes": max(1, args.baseline_passes),
        "read_rows": args.read_rows or (64 if q else 2000),
        "memory_model": args.memory_model or (_memory.TINY if q else "facebook/dinov2-small"),
        "memory_size": args.memory_size,
        "memory_counts": memory_counts,
        "repeats": args.repeats or (1 if q else 2),
        "quick": q,
        "min_seconds": 0.3 if q else 2.0 if cuda else 3.0,
        "pool": 8 if q else 64,
        "loader_epochs": 1 if q else 3,
        "single_reads": 32 if q else 300,
        "get_batch_batches": 3 if q else 10,
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    mem_gb = None
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem_gb = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        pass
    import numpy
    import PIL
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": _compute.cpu_threads(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "featstore_commit": _git_commit(),
        "gpu": None,
    }
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("zarr", "h5py", "numcodecs", "tensorstore"):
        try:
            info[mod] = version(mod)
        except PackageNotFoundError:
            info[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["cuda"] = torch.version.cuda
    elif torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.get_device_name(0)} (not used: --device {device})"
    return info


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------- the sections


def _best(runs: list[dict[str, Any]], key: str = "images_per_s") -> dict[str, Any] | None:
    ok = [r for r in runs if isinstance(r.get(key), int | float)]
    if not ok:
        return runs[-1] if runs else None
    best = dict(max(ok, key=lambda r: r[key]))
    best["all_rounds"] = [round(r[key], 3) for r in ok]
    return best


def _store_missing(e: BaseException) -> bool:
    return isinstance(e, ImportError) and "featstore" in str(e) and ("store" in str(e) or "torch" in str(e))


def compute_sections(cfg: dict[str, Any], sections: list[str], work: Path, folder: Path, results: dict) -> None:
    """model-only, end-to-end and baseline, in rounds, side by side."""
    spec = lookup(cfg["model"])
    device = torch.device(cfg["device"])
    log(f"building {cfg['model']} with random weights")
    loaded = random_model(spec)
    encoder = PatchEncoder(loaded, size=cfg["size"], device=device, precision=cfg["precision"])
    model_rounds: list[dict[str, Any]] = []
    e2e_rounds: dict[str, list[dict[str, Any]]] = {w: [] for w in E2E_WRITERS}
    base_rounds: list[dict[str, Any]] = []
    store_skip: dict[str, str] = {}
    files = sorted(folder.iterdir())[: cfg["baseline_images"]]

    for r in range(cfg["repeats"]):
        if "model" in sections:
            mo = _compute.model_only(encoder, cfg["batch_sizes"], min_seconds=cfg["min_seconds"], seed=r)
            model_rounds.append(mo)
            rates = ", ".join(f"b{b}: {v.get('images_per_s', 0):.1f}" for b, v in mo["by_batch"].items())
            log(f"round {r + 1} model-only images/s {rates}")
        if cfg["batch_size"] is None:  # what users get without flags
            cfg["batch_size"] = default_batch_size(device, encoder.out_dim)
        if "e2e" in sections:
            options = BuildOptions(
                model=cfg["model"],
                size=cfg["size"],
                device=cfg["device"],
                precision=cfg["precision"],
                batch_size=cfg["batch_size"],
                workers=cfg["workers"],
                overwrite=True,
                recursive=False,
            )
            for w in E2E_WRITERS:
                if w in store_skip:
                    continue
                out = work / "e2e" / ("npy" if w == "npy" else f"x.{w}")
                try:
                    res = _compute.end_to_end(folder, out, w, options, loaded)
                except Exception as e:
                    if _store_missing(e):
                        store_skip[w] = f"skipped: store not available ({e})"
                    else:
                        store_skip[w] = f"failed: {type(e).__name__}: {e}"
                        log(traceback.format_exc())
                    log(f"round {r + 1} end-to-end {w}: {store_skip[w]}")
                    continue
                finally:
                    _compute._clear(out)
                e2e_rounds[w].append(res)
                log(f"round {r + 1} end-to-end {w}: {res['images_per_s']:.1f} images/s ({res['images']} images)")
        if "baseline" in sections:
            res = _compute.baseline(encoder, files, work / "baseline", passes=cfg["baseline_passes"])
            _compute._clear(work / "baseline")
            base_rounds.append(res)
            log(f"round {r + 1} baseline: {res['images_per_s']:.1f} images/s")

    if model_rounds:
        by_batch: dict[str, Any] = {}
        for b in model_rounds[0]["by_batch"]:
            by_batch[b] = _best([m["by_batch"][b] for m in model_rounds]) or {}
        ok = {b: v for b, v in by_batch.items() if "images_per_s" in v}
        best_b = max(ok, key=lambda b: ok[b]["images_per_s"]) if ok else None
        results["model_only"] = {
            "by_batch": by_batch,
            "best_batch": int(best_b) if best_b else None,
            "best_images_per_s": ok[best_b]["images_per_s"] if best_b else None,
        }
    if "e2e" in sections:
        results["end_to_end"] = {
            "batch_size": cfg["batch_size"],
            "workers": cfg["workers"],
            **{
                w: (_best(e2e_rounds[w]) if e2e_rounds[w] else {"status": store_skip.get(w, "not run")})
                for w in E2E_WRITERS
            },
        }
        # Each round's zarr build over the same round's model-only rate at the build's
        # batch: pairs measured a minute apart, less exposed to the machine's drift
        # than best-of-all-rounds figures.
        same = [m["by_batch"].get(str(cfg["batch_size"]), {}).get("images_per_s") for m in model_rounds]
        built = [e.get("images_per_s") for e in e2e_rounds["zarr"]]
        paired = [e / m for e, m in zip(built, same, strict=False) if e and m]
        if paired:
            results["end_to_end"]["zarr_vs_model_only_same_round"] = [round(p, 3) for p in paired]
    if base_rounds:
        results["baseline"] = _best(base_rounds)
    del encoder, loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_section(cfg: dict[str, Any], pools: dict[str, list[Path]], results: dict) -> None:
    spec = lookup(cfg["model"])
    out: dict[str, Any] = {"size": cfg["size"]}
    for kind, label in (("png", "png_render_512_rgba"), ("jpeg", "jpeg_photo_500x375")):
        out[label] = _reads.decode_rate(
            pools[kind], size=cfg["size"], grid=spec.grid(cfg["size"]), min_seconds=cfg["min_seconds"]
        )
        log(f"decode {label}: {out[label].get('images_per_s', 0):.1f} images/s per worker")
    results["decode"] = out


def read_section(cfg: dict[str, Any], work: Path, pools: dict[str, list[Path]], results: dict, cold_ok: bool) -> None:
    try:
        from featstore.store import open_store  # noqa: F401
        from featstore.torch import FeatureDataset  # noqa: F401
    except ImportError as e:
        results["read"] = {"status": f"skipped: store not available ({e})"}
        log(results["read"]["status"])
        return
    spec = lookup(cfg["model"])
    # Same feature shape and dtype as the benchmarked model, made by its 0-layer twin
    # (patch embedding only), so that 2,000 rows take seconds to build, not minutes.
    shape_model = random_model(dataclasses.replace(spec, num_layers=0))
    folder = _images.fill(work / "read_images", [pools["png"]], cfg["read_rows"])
    options = BuildOptions(
        model=cfg["model"],
        size=cfg["size"],
        device=cfg["device"],
        precision=cfg["precision"],
        batch_size=64,
        workers=cfg["workers"],
        overwrite=True,
        recursive=False,
    )
    from featstore.pipeline import build

    rd = work / "read"
    npy_dir = rd / "npy"
    out: dict[str, Any] = {
        "rows": cfg["read_rows"],
        "row_shape": [spec.hidden_dim, spec.grid(cfg["size"]), spec.grid(cfg["size"])],
        "dtype": "float32" if cfg["precision"] == "fp32" else "float16",
        "cold": "measured (page cache dropped)" if cold_ok else "cold: unavailable",
        "dataloader": {"batch_size": 64, "num_workers": 2},
    }
    log(f"read: building {cfg['read_rows']}-row stores (.zarr + .npy, then .h5)")
    built: dict[str, Path] = {}
    for fmt in ("zarr", "h5"):
        path = rd / f"x.{fmt}"
        try:
            kwargs: dict[str, Any] = {"npy_dir": npy_dir} if fmt == "zarr" else {}
            res = build(folder, options, store=path, loaded=shape_model, **kwargs)
            if res.failed:
                raise RuntimeError(f"{res.failed} images failed: {res.failures[0].reason}")
            built[fmt] = path
        except Exception as e:
            out[fmt] = {"status": f"failed to build: {type(e).__name__}: {e}"}
            log(traceback.format_exc())
    if not npy_dir.exists() and built:
        build(folder, options, npy_dir=npy_dir, loaded=shape_model)
    if npy_dir.exists():
        out["npy_disk"] = _reads.disk_usage(npy_dir)
    for fmt, path in built.items():
        try:
            log(f"read: {fmt}")
            out[fmt] = _reads.read_store(
                path,
                npy_dir,
                single_reads=cfg["single_reads"],
                batches=cfg["get_batch_batches"],
                epochs=cfg["loader_epochs"],
                cold=cold_ok,
            )
            out[fmt]["disk"] = _reads.disk_usage(path)
        except Exception as e:
            out[fmt] = {"status": f"failed: {type(e).__name__}: {e}"}
            log(traceback.format_exc())
    shutil.rmtree(rd, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    results["read"] = out


def memory_section(cfg: dict[str, Any], work: Path, pools: dict[str, list[Path]], results: dict) -> None:
    runs = []
    for count in cfg["memory_counts"]:
        folder = _images.fill(work / f"memory_images_{count}", [pools["png"]], count)
        child = {
            "model": cfg["memory_model"],
            "size": cfg["memory_size"],
            "device": cfg["device"],
            "precision": cfg["precision"],
            "batch_size": cfg["batch_size"] or 16,
            "workers": cfg["workers"],
            "threads": cfg["threads"],
            "input": str(folder),
            "out": str(work / f"memory_out_{count}"),
        }
        log(f"memory: build of {count} images in a subprocess ({cfg['memory_model']} at {cfg['memory_size']})")
        rep = _memory.measure(child)
        rep["count"] = count
        runs.append(rep)
        shutil.rmtree(folder, ignore_errors=True)
        for suffix in (".zarr", ".npy"):
            _compute._clear(work / f"memory_out_{count}{suffix}")
        log(f"memory: {count} images -> {rep}")
    out: dict[str, Any] = {"model": cfg["memory_model"], "size": cfg["memory_size"], "runs": runs}
    small, large = runs
    if "error" not in small and "error" not in large:
        out["main_ratio"] = large["peak_rss_main_mb"] / small["peak_rss_main_mb"]
        if small["peak_rss_worker_mb"] > 0:
            out["worker_ratio"] = large["peak_rss_worker_mb"] / small["peak_rss_worker_mb"]
    results["memory"] = out


def gpu_section(cfg: dict[str, Any], results: dict) -> None:
    device = torch.device(cfg["device"])
    log("gpu: 8192^3 bf16 matmul")
    results["gpu"] = {"matmul": _compute.matmul_tflops(device)}
    log(f"gpu: {results['gpu']['matmul']['tflops']:.0f} TFLOP/s")


# ---------------------------------------------------------------- ratios, checks, tables


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b > 0 else None


def derive(cfg: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    mo = _get(results, "model_only", "best_images_per_s")
    e2e = results.get("end_to_end", {})
    base = _get(results, "baseline", "images_per_s")
    ratios: dict[str, Any] = {}
    for w in E2E_WRITERS:
        rate = _get(e2e, w, "images_per_s")
        ratios[f"e2e_{w}_vs_model_only"] = _ratio(rate, mo)
        ratios[f"e2e_{w}_loop_vs_model_only"] = _ratio(_get(e2e, w, "loop_images_per_s"), mo)
        ratios[f"e2e_{w}_vs_baseline"] = _ratio(rate, base)
        ratios[f"e2e_{w}_model_busy"] = _get(e2e, w, "model_busy")
    same_b = _get(results, "model_only", "by_batch", str(cfg["batch_size"]), "images_per_s")
    ratios["e2e_zarr_vs_model_only_same_batch"] = _ratio(_get(e2e, "zarr", "images_per_s"), same_b)
    paired = e2e.get("zarr_vs_model_only_same_round")
    if paired:
        ratios["e2e_zarr_vs_model_only_same_round_median"] = statistics.median(paired)
    flops = results.get("flops", {}).get("gflops")
    if mo and flops:
        ratios["model_only_gflops_per_s"] = mo * flops
    matmul = _get(results, "gpu", "matmul", "tflops")
    if matmul and flops:
        if mo:
            ratios["model_only_mfu_vs_matmul"] = mo * flops * 1e9 / (matmul * 1e12)
        rate = _get(e2e, "zarr", "images_per_s") or _get(e2e, "npy", "images_per_s")
        if rate:
            ratios["e2e_mfu_vs_matmul"] = rate * flops * 1e9 / (matmul * 1e12)
    dec = results.get("decode", {})
    for kind in ("png_render_512_rgba", "jpeg_photo_500x375"):
        rate = _get(dec, kind, "images_per_s")
        if mo and rate:
            ratios[f"workers_for_model_rate_{kind}"] = math.ceil(mo / rate)
    return {k: v for k, v in ratios.items() if v is not None}


def checks(cfg: dict[str, Any], results: dict[str, Any], ratios: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        value: float | None,
        target: float,
        detail: str,
        info_only: str | None = None,
        at_most: bool = False,
        missing: str | None = None,
    ) -> None:
        if value is None:
            status = "SKIP"
            detail = missing or "not measured in this run"
        elif info_only:
            status = "INFO"
        else:
            status = "PASS" if (value <= target if at_most else value >= target) else "FAIL"
        out.append(
            {
                "check": name,
                "value": value,
                "target": target,
                "status": status,
                "detail": detail + (f" ({info_only})" if info_only and value is not None else ""),
            }
        )

    mo = _get(results, "model_only", "best_images_per_s")
    e2e = _get(results, "end_to_end", "zarr", "images_per_s")
    e2e_w = "zarr"
    if e2e is None:
        e2e, e2e_w = _get(results, "end_to_end", "npy", "images_per_s"), "npy"
    zarr_status = _get(results, "end_to_end", "zarr", "status")
    if e2e is not None and zarr_status:
        e2e_w = f"npy; zarr {zarr_status.split(' (')[0]}"
    cuda = str(cfg["device"]).startswith("cuda")
    # The targets: on the 2-core CPU machine ViT-B/32 (and dinov2-small) in fp32;
    # on a GPU ViT-L/14 and dinov2-large in half precision.
    e2e_target, base_target = (0.8, 20.0) if cuda else (0.85, 1.5)
    target_models = ("ViT-L/14", "dinov2-large", "facebook/dinov2-large") if cuda else ("ViT-B/32",)
    other_model = None if cfg["model"] in target_models else f"target is for {', '.join(target_models)}"
    if cuda:
        mfu = _get(ratios, "model_only_mfu_vs_matmul")
        add(
            "model-only >= 45% of the bf16 matmul rate",
            mfu,
            0.45,
            f"{_f(mo)} images/s x {_f(_get(results, 'flops', 'gflops'))} GFLOPs = "
            f"{_f(mo * _get(results, 'flops', 'gflops') / 1000 if mo and _get(results, 'flops', 'gflops') else None)}"
            f" TFLOP/s vs matmul {_f(_get(results, 'gpu', 'matmul', 'tflops'))}",
            other_model,
        )
    add(
        f"end-to-end >= {e2e_target} x model-only",
        _ratio(e2e, mo),
        e2e_target,
        f"{_f(e2e)} ({e2e_w}) / {_f(mo)} images/s (model-only, batch {_get(results, 'model_only', 'best_batch')})"
        + (
            f"; same round, same batch: median {_f(ratios['e2e_zarr_vs_model_only_same_round_median'], 3)}"
            if "e2e_zarr_vs_model_only_same_round_median" in ratios
            else ""
        ),
    )
    if not cuda:
        busy = _get(ratios, "e2e_zarr_model_busy")
        add(
            "pipeline keeps the model busy >= 95% of the build (CPU)",
            busy,
            0.95,
            f"{_f(busy * 100 if busy is not None else None)}% of the zarr build's wall time inside encode()",
        )
    base = _get(results, "baseline", "images_per_s")
    add(
        f"featstore >= {base_target:g} x baseline",
        _ratio(e2e, base),
        base_target,
        f"{_f(e2e)} ({e2e_w}) / {_f(base)} images/s (baseline, {cfg['baseline_passes']} pass)",
        other_model,
    )
    mem = results.get("memory", {})
    small, large = cfg["memory_counts"]
    main_r, worker_r = mem.get("main_ratio"), mem.get("worker_ratio")
    runs = mem.get("runs", [{}, {}])
    mem_error = "; ".join(str(r["error"]) for r in runs if "error" in r) or None
    add(
        f"peak RSS {large} <= 1.2 x {small} images (main process)",
        main_r,
        1.2,
        f"{_f(_get(runs[-1], 'peak_rss_main_mb'))} / {_f(_get(runs[0], 'peak_rss_main_mb'))} MB = {_f(main_r, 3)}",
        at_most=True,
        missing=mem_error,
    )
    if worker_r is not None:
        add(
            f"peak RSS {large} <= 1.2 x {small} images (decode worker)",
            worker_r,
            1.2,
            f"{_f(_get(runs[-1], 'peak_rss_worker_mb'))} / {_f(_get(runs[0], 'peak_rss_worker_mb'))} MB"
            f" = {_f(worker_r, 3)}",
            at_most=True,
        )
    reads = (
        ("single_random", "single random row"),
        ("get_batch_64", "get_batch of 64 random rows"),
        ("loader_random", "DataLoader batch 64 shuffled, 2 workers"),
    )
    for fmt in ("zarr", "h5"):
        r = _get(results, "read", fmt) or {}
        why = _get(results, "read", "status") or r.get("status")
        for section, label in reads:
            for temp in ("warm", "cold"):
                s_, n_ = (_get(r, section, side, f"{temp}_rows_per_s") for side in ("store", "npy"))
                add(
                    f"read {fmt}, {temp}: {label}, reader >= .npy",
                    _ratio(s_, n_),
                    1.0,
                    f"{_f(s_)} vs {_f(n_)} rows/s",
                    missing=why or (None if s_ is not None else f"{temp} reads not measured" if r else None),
                )
    return out


def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _stages(stages: dict[str, float] | None) -> str:
    """The runner's per-stage seconds, as recorded by the build itself."""
    if not stages:
        return ""
    return "; stages (s): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in stages.items())


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else _f(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([f"\n{title}", fmt(cells[0]), line, *(fmt(r) for r in cells[1:])])


def render(report: dict[str, Any]) -> str:
    cfg, res, ratios = report["settings"], report["results"], report["ratios"]
    m = report["machine"]
    parts = [
        f"featstore benchmarks: {cfg['model']} at {cfg['size']} ({cfg['precision']}) on {cfg['device']}; "
        f"{m['cpu']} ({m['usable_cpus']} usable cpus), GPU: {m['gpu'] or 'none'}; torch {m['torch']}, "
        f"transformers {m['transformers']}; threads {cfg['threads']}, workers {cfg['workers']}, "
        f"images {cfg['images']} ({cfg['input_kind']}), repeats {cfg['repeats']}"
        + ("\nQUICK RUN: tiny counts, the numbers below only show that the suite works" if cfg["quick"] else "")
    ]
    fl = res.get("flops")
    if fl:
        parts.append(f"\nFLOPs/image: {fl['arithmetic']}\n  check: {fl['reference_check']}")
    if "gpu" in res:
        g = res["gpu"]["matmul"]
        parts.append(f"\nGPU matmul {g['n']}^3 {g['dtype']}: {g['tflops']:.1f} TFLOP/s")
    rows: list[list[Any]] = []
    mo = res.get("model_only")
    if mo:
        for b, v in mo["by_batch"].items():
            rows.append([f"model-only, batch {b}", v.get("images_per_s", v.get("error")), ""])
    e2e = res.get("end_to_end", {})
    for w in E2E_WRITERS:
        v = e2e.get(w)
        if v is not None:
            rows.append(
                [
                    f"end-to-end build -> {w} (batch {e2e['batch_size']}, workers={e2e['workers']})",
                    v.get("images_per_s", v.get("status")),
                    f"{_f(ratios.get(f'e2e_{w}_vs_model_only'), 3)} x model-only "
                    f"(loop only {_f(ratios.get(f'e2e_{w}_loop_vs_model_only'), 3)}); "
                    f"{_f(ratios.get(f'e2e_{w}_vs_baseline'), 2)} x baseline"
                    + (f"; model busy {v['model_busy']:.0%}" if v.get("model_busy") is not None else "")
                    + _stages(v.get("stages")),
                ]
            )
    if "baseline" in res:
        b = res["baseline"]
        rows.append([f"baseline, one at a time ({b['passes']} pass)", b["images_per_s"], ""])
    for kind, v in res.get("decode", {}).items():
        if isinstance(v, dict):
            need = ratios.get(f"workers_for_model_rate_{kind}")
            rows.append(
                [
                    f"decode {kind} (one worker)",
                    v.get("images_per_s", v.get("error")),
                    f"workers to feed model-only: {need}" if need else "",
                ]
            )
    if rows:
        parts.append(table("Throughput", ["what", "images/s", "note"], rows))
    extra = [[k, v] for k, v in ratios.items() if "mfu" in k or "gflops" in k]
    if extra:
        parts.append(table("Compute", ["what", "value"], [[k, _f(v, 3)] for k, v in extra]))

    rd = res.get("read")
    if rd:
        if "status" in rd:
            parts.append(f"\nReads: {rd['status']}")
        else:
            rows = []
            for fmt in ("zarr", "h5"):
                r = rd.get(fmt, {})
                if "status" in r:
                    rows.append([fmt, r["status"], "", "", ""])
                    continue
                for name in ("loader_random", "loader_sequential", "single_random", "get_batch_64"):
                    s, n = r.get(name, {}).get("store", {}), r.get(name, {}).get("npy", {})
                    rows.append(
                        [
                            f"{fmt} {name}",
                            s.get("warm_rows_per_s"),
                            n.get("warm_rows_per_s"),
                            s.get("cold_rows_per_s", "-"),
                            n.get("cold_rows_per_s", "-"),
                        ]
                    )
                d = r.get("disk", {})
                rows.append(
                    [f"{fmt} on disk: files / MB", f"{d.get('files')} / {_f(d.get('disk_bytes', 0) / 1e6)}", "", "", ""]
                )
            nd = rd.get("npy_disk", {})
            rows.append(
                [".npy on disk: files / MB", f"{nd.get('files')} / {_f(nd.get('disk_bytes', 0) / 1e6)}", "", "", ""]
            )
            parts.append(
                table(
                    f"Reads, rows/s ({rd['rows']} rows {rd['row_shape']} {rd['dtype']}; {rd['cold']})",
                    ["what", "store warm", ".npy warm", "store cold", ".npy cold"],
                    rows,
                )
            )
    mem = res.get("memory")
    if mem:
        rows = [
            [
                f"build of {r['count']} images",
                r.get("peak_rss_main_mb", r.get("error")),
                r.get("peak_rss_worker_mb"),
                r.get("rss_before_build_mb"),
                r.get("writer"),
            ]
            for r in mem["runs"]
        ]
        parts.append(
            table(
                f"Peak RSS, MB ({mem['model']} at {mem['size']}, fresh subprocess each)",
                ["what", "main", "worker", "before build", "writer"],
                rows,
            )
        )
    parts.append(
        table(
            "Targets", ["check", "status", "detail"], [[c["check"], c["status"], c["detail"]] for c in report["checks"]]
        )
    )
    return "\n".join(parts)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = _sections(args)
    cfg = settings(args)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if "gpu" in sections and device.type != "cuda":
        sections.remove("gpu")
    report: dict[str, Any] = {
        "schema": 1,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "sections": sections,
        "machine": machine_info(device),
        "settings": cfg,
        "results": {},
        "errors": {},
    }
    res = report["results"]
    spec = lookup(cfg["model"])
    res["flops"] = _compute.flops_per_image(spec, cfg["size"])
    ref = _compute.flops_per_image(REGISTRY["ViT-L/14"], 224)["gflops"]
    res["flops"]["reference_check"] = f"ViT-L/14 at 224 by the same formula: {ref:.1f} GFLOPs (perf-facts table: 162.0)"

    work = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="featstore-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}; sections {','.join(sections)}")
    try:
        kinds = {"png", "jpeg"}
        pools = {k: _images.make_pool(work / "pool" / k, k, cfg["pool"]) for k in sorted(kinds)}
        log(f"made {cfg['pool']} distinct PNG renders and JPEG photos")
        order = {"png": [pools["png"]], "jpeg": [pools["jpeg"]], "mix": [pools["png"], pools["jpeg"]]}
        folder = _images.fill(work / "images", order[cfg["input_kind"]], cfg["images"])

        def guarded(name: str, fn: Any, *a: Any) -> None:
            try:
                fn(*a)
            except Exception as e:
                report["errors"][name] = f"{type(e).__name__}: {e}"
                log(f"{name} failed:\n{traceback.format_exc()}")

        if "gpu" in sections:
            guarded("gpu", gpu_section, cfg, res)
        if {"model", "e2e", "baseline"} & set(sections):
            guarded("compute", compute_sections, cfg, sections, work, folder, res)
        if "decode" in sections:
            guarded("decode", decode_section, cfg, pools, res)
        if "read" in sections:
            cold_ok = not args.no_cold and _reads.drop_caches()
            guarded("read", read_section, cfg, work, pools, res, cold_ok)
        if "memory" in sections:
            guarded("memory", memory_section, cfg, work, pools, res)
    finally:
        if not args.keep and not args.tmp:
            shutil.rmtree(work, ignore_errors=True)

    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["ratios"] = derive(cfg, res)
    report["checks"] = checks(cfg, res, report["ratios"])
    report["seconds"] = time.perf_counter() - T0
    print(render(report))
    if report["errors"]:
        print("\nErrors: " + "; ".join(f"{k}: {v}" for k, v in report["errors"].items()))

    slug = re.sub(r"[^A-Za-z0-9]+", "-", cfg["model"]).strip("-").lower()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{device.type}-{slug}{'-quick' if cfg['quick'] else ''}.json"
    out = Path(args.out) if args.out else HERE / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
