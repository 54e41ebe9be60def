"""The reader and the runner alone, and `build` through the encoder seam (the fake encoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featstore
from featstore.batches import EncodedBatch, Failure
from featstore.errors import BuildInterrupted, ConfigError
from featstore.images import discover
from featstore.pipeline import BuildOptions, build
from featstore.reader import ImageReader
from featstore.runner import RunResult, run
from featstore.signals import StopRequest
from tests.conftest import make_rgba
from tests.fake_featstore import FakeEncoder


class RecordingWriter:
    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[EncodedBatch] = []
        self.failures: list[Failure] = []
        self.closed = False
        self.fail_on = fail_on

    def pending(self, keys):
        return set(keys)

    def write(self, batch: EncodedBatch) -> None:
        if len(self.batches) == self.fail_on:
            raise RuntimeError("writer broke")
        self.batches.append(batch)

    def record_failures(self, failures) -> None:
        self.failures.extend(failures)  # called as failures are found

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(7):
        Image.fromarray(make_rgba(32, 32, i)).save(d / f"{i}.png")
    (d / "bad.png").write_text("not an image")
    return d


def _reader(batch_size: int = 2, workers: int = 0) -> ImageReader:
    return ImageReader(size=32, grid=4, batch_size=batch_size, workers=workers)


def test_reader_reads_any_slice_of_the_sorted_list_in_order(folder):
    items = discover(folder)
    whole = [b for b in _reader(workers=1).batches(items)]
    unit = [b for b in _reader(batch_size=3).batches(items[2:6])]
    assert [it.key for b in whole for it in b.items] == [it.key for it in items if it.key != "bad.png"]
    assert [f.key for b in whole for f in b.failures] == ["bad.png"]
    assert [it.key for b in unit for it in b.items] == [it.key for it in items[2:6]]
    by_key = {it.key: (b.pixels[i], b.masks[i]) for b in whole for i, it in enumerate(b.items)}
    for b in unit:
        for i, it in enumerate(b.items):
            assert torch.equal(b.pixels[i], by_key[it.key][0]) and (b.masks[i] == by_key[it.key][1]).all()


def test_a_started_reader_gives_the_same_batches_and_can_be_dropped(folder):
    items = discover(folder)
    reader = _reader(workers=1)
    started = reader.start(items)  # the decode worker runs from here on
    got = [(tuple(it.key for it in b.items), b.pixels.clone(), [f.key for f in b.failures]) for b in started]
    want = [(tuple(it.key for it in b.items), b.pixels, [f.key for f in b.failures]) for b in reader.batches(items)]
    assert [g[0] for g in got] == [w[0] for w in want] and [g[2] for g in got] == [w[2] for w in want]
    assert all(torch.equal(g[1], w[1]) for g, w in zip(got, want, strict=True))
    dropped = reader.start(items)
    next(dropped)
    dropped.close()  # type: ignore[attr-defined]  # a stopped build: the worker is shut down now
    assert list(reader.start([])) == []


def test_runner_feeds_writers_in_order_and_times_each_stage(folder):
    items = discover(folder)
    writer, seen = RecordingWriter(), []
    enc = FakeEncoder()
    given = [Failure("x.png", "refused before the run")]
    result = run(
        _reader().batches(items),
        enc,
        [writer],
        total=len(items),
        failures=given,
        progress=lambda r: seen.append((r.encoded, r.finished, r.images_per_second)),
    )
    assert result.encoded == 7 and result.decode_failures == 1 and result.finished
    assert [it.key for b in writer.batches for it in b.items] == [it.key for it in items if it.key != "bad.png"]
    assert [f.key for f in writer.failures] == ["x.png", "bad.png"] and writer.closed
    first = next(iter(_reader().batches(items)))
    assert writer.batches[0].features.shape == (2, 6, 4, 4) and writer.batches[0].features.dtype == np.float32
    np.testing.assert_array_equal(writer.batches[0].features, FakeEncoder().encode(first.pixels).numpy())
    assert len(seen) == 4 + 1 and seen[-1][:2] == (7, True)  # one per batch, then one after the commit
    assert seen[-1][2] == result.images_per_second  # the progress bar's last rate is the summary's
    stages = result.stages.as_dict()
    assert set(stages) == {"decode_wait", "encode", "host_copy", "write", "write_wait", "commit"}
    assert all(v >= 0 for v in stages.values()) and stages["encode"] > 0
    main_thread = stages["decode_wait"] + stages["encode"] + stages["write_wait"] + stages["commit"]
    assert main_thread <= result.seconds + 1e-9  # disjoint intervals of the run


def test_stop_request_ends_the_run_after_the_current_batch(folder):
    stop, writer = StopRequest(), RecordingWriter()

    def stop_after_first(r: RunResult) -> None:
        if r.encoded:
            stop.request()

    result = run(_reader().batches(discover(folder)), FakeEncoder(), [writer], progress=stop_after_first, stop=stop)
    assert result.encoded == 2 and [len(b) for b in writer.batches] == [2] and writer.closed


def test_writer_error_propagates_and_writers_are_closed(folder):
    writer = RecordingWriter(fail_on=1)
    with pytest.raises(RuntimeError, match="writer broke"):
        run(_reader().batches(discover(folder)), FakeEncoder(), [writer])
    assert writer.closed and len(writer.batches) == 1


def test_build_through_the_encoder_seam(folder, tmp_path):
    seen: list[RunResult] = []

    class Bar:
        def __init__(self, total: int) -> None:
            assert total == 8  # the undecodable image is found by the reader

        def __enter__(self):
            return seen.append

        def __exit__(self, *exc):
            return None

    result = build(
        folder,
        BuildOptions(model="fake", workers=0, batch_size=3),
        store=tmp_path / "s.zarr",
        npy_dir=tmp_path / "npy",
        encoder=FakeEncoder(),
        progress_factory=Bar,
    )
    assert (result.encoded, result.failed, result.skipped) == (7, 1, 0)
    assert seen[-1].finished and seen[-1].images_per_second == result.images_per_second
    assert result.startup_seconds >= 0 and "start-up" in result.summary()
    with featstore.open(tmp_path / "s.zarr") as store:
        assert len(store) == 7 and store.info.feature_type == "fake_patch_means"
        np.testing.assert_array_equal(store["3.png"].features, np.load(tmp_path / "npy" / "3.npy"))
    again = build(folder, BuildOptions(model="fake", workers=0), store=tmp_path / "s.zarr", encoder=FakeEncoder())
    assert (again.encoded, again.skipped) == (0, 7)


def test_build_refuses_a_size_the_encoder_does_not_make(folder, tmp_path):
    with pytest.raises(ConfigError, match="--size 64 disagrees"):
        build(folder, BuildOptions(model="fake", size=64), npy_dir=tmp_path / "o", encoder=FakeEncoder())
    assert not (tmp_path / "o").exists()


def test_empty_input_creates_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=r"no images found under .*empty \(looked for .*\.png"):
        build(tmp_path / "empty", BuildOptions(model="fake"), store=tmp_path / "s.zarr", encoder=FakeEncoder())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_build_interrupted_from_the_library(folder, tmp_path):
    class StopsAtOnce(FakeEncoder):
        def encode(self, pixels):
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # handled by build: recorded, then acted on between batches
            return super().encode(pixels)

    with pytest.raises(BuildInterrupted) as e:
        build(
            folder, BuildOptions(model="fake", workers=0, batch_size=2), npy_dir=tmp_path / "o", encoder=StopsAtOnce()
        )
    assert e.value.exit_code == 143 and e.value.kept == 2 and "interrupted: 2 images kept" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "o").glob("*_mask.npy")) == ["0_mask.npy", "1_mask.npy"]


def test_out_of_memory_in_a_build_splits_batches_and_completes(folder, tmp_path):
    class SmallGpu(FakeEncoder):
        """Runs out of memory on batches over 2 images, as a model on a small GPU would."""

        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def encode(self, pixels):
            if len(pixels) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            self.sizes.append(len(pixels))
            return super().encode(pixels)

    enc = SmallGpu()
    result = build(folder, BuildOptions(model="fake", workers=0, batch_size=5), npy_dir=tmp_path / "o", encoder=enc)
    assert (result.encoded, result.failed) == (7, 1) and max(enc.sizes) == 2 and sum(enc.sizes) == 7
    build(folder, BuildOptions(model="fake", workers=0, batch_size=1), npy_dir=tmp_path / "one", encoder=FakeEncoder())
    for f in sorted((tmp_path / "one").glob("*.npy")):
        np.testing.assert_array_equal(np.load(f), np.load(tmp_path / "o" / f.name))


def test_a_signal_before_the_outputs_open_stops_with_nothing_created(folder, tmp_path):
    import os
    import signal

    class SignalledWhileLoading(FakeEncoder):
        @property
        def info(self):  # read by build right after the model would have loaded
            os.kill(os.getpid(), signal.SIGHUP)
            return self._info

        @info.setter
        def info(self, value):
            self._info = value

    with pytest.raises(BuildInterrupted) as e:
        build(folder, BuildOptions(model="fake"), store=tmp_path / "s.zarr", encoder=SignalledWhileLoading())
    assert e.value.exit_code == 129 and e.value.kept == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
