"""DINOv2, with and without registers (`Dinov2Model`, `Dinov2WithRegistersModel`).

Standard output: `last_hidden_state` (after the final layer norm), CLS and registers
dropped (`dinov2_patch_features`). Embedding: the normed CLS token (`pooler_output`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from featstore.images import Preprocess
from featstore.models.family import Family, register, register_family
from featstore.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec


class Dinov2Family(Family):
    name = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")
    feature_types: ClassVar[dict[str, str]] = {"raw": "dinov2_patch_features"}
    standard_norm = "model"
    preprocess = Preprocess("crop", "bicubic")
    embedding_name = "normed CLS token (pooler_output)"

    def spec_from_config(self, name: str, source: str, config: dict[str, Any]) -> ModelSpec:
        hidden = int(config.get("hidden_size", 768))
        registers = int(config.get("num_register_tokens", 0)) if config.get("model_type") != "dinov2" else 0
        return ModelSpec(
            name=name,
            family=self.name,
            source=source,
            patch_size=int(config.get("patch_size", 14)),
            native_size=int(config.get("image_size", 518)),
            default_size=224,
            hidden_dim=hidden,
            num_layers=int(config.get("num_hidden_layers", 12)),
            num_heads=int(config.get("num_attention_heads", 12)),
            intermediate_size=int(hidden * float(config.get("mlp_ratio", 4))),
            num_registers=registers,
            extra_config=(("use_swiglu_ffn", bool(config.get("use_swiglu_ffn", False))),),
            preprocess=self.preprocess,
        )

    def hf_config(self, spec: ModelSpec) -> Any:
        import transformers

        kwargs: dict[str, Any] = dict(
            hidden_size=spec.hidden_dim,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            mlp_ratio=spec.intermediate_size // spec.hidden_dim,
            patch_size=spec.patch_size,
            image_size=spec.native_size,
            layerscale_value=1.0,
            **dict(spec.extra_config),
        )
        if spec.num_registers:
            return transformers.Dinov2WithRegistersConfig(num_register_tokens=spec.num_registers, **kwargs)
        return transformers.Dinov2Config(**kwargs)

    def tiny_config(self, registers: int = 0, patch: int = 8, image_size: int = 32) -> Any:
        import transformers

        kwargs: dict[str, Any] = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=patch,
            image_size=image_size,
            mlp_ratio=2,
        )
        if registers:
            return transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
        return transformers.Dinov2Config(**kwargs)

    def model_class(self, spec: ModelSpec) -> Any:
        import transformers

        return transformers.Dinov2WithRegistersModel if spec.num_registers else transformers.Dinov2Model

    def forward(self, module: Any, x: Any, *, interpolate: bool, hidden_states: bool) -> Any:
        return module(pixel_values=x, output_hidden_states=hidden_states)  # interpolates by itself

    def final_norm(self, module: Any) -> Any:
        return module.layernorm


DINOV2 = register_family(Dinov2Family())

_SIZES = {  # hidden, layers, heads, swiglu
    "small": (384, 12, 6, False),
    "base": (768, 12, 12, False),
    "large": (1024, 24, 16, False),
    "giant": (1536, 40, 24, True),
}


def _dino(variant: str, registers: bool) -> ModelSpec:
    hidden, layers, heads, swiglu = _SIZES[variant]
    repo = f"facebook/dinov2-{'with-registers-' if registers else ''}{variant}"
    return ModelSpec(
        name=repo,
        family="dinov2",
        source=repo,
        patch_size=14,
        native_size=518,
        default_size=224,
        hidden_dim=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=hidden * 4,
        num_registers=4 if registers else 0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        extra_config=(("use_swiglu_ffn", swiglu),),
        preprocess=DINOV2.preprocess,
    )


register(*(_dino(v, r) for r in (False, True) for v in _SIZES))
