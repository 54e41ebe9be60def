"""Presets: registry entries that fix weights, preprocessing and tensor to match a
published feature extractor exactly. `--model` given with `--preset` replaces only
the weights (a local copy of gated checkpoints), never the preprocessing or tensor.
"""

from __future__ import annotations

from dataclasses import replace

from featstore.images import Preprocess
from featstore.models.family import REGISTRY, register

# Pillow LANCZOS on the RGBA image straight to size x size, then rgb * alpha in float32.
TRELLIS_PREPROCESS = Preprocess("squash", "lanczos", premultiply="float")

register(
    replace(
        REGISTRY["facebook/dinov2-with-registers-large"],
        name="trellis",
        default_size=518,
        preprocess=TRELLIS_PREPROCESS,
        layers=(-1,),
        norm="none",
        preset="TRELLIS dataset_toolkits/extract_feature.py: x_prenorm patch tokens at 518",
    ),
    replace(
        REGISTRY["facebook/dinov3-vitl16-pretrain-lvd1689m"],
        name="trellis2",
        default_size=512,
        preprocess=TRELLIS_PREPROCESS,
        layers=(-1,),
        norm="plain",
        preset="TRELLIS.2 DinoV3FeatureExtractor: last block + layer norm without weights at 512",
    ),
)
