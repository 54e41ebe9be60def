"""featstore.cputhreads: a CPU build tries the model on the cores the decode workers leave
and keeps whichever ran faster; torch's thread count is back as it was after the build."""

from pathlib import Path

import pytest
import torch

from featstore import cputhreads
from featstore.cputhreads import WINDOW, ModelThreads
from featstore.pipeline import BuildOptions, build
from featstore.runner import RunResult
from tests.fake_featstore import FakeEncoder


@pytest.fixture
def four_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def _feed(threads: ModelThreads, seconds_per_batch, waiting: float = 0.5) -> list[int]:
    """Batches of 16 images, each taking seconds_per_batch(threads now), `waiting` of it
    waiting for the reader; torch's count after each."""
    run, seen = RunResult(), []
    for _ in range(1 + 3 * WINDOW):
        took = seconds_per_batch(torch.get_num_threads())
        run.encoded += 16
        run.seconds += took
        run.stages.decode_wait += waiting * took
        threads.observe(run)
        seen.append(torch.get_num_threads())
    return seen


def test_fewer_threads_are_kept_where_the_build_ran_faster_with_them(four_threads):
    threads = ModelThreads(workers=1, cpus=4)
    seen = _feed(threads, lambda n: 0.1 if n == 3 else 0.2)  # the workers starved at 4
    assert seen[:WINDOW] == [4] * WINDOW and seen[WINDOW:] == [3] * (2 * WINDOW + 1)
    assert threads.rates == pytest.approx([80.0, 160.0])
    threads.restore()
    assert torch.get_num_threads() == 4


def test_torch_threads_come_back_where_fewer_were_slower(four_threads):
    threads = ModelThreads(workers=1, cpus=4)
    seen = _feed(threads, lambda n: 0.1 if n == 4 else 0.3)  # a large model: every core counts
    assert 3 in seen and seen[-WINDOW:] == [4] * WINDOW
    assert threads.rates[0] > threads.rates[1]


def test_a_model_that_never_waits_for_the_reader_keeps_every_core(four_threads):
    threads = ModelThreads(workers=1, cpus=4)
    seen = _feed(threads, lambda n: 0.1 if n == 3 else 0.2, waiting=0.01)  # fewer would be faster: never tried
    assert set(seen) == {4} and len(threads.rates) == 1


@pytest.mark.parametrize(
    ("workers", "applies", "omp"), [(0, True, None), (1, False, None), (1, True, "4"), (4, True, None)]
)
def test_nothing_is_tried_where_it_does_not_apply(four_threads, monkeypatch, workers, applies, omp):
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    threads = ModelThreads(workers=workers, applies=applies, cpus=4 if workers < 4 else 8)  # 8 - 4: 4 threads
    assert set(_feed(threads, lambda n: 0.1)) == {4} and not threads.rates


def test_a_cpu_build_leaves_torch_threads_as_they_were(image_dir: Path, tmp_path: Path, four_threads, monkeypatch):
    monkeypatch.setattr(cputhreads, "WINDOW", 1)  # the 5 images in batches of 1: both windows run
    made = []
    monkeypatch.setattr(
        "featstore.pipeline.ModelThreads", lambda *a, **k: made.append(ModelThreads(*a, **k, cpus=4)) or made[-1]
    )
    options = BuildOptions(model="fake", size=32, device="cpu", batch_size=1, workers=1)
    result = build(image_dir, options, npy_dir=tmp_path / "out", encoder=FakeEncoder(size=32))
    assert result.encoded == 5 and len(made[0].rates) == 2
    assert torch.get_num_threads() == 4
