import pytest

from featstore.errors import ConfigError
from featstore.models import REGISTRY, lookup, spec_from_hf_config

# Shapes at --size 224 (the README's models table)
EXPECTED_224 = {
    "ViT-B/32": (768, 7),
    "ViT-B/16": (768, 14),
    "ViT-L/14": (1024, 16),
    "ViT-L/14@336px": (1024, 16),
    "facebook/dinov2-small": (384, 16),
    "facebook/dinov2-base": (768, 16),
    "facebook/dinov2-large": (1024, 16),
    "facebook/dinov2-giant": (1536, 16),
    "facebook/dinov2-with-registers-small": (384, 16),
    "facebook/dinov2-with-registers-base": (768, 16),
    "facebook/dinov2-with-registers-large": (1024, 16),
    "facebook/dinov2-with-registers-giant": (1536, 16),
}


# The families added since: shape at each name's default --size (the `featstore models` table).
EXPECTED_DEFAULT = {
    "ViT-L-14-laion2B": (1024, 224, 16),
    "ViT-H-14-laion2B": (1280, 224, 16),
    "ViT-bigG-14-laion2B": (1664, 224, 16),
    **{
        f"facebook/dinov3-vit{v}-pretrain-lvd1689m": (c, 224, 14)
        for v, c in [("s16", 384), ("s16plus", 384), ("b16", 768), ("l16", 1024), ("h16plus", 1280), ("7b16", 4096)]
    },
    "google/siglip-base-patch16-224": (768, 224, 14),
    "google/siglip-so400m-patch14-384": (1152, 378, 27),
    "google/siglip2-base-patch16-224": (768, 224, 14),
    "google/siglip2-large-patch16-512": (1024, 512, 32),
    "google/siglip2-so400m-patch14-384": (1152, 378, 27),
    "google/siglip2-so400m-patch16-512": (1152, 512, 32),
    "trellis": (1024, 518, 37),
    "trellis2": (1024, 512, 32),
}


def test_registry_holds_exactly_the_documented_models():
    assert set(REGISTRY) == set(EXPECTED_224) | set(EXPECTED_DEFAULT)


@pytest.mark.parametrize("name", sorted(EXPECTED_DEFAULT))
def test_shapes_at_the_default_size(name):
    spec = REGISTRY[name]
    assert (spec.hidden_dim, spec.default_size, spec.grid(spec.default_size)) == EXPECTED_DEFAULT[name]


def test_token_layouts():
    assert REGISTRY["google/siglip2-so400m-patch16-512"].num_prefix_tokens == 0  # no CLS
    assert REGISTRY["facebook/dinov3-vitl16-pretrain-lvd1689m"].num_prefix_tokens == 5
    assert REGISTRY["ViT-H-14-laion2B"].num_prefix_tokens == 1
    assert REGISTRY["google/siglip-so400m-patch14-384"].preprocess.resize == "squash"
    assert REGISTRY["facebook/dinov2-small"].preprocess.resize == "crop"


def test_lookup_short_names_of_new_families():
    assert lookup("siglip2-so400m-patch16-512").name == "google/siglip2-so400m-patch16-512"
    assert lookup("laion/CLIP-ViT-H-14-laion2B-s32B-b79K").name == "ViT-H-14-laion2B"
    assert lookup("TRELLIS").name == "trellis"


def test_preprocessing_for_import():
    from featstore.models import preprocessing_for

    assert preprocessing_for("ViT-B/32") == ("clip", REGISTRY["ViT-B/32"].mean, REGISTRY["ViT-B/32"].std)
    assert preprocessing_for("unknown", "siglip_patch_features") == ("siglip", (0.5,) * 3, (0.5,) * 3)
    assert preprocessing_for("unknown", "mystery") is None


@pytest.mark.parametrize("name", sorted(EXPECTED_224))
def test_shapes_at_224(name):
    spec = REGISTRY[name]
    channels, grid = EXPECTED_224[name]
    assert (spec.hidden_dim, spec.grid(224)) == (channels, grid)


def test_336_model_native_grid():
    assert REGISTRY["ViT-L/14@336px"].grid(336) == 24
    assert REGISTRY["ViT-L/14@336px"].default_size == 336


def test_registers_and_prefix_tokens():
    assert REGISTRY["facebook/dinov2-with-registers-base"].num_prefix_tokens == 5
    assert REGISTRY["facebook/dinov2-base"].num_prefix_tokens == 1
    assert REGISTRY["ViT-B/16"].num_prefix_tokens == 1


def test_projected_width_and_feature_types():
    b32 = REGISTRY["ViT-B/32"]
    assert b32.out_dim("projected") == 512
    assert b32.feature_type("raw") == "clip_vit_last_layer"
    assert b32.feature_type("projected") == "clip_vit_last_layer_processed"
    assert REGISTRY["facebook/dinov2-small"].feature_type() == "dinov2_patch_features"
    with pytest.raises(ConfigError, match="needs a CLIP model"):
        REGISTRY["facebook/dinov2-small"].out_dim("projected")


@pytest.mark.parametrize(
    ("name", "size", "nearest"),
    [("ViT-L/14", 230, "224 or 238"), ("ViT-B/32", 250, "224 or 256"), ("facebook/dinov2-small", 5, "14")],
)
def test_refused_sizes_name_the_nearest_valid_ones(name, size, nearest):
    with pytest.raises(ConfigError, match=f"nearest valid sizes: {nearest}$"):
        REGISTRY[name].grid(size)


def test_lookup_accepts_repo_ids_and_short_names():
    assert lookup("openai/clip-vit-large-patch14").name == "ViT-L/14"
    assert lookup("vit-b/32").name == "ViT-B/32"
    assert lookup("dinov2-large").name == "facebook/dinov2-large"
    assert lookup("some/other-model") is None


def test_spec_from_full_clip_config_reads_the_vision_tower():
    cfg = {
        "model_type": "clip",
        "projection_dim": 768,
        "vision_config": {"hidden_size": 1024, "patch_size": 14, "image_size": 336, "num_hidden_layers": 24},
    }
    spec = spec_from_hf_config("x", "x", cfg)
    assert (spec.family, spec.hidden_dim, spec.patch_size, spec.native_size, spec.embed_dim) == (
        "clip",
        1024,
        14,
        336,
        768,
    )


def test_spec_from_unsupported_config_is_refused():
    with pytest.raises(ConfigError, match="not supported"):
        spec_from_hf_config("bert", "bert", {"model_type": "bert"})
