"""Several models from one decode, measured side by side in one run (`featstore build
--model A --store a.zarr --model B --store b.zarr ...`).

1. **Decode-side CPU per image** (one thread, in this process, the worker's own code):
   the decode and each model's preprocessing of one image, for 1, 2 and 3 models, with
   one shared decode (`featstore.samples.load_views`) against a decode per model (what
   separate builds do). Shared, the decode's share stays flat as models are added.
2. **Wall time**: one build of N models against the same N models built one after
   another (same images, same settings, fresh outputs each round), for N = 2 and 3.

The models are random-weight transformers models of three families (DINOv2 at 224 and
518, CLIP at 224, SigLIP at 224: crop and squash, bicubic and bilinear), small enough
(`--width`, default 64, 2 layers) that the CPU's encoding does not hide the reading
and decoding that sharing saves; on a GPU host those are what is scarce. The images
are 512x512 RGBA PNG renders (`benchmarks/_images.py`). Nothing is downloaded.

    python benchmarks/multi.py [--images 160] [--repeats 2] [--out results/multi-<time>.json]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _images
from feed import per_image_ms

from featstore.batches import ImageItem
from featstore.fastdecode import png as fast_png
from featstore.images import prepare
from featstore.pipeline import BuildOptions, Target, build
from featstore.samples import InputSpec, load_views

RESULTS = Path(__file__).resolve().parent / "results"


def save_models(root: Path, width: int) -> list[tuple[str, str, int]]:
    """(name, folder, size) of the benchmark's models, saved with save_pretrained."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    common = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * width)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(patch_size=14, image_size=518, mlp_ratio=2, **{
        k: v for k, v in common.items() if k != "intermediate_size"}))  # fmt: skip
    clip = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(patch_size=16, image_size=224, projection_dim=width, **common)
    )
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(patch_size=16, image_size=224, **common))
    out = []
    for name, model, size in (("dinov2@224", dino, 224), ("clip@224", clip, 224), ("siglip@224", siglip, 224)):
        folder = root / name.split("@")[0]
        if not folder.exists():
            model.save_pretrained(folder)
        out.append((name, str(folder), size))
    out.append(("dinov2@518", str(root / "dinov2"), 518))
    return out


def specs_of(models: list[tuple[str, str, int]]) -> list[InputSpec]:
    """What each model takes from an image in a build with the default options (resizer auto)."""
    from featstore.loading import load_model
    from featstore.pipeline import _with_resizer

    specs = []
    for _name, folder, size in models:
        spec = _with_resizer(load_model(folder), "auto").spec
        specs.append(InputSpec(size, spec.grid(size), spec.preprocess))
    return specs


def decode_side(paths: list[Path], specs: list[InputSpec], repeats: int) -> list[dict[str, Any]]:
    items = [ImageItem(p.name, str(p)) for p in paths]
    decode = per_image_ms(lambda p: fast_png(str(p), max_pixels=1 << 30), paths, repeats)
    decoded = [fast_png(str(p), max_pixels=1 << 30)[0] for p in paths]  # type: ignore[index]
    rows = []
    for n in (1, 2, 3):
        chosen = specs[:n]
        prep = sum(
            per_image_ms(
                lambda px, s=s: prepare(px, size=s.size, grid=s.grid, preprocess=s.preprocess), decoded, repeats
            )
            for s in chosen
        )
        shared = per_image_ms(lambda it, c=tuple(chosen): load_views(it, c), items, repeats)
        separate = per_image_ms(lambda it, c=chosen: [load_views(it, (s,)) for s in c], items, repeats)
        rows.append(
            {
                "models": n,
                "decode_ms": round(decode, 3),  # one decode, whatever n
                "preprocess_ms": round(prep, 3),  # every model's, from the decoded image
                "shared_ms": round(shared, 3),  # load_views with n specs: one decode
                "shared_minus_preprocess_ms": round(shared - prep, 3),  # the decode (and reading) inside it
                "separate_ms": round(separate, 3),  # n one-model reads: n decodes
                "decode_share_shared": round(decode / shared, 3),
                "separate_over_shared": round(separate / shared, 3),
            }
        )
    return rows


def _builds(folder: Path, out: Path, models: list[tuple[str, str, int]], shared: bool) -> float:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    options = [BuildOptions(model=m[1], size=m[2], device="cpu", workers=1, batch_size=16) for m in models]
    t0 = time.perf_counter()
    if shared:
        also = [Target(o, store=out / f"{i}.zarr") for i, o in enumerate(options) if i]
        build(folder, options[0], store=out / "0.zarr", also=also)
    else:
        for i, o in enumerate(options):
            build(folder, o, store=out / f"{i}.zarr")
    return time.perf_counter() - t0


def wall(folder: Path, work: Path, models: list[tuple[str, str, int]], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in (2, 3):
        chosen = models[:n]
        best = {"shared": float("inf"), "one_after_another": float("inf")}
        for _ in range(repeats):  # interleaved, best of each
            best["one_after_another"] = min(best["one_after_another"], _builds(folder, work / "seq", chosen, False))
            best["shared"] = min(best["shared"], _builds(folder, work / "multi", chosen, True))
        rows.append(
            {
                "models": [m[0] for m in chosen],
                "one_build_s": round(best["shared"], 2),
                "one_after_another_s": round(best["one_after_another"], 2),
                "speedup": round(best["one_after_another"] / best["shared"], 2),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=160, help="images per build (default 160)")
    ap.add_argument("--pool", type=int, default=32, help="distinct renders in the decode-side sample (default 32)")
    ap.add_argument("--width", type=int, default=64, help="the models' hidden size (default 64)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny counts: only shows that everything runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.pool, args.repeats = 12, 4, 1
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="featstore-multi-"))
    try:
        models = save_models(work / "models", args.width)
        pool = _images.make_pool(work / "pool", "png", args.pool)
        folder = _images.fill(work / "images", [pool], args.images)
        # the decode side: dinov2@224, siglip@224 (squash, bilinear), dinov2@518
        order = [models[0], models[2], models[3]]
        side = decode_side(pool, specs_of(order), args.repeats)
        # the builds: dinov2@224, clip@224, siglip@224
        walls = wall(folder, work, models[:3], args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "multi",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch_threads": torch.get_num_threads(),
        "images": args.images,
        "decode_side_models": [m[0] for m in order],
        "decode_side": side,
        "wall": walls,
        "quick": args.quick,
    }
    print("decode side, per 512x512 RGBA render, one thread (ms):")
    print("  models  decode alone  preprocess  shared read  its decode part  a read per model  separate/shared")
    for r in side:
        print(
            f"  {r['models']:>6}  {r['decode_ms']:12.2f}  {r['preprocess_ms']:10.2f}  {r['shared_ms']:11.2f}"
            f"  {r['shared_minus_preprocess_ms']:14.2f}  {r['separate_ms']:16.2f}  {r['separate_over_shared']:14.2f}x"
        )
    print(f"wall time, {args.images} images, 1 decode worker, CPU:")
    for r in walls:
        print(
            f"  {' + '.join(r['models'])}: one build {r['one_build_s']:.2f} s, one after another "
            f"{r['one_after_another_s']:.2f} s ({r['speedup']:.2f}x)"
        )
    out = (
        args.out
        or RESULTS / f"multi-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}{'-quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
