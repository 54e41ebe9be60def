"""Several models from one decode: `build --model A --store a.zarr --model B --store b.zarr`.

Each model's outputs must be what a build of that model alone gives: keys in order,
features, masks, failures and attributes (timestamps aside), after interruptions too,
resumed per model, single-process and distributed. The CLI runs are real subprocesses
of tests/fake_featstore.py (`fake`: size 32, grid 4; `fake48`: size 48, grid 6); the
library runs use tiny random-weight transformers models.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featstore
from featstore import memory, samples
from featstore.batches import ImageItem
from featstore.errors import ConfigError
from featstore.images import load_sample
from featstore.pipeline import BuildOptions, Target, build
from featstore.samples import InputSpec, load_views
from tests.conftest import make_rgba
from tests.fake_featstore import wait_until_held
from tests.test_distributed import assert_same_store
from tests.test_inputs_build import KEYS, make_collection

FAKE_CLI = str(Path(__file__).with_name("fake_featstore.py"))
IMAGES = 30
ENV_DROP = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i in range(IMAGES):
        sub = "sub/" if i % 7 == 0 else ""
        Image.fromarray(make_rgba(40 + i % 3, 36, i)).save(d / f"{sub}img{i:02d}.png")
    Image.fromarray(make_rgba(300, 220, 99)[..., :3]).save(d / "photo.jpg", quality=90)  # reduced decodes differ
    (d / "bad.png").write_bytes(b"not an image")
    return d


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(HF_HUB_OFFLINE="1", FAKE_SHARD_ROWS="4", OMP_NUM_THREADS="1", **extra)
    return env


def _args(images: Path, *rest: str) -> list[str]:
    return ["build", "-i", str(images), "--batch-size", "3", "--workers", "0", "--device", "cpu", *rest]


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, FAKE_CLI, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600
    )


def _ok(args: list[str], cwd: Path, **env: str) -> str:
    p = _cli(args, cwd, **env)
    assert p.returncode == 0, p.stderr
    return p.stderr


@pytest.fixture
def singles(images: Path, tmp_path: Path) -> dict[str, Path]:
    """Each fake model built alone: the reference every build of several must equal."""
    out = {}
    for model in ("fake", "fake48"):
        _ok(_args(images, "-m", model, "--store", f"single-{model}.zarr"), tmp_path)
        out[model] = tmp_path / f"single-{model}.zarr"
    return out


def test_two_models_one_decode_equal_single_builds(images, tmp_path, singles):
    err = _ok(_args(images, "-m", "fake", "--store", "a.zarr", "-m", "fake48", "--store", "b.zarr"), tmp_path)
    assert "once for 2 models" in err
    assert "fake -> " in err and "fake48 -> " in err
    assert_same_store(tmp_path / "a.zarr", singles["fake"])
    assert_same_store(tmp_path / "b.zarr", singles["fake48"])
    with featstore.open(tmp_path / "b.zarr") as b:
        assert b.attrs["grid"] == 6 and b.attrs["size"] == 48


def test_per_model_options_and_npy_outputs(images, tmp_path):
    # --npy-dir belongs to the model before it; the first model keeps its own defaults
    _ok(_args(images, "-m", "fake48", "--npy-dir", "ref48", "--save-meta"), tmp_path)
    _ok(_args(images, "-m", "fake", "--store", "a.zarr", "-m", "fake48", "--npy-dir", "n48", "--save-meta"), tmp_path)
    ref = sorted(p.name for p in (tmp_path / "ref48").iterdir())
    assert sorted(p.name for p in (tmp_path / "n48").iterdir()) == ref and "img01.npy" in ref
    for name in ref:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "n48" / name), np.load(tmp_path / "ref48" / name))
    with featstore.open(tmp_path / "a.zarr") as a:
        assert a.attrs["size"] == 32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "fake", "--store", "a.zarr", "-m", "fake48"], "-m fake48 has no output"),
        (["-m", "fake", "-m", "fake48", "--store", "b.zarr"], "-m fake has no output"),
        (["--store", "a.zarr", "-m", "fake", "-m", "fake48", "--store", "b.zarr"], "--store comes before the first"),
        (["--size", "32", "-m", "fake", "--store", "a", "-m", "fake48", "--npy-dir", "b"], "--size comes before"),
        (["-m", "fake", "--store", "x.zarr", "-m", "fake48", "--store", "x.zarr"], "x.zarr is the output of both"),
        (["-m", "fake", "--store", "a.zarr", "--store", "b.zarr"], "--store is given twice for -m fake"),
        (["-m", "fake", "--size", "32", "--size", "48", "--store", "a.zarr"], "--size is given twice"),
    ],
)
def test_ambiguous_command_lines_are_refused_with_nothing_created(images, tmp_path, args, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    p = _cli(_args(images, *args), tmp_path)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_resume_per_model_and_a_model_added_later(images, tmp_path, singles):
    _ok(_args(images, "-m", "fake", "--store", "a.zarr"), tmp_path)
    err = _ok(_args(images, "-m", "fake", "--store", "a.zarr", "-m", "fake48", "--store", "b.zarr"), tmp_path)
    assert f"fake -> {tmp_path / 'a.zarr'}: encoded 0, skipped {IMAGES + 1}" in err
    assert f"fake48 -> {tmp_path / 'b.zarr'}: encoded {IMAGES + 1}, skipped 0" in err
    assert_same_store(tmp_path / "a.zarr", singles["fake"])
    assert_same_store(tmp_path / "b.zarr", singles["fake48"])
    err = _ok(_args(images, "-m", "fake", "--store", "a.zarr", "-m", "fake48", "--store", "b.zarr"), tmp_path)
    assert "decoded 0 once for 2 models, skipped" in err  # nothing left for either model: nothing read


@pytest.mark.parametrize("how", ["kill", "term"])
def test_interrupted_then_the_same_command_finishes_both(images, tmp_path, singles, how):
    hold = tmp_path / "hold"
    hold.mkdir()
    cmd = _args(images, "-m", "fake", "--store", "a.zarr", "-m", "fake48", "--store", "b.zarr")
    proc = subprocess.Popen(
        [sys.executable, FAKE_CLI, *cmd],
        cwd=tmp_path,
        env=_env(FAKE_HOLD_AFTER="5", FAKE_HOLD_DIR=str(hold)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_held(hold / "held", proc)  # the 6th batch of `fake`: 15 rows of each model written before it
    _wait_for_rows([tmp_path / "a.zarr", tmp_path / "b.zarr"], 12, proc)  # 3 shards of 4 committed in each
    if how == "kill":
        proc.kill()
        proc.communicate(timeout=600)
    else:
        proc.send_signal(signal.SIGTERM)
        (hold / "release").touch()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 143 and "interrupted" in err, err
    for name in ("a.zarr", "b.zarr"):  # consistent: every committed row is whole, and opens
        with featstore.open(tmp_path / name) as s:
            assert 0 < len(s) < IMAGES
            s.get_batch(list(range(len(s))))
    _ok(cmd, tmp_path)
    assert_same_store(tmp_path / "a.zarr", singles["fake"])
    assert_same_store(tmp_path / "b.zarr", singles["fake48"])


def _rows(store: Path) -> int:
    try:
        with featstore.open(store) as s:
            return len(s)
    except Exception:  # not created yet
        return 0


def _wait_for_rows(stores: list[Path], rows: int, proc: subprocess.Popen[str]) -> None:
    """Wait until every store has `rows` committed (the writer thread commits behind the encoder)."""
    deadline = time.monotonic() + 600
    while any(_rows(s) < rows for s in stores):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the stores never got their rows"
        time.sleep(0.05)


def test_distributed_shards_build_every_model(images, tmp_path, singles):
    cmd = _args(images, "-m", "fake", "--store", "a.zarr", "-m", "fake48", "--store", "b.zarr", "--unit-images", "8")
    _ok([*cmd, "--shard", "1/2"], tmp_path)
    with featstore.open(tmp_path / "a.zarr") as a:
        assert a.attrs.get("num_rows") != IMAGES  # half the units so far
    _ok([*cmd, "--shard", "0/2"], tmp_path)
    assert_same_store(tmp_path / "a.zarr", singles["fake"])
    assert_same_store(tmp_path / "b.zarr", singles["fake48"])


def test_torchrun_two_processes_two_models_and_per_image_files(images, tmp_path, singles):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = _args(images, "-m", "fake", "--store", "a.zarr", "-m", "fake48", "--store", "b.zarr", "--npy-dir", "n48")
    p = subprocess.run(
        [*torchrun, FAKE_CLI, *cmd, "--unit-images", "8"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert "process 1 of 2 (torchrun)" in p.stderr and "process 2 of 2 (torchrun)" in p.stderr
    assert_same_store(tmp_path / "a.zarr", singles["fake"])
    assert_same_store(tmp_path / "b.zarr", singles["fake48"])
    with featstore.open(singles["fake48"]) as want:  # the per-image files hold the store's rows
        for key in want.keys()[:5]:
            stem = key.removesuffix(".png").removesuffix(".jpg")
            np.testing.assert_array_equal(np.load(tmp_path / "n48" / f"{stem}.npy"), want[key].features)


def test_distributed_refuses_stores_at_different_points(images, tmp_path):
    _ok(_args(images, "-m", "fake", "--store", "a.zarr"), tmp_path)
    cmd = _args(images, "-m", "fake", "--store", "a.zarr", "-m", "fake48", "--store", "b.zarr", "--shard", "0/2")
    p = _cli(cmd, tmp_path)
    assert p.returncode == 2 and "are at different points" in p.stderr, p.stderr


# ---------------------------------------------------------------- library: real tiny models


def test_real_models_of_two_grids_equal_single_builds(tiny_models, images, tmp_path):
    a = BuildOptions(model=tiny_models["dino"], device="cpu", batch_size=4, workers=1)
    b = BuildOptions(model=tiny_models["clip"], device="cpu", size=64)
    build(images, a, store=tmp_path / "single-a.zarr")
    build(images, BuildOptions(**{**_fields(b), "batch_size": 4, "workers": 1}), npy_dir=tmp_path / "single-b")
    got = build(images, a, store=tmp_path / "a.zarr", also=[Target(b, npy_dir=tmp_path / "b")])
    assert [m.encoded for m in got.models] == [IMAGES + 1, IMAGES + 1]
    assert [len(m.failures) for m in got.models] == [1, 1]
    with featstore.open(tmp_path / "a.zarr") as x, featstore.open(tmp_path / "single-a.zarr") as y:
        assert x.keys() == y.keys()
        n = len(y)
        gx, gy = x.get_batch(list(range(n))), y.get_batch(list(range(n)))
        np.testing.assert_allclose(gx.features, gy.features, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(gx.masks, gy.masks)
    names = sorted(p.name for p in (tmp_path / "single-b").iterdir())
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == names
    for name in names:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(tmp_path / "b" / name), np.load(tmp_path / "single-b" / name), atol=1e-6)


def _fields(options: BuildOptions) -> dict:
    return {f: getattr(options, f) for f in options.__dataclass_fields__}


def test_a_large_jpeg_is_decoded_per_reduction_and_a_png_once(images, monkeypatch):
    specs = (InputSpec(32, 4), InputSpec(96, 12), InputSpec(32, 4))
    photo = ImageItem("photo.jpg", str(images / "photo.jpg"))
    got = load_views(photo, specs)
    for spec, one in zip(specs, got.inputs, strict=True):  # each what a one-model read gives
        alone = load_sample(photo, size=spec.size, grid=spec.grid)
        np.testing.assert_array_equal(one.pixels, alone.pixels)
        np.testing.assert_array_equal(one.mask, alone.mask)
    calls = []
    real = samples._decode
    monkeypatch.setattr(samples, "_decode", lambda *a, **k: calls.append(k["size"]) or real(*a, **k))
    load_views(photo, specs)
    assert sorted(calls) == [32, 96]  # two reductions: two decodes, not three
    calls.clear()
    jpeg_small = images / "small.jpg"
    Image.fromarray(make_rgba(40, 40, 1)[..., :3]).save(jpeg_small)
    load_views(ImageItem("small.jpg", str(jpeg_small)), specs)
    assert len(calls) == 1  # too small to reduce for any model: one decode
    png = load_views(ImageItem("img01.png", str(images / "img01.png")), specs)
    assert png.error is None and len(png.inputs) == 3 and png.inputs[1].pixels.shape == (96, 96, 3)


def test_memory_check_names_the_model_to_drop(tiny_models):
    from featstore.pipeline import model_encoder

    small = model_encoder(BuildOptions(model=tiny_models["dino"], device="cpu"))
    big = model_encoder(BuildOptions(model=tiny_models["clip"], device="cpu", size=256))
    need = memory.activation_bytes(big, 16)
    assert need > memory.activation_bytes(small, 16) > 0 and memory.activation_bytes(big, 32) > need
    assert memory.weight_bytes(big) > 0
    memory.check_fits([small, big], 16, free=need + 1)  # fits: no error
    with pytest.raises(ConfigError, match=r"2 models do not fit cpu together.*drop --model .*clip"):
        memory.check_fits([small, big], 16, free=need // 2)


def test_a_build_that_will_not_fit_creates_nothing(tiny_models, images, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    a = BuildOptions(model=tiny_models["dino"], device="cpu", workers=0)
    b = BuildOptions(model=tiny_models["clip"], device="cpu")
    with pytest.raises(ConfigError, match="do not fit"):
        build(images, a, store=tmp_path / "a.zarr", also=[Target(b, store=tmp_path / "b.zarr")])
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_tar_shards_on_s3_into_two_s3_stores(tmp_path, s3_server):
    collection = make_collection(tmp_path)
    from featstore.sources import as_source
    from featstore.store.location import as_location
    from tests.fake_featstore import FakeEncoder
    from tests.test_inputs_build import _assert_same, _features, _upload

    def fakes() -> tuple[FakeEncoder, FakeEncoder]:
        return FakeEncoder(), FakeEncoder(size=48, channels=5)

    options = BuildOptions(model="fake", device="cpu", batch_size=3, workers=2)
    first, second = fakes()
    build(collection["folder"], options, store=tmp_path / "a.zarr", encoder=first)
    build(collection["folder"], options, store=tmp_path / "b.zarr", encoder=second)

    tars = _upload(s3_server, collection["tars"], "multi-shards")
    source = as_source(tars + "/shard{0..1}.tar", storage_options=s3_server.options)
    stores = [as_location(s3_server.url(f"multi-{n}.zarr"), s3_server.options) for n in "ab"]
    first, second = fakes()
    got = build(source, options, store=stores[0], encoder=first, also=[Target(options, stores[1], encoder=second)])
    assert [m.encoded for m in got.models] == [len(KEYS), len(KEYS)]
    for local, remote in zip(("a.zarr", "b.zarr"), stores, strict=True):
        with featstore.open(remote.url, storage_options=s3_server.options) as s:
            rows = {row.key: (row.features, row.mask, tuple(row.orig_size_hw)) for row in s}
        _assert_same(rows, _features(tmp_path / local))
