"""Throughput of the newer families and the cost of `--embedding`.

For DINOv3 ViT-L/16 and SigLIP2-so400m/16, both at 512 (random weights built from the
registered configs: throughput does not depend on weight values):

- model only: images/s of the encoder on batches already in memory, with the pooled
  embedding off and on (its cost is the difference);
- end to end: `build` into a Zarr store over a few synthetic photos, embedding off and on;
- FLOPs per image from the config.

    python benchmarks/families.py --device cuda --images 512            # a GPU
    python benchmarks/families.py --device cpu --images 16 --batch-sizes 1,4
    python benchmarks/families.py --tiny                                 # smoke test (seconds)

Results go to benchmarks/results/families-<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._compute import end_to_end, flops_per_image, model_only
from benchmarks._images import fill, make_pool
from featstore.encoder import PatchEncoder
from featstore.loading import random_model
from featstore.models import REGISTRY, ModelSpec
from featstore.models.family import FAMILIES
from featstore.pipeline import BuildOptions, resolve_device

MODELS = {  # name -> size
    "facebook/dinov3-vitl16-pretrain-lvd1689m": 512,
    "google/siglip2-so400m-patch16-512": 512,
}


def tiny_spec(name: str) -> ModelSpec:
    """The family's tiny test config under the registered name (smoke runs)."""
    family = FAMILIES[REGISTRY[name].family]
    return replace(family.spec_from_config(name, "random", family.tiny_config().to_dict()), default_size=32)


def measure(spec: ModelSpec, size: int, args: argparse.Namespace, work: Path, photos: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    precision = "fp16" if device.type == "cuda" else "fp32"
    loaded = random_model(spec)
    out: dict[str, Any] = {"model": spec.name, "size": size, "grid": spec.grid(size), **flops_per_image(spec, size)}
    for embedding in (False, True):
        enc = PatchEncoder(loaded, size=size, device=device, precision=precision, embedding=embedding)
        key = "with_embedding" if embedding else "without_embedding"
        out[f"model_only_{key}"] = model_only(enc, args.batch_sizes, min_seconds=args.min_seconds)
        options = BuildOptions(
            model=spec.name,
            size=size,
            device=str(device),
            batch_size=max(args.batch_sizes),
            workers=args.workers,
            embedding=embedding,
        )
        out[f"end_to_end_{key}"] = end_to_end(photos, work / "s.zarr", "zarr", options, loaded)
    a = out["model_only_without_embedding"]["best_images_per_s"]
    b = out["model_only_with_embedding"]["best_images_per_s"]
    out["embedding_cost_model_only"] = (a / b - 1) if a and b else None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=16, help="images for the end-to-end runs")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated; default 1,4 on CPU, 16,64 on CUDA")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="per batch size, model only")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny configs at 32 px: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.batch_sizes:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    else:
        args.batch_sizes = [16, 64] if device.type == "cuda" else [1, 4]
    if args.tiny:
        args.min_seconds = min(args.min_seconds, 0.2)
    results: dict[str, Any] = {"device": str(device), "tiny": args.tiny, "runs": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    results["torch_threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = fill(work / "photos", [make_pool(work / "pool", "jpeg", min(args.images, 32))], args.images)
        for name, size in MODELS.items():
            spec = tiny_spec(name) if args.tiny else REGISTRY[name]
            run = measure(spec, 32 if args.tiny else size, args, work, photos)
            results["runs"].append(run)
            wo, wi = run["model_only_without_embedding"], run["model_only_with_embedding"]
            print(
                f"{name} @{run['size']}: {run['gflops']:.1f} GFLOPs/image; model only "
                f"{wo['best_images_per_s']:.2f} images/s without embedding, {wi['best_images_per_s']:.2f} with; "
                f"end to end {run['end_to_end_without_embedding']['images_per_s']:.2f} / "
                f"{run['end_to_end_with_embedding']['images_per_s']:.2f} images/s",
                flush=True,
            )
    out = args.out or Path(__file__).parent / "results" / f"families-{device.type}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
