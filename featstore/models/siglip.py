"""SigLIP and fixed-resolution SigLIP2 vision towers (`SiglipVisionModel`).

No CLS token: every token is a patch, so none is dropped. The image is squashed to a
square, as SigLIP's own processor does. Standard output: `last_hidden_state` (after
`post_layernorm`, `siglip_patch_features`). Embedding: the attention-pooled output
(`pooler_output`). NaFlex checkpoints (variable aspect ratio, `model_type` siglip2)
are refused for now.
"""

from __future__ import annotations

from typing import Any, ClassVar

from featstore.errors import ConfigError
from featstore.images import Preprocess
from featstore.models.family import TINY_VIT, Family, register, register_family, vit_config_fields
from featstore.models.spec import HALF_MEAN, HALF_STD, ModelSpec

NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")


def naflex_refusal(name: str) -> ConfigError:
    return ConfigError(
        f"{name}: SigLIP2 NaFlex checkpoints (variable resolution) are not supported yet; "
        "use a fixed-resolution one such as google/siglip2-so400m-patch16-512"
    )


class SiglipFamily(Family):
    name = "siglip"
    model_types = ("siglip", "siglip_vision_model")
    feature_types: ClassVar[dict[str, str]] = {"raw": "siglip_patch_features"}
    standard_norm = "model"
    preprocess = Preprocess("squash", "bicubic")
    optional_weights: ClassVar[dict[str, str]] = {"head": "the attention-pooling head (embedding)"}
    embedding_name = "attention-pooled output (pooler_output)"

    def spec_from_config(self, name: str, source: str, config: dict[str, Any]) -> ModelSpec:
        if config.get("model_type") == "siglip":  # a full SiglipModel: the vision tower sits in vision_config
            config = dict(config.get("vision_config") or {})
        size, patch = int(config.get("image_size", 224)), int(config.get("patch_size", 16))
        return ModelSpec(
            name=name,
            family=self.name,
            source=source,
            patch_size=patch,
            native_size=size,
            default_size=size // patch * patch,  # patch14-384: the model sees 27x27 patches, 378 px
            hidden_dim=int(config.get("hidden_size", 768)),
            num_layers=int(config.get("num_hidden_layers", 12)),
            num_heads=int(config.get("num_attention_heads", 12)),
            intermediate_size=int(config.get("intermediate_size", 3072)),
            mean=HALF_MEAN,
            std=HALF_STD,
            extra_config=(("vision_use_head", bool(config.get("vision_use_head", True))),),
            cls_token=False,
            preprocess=self.preprocess,
        )

    def hf_config(self, spec: ModelSpec) -> Any:
        import transformers

        return transformers.SiglipVisionConfig(**vit_config_fields(spec), **dict(spec.extra_config))

    def tiny_config(self) -> Any:
        import transformers

        return transformers.SiglipVisionConfig(**TINY_VIT)

    def model_class(self, spec: ModelSpec) -> Any:
        import transformers

        return transformers.SiglipVisionModel

    def forward(self, module: Any, x: Any, *, interpolate: bool, hidden_states: bool) -> Any:
        return module(pixel_values=x, interpolate_pos_encoding=interpolate, output_hidden_states=hidden_states)

    def final_norm(self, module: Any) -> Any:
        return module.post_layernorm


SIGLIP = register_family(SiglipFamily())


def _siglip(repo: str, hidden: int, layers: int, heads: int, inter: int, patch: int, size: int) -> ModelSpec:
    resample = "bilinear" if "siglip2" in repo else "bicubic"  # as their preprocessor_config.json
    return ModelSpec(
        name=repo,
        family="siglip",
        source=repo,
        patch_size=patch,
        native_size=size,
        # 384 is no multiple of 14: the conv sees 27x27 patches (378 px) and drops the rest
        default_size=size // patch * patch,
        hidden_dim=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=inter,
        mean=HALF_MEAN,
        std=HALF_STD,
        extra_config=(("vision_use_head", True),),
        cls_token=False,
        preprocess=Preprocess("squash", resample),
    )


_SO400M = (1152, 27, 16, 4304)
_BASE = (768, 12, 12, 3072)
_LARGE = (1024, 24, 16, 4096)

register(
    _siglip("google/siglip-base-patch16-224", *_BASE, 16, 224),
    _siglip("google/siglip-so400m-patch14-384", *_SO400M, 14, 384),
    _siglip("google/siglip2-base-patch16-224", *_BASE, 16, 224),
    _siglip("google/siglip2-large-patch16-512", *_LARGE, 16, 512),
    _siglip("google/siglip2-so400m-patch14-384", *_SO400M, 14, 384),
    _siglip("google/siglip2-so400m-patch16-512", *_SO400M, 16, 512),
)
