"""One image -> the input of every model of a build: read and decoded once, then
preprocessed per model (`featstore.images.prepare`: each model's size, crop or
squash, premultiply).

The decode is shared, with one exception that keeps every model's input what a build
of that model alone gives: a JPEG much larger than a model's size is decoded at a
reduced scale for it (`Image.draft`, see `featstore.images`), and a reduced decode
differs from a full one. So a large JPEG is decoded once per distinct reduction the
models take (each reduced decode is cheaper than the full one); everything else, and
every PNG, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from featstore import fastdecode
from featstore.batches import ImageItem, ModelInput, Sample
from featstore.errors import ImageError
from featstore.imagecheck import DEFAULT_MAX_IMAGE_BYTES
from featstore.images import DEFAULT_MAX_PIXELS, DEFAULT_PREPROCESS, Preprocess, _decode, prepare

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What one model takes from an image: its input size, patch grid and preprocessing."""

    size: int
    grid: int
    preprocess: Preprocess = DEFAULT_PREPROCESS

    @property
    def draft(self) -> bool:
        """Whether a large JPEG may be decoded at a reduced scale for this model (exact
        presets decode at full scale, as the scripts they reproduce do)."""
        return self.preprocess.premultiply != "float"

    def decode_scale(self, hw: tuple[int, int], jpeg: bool) -> int | None:
        """The size a decode for this model is reduced towards, None for a full-scale decode
        (the condition `featstore.images._decode` applies)."""
        return self.size if jpeg and self.draft and min(hw) >= 2 * self.size else None


def load_views(
    item: ImageItem,
    specs: Sequence[InputSpec],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Sample:
    """Everything a decode worker does for one image (read from `item.path`, or `data` when
    the reader fetched its bytes): one `ModelInput` per spec; failures become a Sample
    with `error`."""
    try:
        source = item.path if data is None else data
        decoded = fastdecode.png(source, max_pixels=max_pixels, max_bytes=max_bytes)  # None: not a plain PNG
        if decoded is not None:  # no reduced decodes of PNGs: one decode serves every model
            return Sample(item, tuple(_prepare(decoded[0], spec) for spec in specs), decoded[1])
        # full scale first (if a model needs it), else reduced towards the largest size
        first = min(specs, key=lambda s: (s.draft, -s.size))
        pixels, hw = _decode(source, size=first.size, max_pixels=max_pixels, draft=first.draft, max_bytes=max_bytes)
        jpeg = len({s.decode_scale(hw, True) for s in specs}) > 1 and _is_jpeg(source)
        decodes: dict[int | None, Any] = {first.decode_scale(hw, jpeg): pixels}
        inputs = []
        for spec in specs:
            scale = spec.decode_scale(hw, jpeg)
            if scale not in decodes:
                decodes[scale] = _decode(
                    source, size=spec.size, max_pixels=max_pixels, draft=spec.draft, max_bytes=max_bytes
                )[0]
            inputs.append(_prepare(decodes[scale], spec))
        return Sample(item, tuple(inputs), hw)
    except ImageError as e:
        return Sample(item, error=str(e))
    except Exception as e:  # a bug on one odd image must not stop the run
        return Sample(item, error=f"cannot preprocess: {type(e).__name__}: {e}")


def _prepare(pixels: np.ndarray | Image.Image, spec: InputSpec) -> ModelInput:
    rgb, mask = prepare(pixels, size=spec.size, grid=spec.grid, preprocess=spec.preprocess)
    return ModelInput(rgb, mask)


def _is_jpeg(source: str | bytes) -> bool:
    if isinstance(source, bytes):
        return source.startswith(JPEG_MAGIC)
    with open(source, "rb") as f:
        return f.read(3) == JPEG_MAGIC
