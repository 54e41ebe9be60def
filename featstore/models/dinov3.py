"""DINOv3 ViTs (`DINOv3ViTModel`): patch 16, CLS + 4 registers, RoPE (any multiple of 16).

Standard output: `last_hidden_state` (after the final layer norm), CLS and registers
dropped (`dinov3_patch_features`). Embedding: the normed CLS token (`pooler_output`).
The weights are gated on the hub (a licence to accept before downloading).
"""

from __future__ import annotations

from typing import Any, ClassVar

from featstore.images import Preprocess
from featstore.models.family import TINY_VIT, Family, register, register_family, vit_config_fields
from featstore.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec


class Dinov3Family(Family):
    name = "dinov3"
    model_types = ("dinov3_vit",)
    feature_types: ClassVar[dict[str, str]] = {"raw": "dinov3_patch_features"}
    standard_norm = "model"
    preprocess = Preprocess("crop", "bilinear")  # the checkpoints' preprocessor_config resamples bilinearly
    embedding_name = "normed CLS token (pooler_output)"

    def spec_from_config(self, name: str, source: str, config: dict[str, Any]) -> ModelSpec:
        size = int(config.get("image_size", 224))
        return ModelSpec(
            name=name,
            family=self.name,
            source=source,
            patch_size=int(config.get("patch_size", 16)),
            native_size=size,
            default_size=size,
            hidden_dim=int(config.get("hidden_size", 384)),
            num_layers=int(config.get("num_hidden_layers", 12)),
            num_heads=int(config.get("num_attention_heads", 6)),
            intermediate_size=int(config.get("intermediate_size", 1536)),
            num_registers=int(config.get("num_register_tokens", 0)),
            extra_config=(("use_gated_mlp", bool(config.get("use_gated_mlp", False))),),
            preprocess=self.preprocess,
            gated=source.startswith("facebook/dinov3-"),
        )

    def hf_config(self, spec: ModelSpec) -> Any:
        import transformers

        return transformers.DINOv3ViTConfig(
            **vit_config_fields(spec), num_register_tokens=spec.num_registers, **dict(spec.extra_config)
        )

    def tiny_config(self) -> Any:
        import transformers

        return transformers.DINOv3ViTConfig(**TINY_VIT, num_register_tokens=4)

    def model_class(self, spec: ModelSpec) -> Any:
        import transformers

        return transformers.DINOv3ViTModel

    def forward(self, module: Any, x: Any, *, interpolate: bool, hidden_states: bool) -> Any:
        return module(pixel_values=x, output_hidden_states=hidden_states)  # RoPE: any size

    def final_norm(self, module: Any) -> Any:
        return module.norm


DINOV3 = register_family(Dinov3Family())

_SIZES = {  # hidden, layers, heads, intermediate, gated MLP
    "s16": (384, 12, 6, 1536, False),
    "s16plus": (384, 12, 6, 1536, True),
    "b16": (768, 12, 12, 3072, False),
    "l16": (1024, 24, 16, 4096, False),
    "h16plus": (1280, 32, 20, 5120, True),
    "7b16": (4096, 40, 32, 8192, True),
}


def _dinov3(variant: str) -> ModelSpec:
    hidden, layers, heads, inter, gated_mlp = _SIZES[variant]
    repo = f"facebook/dinov3-vit{variant}-pretrain-lvd1689m"
    return ModelSpec(
        name=repo,
        family="dinov3",
        source=repo,
        patch_size=16,
        native_size=224,
        default_size=224,
        hidden_dim=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=inter,
        num_registers=4,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        extra_config=(("use_gated_mlp", gated_mlp),),
        preprocess=DINOV3.preprocess,
        gated=True,
    )


register(*(_dinov3(v) for v in _SIZES))
