"""The default resizer "auto" (featstore.resample, featstore.images): torch's resize only
where both sides shrink 2x or more, within one level of Pillow's pixels there; masks
identical to Pillow's path always (Pillow's own alpha computed exactly where torch's
leaves a patch open); stores record it and appends keep a store's resizer; the compat
scripts stay Pillow's exactly."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featstore import resample
from featstore.batches import ImageItem
from featstore.errors import IncompatibleStoreError
from featstore.images import (
    AUTO_MARK,
    RESAMPLE,
    TORCH_MARK,
    Preprocess,
    _torch_plan,
    load_sample,
    patch_mask,
    prepare,
)
from featstore.models.presets import TRELLIS_PREPROCESS
from featstore.pipeline import BuildOptions, build
from featstore.store.base import resized_by

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _images

AUTO = Preprocess(resizer="auto")
TORCH = Preprocess(resizer="torch")


# ---------------------------------------------------------------- auto's choice


@pytest.mark.parametrize(
    ("hw", "size", "preprocess", "torch_resizes"),
    [
        ((512, 512), 224, AUTO, True),  # renders at 224: 2.29x
        ((1024, 1024), 518, AUTO, False),  # 1.98x: just under 2x
        ((1036, 1036), 518, AUTO, True),  # 2x exactly
        ((512, 512), 518, AUTO, False),  # an upscale
        ((375, 500), 224, AUTO, False),  # 0.5 MP photos: 1.67x
        ((900, 1200), 224, AUTO, True),
        ((1200, 300), 224, Preprocess("squash", "bicubic", resizer="auto"), False),  # one side 1.34x
        ((1200, 500), 224, Preprocess("squash", "bicubic", resizer="auto"), True),
        ((600, 600), 224, Preprocess("crop", "bilinear", resizer="auto"), True),
        ((224, 224), 224, AUTO, False),  # no resize at all: byte-identical
        ((512, 512), 224, Preprocess(), False),  # pillow
        ((512, 512), 518, TORCH, True),
        ((1, 100_000), 224, TORCH, False),  # extreme aspect: Pillow's box path
    ],
)
def test_auto_takes_torch_only_where_both_sides_shrink_2x(hw, size, preprocess, torch_resizes):
    assert (_torch_plan(*hw, size, preprocess) is not None) == torch_resizes


def test_auto_is_refused_or_absent_where_torch_cannot_stand_in():
    with pytest.raises(ValueError, match="auto resizer"):
        Preprocess("squash", "lanczos", resizer="auto")
    assert not TRELLIS_PREPROCESS.torch_allowed() and TRELLIS_PREPROCESS.resizer == "pillow"


def test_auto_is_recorded_and_told_apart():
    from dataclasses import replace

    from featstore.batches import EncodingInfo

    assert AUTO_MARK in AUTO.describe_resize() and TORCH_MARK in AUTO.describe_resize()
    attrs = {"model": "m", "family": "clip", "feature_type": "t", "size": 32, "grid": 4, "hidden_dim": 8}
    old = EncodingInfo.from_attrs({**attrs, "dtype": "float32", "preprocessing": {"name": "x"}})
    assert resized_by(replace(old, resize=AUTO.describe_resize())) == "auto"
    assert resized_by(replace(old, resize=TORCH.describe_resize())) == "torch"
    assert resized_by(replace(old, resize=Preprocess().describe_resize())) == "pillow"


# ---------------------------------------------------------------- pixels within one level


def test_auto_stays_within_one_level_of_pillow_where_it_takes_torch():
    """Renders (512, 1024), photos and soft alpha, at 224 and odd sizes: the resized pixels
    and the encoder's input (premultiplied) within 1 level of the Pillow path's."""
    rng = np.random.default_rng(11)
    soft = _images.render(rng, 600)
    soft[..., 3] = soft[..., 3] // 3 + rng.integers(0, 3, soft.shape[:2], dtype=np.uint8)
    sources = {
        "render512": _images.render(rng, 512),
        "render1024": _images.render(rng, 1024),
        "photo": _images.photo(rng, (900, 1200)),
        "soft": soft,
    }
    checked = 0
    for name, pixels in sources.items():
        for size, grid in ((224, 16), (98, 7), (112, 8)):
            assert _torch_plan(*pixels.shape[:2], size, AUTO) is not None, (name, size)
            fast, _ = prepare(pixels, size=size, grid=grid, preprocess=AUTO)
            exact, _ = prepare(pixels, size=size, grid=grid)
            diff = np.abs(fast.astype(int) - exact.astype(int))
            assert diff.max() <= 1, (name, size, diff.max())
            checked += diff.size
    assert checked > 500_000


def test_unresized_images_stay_byte_identical_with_auto(tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(_images.render(rng, 224), "RGBA").save(tmp_path / "r.png")
    item = ImageItem("r.png", str(tmp_path / "r.png"))
    a = load_sample(item, size=224, grid=16, preprocess=AUTO)
    b = load_sample(item, size=224, grid=16)
    assert a.pixels.tobytes() == b.pixels.tobytes() and np.array_equal(a.mask, b.mask)


# ---------------------------------------------------------------- the exact mask


def _pillow_alpha(alpha: np.ndarray, hw: tuple[int, int], method: str) -> np.ndarray:
    return np.asarray(Image.fromarray(alpha, "L").resize((hw[1], hw[0]), RESAMPLE[method]))


def test_the_port_of_pillows_arithmetic_is_exact_in_both_pass_orders():
    """Pillow's coefficients, fixed point and pass order (probed) reproduce Pillow's resized
    alpha bit for bit, up and down, both kernels, on noise and sparse faint alpha."""
    rng = np.random.default_rng(5)
    orders = set()
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(12, 200, 2))
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if trial % 2:
            alpha = ((rng.random((h, w)) < 0.02) * rng.integers(1, 3, (h, w))).astype(np.uint8)
        method = ("bicubic", "bilinear")[trial % 4 // 2]
        new = (int(rng.integers(4, 2 * h)), int(rng.integers(4, 2 * w)))
        first = resample._vertical_first(h, w, *new, method)
        assert first is not None
        orders.add(first)
        vert = resample._pillow_pass(h, new[0], method).matrix(0, new[0], 0, h)
        horiz = resample._pillow_pass(w, new[1], method).matrix(0, new[1], 0, w).T
        src = alpha.astype(np.float64)
        out = (
            resample._clip8(resample._clip8(vert @ src) @ horiz)
            if first
            else resample._clip8(vert @ resample._clip8(src @ horiz))
        )
        np.testing.assert_array_equal(out.astype(np.uint8), _pillow_alpha(alpha, new, method), err_msg=str((h, w, new)))
    assert orders == {False, True} or orders == {False}  # Pillow 13 runs some vertical passes first


def _adversarial(rng: np.random.Generator, h: int, w: int, kind: int) -> np.ndarray:
    """Faint and isolated alpha that torch's `alpha > 0` gets wrong at some patches."""
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if kind == 0:  # scattered 1-level pixels
        rgba[..., 3] = rng.random((h, w)) < 0.01
    elif kind == 1:  # rare pixels of any alpha
        rgba[..., 3] = (rng.random((h, w)) < 0.003) * rng.integers(1, 256, (h, w))
    elif kind == 2:  # a faint ramp 0, 1, 2, 3
        rgba[..., 3] = np.clip(np.arange(w)[None, :] - w // 2, 0, 3)
    elif kind == 3:  # a render's shape at alpha 0..2
        shape = _images.render(rng, max(h, w))[:h, :w, 3] > 0
        rgba[..., 3] = shape * rng.integers(0, 3, (h, w))
    else:  # a few isolated pixels, one in a corner
        rgba[..., 3] = 0
        rgba[h // 3 : h // 3 + 2, w // 2, 3] = 1
        rgba[0, 0, 3], rgba[-1, -1, 3] = 1, 2
    return rgba


@pytest.mark.parametrize(
    "preprocess",
    [TORCH, Preprocess("squash", "bicubic", resizer="torch"), Preprocess("crop", "bilinear", resizer="torch")],
    ids=["crop-bicubic", "squash-bicubic", "crop-bilinear"],
)
def test_masks_equal_pillows_on_adversarial_alpha_and_renders(preprocess):
    """Every geometry (224, 518, odd sizes; up and down) where torch resizes: the mask is
    Pillow's path's, though torch's own `alpha > 0` differs on some of these."""
    rng = np.random.default_rng(17)
    pillow = Preprocess(preprocess.resize, preprocess.resample)
    cases = torch_wrong = 0
    for trial in range(40):
        h, w = int(rng.integers(90, 620)), int(rng.integers(90, 620))
        pixels = _adversarial(rng, h, w, trial % 5) if trial % 3 else _images.render(rng, max(h, w))[:h, :w].copy()
        for size, grid in ((224, 16), (518, 37), (98, 7), (63, 9)):
            _, want = prepare(pixels, size=size, grid=grid, preprocess=pillow)
            _, got = prepare(pixels, size=size, grid=grid, preprocess=preprocess)
            np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w} at {size}")
            hint = resample_hint(pixels, size, preprocess)
            torch_wrong += not np.array_equal(patch_mask(hint, grid), want)
            cases += 1
    assert torch_wrong >= 1, (torch_wrong, cases)  # the exact mask is doing work


def resample_hint(pixels: np.ndarray, size: int, preprocess: Preprocess) -> np.ndarray:
    from featstore.images import resize

    return resize(pixels, size, preprocess)[..., 3]


# ---------------------------------------------------------------- stores and the compat scripts


def _attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def _renders(folder: Path, n: int, side: int = 64) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(_images.render(rng, side), "RGBA").save(folder / f"r{i}.png")
    return folder


def test_appending_with_auto_keeps_a_pillow_stores_resizer_and_explicit_mismatch_is_refused(tiny_models, tmp_path):
    """A store made with Pillow's resize (every store before auto) takes an auto build's rows
    with Pillow's resize, recorded as before; an explicit torch build is refused, one line."""
    images = _renders(tmp_path / "in", 3)
    store = tmp_path / "s.zarr"
    opts = BuildOptions(model=tiny_models["dino"], size=32, device="cpu", workers=0)
    first = tmp_path / "first"
    first.mkdir()
    (first / "r0.png").write_bytes((images / "r0.png").read_bytes())
    build(first, BuildOptions(**{**_fields(opts), "resizer": "pillow"}), store=store)
    before = _attrs(store)["preprocessing"]["resize"]
    assert TORCH_MARK not in before
    done = build(images, opts, store=store)  # the default, auto
    assert done.encoded == 2 and _attrs(store)["preprocessing"]["resize"] == before
    with pytest.raises(IncompatibleStoreError, match="resized by pillow but this build resizes with torch") as e:
        build(images, BuildOptions(**{**_fields(opts), "resizer": "torch"}), store=store)
    assert "\n" not in str(e.value)
    # a new store made by default records auto, and per-image JSON says the same
    fresh, npy = tmp_path / "a.zarr", tmp_path / "npy"
    build(images, opts, store=fresh, npy_dir=npy, save_meta=True)
    assert AUTO_MARK in _attrs(fresh)["preprocessing"]["resize"]
    assert AUTO_MARK in json.loads((npy / "r0.json").read_text())["resize"]
    with pytest.raises(IncompatibleStoreError, match="resized by auto but this build resizes with pillow"):
        build(images, BuildOptions(**{**_fields(opts), "resizer": "pillow"}), store=fresh)


def _fields(opts: BuildOptions) -> dict:
    from dataclasses import fields

    return {f.name: getattr(opts, f.name) for f in fields(opts)}


def test_compat_scripts_keep_pillows_resize_exactly(tiny_models, tmp_path):
    """encode_with_dino.py resizes 64 -> 32 (where auto would take torch's) with Pillow's
    resize: the same features and masks as a build pinned to Pillow, and its JSON says Pillow."""
    from featstore.compat import main

    images = _renders(tmp_path / "in", 2)
    out, pinned = tmp_path / "out", tmp_path / "pinned"
    assert (
        main(
            "dino",
            [
                "--input",
                str(images),
                "--output",
                str(out),
                "--model",
                tiny_models["dino"],
                "--size",
                "32",
                "--device",
                "cpu",
                "--save_meta",
                "--workers",
                "0",
            ],
        )
        == 0
    )
    build(
        images,
        BuildOptions(model=tiny_models["dino"], size=32, device="cpu", workers=0, resizer="pillow"),
        npy_dir=pinned,
    )
    for name in ("r0", "r1"):
        assert np.load(out / f"{name}.npy").tobytes() == np.load(pinned / f"{name}.npy").tobytes()
        assert np.array_equal(np.load(out / f"{name}_mask.npy"), np.load(pinned / f"{name}_mask.npy"))
        assert "resize" not in json.loads((out / f"{name}.json").read_text())  # the reference's keys


@pytest.mark.parametrize(("hw", "new"), [((512, 512), (224, 224)), ((512, 512), (518, 518)), ((300, 700), (98, 230))])
@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_the_alpha_floor_that_proves_a_pixel_visible_is_sound(hw, new, method):
    """Source alpha all >= `_sure_min` gives Pillow alpha > 0 everywhere, even with 255
    under every negative weight; the shortcut must never call a pixel visible that Pillow
    does not."""
    floor = resample._sure_min(*hw, *new, method)
    assert floor < 256
    rng = np.random.default_rng(2)
    for _ in range(4):
        alpha = np.where(rng.random(hw) < 0.5, floor, 255).astype(np.uint8)
        alpha[:, ::3] = floor  # stripes: high values where the negative lobes fall on some outputs
        assert (_pillow_alpha(alpha, new, method) > 0).all()
