"""The reference scripts' command line (`encode_with_clip.py`, `encode_with_dino.py`).

Same options and defaults as the seed document: `--input --output --model --size
--device --fp16 --overwrite --save_meta`; only the files directly inside `--input`;
per-image `.npy`, `_mask.npy` and (with `--save_meta`) `.json` in `--output`.
`--device` defaults to `auto` (CUDA when present) where the reference said `cuda`.
"""

from __future__ import annotations

import argparse
import sys

from featstore.errors import BuildInterrupted, FeatstoreError

DEFAULT_MODELS = {"clip": "ViT-L/14", "dino": "facebook/dinov2-large"}


def parser(kind: str) -> argparse.ArgumentParser:
    what = "CLIP ViT last-layer" if kind == "clip" else "DINOv2 patch"
    p = argparse.ArgumentParser(
        prog=f"encode_with_{kind}.py",
        description=f"Encode the images in --input into {what} feature maps (reference-compatible output).",
    )
    p.add_argument("--input", required=True, help="folder of images (top level only)")
    p.add_argument("--output", required=True, help="folder for <name>.npy, <name>_mask.npy, <name>.json")
    p.add_argument("--model", default=DEFAULT_MODELS[kind], help=f"model name (default {DEFAULT_MODELS[kind]})")
    p.add_argument("--size", type=int, default=None, help="input size (default: the model's, 224 for most)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto)")
    p.add_argument("--fp16", action="store_true", help="float16 compute and output")
    p.add_argument("--overwrite", action="store_true", help="re-encode images whose outputs exist")
    p.add_argument("--save_meta", action="store_true", help="also write <name>.json")
    p.add_argument("--batch_size", type=int, default=None, help="images per forward pass (featstore extension)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (featstore extension)")
    if kind == "clip":
        p.add_argument(
            "--spatial_mode",
            choices=["raw", "processed"],
            default="raw",
            help="raw: last block; processed: ln_post + projection + L2 per patch",
        )
    return p


def main(kind: str, argv: list[str] | None = None) -> int:
    args = parser(kind).parse_args(argv)
    from featstore.pipeline import BuildOptions, build

    options = BuildOptions(
        model=args.model,
        size=args.size,
        device=args.device,
        precision="fp16" if args.fp16 else None,
        batch_size=args.batch_size,
        workers=args.workers,
        clip_output="projected" if getattr(args, "spatial_mode", "raw") == "processed" else "raw",
        overwrite=args.overwrite,
        recursive=False,
        resizer="pillow",  # the reference scripts' pixels, exactly
    )
    try:
        result = build(
            args.input,
            options,
            npy_dir=args.output,
            save_meta=args.save_meta,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    except BuildInterrupted as e:
        print(e, file=sys.stderr)
        return e.exit_code
    except FeatstoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(result.summary(), file=sys.stderr)
    for f in result.failures:
        print(f"  failed: {f.key}: {f.reason}", file=sys.stderr)
    return 0
