"""featstore: CLIP and DINOv2 patch-feature maps for folders of images.

    import featstore
    featstore.build("images/", featstore.BuildOptions(model="ViT-B/32"), store="feats.zarr")
    with featstore.open("feats.zarr") as store:
        row = store["cats/a.png"]            # row.features (C, g, g), row.mask (g, g)

Reading needs numpy only; `build`, `BuildOptions` and `FeatureDataset` import torch
when first used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BuildOptions",
    "BuildResult",
    "FeatureDataset",
    "FeatureStore",
    "Row",
    "RowBatch",
    "Target",
    "__version__",
    "build",
    "open",
]

if TYPE_CHECKING:
    from featstore.pipeline import BuildOptions, BuildResult, Target, build
    from featstore.store import FeatureStore, Row, RowBatch
    from featstore.torch import FeatureDataset

_LAZY = {
    "build": "featstore.pipeline",
    "BuildOptions": "featstore.pipeline",
    "BuildResult": "featstore.pipeline",
    "Target": "featstore.pipeline",
    "FeatureStore": "featstore.store",
    "Row": "featstore.store",
    "RowBatch": "featstore.store",
    "FeatureDataset": "featstore.torch",
}


def open(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a feature store (`.zarr` or `.h5`, a path or a URL such as `s3://bucket/x.zarr`)
    for reading; also a context manager. `storage_options`: fsspec's options for a URL."""
    from featstore.store import open_store

    return open_store(path, storage_options=storage_options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featstore' has no attribute {name!r}")
