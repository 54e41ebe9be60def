"""Distributed builds through the real CLI: torchrun, simulated SLURM, `--shard I/N`,
a process killed mid-run, a straggler, incremental runs; local and on the S3 server.

Every build runs the deterministic fake encoder (tests/fake_featstore.py) on a folder
that cuts into several units of small shards (FAKE_SHARD_ROWS, --unit-images), with
two bad images in different units. A distributed store must equal the store of a
single-process build of the same folder: keys in order, rows, sources, sizes, the
failures (once each) and the attributes apart from timing. Nothing waits on time: a
process is stopped at a known point by holding its encoder (FAKE_HOLD_AFTER), and
waits poll for a state of the store with a generous deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import featstore
from featstore.errors import ConfigError
from featstore.launch import Share, detect_share, parse_shard, workers_for
from tests.conftest import make_rgba

FAKE_CLI = str(Path(__file__).with_name("fake_featstore.py"))
IMAGES = 40
SHARD_ROWS, UNIT_IMAGES = 4, 8  # units of 2 shards: 6 units for 42 files
WAIT_S = 600  # generous: only a build that never gets going would use it up
TIMING_ATTRS = {"created", "plan"}
ENCODED = re.compile(r"encoded (\d+), skipped (\d+), failed (\d+)")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i in range(IMAGES):
        sub = "sub/" if i % 5 == 0 else ""
        Image.fromarray(make_rgba(32, 32, i)).save(d / f"{sub}img{i:02d}.png")
    (d / "img05_bad.png").write_bytes(b"not an image")  # in the first units
    (d / "sub" / "zz_bad.png").write_bytes(b"not an image either")  # in the last unit
    return d


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(HF_HUB_OFFLINE="1", FAKE_SHARD_ROWS=str(SHARD_ROWS), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


_LAUNCHER_VARS = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_NTASKS_PER_NODE",
}  # fmt: skip


def _build_args(images: Path, *outputs: str) -> list[str]:
    return [
        "build", "-i", str(images), "-m", "fake", "--batch-size", "2", "--workers", "0", "--device", "cpu",
        "--unit-images", str(UNIT_IMAGES), *outputs,
    ]  # fmt: skip


def _start(args: list[str], cwd: Path, env: dict[str, str], launcher: list[str] | None = None) -> subprocess.Popen[str]:
    cmd = [*(launcher or [sys.executable]), FAKE_CLI, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen[str]) -> str:
    _, err = p.communicate(timeout=WAIT_S)
    assert p.returncode == 0, err
    return err


def _run(args: list[str], cwd: Path, env: dict[str, str], launcher: list[str] | None = None) -> str:
    return _finish(_start(args, cwd, env, launcher))


def _encoded(stderr: str) -> int:
    """Images encoded, summed over the summaries of every process in `stderr`."""
    return sum(int(m.group(1)) for m in ENCODED.finditer(stderr))


def _single(images: Path, tmp_path: Path, store: str = "single.zarr") -> Path:
    _run(_build_args(images, "--store", store), tmp_path, _env())
    return tmp_path / store


def _rank_env(rank: int, world: int, **extra: str) -> dict[str, str]:
    """The variables torchrun sets, without torchrun (so that a test can hold or kill one process)."""
    return _env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), **extra)


def assert_same_store(got_path: Any, want_path: Any, storage_options: dict[str, Any] | None = None) -> None:
    with featstore.open(got_path, storage_options=storage_options) as got, featstore.open(want_path) as want:
        assert got.keys() == want.keys()
        assert len(set(got.keys())) == len(got)
        assert got.sources() == want.sources()
        assert sorted((f.key, f.reason) for f in got.failed) == sorted((f.key, f.reason) for f in want.failed)
        assert len({f.key for f in got.failed}) == len(got.failed)
        n = len(want)
        a, b = got.get_batch(list(range(n))), want.get_batch(list(range(n)))
        assert np.array_equal(a.features, b.features)
        assert np.array_equal(a.masks, b.masks)
        assert np.array_equal(a.orig_size_hw, b.orig_size_hw)
        ga = {k: v for k, v in got.attrs.items() if k not in TIMING_ATTRS}
        wa = {k: v for k, v in want.attrs.items() if k not in TIMING_ATTRS}
        ga["failed"] = sorted(map(str, ga["failed"]))
        wa["failed"] = sorted(map(str, wa["failed"]))
        assert ga == wa


def _units(store: Path) -> int:
    return len(list((store / "units" / "c").glob("*"))) if (store / "units" / "c").exists() else 0


def _wait_for(what: str, condition: Any, procs: list[subprocess.Popen[str]] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + WAIT_S
    while not condition():
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"a process ended ({p.returncode}) while waiting for {what}: {p.stderr.read()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------- launcher variables


def test_share_from_torchrun_slurm_and_shard() -> None:
    torchrun = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert detect_share(env=torchrun) == Share(5, 16, 1, 4, "torchrun")
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_TASKS_PER_NODE": "8(x2)"}  # fmt: skip
    assert detect_share(env=slurm) == Share(9, 16, 1, 8, "slurm")
    batch_shell = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}  # sbatch's own shell: no job step
    assert detect_share(env=batch_shell) == Share()
    assert detect_share(env={"RANK": "0", "WORLD_SIZE": "1"}) == Share()
    assert detect_share("2/3", env=torchrun) == Share(2, 3, 0, 1, "shard", steal=False)  # --shard wins
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ConfigError, match="rank 4 of 4"):
        detect_share(env={"RANK": "4", "WORLD_SIZE": "4"})
    assert workers_for(Share(0, 8, 0, 8, "torchrun"), on_cuda=False) == 1


# ---------------------------------------------------------------- equal to a single build


def test_torchrun_two_processes_equal_a_single_build(images: Path, tmp_path: Path) -> None:
    want = _single(images, tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    err = _run(_build_args(images, "--store", "dist.zarr"), tmp_path, _env(), launcher=torchrun)
    assert "process 1 of 2 (torchrun)" in err and "process 2 of 2 (torchrun)" in err, err
    assert _encoded(err) == IMAGES  # each image once, across the processes
    assert "the store is complete" in err
    assert_same_store(tmp_path / "dist.zarr", want)
    again = _run(_build_args(images, "--store", "dist.zarr"), tmp_path, _env(), launcher=torchrun)
    assert _encoded(again) == 0, again


def test_torchrun_into_s3_equals_a_single_build(images: Path, tmp_path: Path, s3_server: Any) -> None:
    want = _single(images, tmp_path)
    url = s3_server.url("dist.zarr")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    err = _run(_build_args(images, "--store", url), tmp_path, _env(**s3_server.env()), launcher=torchrun)
    assert _encoded(err) == IMAGES and "the store is complete" in err, err
    assert_same_store(url, want, storage_options=s3_server.options)


def test_shards_one_after_another_and_at_once_equal_a_single_build(images: Path, tmp_path: Path) -> None:
    want = _single(images, tmp_path)
    total = 0
    for i in range(3):
        err = _run(_build_args(images, "--store", "seq.zarr", "--shard", f"{i}/3"), tmp_path, _env())
        total += _encoded(err)
        assert ("the store is complete" in err) == (i == 2), err  # the last one finalizes
    assert total == IMAGES
    assert_same_store(tmp_path / "seq.zarr", want)

    procs = [
        _start(_build_args(images, "--store", "par.zarr", "--shard", f"{i}/3"), tmp_path, _env()) for i in range(3)
    ]
    errs = [_finish(p) for p in procs]
    assert sum(_encoded(e) for e in errs) == IMAGES
    assert all("took 2 units (0 from others)" in e for e in errs), errs  # exactly its part
    fin = subprocess.run([sys.executable, FAKE_CLI, "finalize", "par.zarr"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True)  # fmt: skip
    assert fin.returncode == 0 and "complete (6 units)" in fin.stdout, fin.stdout + fin.stderr
    assert_same_store(tmp_path / "par.zarr", want)


def test_simulated_slurm_equals_a_single_build(images: Path, tmp_path: Path) -> None:
    want = _single(images, tmp_path)
    procs = []
    for rank in range(3):
        env = _env(SLURM_PROCID=str(rank), SLURM_NTASKS="3", SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                   SLURM_NTASKS_PER_NODE="3", SLURM_JOB_ID="42")  # fmt: skip
        procs.append(_start(_build_args(images, "--store", "slurm.zarr", "--npy-dir", "npy"), tmp_path, env))
    errs = [_finish(p) for p in procs]
    assert all(f"process {r + 1} of 3 (slurm)" in e for r, e in enumerate(errs)), errs
    assert sum(_encoded(e) for e in errs) == IMAGES
    assert_same_store(tmp_path / "slurm.zarr", want)
    npy = sorted(p.relative_to(tmp_path / "npy").as_posix() for p in (tmp_path / "npy").rglob("*.npy"))
    assert len(npy) == 2 * IMAGES  # features and mask per image, each written by one process
    failure_logs = sorted(p.name for p in (tmp_path / "npy").glob("featstore_failures*.jsonl"))
    assert failure_logs and all(re.fullmatch(r"featstore_failures\.\d-of-3\.jsonl", n) for n in failure_logs)


def test_npy_only_processes_split_the_listing(images: Path, tmp_path: Path) -> None:
    _run(_build_args(images, "--npy-dir", "single"), tmp_path, _env())
    errs = [_run(_build_args(images, "--npy-dir", "dist", "--shard", f"{i}/2"), tmp_path, _env()) for i in range(2)]
    assert sum(_encoded(e) for e in errs) == IMAGES
    single = {p.relative_to(tmp_path / "single"): p.read_bytes() for p in (tmp_path / "single").rglob("*.npy")}
    dist = {p.relative_to(tmp_path / "dist"): p.read_bytes() for p in (tmp_path / "dist").rglob("*.npy")}
    assert single == dist and len(single) == 2 * IMAGES


# ---------------------------------------------------------------- failures of processes


def test_killed_process_then_rerun_with_another_count_equals_a_single_build(images: Path, tmp_path: Path) -> None:
    """--shard 0/2 is SIGKILLed while it holds a batch; 1/2 does its part; three processes
    then finish exactly what is missing (nothing committed is encoded again)."""
    want = _single(images, tmp_path)
    hold = tmp_path / "hold"
    hold.mkdir()
    victim = _start(_build_args(images, "--store", "k.zarr", "--shard", "0/2"), tmp_path,
                    _env(FAKE_HOLD_AFTER="5", FAKE_HOLD_DIR=str(hold)))  # fmt: skip
    _wait_for("the held batch", lambda: (hold / "held").exists(), [victim])
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=WAIT_S)
    other = _run(_build_args(images, "--store", "k.zarr", "--shard", "1/2"), tmp_path, _env())
    assert re.search(r"took 3 units \(0 from others\); [3-5] of 6 units finished", other), other
    with featstore.open(tmp_path / "k.zarr") as s:
        committed = len(s)
    assert 0 < committed < IMAGES  # the victim committed some of its part, not all
    procs = [_start(_build_args(images, "--store", "k.zarr"), tmp_path, _rank_env(r, 3)) for r in range(3)]
    errs = [_finish(p) for p in procs]
    assert sum(_encoded(e) for e in errs) == IMAGES - committed
    assert_same_store(tmp_path / "k.zarr", want)


def test_a_straggler_does_not_hold_the_others(images: Path, tmp_path: Path) -> None:
    """Process 2 of 2 holds its first batch until released: process 1 does every other
    unit, its own and the straggler's, while the straggler is stuck on its first (and
    holds the one it took ahead, see `Scheduler.stream`)."""
    want = _single(images, tmp_path)
    hold = tmp_path / "hold"
    hold.mkdir()
    slow = _start(_build_args(images, "--store", "s.zarr"), tmp_path,
                  _rank_env(1, 2, FAKE_HOLD_AFTER="0", FAKE_HOLD_DIR=str(hold)))  # fmt: skip
    _wait_for("the straggler's first batch", lambda: (hold / "held").exists(), [slow])
    fast = _start(_build_args(images, "--store", "s.zarr"), tmp_path, _rank_env(0, 2))
    _wait_for("every unit but the straggler's two", lambda: _units(tmp_path / "s.zarr") == 4, [fast, slow])
    (hold / "release").touch()
    fast_err, slow_err = _finish(fast), _finish(slow)
    assert "took 4 units (1 from others)" in fast_err, fast_err
    assert "took 2 units (0 from others)" in slow_err, slow_err
    assert_same_store(tmp_path / "s.zarr", want)


# ---------------------------------------------------------------- runs after the first


def test_incremental_run_encodes_only_new_images(images: Path, tmp_path: Path) -> None:
    def add_images() -> None:
        for i in range(IMAGES, IMAGES + 7):
            Image.fromarray(make_rgba(32, 32, i)).save(images / f"new{i:02d}.png")

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run(_build_args(images, "--store", "dist.zarr"), tmp_path, _env(), launcher=torchrun)
    _single(images, tmp_path)
    add_images()
    err = _run(_build_args(images, "--store", "dist.zarr"), tmp_path, _env(), launcher=torchrun)
    assert _encoded(err) == 7, err
    _single(images, tmp_path)  # the single-process store, built the same way: old rows, then the new
    assert_same_store(tmp_path / "dist.zarr", tmp_path / "single.zarr")


def test_one_plain_process_resumes_a_distributed_build_then_appends(images: Path, tmp_path: Path) -> None:
    """A plain `featstore build` finishes an unfinished distributed build unit by unit (the
    same order as a single build); once the plan is finalized, it appends as always and
    closes the plan, and a distributed run after it plans anew: nothing is stored twice."""
    want = _single(images, tmp_path)
    first = _encoded(_run(_build_args(images, "--store", "mix.zarr", "--shard", "0/2"), tmp_path, _env()))
    err = _run(_build_args(images, "--store", "mix.zarr"), tmp_path, _env())
    assert "one process, resuming a distributed build" in err and "the store is complete" in err, err
    assert 0 < first < IMAGES and _encoded(err) == IMAGES - first, err
    assert_same_store(tmp_path / "mix.zarr", want)

    for i in range(IMAGES, IMAGES + 7):
        Image.fromarray(make_rgba(32, 32, i)).save(images / f"new{i:02d}.png")
    plain = _run(_build_args(images, "--store", "mix.zarr"), tmp_path, _env())
    assert _encoded(plain) == 7 and "process" not in plain, plain  # the single-process writer
    again = _run(_build_args(images, "--store", "mix.zarr", "--shard", "1/2"), tmp_path, _env())
    assert _encoded(again) == 0, again  # a new plan of what is missing: the two bad images
    _single(images, tmp_path)
    assert_same_store(tmp_path / "mix.zarr", tmp_path / "single.zarr")


def test_refused_with_several_processes(images: Path, tmp_path: Path) -> None:
    for outputs, message in (
        (["--store", "x.h5"], "HDF5 store is one local file"),
        (["--store", "x.zarr", "--overwrite"], "--overwrite in a distributed build (process 1 of 2"),
    ):
        p = subprocess.run([sys.executable, FAKE_CLI, *_build_args(images, *outputs, "--shard", "0/2")],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
