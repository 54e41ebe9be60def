"""Decode workers keep freed memory (featstore.heap): the next image's buffers reuse it
instead of faulting fresh pages in. Counted in page faults, not timed."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from featstore import reader
from featstore.images import discover
from featstore.reader import ImageReader

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_FAULTS = """
import resource, sys
from featstore.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bytes(4 << 20)
before = faults()
for _ in range(50):  # an image's worth of buffers, made and freed, 50 times
    a = bytearray(4 << 20)
    b = bytes(a)
    del a, b
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc thresholds")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    kept, default = _faults("keep"), _faults("default")
    # glibc's defaults map and unmap every 4 MiB buffer: 2 x 1,024 pages each time, 50 times
    assert default > 50_000
    assert kept < default / 10


def test_every_decode_worker_keeps_freed_memory(image_dir: Path, tmp_path: Path, monkeypatch):
    """Workers are forked: a stand-in set in this process runs in each of them."""
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setattr(reader, "keep_freed_memory", lambda: (marks / str(os.getpid())).touch())
    batches = list(ImageReader(size=32, grid=4, batch_size=2, workers=2).batches(discover(image_dir)))
    assert sum(len(b.items) for b in batches) == 5
    pids = {int(p.name) for p in marks.iterdir()}
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_build_keeps_freed_memory_in_its_own_process(image_dir: Path, tmp_path: Path, monkeypatch):
    from featstore import pipeline
    from tests.fake_featstore import FakeEncoder

    calls = []
    monkeypatch.setattr(pipeline, "keep_freed_memory", lambda: calls.append(os.getpid()))
    options = pipeline.BuildOptions(model="fake", size=32, device="cpu", batch_size=2, workers=0)
    result = pipeline.build(image_dir, options, npy_dir=tmp_path / "out", encoder=FakeEncoder(size=32))
    assert result.encoded == 5 and calls == [os.getpid()]
