"""Synthetic benchmark images, made in a temp folder (no downloads).

- renders: 512x512 RGBA PNGs, a shaded object on a transparent background with a
  little sensor-like noise (so that PNG compression is not unrealistically good);
- photos: 500x375 RGB JPEGs (quality 90) with texture everywhere.

A small pool of distinct images is drawn once; folders of any size are filled with
hard links to the pool (copies where links fail), so 2,000 images cost 2,000 links.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

RENDER_SIZE = 512
PHOTO_HW = (375, 500)


def render(rng: np.random.Generator, size: int = RENDER_SIZE) -> np.ndarray:
    """(size, size, 4) uint8: a lit ellipsoid with a ring, transparent around it."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    ax, ay = rng.uniform(0.45, 0.8, 2)
    u, v = (x - cx) / ax, (y - cy) / ay
    r2 = u**2 + v**2
    inside = r2 < 1.0
    z = np.sqrt(np.clip(1.0 - r2, 0, None))
    light_dir = rng.normal(size=3)
    light_dir[2] = abs(light_dir[2]) + 0.5
    light_dir /= np.linalg.norm(light_dir)
    shade = np.clip(light_dir[0] * u + light_dir[1] * v + light_dir[2] * z, 0, 1)
    stripes = 0.5 + 0.5 * np.sin(rng.uniform(4, 14) * np.arctan2(v, u) + rng.uniform(0, 6))
    base = rng.uniform(0.2, 1.0, 3)
    accent = rng.uniform(0.2, 1.0, 3)
    color = base[None, None] * (1 - 0.3 * stripes[..., None]) + accent[None, None] * 0.3 * stripes[..., None]
    rgb = color * (0.15 + 0.85 * shade[..., None]) * 255 + rng.normal(0, 2.0, (size, size, 3))
    ring = np.abs(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - rng.uniform(0.7, 0.9)) < 0.04
    alpha = np.where(inside | ring, 255, 0)
    edge = (r2 > 0.96) & inside  # a soft, anti-aliased rim
    alpha = np.where(edge, 128, alpha)
    out = np.dstack([np.clip(rgb, 0, 255), alpha]).astype(np.uint8)
    out[alpha == 0, :3] = 0
    return out


def photo(rng: np.random.Generator, hw: tuple[int, int] = PHOTO_HW) -> np.ndarray:
    """(h, w, 3) uint8: sky, ground and texture, like an outdoor photo."""
    h, w = hw
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    horizon = h * rng.uniform(0.4, 0.65) + 15 * np.sin(x / rng.uniform(20, 60))
    sky = np.stack([90 + 0 * x, 140 + 70 * y / h, 230 - 50 * y / h], axis=2)
    fx, fy = rng.uniform(3, 12, 2)
    ground = np.stack(
        [70 + 40 * np.sin(x / fx) * np.cos(y / fy), 110 + 30 * np.cos(y / fy), 50 + 20 * np.sin((x + y) / 5)], axis=2
    )
    img = np.where((y > horizon)[..., None], ground, sky) + rng.normal(0, 6.0, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_pool(folder: Path, kind: str, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct images of `kind` ("png" renders or "jpeg" photos) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + (0 if kind == "png" else 1_000_003))
    paths = []
    for i in range(count):
        if kind == "png":
            p = folder / f"render_{i:04d}.png"
            Image.fromarray(render(rng), "RGBA").save(p, compress_level=6)
        elif kind == "jpeg":
            p = folder / f"photo_{i:04d}.jpg"
            Image.fromarray(photo(rng), "RGB").save(p, quality=90)
        else:
            raise ValueError(f"unknown image kind {kind!r}")
        paths.append(p)
    return paths


def fill(folder: Path, pools: list[list[Path]], count: int) -> Path:
    """`folder` holding exactly `count` images: hard links to the pools, taken in turn."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i in range(count):
        pool = pools[i % len(pools)]
        src = pool[(i // len(pools)) % len(pool)]
        dst = folder / f"img_{i:06d}{src.suffix}"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return folder
