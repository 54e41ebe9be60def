"""featstore.cputhreads: once a CPU build waits for its decode workers, the model runs on
the cores they leave; torch's count comes back only where that made the model the limit
and slower; torch's thread count is back as it was after the build."""

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


def _feed(threads: ModelThreads, seconds_per_batch, waiting=lambda n: 0.5, head_start: int = 0) -> list[int]:
    """Batches of 16 images, each taking seconds_per_batch(threads now), waiting(threads now)
    of it waiting for the reader (none for the first `head_start` batches after the first:
    the workers' prefetched ones); torch's count after each."""
    run, seen = RunResult(), []
    for i in range(2 + head_start + 3 * WINDOW):
        n = torch.get_num_threads()
        took = seconds_per_batch(n)
        run.encoded += 16
        run.seconds += took
        run.stages.decode_wait += 0.0 if 0 < i <= head_start else waiting(n) * took
        threads.observe(run)
        seen.append(torch.get_num_threads())
    return seen


def test_fewer_threads_are_kept_where_the_reader_is_the_limit_with_them_too(four_threads):
    threads = ModelThreads(workers=1, cpus=4)
    seen = _feed(threads, lambda n: 0.1 if n == 3 else 0.2, head_start=3)  # the workers starved at 4
    # the first batch and the head start say nothing; the second batch in a row that waited switches
    assert seen[:5] == [4] * 5 and seen[5:] == [3] * (len(seen) - 5)
    assert threads.rates == pytest.approx([160.0]) and threads.waiting == pytest.approx([0.5])
    threads.restore()
    assert torch.get_num_threads() == 4


def test_fewer_threads_stay_even_where_they_measured_slower_while_the_reader_is_the_limit(four_threads):
    """Rates of short windows are noise on a busy machine; waiting is measured within each."""
    threads = ModelThreads(workers=1, cpus=4)
    seen = _feed(threads, lambda n: 0.1 if n == 4 else 0.2)
    assert seen[-1] == 3 and len(threads.rates) == 1


def test_torch_threads_come_back_where_fewer_made_the_model_the_limit_and_slower(four_threads):
    threads = ModelThreads(workers=1, cpus=4)
    seen = _feed(threads, lambda n: 0.1 if n == 4 else 0.3, waiting=lambda n: 0.2 if n == 4 else 0.0)
    assert seen[2 : 2 + WINDOW] == [3] * WINDOW and seen[-WINDOW:] == [4] * WINDOW
    assert threads.waiting[0] == 0.0 and threads.rates[0] < threads.rates[1]


def test_fewer_threads_are_kept_where_the_model_became_the_limit_but_the_build_ran_faster(four_threads):
    threads = ModelThreads(workers=1, cpus=4)
    seen = _feed(threads, lambda n: 0.2 if n == 4 else 0.1, waiting=lambda n: 0.2 if n == 4 else 0.0)
    assert seen[2 + WINDOW : 2 + 2 * WINDOW] == [4] * WINDOW and seen[-1] == 3
    assert threads.rates[0] > threads.rates[1]


def test_a_model_that_never_waits_for_the_reader_keeps_every_core(four_threads):
    threads = ModelThreads(workers=1, cpus=4)
    seen = _feed(
        threads, lambda n: 0.1 if n == 3 else 0.2, waiting=lambda n: 0.01
    )  # fewer would be faster: never tried
    assert set(seen) == {4} and not threads.rates


@pytest.mark.parametrize(
    ("workers", "applies", "omp"), [(0, True, None), (1, False, None), (1, True, "4"), (4, True, None)]
)
def test_nothing_is_tried_where_it_does_not_apply(four_threads, monkeypatch, workers, applies, omp):
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    threads = ModelThreads(workers=workers, applies=applies, cpus=4 if workers < 4 else 8)  # 8 - 4: 4 threads
    assert set(_feed(threads, lambda n: 0.1)) == {4} and not threads.rates


def test_a_cpu_build_runs_on_fewer_threads_once_it_waited_then_leaves_torch_threads_as_they_were(
    image_dir: Path, tmp_path: Path, four_threads, monkeypatch
):
    monkeypatch.setattr(cputhreads, "WINDOW", 1)  # the 5 images in batches of 1
    monkeypatch.setattr(cputhreads, "WAITING", -1.0)  # every batch counts as having waited for the reader
    made = []
    monkeypatch.setattr(
        "featstore.pipeline.ModelThreads", lambda *a, **k: made.append(ModelThreads(*a, **k, cpus=4)) or made[-1]
    )
    during = []
    encoder = FakeEncoder(size=32)
    inner = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda pixels: during.append(torch.get_num_threads()) or inner(pixels))
    options = BuildOptions(model="fake", size=32, device="cpu", batch_size=1, workers=1)
    result = build(image_dir, options, npy_dir=tmp_path / "out", encoder=encoder)
    assert result.encoded == 5 and len(made[0].rates) == 1
    assert during == [4, 4, 4, 3, 3]  # switched after the third (the first one includes the start)
    assert torch.get_num_threads() == 4


def test_one_batch_that_waited_alone_changes_nothing(four_threads):
    """A slow file or a busy disk for one batch is not a reader that cannot keep up."""
    threads = ModelThreads(workers=1, cpus=4)
    run, seen = RunResult(), []
    for i in range(4 * WINDOW):
        run.encoded += 16
        run.seconds += 0.1
        run.stages.decode_wait += 0.05 if i % 2 else 0.0  # every other batch waited
        threads.observe(run)
        seen.append(torch.get_num_threads())
    assert set(seen) == {4} and not threads.rates
