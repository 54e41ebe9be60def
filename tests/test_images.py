import numpy as np
import pytest
from PIL import Image

from featstore.batches import ImageItem
from featstore.errors import ConfigError
from featstore.images import (
    discover,
    load_sample,
    open_image,
    output_collisions,
    patch_mask,
    premultiply,
    resize_center_crop,
)


def test_discover_is_recursive_sorted_and_filters_extensions(tmp_path):
    for name in ["b.PNG", "a.jpg", "z/c.webp", "z/y/d.tiff", "notes.txt", "z/e.bmp"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()  # a folder named like an image is not an image
    keys = [it.key for it in discover(tmp_path)]
    assert keys == ["a.jpg", "b.PNG", "z/c.webp", "z/e.bmp", "z/y/d.tiff"]
    assert [it.key for it in discover(tmp_path, recursive=False)] == ["a.jpg", "b.PNG"]
    assert discover(tmp_path)[2].path == str(tmp_path / "z" / "c.webp")


def test_discover_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        discover(tmp_path / "nope")


def test_premultiply_matches_the_reference_formula_with_truncation():
    rgba = np.array([[[200, 100, 3, 128], [255, 255, 255, 255], [77, 0, 255, 0], [10, 20, 30, 1]]], dtype=np.uint8)
    out = premultiply(rgba)
    # uint8(rgb/255 * alpha/255 * 255), truncated: 200*128/255 = 100.39 -> 100
    assert out.tolist() == [[[100, 50, 1], [255, 255, 255], [0, 0, 0], [0, 0, 0]]]


def reference_premultiply(rgba: np.ndarray) -> np.ndarray:
    return (rgba[..., :3] / 255 * rgba[..., 3:4] / 255 * 255).astype(np.uint8)


def test_premultiply_equals_the_formula_for_every_value_pair():
    """Every (value, alpha) pair, in an image with transparency and in an opaque one (the fast path)."""
    v, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = np.stack([v, v, v, a], axis=2)  # (256, 256, 4): every pair
    np.testing.assert_array_equal(premultiply(rgba), reference_premultiply(rgba))
    opaque = rgba[:, 255:]  # alpha 255 only
    assert opaque[..., 3].min() == 255
    np.testing.assert_array_equal(premultiply(opaque), reference_premultiply(opaque))
    assert (premultiply(opaque)[:, 0, 0] == np.arange(256)).all()  # the identity the fast path relies on
    almost = opaque.copy()
    almost[7, 0, 3] = 254
    np.testing.assert_array_equal(premultiply(almost), reference_premultiply(almost))


def test_mask_is_max_pooled_alpha_on_a_known_shape():
    alpha = np.zeros((32, 32), np.uint8)
    alpha[0, 0] = 1  # one visible pixel -> its whole patch is 1
    alpha[16:32, 8:16] = 255  # exactly two patches
    expected = np.zeros((4, 4), np.uint8)
    expected[0, 0] = 1
    expected[2:4, 1] = 1
    got = patch_mask(alpha, 4)
    assert got.dtype == np.uint8
    assert (got == expected).all()


def test_resize_shorter_side_then_center_crop():
    rgba = np.zeros((40, 80, 4), np.uint8)
    rgba[:, 30:50] = 255  # a white, opaque vertical band in the middle
    out = resize_center_crop(rgba, 20)  # 40x80 -> 20x40 -> crop columns 10..30
    assert out.shape == (20, 20, 4)
    assert out[:, 0, 3].max() == 0 and out[:, 19, 3].max() == 0  # outside the band
    assert out[:, 10, 3].min() == 255  # the band's center survives
    assert resize_center_crop(rgba[:20, :20], 20) is not None


def test_square_images_of_the_target_size_are_untouched():
    rgba = np.random.default_rng(0).integers(0, 256, (24, 24, 4), dtype=np.uint8)
    assert resize_center_crop(rgba, 24) is rgba


def _palette_with_transparent_left_half() -> Image.Image:
    idx = np.ones((16, 16), np.uint8)
    idx[:, :8] = 0
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 200, 200, 200] + [0] * 762)
    im.info["transparency"] = 0
    return im


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P"])
def test_modes_decode_to_premultiplied_rgb(tmp_path, mode):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:, :8, 3] = 0
    im = Image.fromarray(rgba).convert(mode) if mode != "P" else _palette_with_transparent_left_half()
    path = tmp_path / "x.png"
    im.save(path)
    s = load_sample(ImageItem("x.png", str(path)), size=16, grid=2)
    assert s.error is None and s.pixels.shape == (16, 16, 3) and s.pixels.dtype == np.uint8
    has_alpha = mode in ("RGBA", "LA", "P")
    assert s.mask.tolist() == ([[0, 1], [0, 1]] if has_alpha else [[1, 1], [1, 1]])
    if has_alpha:
        assert s.pixels[:, :8].max() == 0
    if mode == "L":  # grayscale replicated to RGB
        assert (s.pixels[..., 0] == s.pixels[..., 2]).all()
    assert s.orig_size_hw == (16, 16)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # wide image stored, rotated 90 degrees by EXIF
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif)
    s = load_sample(ImageItem("r.jpg", str(tmp_path / "r.jpg")), size=16, grid=2)
    assert s.orig_size_hw == (40, 20)


def test_bad_files_become_errors_not_exceptions(tmp_path):
    (tmp_path / "t.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, reason in [("t.png", "not a recognised"), ("empty.png", "empty file"), ("gone.png", "not found")]:
        s = load_sample(ImageItem(name, str(tmp_path / name)), size=16, grid=2)
        assert s.pixels is None and reason in s.error


def test_pixel_limit_refuses_before_decoding(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    s = load_sample(ImageItem("big.png", str(tmp_path / "big.png")), size=16, grid=2, max_pixels=9_999)
    assert "--max-pixels" in s.error


def test_output_collisions_keep_the_first_key():
    items = [ImageItem(k, k) for k in ["a.jpg", "a.png", "b.png", "s/a.png"]]
    assert output_collisions(items) == {"a.png": "a.jpg"}


@pytest.mark.parametrize(("h", "w", "size"), [(375, 500, 224), (50, 40, 32), (30, 300, 16)])
def test_resize_treats_the_four_channels_independently(h, w, size):
    """Same result as resizing RGB and alpha as separate images (no premultiplied resize)."""
    rgba = np.random.default_rng(h).integers(0, 256, (h, w, 4), dtype=np.uint8)
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if max(new) > 64 * size:
        pytest.skip("extreme aspect ratios resample the kept centre only")
    rgb = Image.fromarray(np.ascontiguousarray(rgba[..., :3])).resize(new, Image.Resampling.BICUBIC)
    alpha = Image.fromarray(np.ascontiguousarray(rgba[..., 3])).resize(new, Image.Resampling.BICUBIC)
    top, left = (new[1] - size) // 2, (new[0] - size) // 2
    box = (left, top, left + size, top + size)
    expected = np.dstack([np.asarray(rgb.crop(box)), np.asarray(alpha.crop(box))])
    assert np.array_equal(resize_center_crop(rgba, size), expected)


@pytest.mark.parametrize(
    ("name", "hw", "mode"),
    [
        ("photo.jpg", (375, 500), "RGB"),
        ("tall.jpg", (640, 360), "RGB"),
        ("exact.png", (224, 224), "RGB"),
        ("cmyk.jpg", (300, 260), "CMYK"),
        ("strip.png", (3, 3000), "RGB"),  # extreme aspect ratio: the box path
        ("large.jpg", (1200, 1000), "RGB"),  # decoded at a reduced scale (draft)
    ],
)
def test_opaque_fast_path_equals_the_rgba_path(tmp_path, name, hw, mode):
    """Opaque images skip alpha: the sample must equal what the RGBA path makes of them."""
    from featstore.images import _decode

    rng = np.random.default_rng(len(name))
    arr = rng.integers(0, 256, (*hw, 4 if mode == "CMYK" else 3), dtype=np.uint8)
    arr[: hw[0] // 2] //= 3  # some structure for JPEG to keep
    path = tmp_path / name
    Image.fromarray(arr, mode).save(path, quality=90) if name.endswith(".jpg") else Image.fromarray(arr).save(path)
    assert isinstance(_decode(str(path), size=224, max_pixels=10**9)[0], Image.Image)  # the fast path is taken
    sample = load_sample(ImageItem(name, str(path)), size=224, grid=7)
    rgba, orig_hw = open_image(str(path), size=224)
    resized = resize_center_crop(rgba, 224)
    assert sample.error is None and sample.orig_size_hw == orig_hw == hw
    np.testing.assert_array_equal(sample.pixels, premultiply(resized))
    np.testing.assert_array_equal(sample.mask, patch_mask(resized[..., 3], 7))


# ---------------------------------------------------------------- resize policies


def test_squash_resizes_every_band_to_a_square(tmp_path):
    from featstore.images import Preprocess

    rgba = np.random.default_rng(0).integers(0, 256, (30, 50, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, :10, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "x.png")
    policy = Preprocess("squash", "bilinear")
    s = load_sample(ImageItem("x.png", str(tmp_path / "x.png")), size=16, grid=4, preprocess=policy)
    bands = [np.asarray(Image.fromarray(rgba[..., c]).resize((16, 16), Image.Resampling.BILINEAR)) for c in range(4)]
    expected = np.stack(bands, axis=2)
    np.testing.assert_array_equal(s.pixels, premultiply(expected))  # the whole image, no crop
    np.testing.assert_array_equal(s.mask, patch_mask(expected[..., 3], 4))


def test_float_premultiply_is_trellis_lines(tmp_path):
    """TRELLIS: Pillow resizes the RGBA image (LANCZOS), then float32 rgb * alpha, unrounded."""
    from featstore.images import Preprocess

    rgba = np.random.default_rng(1).integers(0, 256, (40, 28, 4), dtype=np.uint8)
    rgba[:5, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "v.png")
    policy = Preprocess("squash", "lanczos", premultiply="float")
    s = load_sample(ImageItem("v.png", str(tmp_path / "v.png")), size=14, grid=2, preprocess=policy)
    ref = Image.open(tmp_path / "v.png").resize((14, 14), Image.Resampling.LANCZOS)
    ref = np.array(ref).astype(np.float32) / 255
    assert s.pixels.dtype == np.float32 and s.pixels.shape == (14, 14, 3)
    np.testing.assert_array_equal(s.pixels, ref[:, :, :3] * ref[:, :, 3:])
    assert not np.array_equal(s.pixels, np.floor(s.pixels * 255) / 255)  # not rounded to uint8 levels
    # an opaque JPEG: alpha 1 everywhere, all-ones mask
    Image.fromarray(rgba[..., :3]).save(tmp_path / "o.jpg")
    o = load_sample(ImageItem("o.jpg", str(tmp_path / "o.jpg")), size=14, grid=2, preprocess=policy)
    ref_o = np.array(Image.open(tmp_path / "o.jpg").resize((14, 14), Image.Resampling.LANCZOS)).astype(np.float32)
    np.testing.assert_array_equal(o.pixels, ref_o / 255)
    assert o.mask.all()
