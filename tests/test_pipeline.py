"""build(): the reader -> encoder -> writer loop, per-image output, skip/overwrite, and
equality with an independent one-image-at-a-time implementation of the reference."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.errors import ConfigError
from featstore.pipeline import BuildOptions, build
from featstore.runner import encode_splitting
from tests.conftest import make_rgba

JSON_KEYS = [
    "source",
    "orig_size_hw",
    "size_input",
    "feature_shape",
    "mask_shape",
    "dtype",
    "model",
    "feature_type",
    "preprocessing",
    "grid_size",
    "hidden_dim",
]


def _options(model: str, **kw) -> BuildOptions:
    kw.setdefault("workers", 0)
    kw.setdefault("size", 32)
    kw.setdefault("device", "cpu")
    return BuildOptions(model=model, **kw)


def reference_encode(path, model_dir, family: str, prefix: int):
    """What the reference scripts compute for an image that needs no resizing, written
    independently of featstore: numpy premultiply, normalise, batch of one, the HF model."""
    import transformers

    img = np.array(Image.open(path).convert("RGBA"))
    rgb, alpha = img[..., :3], img[..., 3:4]
    rgb = (rgb / 255 * alpha / 255 * 255).astype(np.uint8)
    if family == "clip":
        mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
        model = transformers.CLIPVisionModel.from_pretrained(model_dir)
    else:
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        model = transformers.AutoModel.from_pretrained(model_dir)
    x = ((rgb.astype(np.float32) / 255 - mean.astype(np.float32)) / std.astype(np.float32)).transpose(2, 0, 1)
    with torch.no_grad():
        tokens = model(pixel_values=torch.from_numpy(x)[None]).last_hidden_state[0, prefix:]
    g = int(len(tokens) ** 0.5)
    feats = tokens.T.reshape(-1, g, g).numpy()
    mask = (alpha[..., 0] > 0).reshape(g, 32 // g, g, 32 // g).max(axis=(1, 3)).astype(np.uint8)
    return feats, mask


@pytest.mark.parametrize(("which", "family", "prefix"), [("clip", "clip", 1), ("dino_reg", "dinov2", 5)])
def test_compat_output_matches_reference_on_unresized_images(tiny_models, image_dir, tmp_path, which, family, prefix):
    out = tmp_path / "out"
    # Pillow's resize, as the compat scripts pin it: parity with the reference is the point
    res = build(image_dir, _options(tiny_models[which], batch_size=3, resizer="pillow"), npy_dir=out, save_meta=True)
    assert (res.encoded, res.failed) == (5, 0)
    for name in ["a_rgba", "b_rgb", "c_gray", "sub/e"]:
        src = image_dir / f"{name}.png"
        if Image.open(src).size != (32, 32):
            continue
        ref_f, ref_m = reference_encode(src, tiny_models[which], family, prefix)
        got_f, got_m = np.load(out / f"{name}.npy"), np.load(out / f"{name}_mask.npy")
        assert got_f.dtype == np.float32 and got_f.shape == ref_f.shape
        np.testing.assert_allclose(got_f, ref_f, rtol=1e-5, atol=2e-5)
        assert got_m.dtype == np.uint8 and (got_m == ref_m).all()
    meta = json.loads((out / "a_rgba.json").read_text())
    assert list(meta) == JSON_KEYS
    assert meta["source"] == str(image_dir / "a_rgba.png")
    assert meta["feature_shape"] == [meta["hidden_dim"], 4, 4] and meta["mask_shape"] == [4, 4]
    assert meta["orig_size_hw"] == [32, 32] and meta["dtype"] == "float32" and meta["size_input"] == 32
    assert json.loads((out / "d_photo.json").read_text())["orig_size_hw"] == [48, 64]


def test_mask_of_a_known_alpha_shape_end_to_end(tiny_models, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rgba = make_rgba(32, 32)  # left third transparent: columns 0..9 -> patch column 0 only partly (0..7 fully)
    Image.fromarray(rgba).save(d / "x.png")
    build(d, _options(tiny_models["dino"]), npy_dir=tmp_path / "o")
    mask = np.load(tmp_path / "o" / "x_mask.npy")
    assert mask.tolist() == [[0, 1, 1, 1]] * 4


def test_skip_and_overwrite(tiny_models, image_dir, tmp_path):
    out = tmp_path / "out"
    first = build(image_dir, _options(tiny_models["dino"]), npy_dir=out)
    assert (first.encoded, first.skipped) == (5, 0)
    (out / "c_gray_mask.npy").unlink()  # an image whose outputs are incomplete is redone
    mtime = (out / "a_rgba.npy").stat().st_mtime_ns
    again = build(image_dir, _options(tiny_models["dino"]), npy_dir=out)
    assert (again.encoded, again.skipped) == (1, 4)
    assert (out / "a_rgba.npy").stat().st_mtime_ns == mtime
    forced = build(image_dir, _options(tiny_models["dino"], overwrite=True), npy_dir=out)
    assert (forced.encoded, forced.skipped) == (5, 0)
    assert not list(out.rglob("*.tmp"))


def test_batched_build_equals_batch_of_one(tiny_models, image_dir, tmp_path):
    build(image_dir, _options(tiny_models["clip"], batch_size=5), npy_dir=tmp_path / "b")
    build(image_dir, _options(tiny_models["clip"], batch_size=1), npy_dir=tmp_path / "s")
    for f in sorted((tmp_path / "b").rglob("*.npy")):
        np.testing.assert_allclose(np.load(f), np.load(tmp_path / "s" / f.relative_to(tmp_path / "b")), atol=1e-5)


def test_workers_give_the_same_result_as_inline(tiny_models, image_dir, tmp_path):
    build(image_dir, _options(tiny_models["dino"], workers=2, batch_size=2), npy_dir=tmp_path / "w")
    build(image_dir, _options(tiny_models["dino"]), npy_dir=tmp_path / "i")
    files = sorted(p.relative_to(tmp_path / "w") for p in (tmp_path / "w").rglob("*.npy"))
    assert len(files) == 10
    for f in files:
        assert (tmp_path / "w" / f).read_bytes() == (tmp_path / "i" / f).read_bytes()


def test_fp16_stores_float16(tiny_models, image_dir, tmp_path):
    build(image_dir, _options(tiny_models["clip"], precision="fp16"), npy_dir=tmp_path / "h", save_meta=True)
    assert np.load(tmp_path / "h" / "a_rgba.npy").dtype == np.float16
    assert json.loads((tmp_path / "h" / "a_rgba.json").read_text())["dtype"] == "float16"


def test_bad_images_and_name_collisions_are_reported_not_fatal(tiny_models, image_dir, tmp_path):
    (image_dir / "broken.png").write_text("<html>not found</html>")
    Image.fromarray(make_rgba(32, 32)[..., :3]).save(image_dir / "a_rgba.jpg")  # same stem as a_rgba.png
    res = build(image_dir, _options(tiny_models["dino"]), npy_dir=tmp_path / "o")
    assert res.encoded == 5
    reasons = {f.key: f.reason for f in res.failures}
    assert set(reasons) == {"broken.png", "a_rgba.png"}
    assert "collides" in reasons["a_rgba.png"]
    log = (tmp_path / "o" / "featstore_failures.jsonl").read_text().splitlines()
    assert {json.loads(line)["key"] for line in log} == {"broken.png", "a_rgba.png"}


def test_refused_size_and_missing_cuda(tiny_models, image_dir, tmp_path):
    with pytest.raises(ConfigError, match="nearest valid sizes: 32 or 40"):
        build(image_dir, _options(tiny_models["clip"], size=33), npy_dir=tmp_path / "o")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            build(image_dir, _options(tiny_models["clip"], device="cuda"), npy_dir=tmp_path / "o")


class _OomOnBigBatches:
    """Stands in for a model on a small GPU: batches over 2 images run out of memory."""

    device = torch.device("cpu")
    out_dim = 3

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if len(pixels) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.calls.append(len(pixels))
        return pixels.float().mean(dim=(1, 2))[:, :, None, None]


def test_out_of_memory_splits_the_batch():
    enc = _OomOnBigBatches()
    px = torch.randint(0, 255, (5, 4, 4, 3), dtype=torch.uint8)
    out, _ = encode_splitting(enc, px)
    torch.testing.assert_close(out[:, :, 0, 0], px.float().mean(dim=(1, 2)))
    assert enc.calls == [2, 1, 2]  # 5 -> 2 + 3 -> 2 + (1 + 2)
