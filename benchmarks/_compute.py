"""Model-only, end-to-end and baseline throughput, FLOPs per image, and the GPU matmul rate."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featstore.encoder import PatchEncoder
from featstore.loading import LoadedModel
from featstore.models import ModelSpec
from featstore.pipeline import BuildOptions, build, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------- 1. model only


def model_only(encoder: PatchEncoder, batch_sizes: list[int], *, min_seconds: float, seed: int = 0) -> dict[str, Any]:
    """images/s of `encoder.encode` on uint8 batches already in memory (on the device for CUDA).

    Per batch size: two warm-up calls (the second one timed to size the run), then
    enough calls for `min_seconds` (at least 2), with one device sync at the end.
    """
    g = torch.Generator().manual_seed(seed)
    dev = encoder.device
    rates: dict[str, Any] = {}
    for b in batch_sizes:
        try:
            x = torch.randint(0, 256, (b, encoder.size, encoder.size, 3), dtype=torch.uint8, generator=g).to(dev)
            encoder.encode(x)
            sync(dev)
            t0 = time.perf_counter()
            encoder.encode(x)
            sync(dev)
            per_call = max(time.perf_counter() - t0, 1e-6)
            calls = max(2, math.ceil(min_seconds / per_call))
            t0 = time.perf_counter()
            for _ in range(calls):
                out = encoder.encode(x)
            sync(dev)
            seconds = time.perf_counter() - t0
            rates[str(b)] = {"images_per_s": b * calls / seconds, "calls": calls, "seconds": seconds}
            del out, x
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            rates[str(b)] = {"error": "out of memory"}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    ok = {b: r for b, r in rates.items() if "images_per_s" in r}
    best = max(ok, key=lambda b: ok[b]["images_per_s"]) if ok else None
    return {
        "by_batch": rates,
        "best_batch": int(best) if best else None,
        "best_images_per_s": ok[best]["images_per_s"] if best else None,
    }


# ---------------------------------------------------------------- 2. end to end


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextmanager
def encode_timer(device: torch.device) -> Iterator[dict[str, float] | None]:
    """Seconds spent inside `PatchEncoder.encode` / `encode_batch` (CPU only: on CUDA the
    calls return before the work is done)."""
    if device.type != "cpu":
        yield None
        return
    originals = {name: getattr(PatchEncoder, name) for name in ("encode", "encode_batch")}
    spent = {"seconds": 0.0}

    def timed(name: str) -> Any:
        original = originals[name]

        def call(self: PatchEncoder, pixels: torch.Tensor) -> Any:
            t0 = time.perf_counter()
            try:
                return original(self, pixels)
            finally:
                spent["seconds"] += time.perf_counter() - t0

        return call

    for name in originals:  # encode_batch: builds that keep the pooled embedding
        setattr(PatchEncoder, name, timed(name))
    try:
        yield spent
    finally:
        for name, original in originals.items():
            setattr(PatchEncoder, name, original)


def end_to_end(input_dir: Path, out: Path, kind: str, options: BuildOptions, loaded: LoadedModel) -> dict[str, Any]:
    """`featstore.pipeline.build` on `input_dir`, writing a store (`out` ends in .zarr or .h5) or an npy folder.

    On CPU also the share of the wall time the model was computing ("model_busy"): what
    is left is the pipeline's own cost (waiting for decoded images, writing, start-up).
    """
    _clear(out)
    kwargs: dict[str, Any] = {"npy_dir": out} if kind == "npy" else {"store": out}
    with encode_timer(resolve_device(options.device)) as spent:
        t0 = time.perf_counter()
        result = build(input_dir, options, loaded=loaded, **kwargs)
        wall = time.perf_counter() - t0
    return {
        "model_busy": spent["seconds"] / wall if spent is not None and wall > 0 else None,
        "writer": kind,
        "images": result.encoded,
        "failed": result.failed,
        "wall_s": wall,
        "loop_s": result.seconds,
        "images_per_s": result.encoded / wall if wall > 0 else 0.0,
        "loop_images_per_s": result.images_per_second,
        "first_failure": f"{result.failures[0].key}: {result.failures[0].reason}" if result.failures else None,
    }


# ---------------------------------------------------------------- 3. baseline: one image at a time


class Baseline:
    """What the reference scripts do per image, through the same module as featstore.

    PIL decode to RGBA, shorter side to `size` (bicubic), center crop, premultiply in
    float64, normalise on the CPU, a batch of one to the device, `passes` forward passes
    (the reference ran the vision tower twice per image), features and
    `adaptive_max_pool2d` mask saved with `np.save`, one file each.
    """

    def __init__(self, encoder: PatchEncoder, passes: int = 1) -> None:
        self.model = encoder.model
        self.spec: ModelSpec = encoder.spec
        self.size, self.grid = encoder.size, encoder.grid
        self.device = encoder.device
        self.compute_dtype, self.store_dtype = encoder.compute_dtype, encoder.store_dtype
        self.passes = passes
        self.mean = torch.tensor(self.spec.mean).view(3, 1, 1)
        self.std = torch.tensor(self.spec.std).view(3, 1, 1)

    def _pixels(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        with Image.open(path) as im:
            rgba = np.asarray(im.convert("RGBA"))
        h, w = rgba.shape[:2]
        s = self.size
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        rgb = np.asarray(
            Image.fromarray(np.ascontiguousarray(rgba[..., :3])).resize((nw, nh), Image.Resampling.BICUBIC)
        )
        alpha = np.asarray(
            Image.fromarray(np.ascontiguousarray(rgba[..., 3])).resize((nw, nh), Image.Resampling.BICUBIC)
        )
        top, left = (nh - s) // 2, (nw - s) // 2
        rgb, alpha = rgb[top : top + s, left : left + s], alpha[top : top + s, left : left + s]
        premultiplied = (rgb / 255 * alpha[..., None] / 255 * 255).astype(np.uint8)
        return premultiplied, alpha

    @torch.inference_mode()
    def one(self, path: Path, out_dir: Path) -> None:
        rgb, alpha = self._pixels(path)
        mask = F.adaptive_max_pool2d(torch.from_numpy(alpha > 0).float()[None, None], self.grid)[0, 0]
        x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        x = ((x - self.mean) / self.std).unsqueeze(0).to(self.device, self.compute_dtype)
        for _ in range(self.passes):
            if self.spec.family == "clip":
                hidden = self.model.vision_model(  # type: ignore[union-attr]
                    pixel_values=x, interpolate_pos_encoding=self.size != self.spec.native_size
                ).last_hidden_state[:, 1:]
            else:
                hidden = self.model(pixel_values=x).last_hidden_state[:, self.spec.num_prefix_tokens :]
        feats = hidden[0].transpose(0, 1).reshape(-1, self.grid, self.grid).to(self.store_dtype).cpu().numpy()
        np.save(out_dir / f"{path.stem}.npy", feats)
        np.save(out_dir / f"{path.stem}_mask.npy", mask.numpy().astype(np.uint8))


def baseline(
    encoder: PatchEncoder, files: list[Path], out_dir: Path, *, passes: int, warmup: int = 2
) -> dict[str, Any]:
    base = Baseline(encoder, passes)
    _clear(out_dir)
    (out_dir / "warmup").mkdir(parents=True)
    for f in files[:warmup]:
        base.one(f, out_dir / "warmup")
    t0 = time.perf_counter()
    for f in files:
        base.one(f, out_dir)
    seconds = time.perf_counter() - t0
    return {"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds, "passes": passes}


# ---------------------------------------------------------------- FLOPs and the GPU matmul rate


def flops_per_image(spec: ModelSpec, size: int) -> dict[str, Any]:
    """Forward FLOPs (multiply-add = 2) of the transformer at `size`, from the config.

    Per layer: q, k, v and output projections 4ND^2 MACs, MLP 2NDI MACs (I = 4D: 8ND^2;
    SwiGLU: 3NDh with h = 2I/3 rounded up to 8, the same count), attention 2N^2D MACs;
    with I = 4D that is 24ND^2 + 4N^2D FLOPs. Patch embedding: 2 * patches * 3p^2 * D.
    Layer norms, biases, softmax and GELU are left out (well under 1%).
    """
    p, d, layers, inter = spec.patch_size, spec.hidden_dim, spec.num_layers, spec.intermediate_size
    g = size // p
    n = g * g + spec.num_prefix_tokens
    if dict(spec.extra_config).get("use_swiglu_ffn"):
        h = (int(inter * 2 / 3) + 7) // 8 * 8
        mlp_macs = 3 * n * d * h
    else:
        mlp_macs = 2 * n * d * inter
    per_layer = 2 * (4 * n * d * d + mlp_macs) + 4 * n * n * d
    patch = 2 * g * g * 3 * p * p * d
    total = layers * per_layer + patch
    if inter == 4 * d:
        arithmetic = (
            f"L(24ND^2 + 4N^2D) + 2*P*3p^2*D = {layers}*(24*{n}*{d}^2 + 4*{n}^2*{d}) + 2*{g * g}*{3 * p * p}*{d}"
            f" = {layers}*{per_layer / 1e9:.4f}e9 + {patch / 1e9:.4f}e9 = {total / 1e9:.2f} GFLOPs"
        )
    else:
        arithmetic = f"L(8ND^2 + 4NDI + 4N^2D) + patch embed, I={inter} = {total / 1e9:.2f} GFLOPs"
    return {
        "gflops": total / 1e9,
        "tokens_N": n,
        "width_D": d,
        "layers_L": layers,
        "patches_P": g * g,
        "arithmetic": arithmetic,
    }


def matmul_tflops(
    device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, seconds: float = 2.0
) -> dict:
    """Dense n^3 matmul rate on `device` (CUDA events around a run of back-to-back matmuls)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.matmul(a, b, out=c)
    end.record()
    end.synchronize()
    per_call = max(start.elapsed_time(end) / 1000, 1e-6)
    iters = max(10, math.ceil(seconds / per_call))
    start.record()
    for _ in range(iters):
        torch.matmul(a, b, out=c)
    end.record()
    end.synchronize()
    elapsed = start.elapsed_time(end) / 1000
    del a, b, c
    torch.cuda.empty_cache()
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "iters": iters,
        "seconds": elapsed,
        "tflops": 2 * n**3 * iters / elapsed / 1e12,
    }


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
