"""Decode workers killed by SIGKILL (what the kernel's OOM killer sends) during builds.

The images' decode is made to kill its own worker process with a real SIGKILL: the test
replaces `featstore.reader.load_views` before the DataLoader forks its workers, so the
workers run the replacement. It kills only inside a worker (never the test process),
deterministically by key (no timing).
"""

from __future__ import annotations

import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featstore.reader
from featstore.errors import DecodeWorkersError
from featstore.pipeline import BuildOptions, build
from featstore.reader import KILLED
from featstore.sources import as_source
from tests.conftest import make_rgba

N = 12


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for i in range(N):
        Image.fromarray(make_rgba(32, 32, 40 + i)).save(d / f"img{i:02d}.png")
    return d


def _kill_when(monkeypatch: pytest.MonkeyPatch, should_kill) -> None:
    """Decoding an image for which `should_kill(key, workers)` holds SIGKILLs the worker doing it."""
    real = featstore.reader.load_views
    parent = os.getpid()

    def load_views(item, specs, **kw):
        info = featstore.reader.get_worker_info()
        if os.getpid() != parent and info is not None and should_kill(item.key, info.num_workers):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(item, specs, **kw)

    monkeypatch.setattr(featstore.reader, "load_views", load_views)


def _options(model: str, workers: int = 2) -> BuildOptions:
    return BuildOptions(model=model, size=32, device="cpu", batch_size=2, workers=workers)


def _rows(npy: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in npy.glob("*.npy") if not p.stem.endswith("_mask")}


def test_an_image_that_always_kills_its_worker_fails_by_name_and_the_rest_are_encoded(tiny_models, images, tmp_path):
    model = tiny_models["dino"]
    ref = build(images, _options(model, workers=0), npy_dir=tmp_path / "ref")
    assert ref.encoded == N

    with pytest.MonkeyPatch.context() as mp:
        _kill_when(mp, lambda key, _w: key == "img05.png")
        got = build(images, _options(model), npy_dir=tmp_path / "out")
    assert [(f.key, f.reason) for f in got.failures] == [("img05.png", KILLED)]
    assert got.encoded == N - 1  # its batch-mate img04 and every other image: not blamed
    want, have = _rows(tmp_path / "ref"), _rows(tmp_path / "out")
    assert set(have) == set(want) - {"img05"}
    for k in have:
        np.testing.assert_allclose(have[k], want[k], rtol=1e-5, atol=1e-5)


def test_a_worker_killed_once_is_restarted_and_nothing_fails(tiny_models, images, tmp_path):
    marker = tmp_path / "killed-once"

    def once(key: str, _w: int) -> bool:
        if key != "img07.png":
            return False
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # the first decode of img07 only
        except FileExistsError:
            return False
        return True

    with pytest.MonkeyPatch.context() as mp:
        _kill_when(mp, once)
        got = build(images, _options(tiny_models["dino"]), npy_dir=tmp_path / "out")
    assert marker.exists() and got.failures == [] and got.encoded == N


def test_tar_shards_too(tiny_models, images, tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    for s in range(2):
        with tarfile.open(tars / f"shard{s}.tar", "w") as tf:
            for i in range(s * N // 2, (s + 1) * N // 2):
                tf.add(images / f"img{i:02d}.png", arcname=f"img{i:02d}.png")
    with pytest.MonkeyPatch.context() as mp:
        _kill_when(mp, lambda key, _w: key.endswith("img09.png"))
        got = build(as_source(str(tars / "shard{0..1}.tar")), _options(tiny_models["dino"]), npy_dir=tmp_path / "out")
    assert [(f.key.rsplit("/", 1)[-1], f.reason) for f in got.failures] == [("img09.png", KILLED)]
    assert got.encoded == N - 1


def test_deaths_no_image_explains_end_the_build_with_one_line_exit_2(tiny_models, images, tmp_path, capsys):
    from tests.test_reliability import _cli

    # Killed in the build's two-worker loaders, never when decoded alone: memory pressure, say.
    with pytest.MonkeyPatch.context() as mp:
        _kill_when(mp, lambda key, workers: workers == 2 and key == "img03.png")
        with pytest.raises(DecodeWorkersError, match="no single image explains it"):
            build(images, _options(tiny_models["dino"]), npy_dir=tmp_path / "lib")
        args = ["build", "-i", str(images), "-m", tiny_models["dino"], "--npy-dir", str(tmp_path / "out")]
        code, err = _cli([*args, "--size", "32", "--device", "cpu", "--workers", "2", "--batch-size", "2"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "decode workers were killed" in lines[0] and "work committed before this point is kept" in lines[0]
    done = {p.stem for p in (tmp_path / "out").glob("*_mask.npy")}
    assert {"img00_mask", "img01_mask"} <= done  # the batches before the deaths are kept
    code, err = _cli([*args, "--size", "32", "--device", "cpu", "--workers", "0"], capsys)
    assert code == 0 and "failed 0" in err, err


def test_s3_objects_too(tiny_models, images, tmp_path, s3_server):
    import s3fs

    prefix = s3_server.url("killer")
    fs = s3fs.S3FileSystem(**s3_server.options, skip_instance_cache=True)
    for p in sorted(images.iterdir()):
        fs.pipe_file(f"{prefix.removeprefix('s3://')}/{p.name}", p.read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        _kill_when(mp, lambda key, _w: key == "img02.png")
        source = as_source(prefix + "/", storage_options=s3_server.options)
        got = build(source, _options(tiny_models["dino"]), npy_dir=tmp_path / "out")
    assert [(f.key, f.reason) for f in got.failures] == [("img02.png", KILLED)]
    assert got.encoded == N - 1
