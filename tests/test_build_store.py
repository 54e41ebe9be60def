"""`build --store` end to end with a real (tiny) model: export equals --npy-dir output,
appending new images, refusal on a different model, and the CLI as a subprocess."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import featstore
from featstore.convert import export_npy
from featstore.errors import IncompatibleStoreError
from featstore.pipeline import BuildOptions, build
from tests.conftest import make_rgba


def _options(model: str, **kw) -> BuildOptions:
    return BuildOptions(model=model, size=32, device="cpu", workers=0, batch_size=2, **kw)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_store_export_equals_npy_dir_build(tiny_models, image_dir, tmp_path, suffix):
    store = tmp_path / f"s{suffix}"
    res = build(image_dir, _options(tiny_models["clip"]), store=store)
    assert (res.encoded, res.failed) == (5, 0)
    build(image_dir, _options(tiny_models["clip"]), npy_dir=tmp_path / "direct", save_meta=True)
    export_npy(store, tmp_path / "exported", save_meta=True)
    direct = _files(tmp_path / "direct")
    assert len(direct) == 15
    assert _files(tmp_path / "exported") == direct
    with featstore.open(store) as s:
        assert s.keys() == ["a_rgba.png", "b_rgb.png", "c_gray.png", "d_photo.jpg", "sub/e.png"]
        assert s.info.model == tiny_models["clip"] and s.info.feature_type == "clip_vit_last_layer"
        np.testing.assert_array_equal(s["sub/e.png"].features, np.load(tmp_path / "direct" / "sub" / "e.npy"))


def test_store_and_npy_in_one_pass_then_append(tiny_models, image_dir, tmp_path):
    store = tmp_path / "s.zarr"
    first = build(image_dir, _options(tiny_models["dino"]), store=store, npy_dir=tmp_path / "npy")
    assert first.encoded == 5
    Image.fromarray(make_rgba(32, 32, 9)).save(image_dir / "new one.png")
    Image.fromarray(make_rgba(32, 32, 10)).save(image_dir / "sub" / "ünï.png")
    second = build(image_dir, _options(tiny_models["dino"]), store=store, npy_dir=tmp_path / "npy")
    assert (second.encoded, second.skipped) == (2, 5)
    with featstore.open(store) as s:
        assert len(s) == 7 and len(set(s.keys())) == 7
        assert "sub/ünï.png" in s and "new one.png" in s
        np.testing.assert_array_equal(s["new one.png"].features, np.load(tmp_path / "npy" / "new one.npy"))
        assert s.attrs["layout_version"] == 2


def test_appending_with_another_model_or_size_is_refused(tiny_models, image_dir, tmp_path):
    store = tmp_path / "s.zarr"
    build(image_dir, _options(tiny_models["dino"]), store=store)
    with pytest.raises(IncompatibleStoreError):
        build(image_dir, _options(tiny_models["clip"]), store=store)
    with pytest.raises(IncompatibleStoreError):
        build(image_dir, BuildOptions(model=tiny_models["dino"], size=48, device="cpu", workers=0), store=store)
    with pytest.raises(IncompatibleStoreError):
        build(image_dir, _options(tiny_models["dino"], precision="fp16"), store=store)


def test_overwrite_rebuilds_the_store(tiny_models, image_dir, tmp_path):
    store = tmp_path / "s.h5"
    build(image_dir, _options(tiny_models["dino"]), store=store)
    (image_dir / "c_gray.png").unlink()
    res = build(image_dir, _options(tiny_models["dino"], overwrite=True), store=store)
    assert res.encoded == 4
    with featstore.open(store) as s:
        assert len(s) == 4 and "c_gray.png" not in s


def test_cli_build_store_info_and_export(tiny_models, image_dir, tmp_path):
    store = tmp_path / "feats.zarr"

    def run(*args):
        p = subprocess.run([sys.executable, "-m", "featstore", *args], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return p

    p = run("build", "-i", str(image_dir), "-m", tiny_models["dino_reg"], "--store", str(store), "--size", "32")
    assert "encoded 5, skipped 0, failed 0" in p.stderr
    info = run("info", str(store)).stdout
    assert "compression" in info.lower() and "5" in info
    assert run("ls", str(store)).stdout.split("\n")[:2] == ["a_rgba.png", "b_rgb.png"]
    run("export-npy", str(store), str(tmp_path / "out"))
    assert np.load(tmp_path / "out" / "sub" / "e.npy").shape == (32, 4, 4)
    shutil.rmtree(tmp_path / "out")
