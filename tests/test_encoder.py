import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featstore.encoder import PatchEncoder
from featstore.loading import load_model, random_model
from featstore.models import REGISTRY


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def _reference_input(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    x = pixels.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_clip_raw_is_the_last_block_without_cls(tiny_models):
    loaded = load_model(tiny_models["clip"])
    enc = PatchEncoder(loaded, size=32)
    px = _pixels(2, 32)
    feats = enc.encode(px)
    assert feats.shape == (2, 64, 4, 4) and feats.dtype == torch.float32
    with torch.no_grad():
        out = loaded.module.vision_model(
            _reference_input(px, loaded.spec.mean, loaded.spec.std), output_hidden_states=True
        )
    last_block = out.hidden_states[-1]  # before post_layernorm
    assert last_block.shape[1] == 1 + 16
    expected = last_block[:, 1:].reshape(2, 4, 4, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    # row-major grid: token 1 (first patch) is position (0, 0), token 5 is (1, 0)
    torch.testing.assert_close(feats[:, :, 1, 0], last_block[:, 5], rtol=1e-5, atol=1e-5)


def test_clip_projected_is_normalised_projection(tiny_models):
    loaded = load_model(tiny_models["clip"], clip_output="projected")
    enc = PatchEncoder(loaded, size=32, clip_output="projected")
    px = _pixels(1, 32)
    feats = enc.encode(px)
    assert feats.shape == (1, 48, 4, 4)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(1, 4, 4), rtol=1e-5, atol=1e-5)
    vm = loaded.module.vision_model
    with torch.no_grad():
        tokens = vm(_reference_input(px, loaded.spec.mean, loaded.spec.std)).last_hidden_state[:, 1:]
        proj = F.normalize(loaded.module.visual_projection(vm.post_layernorm(tokens)), dim=-1)
    torch.testing.assert_close(feats, proj.reshape(1, 4, 4, 48).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_full_clip_checkpoint_loads_the_vision_tower(tiny_models):
    """A whole CLIPModel folder (as openai/clip-vit-* on the hub) loads into the vision model."""
    a = PatchEncoder(load_model(tiny_models["clip_full"], clip_output="projected"), size=32, clip_output="projected")
    assert a.encode(_pixels(1, 32)).shape == (1, 48, 4, 4)


@pytest.mark.parametrize(("which", "prefix"), [("dino", 1), ("dino_reg", 5)])
def test_dinov2_drops_cls_and_registers(tiny_models, which, prefix):
    loaded = load_model(tiny_models[which])
    assert loaded.spec.num_prefix_tokens == prefix
    enc = PatchEncoder(loaded, size=32)
    px = _pixels(2, 32)
    feats = enc.encode(px)
    assert feats.shape == (2, 32, 4, 4)
    with torch.no_grad():
        hidden = loaded.module(_reference_input(px, loaded.spec.mean, loaded.spec.std)).last_hidden_state
    assert hidden.shape[1] == prefix + 16
    expected = hidden[:, prefix:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["clip", "dino"])
def test_non_native_size_gives_real_features_on_a_larger_grid(tiny_models, which):
    enc = PatchEncoder(load_model(tiny_models[which]), size=48)
    feats = enc.encode(_pixels(1, 48))
    assert feats.shape[2:] == (6, 6)
    flat = feats[0].reshape(feats.shape[1], -1).T  # 36 patch vectors, none a copy of another
    assert torch.cdist(flat, flat).add(torch.eye(36) * 1e9).min() > 1e-3


def test_batch_equals_one_at_a_time(tiny_models):
    enc = PatchEncoder(load_model(tiny_models["dino_reg"]), size=32)
    px = _pixels(5, 32, seed=3)
    batched = enc.encode(px)
    single = torch.cat([enc.encode(px[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.float16)])
def test_half_precisions_store_float16(tiny_models, precision, dtype):
    enc = PatchEncoder(load_model(tiny_models["clip"]), size=32, precision=precision)
    full = PatchEncoder(load_model(tiny_models["clip"]), size=32)
    px = _pixels(1, 32)
    half = enc.encode(px)
    assert half.dtype == dtype
    assert np.allclose(half.float().numpy(), full.encode(px).numpy(), atol=0.1)


ORIGINAL_NAMES = sorted(n for n, s in REGISTRY.items() if s.family in ("clip", "dinov2") and "laion" not in n)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ORIGINAL_NAMES if not REGISTRY[n].preset])  # the rest: test_families
def test_full_size_architectures_shapes(name):
    spec = REGISTRY[name]
    enc = PatchEncoder(random_model(spec), size=224)
    feats = enc.encode(_pixels(1, 224))
    g = 224 // spec.patch_size
    assert feats.shape == (1, spec.hidden_dim, g, g) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


@pytest.mark.slow
def test_compiled_encoder_matches_eager(tiny_models):
    """--compile on the CPU (inductor needs a C++ compiler): the same features, for two batch sizes."""
    import shutil

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    px = _pixels(3, 32)
    eager = PatchEncoder(load_model(tiny_models["clip"]), size=32).encode(px)
    enc = PatchEncoder(load_model(tiny_models["clip"]), size=32, compile=True)
    torch.testing.assert_close(enc.encode(px), eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc.encode(px[:2]), eager[:2], rtol=1e-4, atol=1e-4)
