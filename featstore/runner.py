"""The runner: reader batches -> encoder -> writers, timing each stage.

The main thread takes a batch from the reader, encodes it and starts the copy of its
features to the host; a writer thread waits for that copy and feeds every `Writer`,
behind a bounded queue so that the model never waits for the disk unless the disk is
the bottleneck. Between batches the runner checks a `StopRequest`: once it is set it
takes no more batches, and the writers commit what was encoded.
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from featstore.batches import EncodedBatch, Failure, ImageBatch, UnitMark, Writer
from featstore.encoder import Encoded, Encoder, encode_with_embedding
from featstore.errors import OutputError
from featstore.signals import StopRequest


@dataclass(slots=True)
class StageTimes:
    """Seconds spent per stage. On CUDA, `encode` is the time to launch the work and
    `host_copy` includes waiting for the device to finish it."""

    decode_wait: float = 0.0  # main thread waiting for the reader's next batch
    encode: float = 0.0  # main thread inside encoder.encode
    host_copy: float = 0.0  # writer thread waiting for features in host memory
    write: float = 0.0  # writer thread inside the writers' write()
    write_wait: float = 0.0  # main thread waiting for room in the write queue
    commit: float = 0.0  # at the end: the last queued writes and the writers' close()

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(slots=True)
class RunResult:
    """What a run did; also the progress snapshot passed after each batch."""

    total: int = 0  # images in the unit
    encoded: int = 0  # images decoded and handed to the models (their rows committed once the run returns)
    decode_failures: int = 0  # images the reader could not use
    lanes: list[LaneResult] = field(default_factory=list)  # per model: rows encoded, its failures
    seconds: float = 0.0  # since the run started; at the end, including the commit
    stages: StageTimes = field(default_factory=StageTimes)
    finished: bool = False  # the writers are closed

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def failures(self) -> list[Failure]:
        """Every model's failures, each image once (the first model's order first)."""
        if len(self.lanes) == 1:
            return self.lanes[0].failures
        seen: dict[str, Failure] = {}
        for lane in self.lanes:
            for f in lane.failures:
                seen.setdefault(f.key, f)
        return list(seen.values())


ProgressFn = Callable[[RunResult], None]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def encode_splitting(encoder: Encoder, pixels: torch.Tensor) -> Encoded:
    """Encode a batch into (maps, embedding or None); on out-of-memory, encode its halves
    instead (down to one image)."""
    try:
        return encode_with_embedding(encoder, pixels)
    except RuntimeError as e:
        if not _is_oom(e) or len(pixels) == 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(pixels) // 2
    (fa, ea), (fb, eb) = encode_splitting(encoder, pixels[:half]), encode_splitting(encoder, pixels[half:])
    return torch.cat([fa, fb]), (None if ea is None or eb is None else torch.cat([ea, eb]))


def output_error(e: OSError) -> OutputError:
    """A one-line message for a failed write (disk full, read-only folder, ...)."""
    where = f" ({e.filename})" if e.filename else ""
    reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return OutputError(f"cannot write output{where}: {reason}; work committed before this point is kept")


def _to_host(features: torch.Tensor) -> Callable[[], np.ndarray]:
    """Start the device->host copy now; the writer thread waits for it."""
    if features.device.type != "cuda":
        arr = features.numpy()
        return lambda: arr
    host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)
    event = torch.cuda.Event()
    event.record()

    def wait() -> np.ndarray:
        event.synchronize()
        return host.numpy()

    return wait


class _WriterThread:
    """Runs one model's writers off the main thread; the queue bound caps memory."""

    def __init__(self, writers: Sequence[Writer], stages: StageTimes, lane: int = 0, depth: int = 4) -> None:
        self.writers, self.stages, self.lane = writers, stages, lane
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featstore-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is not None:
                continue
            try:
                if isinstance(job, UnitMark):  # a distributed build's unit starts or ends
                    state = job.unit[self.lane]  # this model's state of the unit (None: its store has it)
                    for w in self.writers if state is not None else ():
                        hook = getattr(w, "begin_unit" if job.start else "end_unit", None)
                        if hook is not None:
                            hook(state)
                    continue
                batch, features, embedding = job
                if features is not None:
                    t0 = time.perf_counter()
                    emb = embedding() if embedding is not None else None
                    encoded = EncodedBatch(batch.items, features(), batch.masks, batch.orig_size_hw, embedding=emb)
                    t1 = time.perf_counter()
                    for w in self.writers:
                        w.write(encoded)
                    self.stages.host_copy += t1 - t0
                    self.stages.write += time.perf_counter() - t1
                if batch.failures:
                    for w in self.writers:
                        w.record_failures(batch.failures)
            except OSError as e:
                self.error = output_error(e)
            except BaseException as e:
                self.error = e

    def put(
        self,
        batch: ImageBatch | UnitMark,
        features: Callable[[], np.ndarray] | None = None,
        embedding: Callable[[], np.ndarray] | None = None,
    ) -> None:
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.queue.put(batch if isinstance(batch, UnitMark) else (batch, features, embedding))
        self.stages.write_wait += time.perf_counter() - t0

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


@dataclass(slots=True)
class Lane:
    """One model of a run: its encoder and writers, and which images it needs.

    `needs` None: every image of the stream (a build of one model). A build of several
    gives each model the keys its outputs lack; a distributed build adds each unit's
    as it takes the unit (the keys of units are disjoint). A batch's failures go to the
    lanes that needed those images; `failures` (found before the run) to this lane."""

    encoder: Encoder
    writers: Sequence[Writer]
    needs: set[str] | None = None
    failures: Sequence[Failure] = ()


@dataclass(slots=True)
class LaneResult:
    encoded: int = 0
    failures: list[Failure] = field(default_factory=list)


def run(
    batches: Iterable[ImageBatch | UnitMark],
    encoder: Encoder,
    writers: Sequence[Writer],
    *,
    total: int = 0,
    failures: Sequence[Failure] = (),
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
) -> RunResult:
    """Encode `batches` with one model and feed every writer (see `run_lanes`)."""
    lane = Lane(encoder, writers, failures=failures)
    return run_lanes(batches, [lane], total=total, progress=progress, stop=stop)


def run_lanes(
    batches: Iterable[ImageBatch | UnitMark],
    lanes: Sequence[Lane],
    *,
    total: int = 0,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
) -> RunResult:
    """Encode `batches` (input `i` of each batch by model `i`) and feed each model's writers.

    A `UnitMark` in the stream (its `unit`: one state per lane) reaches the writers'
    `begin_unit` / `end_unit` in order with the batches (a distributed build's work
    units). Writers are closed (committing what was written) also when stopped or
    failing. `progress` gets the running result after each batch and once more after
    the commit.
    """
    result = RunResult(total=total, lanes=[LaneResult(failures=list(lane.failures)) for lane in lanes])
    stages = result.stages
    start = time.perf_counter()
    source = iter(batches)
    threads: list[_WriterThread] = []
    try:
        for i, lane in enumerate(lanes):
            threads.append(_WriterThread(lane.writers, stages, lane=i))
            for w in lane.writers:
                w.record_failures(lane.failures)
        while not (stop and stop.requested):
            t0 = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                break
            except Exception:
                if stop and stop.requested:  # the reader was stopped by the same signal
                    break
                raise
            t1 = time.perf_counter()
            stages.decode_wait += t1 - t0
            if isinstance(batch, UnitMark):
                for thread in threads:
                    thread.put(batch)
                continue
            if stop and stop.requested:  # a batch that arrived after the stop is left for the next run
                break
            result.decode_failures += len(batch.failures)
            result.encoded += len(batch.items)
            for i, (lane, thread, done) in enumerate(zip(lanes, threads, result.lanes, strict=True)):
                part = batch if len(lanes) == 1 and lane.needs is None else batch.for_model(i, lane.needs)
                done.failures.extend(part.failures)
                if part.items:
                    t2 = time.perf_counter()
                    features, embedding = encode_splitting(lane.encoder, part.pixels)
                    stages.encode += time.perf_counter() - t2
                    thread.put(part, _to_host(features), None if embedding is None else _to_host(embedding))
                    done.encoded += len(part.items)
                elif part.failures:
                    thread.put(part)
            result.seconds = time.perf_counter() - start
            if progress:
                progress(result)
    finally:
        close_source = getattr(source, "close", None)
        if close_source is not None:
            close_source()  # shuts the decode workers down now, not when garbage-collected
        t0 = time.perf_counter()
        errors: list[BaseException] = []
        for thread in threads:
            try:
                thread.finish()
            except BaseException as e:
                errors.append(e)
        try:
            for lane in lanes:
                for w in lane.writers:
                    w.close()
        finally:
            stages.commit = time.perf_counter() - t0
            result.seconds = time.perf_counter() - start
        if errors:
            raise errors[0]
    result.finished = True
    if progress:
        progress(result)
    return result
