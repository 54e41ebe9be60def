"""featstore: CLIP and DINOv2 patch-feature maps for folders of images.

Public surface: `open` (a FeatureStore), `build` (encode a folder), the model
registry, and (imported lazily, it needs torch) `featstore.torch.FeatureDataset`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
