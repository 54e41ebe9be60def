"""What `build` refuses before it loads a model, and how: outputs that cannot be written, a
second build of the same store started at the same instant, option errors (one line and a
hint, not a usage box), and appending with other weights (named in a sentence) while the
same weights from another path are accepted. Real subprocesses of the CLI throughout; a
model that cannot load ("no-such-org/...", offline) proves that a check came first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_featstore import wait_until_held
from tests.test_cli import featstore
from tests.test_signals import _fake_build

NO_MODEL = "no-such-org/no-such-model"  # refused the moment it loads: an error about it means the check came later


def _one_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write: chmod for a user, the immutable flag for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root without chattr: no folder is unwritable")
    try:
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)])
        folder.chmod(0o700)


def test_outputs_that_cannot_be_written_are_refused_before_the_model_loads(image_dir, tmp_path, unwritable):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--store", str(a_file / "feats.zarr")], f"cannot create store {a_file / 'feats.zarr'}: {a_file} is a file"),
        (
            ["--store", str(a_file / "sub" / "f.h5")],
            f"cannot create store {a_file / 'sub' / 'f.h5'}: {a_file} is a file",
        ),
        (["--store", str(unwritable / "f.zarr")], f"the folder {unwritable} cannot be written"),
        (["--store", str(a_file) + ".zarr"], None),  # does not exist: fine (the model is then what fails)
        (["--npy-dir", str(a_file)], f"--npy-dir {a_file} is a file, not a folder"),
        (["--npy-dir", str(a_file / "npy")], f"cannot create --npy-dir {a_file / 'npy'}: {a_file} is a file"),
        (["--npy-dir", str(unwritable / "npy")], f"the folder {unwritable} cannot be written"),
        (["--npy-dir", str(unwritable)], f"cannot write to --npy-dir {unwritable}"),
    ]
    for args, message in cases:
        line = _one_line(featstore("build", "-i", str(image_dir), "-m", NO_MODEL, *args, ok=False))
        if message is None:
            assert "cannot load model" in line, line
        else:
            assert line.startswith("featstore: error: ") and message in line, (args, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "images", "locked"]  # nothing created


def test_a_missing_bucket_is_refused_before_the_model_loads(image_dir, s3_server):  # type: ignore[no-untyped-def]
    env = {**os.environ, **s3_server.env()}
    url = s3_server.url("x.zarr").replace("featstore-test", "no-such-bucket")
    p = subprocess.run(
        [sys.executable, "-m", "featstore", "build", "-i", str(image_dir), "-m", NO_MODEL, "--store", url],
        capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert "bucket 'no-such-bucket' does not exist" in _one_line(p)


def test_two_builds_started_together_the_second_is_refused_before_its_model_loads(image_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # the first build stops where its model would load: it has checked the store, opened nothing
    first = _fake_build(image_dir, work, ["--store", "s.zarr"], hold=False, extra_env={"FAKE_HOLD_AT_LOAD": "1"})
    try:
        wait_until_held(work / "held", first)
        assert not (work / "s.zarr").exists()
        p = featstore("build", "-i", str(image_dir), "-m", NO_MODEL, "--store", str(work / "s.zarr"), ok=False)
        assert _one_line(p) == (
            f"featstore: error: {work / 's.zarr'} is being written by another featstore build (pid {first.pid})"
        )
    finally:
        (work / "release").touch()
        first.communicate(timeout=600)
    assert first.returncode == 0
    # once it is done, the store is free again: the next build gets as far as its model
    p = featstore("build", "-i", str(image_dir), "-m", NO_MODEL, "--store", str(work / "s.zarr"), ok=False)
    assert "cannot load model" in _one_line(p)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["build", "--batch-size", "0", "-i", "x", "--npy-dir", "y"],
            "featstore: error: invalid value for '--batch-size': ",
        ),
        (["preview", "s.zarr", "k"], "featstore: error: missing option '--out' / '-o' (`featstore preview --help`"),
        (["build", "--bogus"], "featstore: error: no such option: --bogus"),
    ],
)
def test_option_errors_are_one_line_with_a_hint(args, expected, tmp_path):
    line = _one_line(featstore(*args, ok=False, cwd=tmp_path))
    assert line.startswith(expected) and line.endswith("--help` lists the options)"), line


def test_same_weights_from_another_path_append_other_weights_are_refused_in_a_sentence(
    tiny_models, image_dir, tmp_path
):
    store = tmp_path / "s.zarr"
    common = ["-i", str(image_dir), "--store", str(store), "--size", "32", "--device", "cpu"]
    featstore("build", "-m", tiny_models["dino"], *common)
    copy = tmp_path / "moved" / "dino-copy"
    shutil.copytree(tiny_models["dino"], copy)
    (image_dir / "new.png").write_bytes((image_dir / "a_rgba.png").read_bytes())
    p = featstore("build", "-m", str(copy), *common)
    assert "encoded 1, skipped 5" in p.stderr  # the same weights: accepted, only the new image encoded

    import torch
    import transformers

    torch.manual_seed(1)  # the same architecture, other weights
    other = tmp_path / "other-dino"
    config = transformers.Dinov2Config.from_pretrained(tiny_models["dino"])
    transformers.Dinov2Model(config).save_pretrained(other)
    line = _one_line(featstore("build", "-m", str(other), *common, ok=False))
    assert "{" not in line and "model_source" not in line
    assert line.startswith(f"featstore: error: {store} holds features of model {tiny_models['dino']!r} (the folder ")
    assert f"but this build uses other weights: model {str(other)!r} (the folder {other}, weights " in line
    assert line.endswith("; write to another store or pass --overwrite")
