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
    encoded: int = 0  # images handed to the writers (committed once the run returns)
    decode_failures: int = 0  # images the reader could not use
    failures: list[Failure] = field(default_factory=list)  # with those given to `run`
    seconds: float = 0.0  # since the run started; at the end, including the commit
    stages: StageTimes = field(default_factory=StageTimes)
    finished: bool = False  # the writers are closed

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


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
    """Runs the writers off the main thread; the queue bound caps memory."""

    def __init__(self, writers: Sequence[Writer], stages: StageTimes, depth: int = 4) -> None:
        self.writers = writers
        self.stages = stages
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
                    for w in self.writers:
                        hook = getattr(w, "begin_unit" if job.start else "end_unit", None)
                        if hook is not None:
                            hook(job.unit)
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
    """Encode `batches` and feed every writer; `failures` (found before the run) are recorded too.

    A `UnitMark` in the stream reaches the writers' `begin_unit` / `end_unit` in order
    with the batches (a distributed build's work units). Writers are closed (committing
    what was written) also when stopped or failing.
    `progress` gets the running result after each batch and once more after the commit.
    """
    result = RunResult(total=total, failures=list(failures))
    stages = result.stages
    start = time.perf_counter()
    source = iter(batches)
    thread = _WriterThread(writers, stages)
    for w in writers:
        w.record_failures(result.failures)
    try:
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
                thread.put(batch)
                continue
            if stop and stop.requested:  # a batch that arrived after the stop is left for the next run
                break
            result.failures.extend(batch.failures)
            result.decode_failures += len(batch.failures)
            if batch.items:
                features, embedding = encode_splitting(encoder, batch.pixels)
                stages.encode += time.perf_counter() - t1
                thread.put(batch, _to_host(features), None if embedding is None else _to_host(embedding))
                result.encoded += len(batch.items)
            elif batch.failures:
                thread.put(batch)
            result.seconds = time.perf_counter() - start
            if progress:
                progress(result)
    finally:
        close_source = getattr(source, "close", None)
        if close_source is not None:
            close_source()  # shuts the decode workers down now, not when garbage-collected
        t0 = time.perf_counter()
        try:
            thread.finish()
        finally:
            for w in writers:
                w.close()
            stages.commit = time.perf_counter() - t0
            result.seconds = time.perf_counter() - start
    result.finished = True
    if progress:
        progress(result)
    return result
