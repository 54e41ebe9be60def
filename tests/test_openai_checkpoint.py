"""OpenAI-format CLIP checkpoints: read safely (plain state dicts and TorchScript archives,
without torch.jit.load), mapped into CLIPVisionModelWithProjection, and checked against
OpenAI's own model code (tests/reference/openai_clip_model.py) on tiny random weights."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from featstore.errors import ModelError, UnsafeCheckpointError
from featstore.openai_checkpoint import load_openai_checkpoint, openai_to_hf, read_openai_state_dict

REFERENCE = Path(__file__).parent / "reference" / "openai_clip_model.py"
EMBED, SIZE, LAYERS, WIDTH, PATCH = 48, 32, 2, 128, 8  # heads = WIDTH // 64 = 2


def _reference_module():
    spec = importlib.util.spec_from_file_location("featstore_tests_openai_clip_model", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    return _reference_module()


@pytest.fixture(scope="module")
def clip_model(ref):
    torch.manual_seed(0)
    # embed, image, vision layers, vision width, patch, context, vocab, text width, text heads, text layers
    model = ref.CLIP(EMBED, SIZE, LAYERS, WIDTH, PATCH, 8, 20, 64, 1, 1)
    with torch.no_grad():  # non-trivial layer norms and biases, so a swapped mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()  # float32; clip's convert_weights is deliberately not called


@pytest.fixture(scope="module")
def files(clip_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("openai")
    out = {
        "plain": root / "plain.pt",
        "wrapped": root / "wrapped.pt",
        "jit": root / "ViT-T-8.pt",
        "jit_visual": root / "visual.pt",
    }
    torch.save(clip_model.state_dict(), out["plain"])
    torch.save({"state_dict": clip_model.state_dict(), "epoch": 3}, out["wrapped"])
    image, text = torch.randn(1, 3, SIZE, SIZE), torch.randint(0, 20, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # clip's released archives are traced whole CLIP models
        torch.jit.save(torch.jit.trace(clip_model, (image, text), check_trace=False), str(out["jit"]))
        torch.jit.save(torch.jit.trace(clip_model.visual, image, check_trace=False), str(out["jit_visual"]))
    return out


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


# --- reading ----------------------------------------------------------------------------


def test_torchscript_archive_read_without_jit(files, clip_model, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    _assert_same_state(read_openai_state_dict(files["jit"]), clip_model.state_dict())


def test_torchscript_archive_of_visual_only(files, clip_model):
    state = read_openai_state_dict(files["jit_visual"])
    _assert_same_state(state, clip_model.visual.state_dict())
    config, weights = openai_to_hf(state)  # bare VisionTransformer keys (no "visual.")
    assert config.hidden_size == WIDTH and len(weights) == 8 + 16 * LAYERS


@pytest.mark.parametrize("kind", ["plain", "wrapped"])
def test_plain_state_dict(files, clip_model, kind):
    _assert_same_state(read_openai_state_dict(files[kind]), clip_model.state_dict())


def test_config_inferred_from_tensors(clip_model):
    config, weights = openai_to_hf(clip_model.state_dict())
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (WIDTH, LAYERS, 2)
    assert (config.patch_size, config.image_size, config.projection_dim) == (PATCH, SIZE, EMBED)
    assert config.intermediate_size == 4 * WIDTH
    assert config.hidden_act == "quick_gelu" and config.layer_norm_eps == 1e-5
    sd = clip_model.state_dict()
    _, k, _ = sd["visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert torch.equal(weights["vision_model.encoder.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(weights["visual_projection.weight"], sd["visual.proj"].T)


def test_weights_kept_as_stored(clip_model, tmp_path):
    """float16 weights (as OpenAI ships them) load unchanged; float32 ones are not rounded."""
    half = {k: v.half() for k, v in clip_model.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    _, weights = openai_to_hf(read_openai_state_dict(tmp_path / "half.pt"))
    assert all(w.dtype == torch.float16 for w in weights.values())
    model, _ = load_openai_checkpoint(tmp_path / "half.pt")
    got = model.vision_model.encoder.layers[0].mlp.fc1.weight
    assert got.dtype == torch.float32
    assert torch.equal(got, half["visual.transformer.resblocks.0.mlp.c_fc.weight"].float())

    _, weights32 = openai_to_hf(clip_model.state_dict())
    w32 = weights32["vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert w32.dtype == torch.float32 and not torch.equal(w32, w32.half().float())


# --- features against OpenAI's model code -------------------------------------------------


def _reference_tokens(visual, x: torch.Tensor) -> torch.Tensor:
    """OpenAI VisionTransformer.forward up to the last transformer block, (N, 1 + grid², width)."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    x = visual.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    return x


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    tol = 1e-5 * max(1.0, want.abs().max().item())
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"
    return diff


@pytest.mark.parametrize("kind", ["plain", "jit"])
def test_features_match_openai_reference(files, clip_model, kind):
    model, source = load_openai_checkpoint(files[kind])
    assert not model.training
    assert source["kind"] == "openai-checkpoint"
    assert source["path"] == str(files[kind].resolve()) and Path(source["path"]).is_absolute()
    assert source["sha256"] == hashlib.sha256(files[kind].read_bytes()).hexdigest()

    torch.manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = _reference_tokens(clip_model.visual, x)
        ref_raw = tokens[:, 1:]
        ref_projected = clip_model.visual.ln_post(tokens[:, 1:]) @ clip_model.visual.proj
        ref_pooled = clip_model.encode_image(x)

        out = model(pixel_values=x)
        raw = out.last_hidden_state[:, 1:]
        projected = model.visual_projection(model.vision_model.post_layernorm(raw))
        pooled = out.image_embeds

    assert raw.shape == (3, (SIZE // PATCH) ** 2, WIDTH) and projected.shape[-1] == EMBED
    diffs = {
        "raw": _max_diff(raw, ref_raw),
        "projected": _max_diff(projected, ref_projected),
        "pooled": _max_diff(pooled, ref_pooled),
    }
    print(f"{kind}: max abs diffs {diffs}")
    assert ref_raw.abs().max() > 0.1  # the comparison is not between near-zero tensors


def test_load_in_other_dtype(files):
    model, _ = load_openai_checkpoint(files["plain"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- refusals ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_unsafe_torch_save_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2), "x": _Payload(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_openai_state_dict(path)
    assert "\n" not in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        load_openai_checkpoint(path)
    assert not marker.exists()


def _torchscript_like_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> None:
    top = path.stem
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/data.pkl", data_pkl)
        zf.writestr(f"{top}/code/__torch__/evil.py", "class Evil(Module):\n  pass\n")
        zf.writestr(f"{top}/constants.pkl", pickle.dumps(()))
        zf.writestr(f"{top}/version", "3\n")
        for key, blob in (storages or {}).items():
            zf.writestr(f"{top}/data/{key}", blob)


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL
def test_unsafe_torchscript_archive_refused(tmp_path, monkeypatch, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _torchscript_like_zip(path, pickle.dumps({"conv1": _Payload(marker)}, protocol=protocol))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load called"))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_openai_state_dict(path)
    assert "os.system" in str(info.value) or "posix.system" in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_unsafe_global_inside_real_archive_refused(files, tmp_path):
    """A real traced archive whose data.pkl is edited to call a builtin on load."""
    top = files["jit"].stem
    with zipfile.ZipFile(files["jit"]) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    data = members[f"{top}/data.pkl"]
    assert b"collections\nOrderedDict\n" in data
    members[f"{top}/data.pkl"] = data.replace(b"collections\nOrderedDict\n", b"builtins\nexec\n", 1)
    path = tmp_path / f"{top}.pt"
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec"):
        read_openai_state_dict(path)


def _garbage(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("hello.txt", "hi")
    elif kind == "bad_data_pkl":
        _torchscript_like_zip(path, os.urandom(256))
    return path


@pytest.mark.parametrize("kind", ["random", "text", "empty", "zip", "bad_data_pkl"])
def test_not_a_checkpoint(tmp_path, kind):
    with pytest.raises(ModelError) as info:
        read_openai_state_dict(_garbage(tmp_path, kind))
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert "\n" not in str(info.value)


def test_archive_missing_storage(files, tmp_path):
    top = files["jit"].stem
    path = tmp_path / f"{top}.pt"
    with zipfile.ZipFile(files["jit"]) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            if name != f"{top}/data/3":
                dst.writestr(name, src.read(name))
    with pytest.raises(ModelError, match="lacks storage"):
        read_openai_state_dict(path)


def test_missing_path_and_non_clip(tmp_path):
    with pytest.raises(ModelError):
        read_openai_state_dict(tmp_path / "nope.pt")
    with pytest.raises(ModelError):
        read_openai_state_dict(tmp_path)
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not an OpenAI CLIP checkpoint"):
        load_openai_checkpoint(tmp_path / "other.pt")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="not a state dict"):
        read_openai_state_dict(tmp_path / "list.pt")


# --- through featstore's own loading path ------------------------------------------------


def test_build_with_a_torchscript_checkpoint(files, tmp_path):
    """`featstore build --model ViT-T-8.pt` goes through load_model to per-image files."""
    import json

    import numpy as np
    from PIL import Image

    from featstore.pipeline import BuildOptions, build

    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(tmp_path / "in" / "x.png")
    options = BuildOptions(model=str(files["jit"]), device="cpu", workers=0)
    res = build(tmp_path / "in", options, npy_dir=tmp_path / "o", save_meta=True)
    assert res.info.model_source["kind"] == "openai-checkpoint" and len(res.info.model_source["sha256"]) == 64
    grid = SIZE // PATCH
    assert np.load(tmp_path / "o" / "x.npy").shape == (WIDTH, grid, grid)
    assert json.loads((tmp_path / "o" / "x.json").read_text())["feature_type"] == "clip_vit_last_layer"
