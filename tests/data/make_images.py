"""Regenerates the small example images in tests/data/images (the README's quick start; no downloads).

Two RGBA "renders" (a shaded sphere and a torus-like ring on transparent
backgrounds), an opaque RGB render and a JPEG "photo" of a non-square size.
"""

from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).parent / "images"


def sphere(size: int, color: tuple[float, float, float]) -> np.ndarray:
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    r2 = x**2 + y**2
    inside = r2 < 0.8
    z = np.sqrt(np.clip(0.8 - r2, 0, None))
    light = np.clip((-0.4 * x - 0.5 * y + 0.77 * z) / np.sqrt(0.8), 0, 1)
    rgb = (np.array(color)[None, None] * (0.2 + 0.8 * light[..., None]) * 255).astype(np.uint8)
    alpha = (inside * 255).astype(np.uint8)
    return np.dstack([rgb, alpha])


def ring(size: int) -> np.ndarray:
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    r = np.sqrt(x**2 + y**2)
    band = np.abs(r - 0.6) < 0.18
    hue = (np.arctan2(y, x) / (2 * np.pi) + 0.5)[..., None]
    rgb = (np.concatenate([hue, 1 - hue, 0.5 + 0.5 * np.cos(6 * np.pi * hue)], axis=2) * 255).astype(np.uint8)
    return np.dstack([rgb, (band * 255).astype(np.uint8)])


def photo(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    sky = np.stack([100 + 0 * x, 150 + 60 * y / h, 230 - 40 * y / h], axis=2)
    ground = np.stack([60 + 30 * np.sin(x / 9.0), 120 + 20 * np.cos(y / 7.0), 50 + 0 * x], axis=2)
    img = np.where((y > h * 0.55 + 12 * np.sin(x / 30.0))[..., None], ground, sky)
    return np.clip(img, 0, 255).astype(np.uint8)


if __name__ == "__main__":
    (OUT / "renders").mkdir(parents=True, exist_ok=True)
    Image.fromarray(sphere(224, (0.9, 0.3, 0.2))).save(OUT / "renders" / "sphere_red.png", optimize=True)
    Image.fromarray(ring(224)).save(OUT / "renders" / "ring.png", optimize=True)
    Image.fromarray(sphere(224, (0.2, 0.5, 0.9))[..., :3]).save(
        OUT / "renders" / "sphere_blue_opaque.png", optimize=True
    )
    Image.fromarray(photo(300, 400)).save(OUT / "landscape.jpg", quality=90)
