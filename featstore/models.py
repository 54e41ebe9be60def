"""The model registry: a name maps to a small frozen record, and everything else
(shapes, preprocessing, the `featstore models` table) is derived from that record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from featstore.errors import ConfigError

Family = Literal["clip", "dinov2"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FEATURE_TYPES = {
    ("clip", "raw"): "clip_vit_last_layer",
    ("clip", "projected"): "clip_vit_last_layer_processed",
    ("dinov2", "raw"): "dinov2_patch_features",
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What featstore needs to know about one vision transformer."""

    name: str
    family: Family
    source: str  # Hugging Face repo id, local folder or checkpoint file
    patch_size: int
    native_size: int  # the resolution its position embeddings were trained at
    default_size: int  # the --size used when none is given
    hidden_dim: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    embed_dim: int | None = None  # CLIP projection width
    num_registers: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra_config: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens: dropped before reshaping to a grid."""
        return 1 + self.num_registers

    def grid(self, size: int) -> int:
        check_size(self, size)
        return size // self.patch_size

    def out_dim(self, clip_output: str = "raw") -> int:
        if clip_output == "projected":
            if self.family != "clip" or self.embed_dim is None:
                raise ConfigError(f"--clip-output projected needs a CLIP model; {self.name} is {self.family}")
            return self.embed_dim
        return self.hidden_dim

    def feature_type(self, clip_output: str = "raw") -> str:
        key = (self.family, clip_output if self.family == "clip" else "raw")
        return FEATURE_TYPES[key]


def check_size(spec: ModelSpec, size: int) -> None:
    p = spec.patch_size
    if size <= 0 or size % p:
        lower = max(p, (size // p) * p)
        upper = lower + p if lower < size else lower
        options = sorted({lower, upper})
        raise ConfigError(
            f"--size {size} is not a multiple of {spec.name}'s patch size {p}; "
            f"nearest valid sizes: {' or '.join(map(str, options))}"
        )


def _clip(name: str, repo: str, patch: int, native: int, large: bool) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="clip",
        source=repo,
        patch_size=patch,
        native_size=native,
        default_size=native,
        hidden_dim=1024 if large else 768,
        num_layers=24 if large else 12,
        num_heads=16 if large else 12,
        intermediate_size=4096 if large else 3072,
        embed_dim=768 if large else 512,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )


_DINO_SIZES = {  # hidden, layers, heads, swiglu
    "small": (384, 12, 6, False),
    "base": (768, 12, 12, False),
    "large": (1024, 24, 16, False),
    "giant": (1536, 40, 24, True),
}


def _dino(variant: str, registers: bool) -> ModelSpec:
    hidden, layers, heads, swiglu = _DINO_SIZES[variant]
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
        extra_config=(("use_swiglu_ffn", swiglu),),
    )


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _clip("ViT-B/32", "openai/clip-vit-base-patch32", 32, 224, large=False),
        _clip("ViT-B/16", "openai/clip-vit-base-patch16", 16, 224, large=False),
        _clip("ViT-L/14", "openai/clip-vit-large-patch14", 14, 224, large=True),
        _clip("ViT-L/14@336px", "openai/clip-vit-large-patch14-336", 14, 336, large=True),
        *(_dino(v, r) for r in (False, True) for v in _DINO_SIZES),
    ]
}

# Also accept a registered model's repo id, and short DINOv2 names ("dinov2-large").
_ALIASES: dict[str, str] = {}
for _spec in REGISTRY.values():
    _ALIASES[_spec.source.lower()] = _spec.name
    _ALIASES[_spec.name.lower()] = _spec.name
    if _spec.family == "dinov2":
        _ALIASES[_spec.source.split("/")[1]] = _spec.name


def lookup(name: str) -> ModelSpec | None:
    """The registered spec for a name, repo id or alias; None if not registered."""
    canonical = _ALIASES.get(name.strip().lower())
    return REGISTRY[canonical] if canonical else None


def spec_from_hf_config(name: str, source: str, config: dict[str, Any]) -> ModelSpec:
    """A spec for any Hugging Face CLIP / DINOv2 checkpoint, read from its config.json."""
    model_type = config.get("model_type", "")
    if model_type == "clip":  # a full CLIPModel: the vision tower sits in vision_config
        vision = dict(config.get("vision_config") or {})
        vision.setdefault("projection_dim", config.get("projection_dim", 512))
        config = vision
        model_type = "clip_vision_model"
    if model_type == "clip_vision_model":
        return ModelSpec(
            name=name,
            family="clip",
            source=source,
            patch_size=int(config.get("patch_size", 32)),
            native_size=int(config.get("image_size", 224)),
            default_size=int(config.get("image_size", 224)),
            hidden_dim=int(config.get("hidden_size", 768)),
            num_layers=int(config.get("num_hidden_layers", 12)),
            num_heads=int(config.get("num_attention_heads", 12)),
            intermediate_size=int(config.get("intermediate_size", 3072)),
            embed_dim=int(config.get("projection_dim", 512)),
            mean=CLIP_MEAN,
            std=CLIP_STD,
        )
    if model_type in ("dinov2", "dinov2_with_registers"):
        hidden = int(config.get("hidden_size", 768))
        return ModelSpec(
            name=name,
            family="dinov2",
            source=source,
            patch_size=int(config.get("patch_size", 14)),
            native_size=int(config.get("image_size", 518)),
            default_size=224,
            hidden_dim=hidden,
            num_layers=int(config.get("num_hidden_layers", 12)),
            num_heads=int(config.get("num_attention_heads", 12)),
            intermediate_size=int(hidden * float(config.get("mlp_ratio", 4))),
            num_registers=int(config.get("num_register_tokens", 0)) if model_type != "dinov2" else 0,
            extra_config=(("use_swiglu_ffn", bool(config.get("use_swiglu_ffn", False))),),
        )
    raise ConfigError(
        f"{name}: model_type {model_type!r} is not supported (featstore encodes CLIP vision and DINOv2 models)"
    )
