"""SIGTERM, SIGHUP and Ctrl-C (SIGINT) stop a build cleanly, through the real CLI.

The build runs as a subprocess with the deterministic fake encoder, which holds its
third batch until the test has sent the signal (see tests/fake_featstore.py): no
timing assumptions. Two batches are done and the held one is in flight, so exactly
three batches must be kept, committed, and skipped by the re-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featstore
from tests.conftest import make_rgba
from tests.fake_featstore import wait_until_held

FAKE_CLI = Path(__file__).with_name("fake_featstore.py")
IMAGES, BATCH, HOLD_AFTER = 20, 2, 2
KEPT = (HOLD_AFTER + 1) * BATCH
WAIT_S = 600  # generous: only a build that never gets going would use it up

MODES = {
    "npy": ["--npy-dir", "npy"],
    "zarr": ["--store", "s.zarr"],
    "h5": ["--store", "s.h5"],
    "both": ["--store", "s.zarr", "--npy-dir", "npy"],
}


@pytest.fixture
def many_images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for i in range(IMAGES):
        Image.fromarray(make_rgba(32, 32, i)).save(d / f"img{i:02d}.png")
    return d


def _fake_build(
    images: Path, work: Path, outputs: list[str], hold: bool, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", FAKE_HOLD_DIR=str(work), **(extra_env or {}))
    if hold:
        env["FAKE_HOLD_AFTER"] = str(HOLD_AFTER)
    args = ["build", "-i", str(images), "-m", "fake", "--batch-size", str(BATCH), "--workers", "1", "--device", "cpu"]
    return subprocess.Popen(
        [sys.executable, str(FAKE_CLI), *args, *outputs],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job in a terminal or under a launcher
    )


def _kept(work: Path, mode: str) -> dict[str, int]:
    counts = {}
    if "--npy-dir" in MODES[mode]:
        masks = sorted((work / "npy").glob("*_mask.npy"))
        assert all(np.load(m).shape == (4, 4) for m in masks)
        counts["npy"] = len(masks)
    if "--store" in MODES[mode]:
        with featstore.open(work / MODES[mode][MODES[mode].index("--store") + 1]) as store:
            counts["store"] = len(store)
            assert list(store.keys()) == [f"img{i:02d}.png" for i in range(len(store))]
    return counts


@pytest.mark.parametrize(
    ("mode", "sig"),
    [
        ("npy", signal.SIGTERM),
        ("zarr", signal.SIGTERM),
        ("h5", signal.SIGTERM),
        ("both", signal.SIGTERM),
        ("zarr", signal.SIGINT),
        ("both", signal.SIGHUP),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v,
)
def test_stop_signal_keeps_encoded_images_and_the_rerun_resumes(many_images, tmp_path, mode, sig):
    _stop_and_resume(many_images, tmp_path, mode, sig, lambda proc: proc.send_signal(sig))


@pytest.mark.parametrize(
    ("mode", "sig"), [("zarr", signal.SIGINT), ("npy", signal.SIGTERM)], ids=["ctrl-c-zarr", "sigterm-npy"]
)
def test_signal_to_the_whole_process_group_reaches_decode_workers_too(many_images, tmp_path, mode, sig):
    """Ctrl-C in a terminal, and systemd or SLURM stopping a job, signal every process of
    the group, the decode worker included: it must leave the stopping to the main process."""
    _stop_and_resume(many_images, tmp_path, mode, sig, lambda proc: os.killpg(proc.pid, sig))


def _stop_and_resume(many_images: Path, tmp_path: Path, mode: str, sig: signal.Signals, send) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = _fake_build(many_images, work, MODES[mode], hold=True)
    wait_until_held(work / "held", proc, WAIT_S)
    send(proc)
    (work / "release").touch()  # the signal is already pending: the runner sees it when the batch returns
    _, err = proc.communicate(timeout=WAIT_S)

    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert f"interrupted: {KEPT} images kept, re-run the same command to resume" in err.splitlines()[-1], err
    assert set(_kept(work, mode).values()) == {KEPT}

    again = _fake_build(many_images, work, MODES[mode], hold=False)  # the lock was released
    _, err = again.communicate(timeout=WAIT_S)
    assert again.returncode == 0, err
    assert f"encoded {IMAGES - KEPT}, skipped {KEPT}, failed 0" in err
    assert set(_kept(work, mode).values()) == {IMAGES}
