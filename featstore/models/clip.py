"""CLIP vision towers: OpenAI's and LAION's OpenCLIP checkpoints in Hugging Face format.

Standard output: the last block's patch tokens before `ln_post` (`clip_vit_last_layer`);
`--clip-output projected`: ln_post, the projection, L2 per patch. Embedding: the
model's projected image embedding (`image_embeds`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from featstore.images import Preprocess
from featstore.models.family import Family, register, register_family, vit_config_fields
from featstore.models.spec import CLIP_MEAN, CLIP_STD, ModelSpec


class ClipFamily(Family):
    name = "clip"
    model_types = ("clip", "clip_vision_model")
    feature_types: ClassVar[dict[str, str]] = {
        "raw": "clip_vit_last_layer",
        "projected": "clip_vit_last_layer_processed",
    }
    standard_norm = "none"
    preprocess = Preprocess("crop", "bicubic")
    optional_weights: ClassVar[dict[str, str]] = {"visual_projection": "the projection (embedding, projected output)"}
    embedding_name = "projected image embedding (image_embeds)"

    def spec_from_config(self, name: str, source: str, config: dict[str, Any]) -> ModelSpec:
        if config.get("model_type") == "clip":  # a full CLIPModel: the vision tower sits in vision_config
            vision = dict(config.get("vision_config") or {})
            vision.setdefault("projection_dim", config.get("projection_dim", 512))
            config = vision
        size = int(config.get("image_size", 224))
        return ModelSpec(
            name=name,
            family=self.name,
            source=source,
            patch_size=int(config.get("patch_size", 32)),
            native_size=size,
            default_size=size,
            hidden_dim=int(config.get("hidden_size", 768)),
            num_layers=int(config.get("num_hidden_layers", 12)),
            num_heads=int(config.get("num_attention_heads", 12)),
            intermediate_size=int(config.get("intermediate_size", 3072)),
            embed_dim=int(config.get("projection_dim", 512)),
            mean=CLIP_MEAN,
            std=CLIP_STD,
            extra_config=(("hidden_act", str(config.get("hidden_act", "quick_gelu"))),),
            preprocess=self.preprocess,
        )

    def hf_config(self, spec: ModelSpec) -> Any:
        import transformers

        return transformers.CLIPVisionConfig(
            **vit_config_fields(spec),
            projection_dim=spec.embed_dim or spec.hidden_dim,
            layer_norm_eps=1e-5,
            **{"hidden_act": "quick_gelu", **dict(spec.extra_config)},
        )

    def tiny_config(self) -> Any:
        import transformers

        return transformers.CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=8,
            image_size=32,
            projection_dim=48,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )

    def model_class(self, spec: ModelSpec) -> Any:
        import transformers

        return transformers.CLIPVisionModelWithProjection

    def forward(self, module: Any, x: Any, *, interpolate: bool, hidden_states: bool) -> Any:
        return module.vision_model(
            pixel_values=x, interpolate_pos_encoding=interpolate, output_hidden_states=hidden_states
        )

    def standard_tokens(self, module: Any, out: Any, clip_output: str, prefix: int) -> Any:
        tokens = out.last_hidden_state[:, prefix:]  # the last block's output, before ln_post
        if clip_output == "projected":
            import torch.nn.functional as F

            tokens = module.visual_projection(module.vision_model.post_layernorm(tokens))
            tokens = F.normalize(tokens.float(), dim=-1)
        return tokens

    def final_norm(self, module: Any) -> Any:
        return module.vision_model.post_layernorm

    def embedding(self, module: Any, out: Any) -> Any:
        return module.visual_projection(out.pooler_output)  # pooler_output = ln_post(CLS)

    def embedding_dim(self, spec: ModelSpec) -> int:
        return spec.embed_dim or spec.hidden_dim


CLIP = register_family(ClipFamily())

# (hidden, layers, heads, intermediate, projection)
_WIDTHS = {
    "B": (768, 12, 12, 3072, 512),
    "L": (1024, 24, 16, 4096, 768),
    "H": (1280, 32, 16, 5120, 1024),
    "bigG": (1664, 48, 16, 8192, 1280),
}


def _clip(name: str, repo: str, width: str, patch: int, native: int, act: str = "quick_gelu") -> ModelSpec:
    hidden, layers, heads, inter, proj = _WIDTHS[width]
    return ModelSpec(
        name=name,
        family="clip",
        source=repo,
        patch_size=patch,
        native_size=native,
        default_size=native,
        hidden_dim=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=inter,
        embed_dim=proj,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        extra_config=(("hidden_act", act),),
        preprocess=CLIP.preprocess,
    )


register(
    _clip("ViT-B/32", "openai/clip-vit-base-patch32", "B", 32, 224),
    _clip("ViT-B/16", "openai/clip-vit-base-patch16", "B", 16, 224),
    _clip("ViT-L/14", "openai/clip-vit-large-patch14", "L", 14, 224),
    _clip("ViT-L/14@336px", "openai/clip-vit-large-patch14-336", "L", 14, 336),
    # LAION's OpenCLIP weights, published in Hugging Face CLIP format (GELU, not QuickGELU)
    _clip("ViT-L-14-laion2B", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "L", 14, 224, "gelu"),
    _clip("ViT-H-14-laion2B", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "H", 14, 224, "gelu"),
    _clip("ViT-bigG-14-laion2B", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "bigG", 14, 224, "gelu"),
)
