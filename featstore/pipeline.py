"""`build`: reader -> encoder -> writers, the short loop that joins them.

- reader: a torch DataLoader whose worker processes decode and preprocess images
  (`featstore.images`) into uint8 batches;
- encoder: whole batches on the device (`featstore.encoder`); a CUDA out-of-memory
  batch is split in halves and retried;
- writers: one or more `Writer`s (per-image .npy files, a store) fed by a background
  thread through a bounded queue, so that the model never waits for the disk.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featstore.batches import EncodedBatch, EncodingInfo, Failure, ImageBatch, ImageItem, Sample, Writer
from featstore.encoder import Encoded, Encoder, PatchEncoder, encode_with_embedding
from featstore.errors import ConfigError, OutputError
from featstore.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PREPROCESS,
    Preprocess,
    discover,
    load_sample,
    output_collisions,
    unusable_names,
)
from featstore.loading import LoadedModel, check_preset_options, load_model
from featstore.npy import NpyWriter

ProgressFn = Callable[[int, int], None]  # (images done in this step, failures in this step)


# ---------------------------------------------------------------- options and result


@dataclass(frozen=True, slots=True)
class BuildOptions:
    model: str | None = None  # optional with a preset (then it replaces only the weights)
    size: int | None = None
    device: str = "auto"
    precision: str | None = None  # fp32 | fp16 | bf16; None: fp16 on CUDA, fp32 on CPU
    batch_size: int | None = None
    workers: int | None = None
    clip_output: str = "raw"
    overwrite: bool = False
    recursive: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    compile: bool = False  # torch.compile the model (CUDA: worth it for long runs)
    layers: tuple[int, ...] | None = None  # hidden_states indices; None: the family's standard output
    norm: str | None = None  # model | none | plain; None: what the family's standard output applies
    preset: str | None = None  # a preset registry entry (trellis, trellis2)
    embedding: bool | None = None  # pooled embedding beside the maps; None: on when the model has one


@dataclass(slots=True)
class BuildResult:
    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    info: EncodingInfo | None = None

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"encoded {self.encoded}, skipped {self.skipped}, failed {self.failed} "
            f"in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def default_precision(device: torch.device) -> str:
    return "fp16" if device.type == "cuda" else "fp32"


def default_batch_size(device: torch.device, hidden_dim: int) -> int:
    if device.type == "cpu":
        return 16
    return 256 if hidden_dim <= 768 else 128


def default_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return 1  # the model needs the cores; decode at CPU model speed is cheap
    return max(1, min(cpus - 1, 16))


# ---------------------------------------------------------------- reader


class _ImageDataset(Dataset[Sample]):
    def __init__(
        self, items: Sequence[ImageItem], size: int, grid: int, max_pixels: int, preprocess: Preprocess
    ) -> None:
        self.items, self.size, self.grid, self.max_pixels = list(items), size, grid, max_pixels
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        return load_sample(
            self.items[i], size=self.size, grid=self.grid, max_pixels=self.max_pixels, preprocess=self.preprocess
        )


def _collate(samples: list[Sample]) -> ImageBatch:
    ok = [s for s in samples if s.error is None]
    failures = [Failure(s.item.key, s.error) for s in samples if s.error is not None]
    if not ok:
        return ImageBatch([], None, np.zeros((0,)), np.zeros((0, 2), np.int32), failures)
    pixels = torch.from_numpy(np.stack([s.pixels for s in ok]))  # type: ignore[misc]
    masks = np.stack([s.mask for s in ok])  # type: ignore[misc]
    hw = np.array([s.orig_size_hw for s in ok], dtype=np.int32)
    return ImageBatch([s.item for s in ok], pixels, masks, hw, failures)


def image_batches(
    items: Sequence[ImageItem],
    *,
    size: int,
    grid: int,
    batch_size: int,
    workers: int,
    pin: bool,
    max_pixels: int,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
) -> Iterator[ImageBatch]:
    loader = DataLoader(
        _ImageDataset(items, size, grid, max_pixels, preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    yield from loader


# ---------------------------------------------------------------- encoder with OOM split


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def encode_splitting(encoder: Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """Encode a batch; on out-of-memory, encode its halves instead (down to one image)."""
    return encode_splitting_with_embedding(encoder, pixels)[0]


def encode_splitting_with_embedding(encoder: Encoder, pixels: torch.Tensor) -> Encoded:
    """`encode_splitting` giving (features, embedding or None)."""
    try:
        return encode_with_embedding(encoder, pixels)
    except RuntimeError as e:
        if not _is_oom(e) or len(pixels) == 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(pixels) // 2
    (fa, ea), (fb, eb) = (
        encode_splitting_with_embedding(encoder, pixels[:half]),
        encode_splitting_with_embedding(encoder, pixels[half:]),
    )
    return torch.cat([fa, fb]), (None if ea is None or eb is None else torch.cat([ea, eb]))


# ---------------------------------------------------------------- writer thread


class _WriterThread:
    """Runs the writers off the main thread; the queue bound caps memory."""

    def __init__(self, writers: Sequence[Writer], depth: int = 4) -> None:
        self.writers = writers
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
                batch: EncodedBatch = job() if callable(job) else job
                for w in self.writers:
                    w.write(batch)
            except OSError as e:
                self.error = output_error(e)
            except BaseException as e:
                self.error = e

    def put(self, job: EncodedBatch | Callable[[], EncodedBatch]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(job)

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


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


# ---------------------------------------------------------------- the loop


def run(
    items: Sequence[ImageItem],
    encoder: PatchEncoder | Encoder,
    writers: Sequence[Writer],
    *,
    size: int,
    grid: int,
    batch_size: int,
    workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    failures: Sequence[Failure] = (),
    progress: ProgressFn | None = None,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
) -> tuple[int, list[Failure]]:
    """Encode `items` and feed every writer; returns (encoded count, failures).

    Writers are closed (committing what was written) even when interrupted.
    """
    all_failures = list(failures)
    encoded = 0
    thread = _WriterThread(writers)
    try:
        batches = image_batches(
            items,
            size=size,
            grid=grid,
            batch_size=batch_size,
            workers=workers,
            pin=encoder.device.type == "cuda",
            max_pixels=max_pixels,
            preprocess=preprocess,
        )
        for batch in batches:
            all_failures.extend(batch.failures)
            if batch.items:
                features, embedding = encode_splitting_with_embedding(encoder, batch.pixels)
                host = _to_host(features)
                host_emb = _to_host(embedding) if embedding is not None else None
                b = batch

                def job(
                    b: ImageBatch = b,
                    host: Callable[[], np.ndarray] = host,
                    host_emb: Callable[[], np.ndarray] | None = host_emb,
                ) -> EncodedBatch:
                    emb = host_emb() if host_emb is not None else None
                    return EncodedBatch(b.items, host(), b.masks, b.orig_size_hw, embedding=emb)

                thread.put(job)
                encoded += len(batch.items)
            if progress:
                progress(len(batch.items), len(batch.failures))
    finally:
        try:
            thread.finish()
        finally:
            for w in writers:
                w.record_failures(all_failures)
            for w in writers:
                w.close()
    return encoded, all_failures


def encoding_info(loaded: LoadedModel, encoder: PatchEncoder, model_name: str) -> EncodingInfo:
    return encoder.info(model_name, loaded.source)


def build(
    input_dir: str | os.PathLike[str],
    options: BuildOptions,
    *,
    npy_dir: str | os.PathLike[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    save_meta: bool = False,
    progress_factory: Callable[[int], Any] | None = None,
    loaded: LoadedModel | None = None,
) -> BuildResult:
    """Encode every image under `input_dir` into per-image files and/or a store.

    `progress_factory(total)` returns a context manager whose value is called as
    `(done, failed)` after each batch (the CLI passes a progress bar).
    """
    if npy_dir is None and store is None:
        raise ConfigError("nothing to write: give --npy-dir, --store or both")
    if options.clip_output not in ("raw", "projected"):
        raise ConfigError(f"--clip-output {options.clip_output!r}: expected raw or projected")
    device = resolve_device(options.device)
    precision = options.precision or default_precision(device)
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--precision {precision!r}: expected fp32, fp16 or bf16")
    items = discover(input_dir, recursive=options.recursive)

    if loaded is None:
        loaded = load_model(options.model, clip_output=options.clip_output, preset=options.preset)
    check_preset_options(loaded.spec, size=options.size, layers=options.layers, norm=options.norm)
    size = options.size or loaded.spec.default_size
    loaded.spec.grid(size)  # refuses sizes that are not a multiple of the patch
    encoder = PatchEncoder(
        loaded,
        size=size,
        device=device,
        precision=precision,
        clip_output=options.clip_output,
        compile=options.compile,
        layers=options.layers,
        norm=options.norm,
        # stores keep it by default; per-image files only when asked (--embedding)
        embedding=options.embedding if store is not None else (options.embedding or False),
    )
    info = encoding_info(loaded, encoder, options.model or loaded.spec.name)

    writers: list[Writer] = []
    try:
        if store is not None:
            from featstore.store.writer import open_store_writer

            writers.append(open_store_writer(Path(store), info, overwrite=options.overwrite))
        if npy_dir is not None:
            # per-image files keep the reference layout: `_embedding.npy` only when asked for
            embedding = options.embedding is True
            writers.append(
                NpyWriter(Path(npy_dir), info, save_meta=save_meta, overwrite=options.overwrite, embedding=embedding)
            )
    except OSError as e:
        raise output_error(e) from None

    bad_names = unusable_names(items)  # not UTF-8, backslash: refused per file
    failures: list[Failure] = list(bad_names.values())
    items = [it for it in items if it.key not in bad_names]
    if npy_dir is not None:  # a.png and a.jpg would both write a.npy: refuse the later one
        clashes = output_collisions(items)
        failures += [
            Failure(k, f"output name collides with {first!r} (both write the same .npy)")
            for k, first in clashes.items()
        ]
        items = [it for it in items if it.key not in clashes]

    keys = [it.key for it in items]
    pending: set[str] = set()
    for w in writers:
        pending |= w.pending(keys)
    todo = [it for it in items if it.key in pending]
    result = BuildResult(total=len(items) + len(failures), skipped=len(items) - len(todo), info=info)

    batch_size = options.batch_size or default_batch_size(device, encoder.out_dim)
    workers = default_workers(device) if options.workers is None else options.workers
    start = time.perf_counter()
    progress_ctx = progress_factory(len(todo)) if progress_factory else nullcontext(None)
    try:
        with progress_ctx as update:
            encoded, all_failures = run(
                todo,
                encoder,
                writers,
                size=size,
                grid=encoder.grid,
                batch_size=batch_size,
                workers=workers,
                max_pixels=options.max_pixels,
                failures=failures,
                progress=update,
                preprocess=loaded.spec.preprocess,
            )
    except OSError as e:
        raise output_error(e) from None
    finally:
        result.seconds = time.perf_counter() - start
    result.encoded = encoded
    result.failures = all_failures
    return result
