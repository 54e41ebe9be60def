"""Finding images and turning one file into the encoder's input.

Per image (SPEC.md, "Preprocessing"): decode keeping alpha (EXIF orientation applied),
resize the shorter side to `size` with antialiased bicubic, center-crop `size x size`,
premultiply RGB by alpha exactly as the reference does, and max-pool `alpha > 0` to
the patch grid. Normalisation happens on the encoder's device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featstore.batches import ImageItem, Sample
from featstore.errors import ConfigError, ImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own bomb limit x2 (about 13,000 x 13,000)

# We check sizes ourselves (with a limit the user can raise), so Pillow's check is off.
Image.MAX_IMAGE_PIXELS = None


def discover(root: str | os.PathLike[str], *, recursive: bool = True) -> list[ImageItem]:
    """Image files under `root` (sorted by key; keys are POSIX paths relative to root)."""
    root_str = os.fspath(root)
    if not os.path.isdir(root_str):
        raise ConfigError(f"input folder {root_str!r} does not exist or is not a folder")
    keys: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root_str):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root_str)
        prefix = "" if rel == "." else Path(rel).as_posix() + "/"
        keys.extend(prefix + f for f in filenames if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        if not recursive:
            break
    return [ImageItem(key=k, path=os.path.join(root_str, *k.split("/"))) for k in sorted(keys)]


def output_collisions(items: list[ImageItem]) -> dict[str, str]:
    """Keys whose per-image outputs would overwrite an earlier key's (`a.png`, `a.jpg` -> `a.npy`).

    Returns {later key: earlier key}; the earlier key (in sorted order) keeps the name.
    """
    first: dict[str, str] = {}
    clashes: dict[str, str] = {}
    for it in items:
        stem = os.path.splitext(it.key)[0]
        if stem in first:
            clashes[it.key] = first[stem]
        else:
            first[stem] = it.key
    return clashes


def _to_rgba(im: Image.Image) -> np.ndarray:
    """(H, W, 4) uint8 for any Pillow mode; images without alpha get alpha 255."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return _gray_to_rgba(arr)
    if mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if (mode == "F" and top <= 1.0) else (255.0 / 65535.0 if top > 255 else 1.0)
        arr = np.clip(np.nan_to_num(arr * scale), 0, 255).astype(np.uint8)
        return _gray_to_rgba(arr)
    if mode == "RGBA":
        return np.asarray(im)
    if mode in ("LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        return np.asarray(im.convert("RGBA"))
    if mode == "L":
        return _gray_to_rgba(np.asarray(im))
    rgb = np.asarray(im.convert("RGB"))
    alpha = np.full((*rgb.shape[:2], 1), 255, dtype=np.uint8)
    return np.concatenate([rgb, alpha], axis=2)


def _gray_to_rgba(gray: np.ndarray) -> np.ndarray:
    alpha = np.full_like(gray, 255)
    return np.stack([gray, gray, gray, alpha], axis=2)


def open_image(path: str, *, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode to RGBA uint8 (H, W, 4) and the size (H, W) before any resizing.

    JPEGs much larger than `size` are decoded at a reduced scale (`Image.draft`, DCT
    scaling by a power of two, never below `size` on the shorter side).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (raise it with --max-pixels)"
                    )
                orientation = im.getexif().get(0x0112, 1)
                if orientation in (5, 6, 7, 8):
                    h, w = w, h
                if im.format == "JPEG" and min(w, h) >= 2 * size:
                    im.draft(im.mode, (size, size))
                im.seek(0)  # first frame of animations and multi-page files
                im.load()
                im = ImageOps.exif_transpose(im)
                rgba = _to_rgba(im)
    except ImageError:
        raise
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except FileNotFoundError:
        raise ImageError("file not found (broken symlink?)") from None
    except Image.UnidentifiedImageError:
        size_bytes = os.path.getsize(path) if os.path.exists(path) else -1
        what = "empty file" if size_bytes == 0 else "not a recognised image format"
        raise ImageError(what) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageError(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return rgba, (h, w)


def resize_center_crop(rgba: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (antialiased bicubic, per channel), then center crop."""
    h, w = rgba.shape[:2]
    if (h, w) == (size, size):
        return rgba
    if h == w:
        new_h = new_w = size
    else:
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    rgb = Image.fromarray(np.ascontiguousarray(rgba[..., :3])).resize((new_w, new_h), Image.Resampling.BICUBIC)
    alpha = Image.fromarray(np.ascontiguousarray(rgba[..., 3])).resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    box = (left, top, left + size, top + size)
    return np.concatenate([np.asarray(rgb.crop(box)), np.asarray(alpha.crop(box))[..., None]], axis=2)


def premultiply(rgba: np.ndarray) -> np.ndarray:
    """The reference's `uint8(rgb/255 * alpha/255 * 255)` (float64, truncating)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    return (rgb / 255 * alpha / 255 * 255).astype(np.uint8)


def patch_mask(alpha: np.ndarray, grid: int) -> np.ndarray:
    """1 where any pixel of a patch is visible (alpha > 0): max-pool to (grid, grid)."""
    size = alpha.shape[0]
    p = size // grid
    return (alpha > 0).reshape(grid, p, grid, p).any(axis=(1, 3)).astype(np.uint8)


def load_sample(item: ImageItem, *, size: int, grid: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
    """Everything the worker does for one image; failures become a Sample with `error`."""
    try:
        rgba, orig_hw = open_image(item.path, size=size, max_pixels=max_pixels)
        rgba = resize_center_crop(rgba, size)
        return Sample(item, premultiply(rgba), patch_mask(rgba[..., 3], grid), orig_hw)
    except ImageError as e:
        return Sample(item, error=str(e))


def iter_samples(items: list[ImageItem], *, size: int, grid: int) -> Iterator[Sample]:
    for it in items:
        yield load_sample(it, size=size, grid=grid)
