"""A picture of one row: the feature map's first three principal components as RGB,
beside its mask (and the source image, when the image folder is given).

numpy and Pillow only: PCA is an SVD of the (g*g, C) patch matrix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from featstore.errors import ConfigError, ImageError
from featstore.images import open_image, premultiply, resize_center_crop
from featstore.npy import output_stem
from featstore.store import FeatureStore

TILE = 256
GAP = 4


def pca_rgb(features: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(C, g, g) -> (g, g, 3) uint8: the top three principal components, each stretched
    to 0-255 between its 1st and 99th percentile. Components are fitted on the mask's
    patches when it has at least three; masked-out patches are drawn black."""
    c, g, _ = features.shape
    x = features.reshape(c, g * g).T.astype(np.float64)
    fg = mask.reshape(-1).astype(bool) if mask is not None else np.ones(g * g, bool)
    fit = x[fg] if fg.sum() >= 3 else x
    mean = fit.mean(axis=0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    proj = (x - mean) @ vt[:3].T  # (g*g, k), k < 3 when C or the patches are fewer
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo = np.percentile(proj[fg] if fg.any() else proj, 1, axis=0)
    hi = np.percentile(proj[fg] if fg.any() else proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
    if mask is not None and fg.any():
        rgb[~fg] = 0
    return (rgb.reshape(g, g, 3) * 255).round().astype(np.uint8)


def _upscale(a: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(a).resize((size, size), Image.Resampling.NEAREST)


def _source_tile(image_root: Path, key: str, size: int) -> Image.Image:
    output_stem(image_root, key)  # refuses keys that would leave image_root
    path = image_root.joinpath(*key.split("/"))
    if not os.path.lexists(path):
        raise ImageError(
            f"the source image of {key!r} is not under {image_root} (no {path}): is --image the --input root?"
        )
    try:  # exactly the pixels the model saw: premultiplied, resized and cropped as in a build
        rgba, _ = open_image(str(path), size=size)
    except ImageError as e:
        raise ImageError(f"cannot read {path}: {e}") from None
    return Image.fromarray(premultiply(resize_center_crop(rgba, size)))


def render_preview(
    store: FeatureStore,
    key: str,
    out_png: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    size: int = TILE,
) -> Path:
    """Save [source image |] PCA of the features | mask, each `size` px square, as a PNG."""
    if not str(out_png).lower().endswith(".png"):
        raise ConfigError(f"{out_png}: the preview is a PNG; name it *.png")
    row = store[key]
    tiles = []
    if image_root is not None:
        tiles.append(_source_tile(Path(image_root), row.key, size))
    tiles.append(_upscale(pca_rgb(row.features, row.mask), size))
    tiles.append(_upscale((row.mask > 0).astype(np.uint8) * 255, size).convert("RGB"))
    canvas = Image.new("RGB", (len(tiles) * size + (len(tiles) - 1) * GAP, size), (255, 255, 255))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * (size + GAP), 0))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
