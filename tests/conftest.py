"""Shared fixtures: tiny random-weight models saved with save_pretrained (and loaded
back through featstore's real loading path), and synthetic images made in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_SIZE = 32  # tiny models: patch 8, native 32 -> grid 4


def _save(model, path: Path) -> str:
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Folders holding tiny checkpoints of every family (CLIP, LAION-style CLIP, DINOv2 with and
    without registers, DINOv3, SigLIP vision and full SigLIP) and the presets' architectures."""
    import torch
    import transformers

    from featstore.models.family import FAMILIES

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    clip_cfg = FAMILIES["clip"].tiny_config()  # the family's own tiny architecture
    dino = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32, mlp_ratio=2)
    full_clip = transformers.CLIPModel(
        transformers.CLIPConfig(
            vision_config=clip_cfg.to_dict(),
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=100,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            ),
            projection_dim=48,
        )
    )

    siglip_cfg = FAMILIES["siglip"].tiny_config()
    full_siglip = transformers.SiglipModel(
        transformers.SiglipConfig(
            vision_config=siglip_cfg.to_dict(),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        )
    )
    laion_cfg = transformers.CLIPVisionConfig(**{**clip_cfg.to_dict(), "hidden_act": "gelu"})

    def _patch16(cfg):
        cfg.patch_size = 16
        return cfg

    return {
        "dinov3": _save(transformers.DINOv3ViTModel(FAMILIES["dinov3"].tiny_config()), root / "dinov3"),
        "siglip": _save(transformers.SiglipVisionModel(siglip_cfg), root / "siglip"),
        "siglip_full": _save(full_siglip, root / "siglip_full"),
        "laion": _save(transformers.CLIPVisionModelWithProjection(laion_cfg), root / "laion"),
        # patch 14 at 518 like TRELLIS's DINOv2 ViT-L/14 with registers, but 32 wide: the preset runs exactly
        "trellis": _save(
            transformers.Dinov2WithRegistersModel(
                FAMILIES["dinov2"].tiny_config(registers=4, patch=14, image_size=518)
            ),
            root / "trellis",
        ),
        "trellis2": _save(transformers.DINOv3ViTModel(_patch16(FAMILIES["dinov3"].tiny_config())), root / "trellis2"),
        "clip": _save(transformers.CLIPVisionModelWithProjection(clip_cfg), root / "clip"),
        "clip_full": _save(full_clip, root / "clip_full"),
        "dino": _save(transformers.Dinov2Model(transformers.Dinov2Config(**dino)), root / "dino"),
        "dino_reg": _save(
            transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **dino)
            ),
            root / "dino_reg",
        ),
    }


def make_rgba(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random colours over a smooth gradient, with a transparent left part."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, : w // 3, 3] = 0
    rgba[: h // 4, w // 3 :, 3] = 128
    return rgba


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A small folder: RGBA / RGB / grayscale PNGs, a JPEG, and one in a subfolder."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(make_rgba(32, 32, 1)).save(d / "a_rgba.png")
    Image.fromarray(make_rgba(32, 32, 2)[..., :3]).save(d / "b_rgb.png")
    Image.fromarray(make_rgba(32, 32, 3)[..., 0]).save(d / "c_gray.png")
    Image.fromarray(make_rgba(48, 64, 4)[..., :3]).save(d / "d_photo.jpg", quality=95)
    Image.fromarray(make_rgba(40, 32, 5)).save(d / "sub" / "e.png")
    return d


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session; see tests/s3_server.py."""
    from tests.s3_server import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
