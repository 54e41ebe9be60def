"""The reader: decoded, preprocessed image batches for a work unit.

A work unit is any sequence of `ImageItem`s, usually a slice of the sorted image list
(a single-process build reads one unit holding everything still to do; a distributed
build hands each process its units). `ImageReader.batches(unit)` decodes the unit in a
torch DataLoader whose worker processes run `featstore.images.load_sample`, and yields
uint8 `ImageBatch`es in the unit's order. The reader holds no state between units.

Three kinds of item, each read its own way (a unit holding several reads them in turn):
local files are opened by the workers; remote objects are fetched by each worker a
batch at a time with `FETCH_THREADS` requests in flight, decoding each as it arrives
(with the DataLoader's prefetch, the next batches are fetched meanwhile); the samples
of a tar shard are read from one sequential stream by one worker (shards are dealt
round-robin to the workers, so batches of a tar unit come in shard, not key, order).
Nothing is staged on disk; memory holds a few batches per worker.
"""

from __future__ import annotations

import os
import signal
import tarfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from featstore.batches import Failure, ImageBatch, ImageItem, Sample
from featstore.images import DEFAULT_MAX_PIXELS, DEFAULT_PREPROCESS, Preprocess, load_sample
from featstore.sources import FETCH_ATTEMPTS, FETCH_BACKOFF_S, Remote, fetch_error, is_url

FETCH_THREADS = 16  # remote requests in flight per decode worker


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


class _ObjectDataset(_ImageDataset):
    """Remote objects: a batch's fetches go out together (the DataLoader calls `__getitems__`)."""

    def __init__(
        self, items: Sequence[ImageItem], size: int, grid: int, max_pixels: int, preprocess: Preprocess, remote: Remote
    ) -> None:
        super().__init__(items, size, grid, max_pixels, preprocess)
        self.remote = remote
        self._pool: tuple[int, ThreadPoolExecutor] | None = None

    def __getstate__(self) -> dict[str, object]:  # spawned workers: the pool stays behind
        return {**self.__dict__, "_pool": None}

    def _fetch(self, item: ImageItem) -> bytes | str:
        try:
            return self.remote.fetch(item.path)
        except Exception as e:  # this object fails, the run goes on
            return fetch_error(e)

    def _sample(self, item: ImageItem, data: bytes | str) -> Sample:
        if isinstance(data, str):
            return Sample(item, error=data)
        return load_sample(
            item, size=self.size, grid=self.grid, max_pixels=self.max_pixels, preprocess=self.preprocess, data=data
        )

    def __getitem__(self, i: int) -> Sample:
        return self._sample(self.items[i], self._fetch(self.items[i]))

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        if self._pool is None or self._pool[0] != os.getpid():  # a forked worker: threads do not survive fork
            self._pool = (os.getpid(), ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="featstore-fetch"))
        items = [self.items[i] for i in indices]
        return [self._sample(it, data) for it, data in zip(items, self._pool[1].map(self._fetch, items), strict=True)]


class _ShardDataset(IterableDataset[Sample]):
    """Tar shards, each read start to end by one worker: [(shard path, its items to do), ...]."""

    def __init__(
        self,
        shards: list[tuple[str, list[ImageItem]]],
        size: int,
        grid: int,
        max_pixels: int,
        preprocess: Preprocess,
        remote: Remote | None,
    ) -> None:
        self.shards, self.size, self.grid, self.max_pixels, self.remote = shards, size, grid, max_pixels, remote
        self.preprocess = preprocess

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard, items in self.shards[worker::workers]:
            yield from self._read(shard, items)

    def _read(self, shard: str, items: list[ImageItem]) -> Iterator[Sample]:
        todo = {it.member: it for it in items}
        reason = "not found in the shard when read"
        for attempt in range(FETCH_ATTEMPTS):
            try:
                remote = self.remote if is_url(shard) else None
                with remote.open(shard) if remote else open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
                    for m in tf:
                        item = todo.pop(m.name, None)
                        if item is None:
                            continue  # another sample's member, or a key already done
                        data = tf.extractfile(m).read()  # type: ignore[union-attr]
                        yield load_sample(
                            item,
                            size=self.size,
                            grid=self.grid,
                            max_pixels=self.max_pixels,
                            preprocess=self.preprocess,
                            data=data,
                        )
                        if not todo:
                            return
                break
            except (tarfile.TarError, EOFError) as e:  # changed or cut short since it was listed
                reason = f"truncated or corrupt tar shard {shard}: {e}"
                break
            except Exception as e:  # a network error: re-read the shard, skipping what was yielded
                reason = f"tar shard {shard}: {fetch_error(e)}"
                if remote is None or isinstance(e, (FileNotFoundError, PermissionError)):
                    break
                time.sleep(FETCH_BACKOFF_S * 2**attempt)
        for item in todo.values():
            yield Sample(item, error=reason)


def collate(samples: list[Sample]) -> ImageBatch:
    ok = [s for s in samples if s.error is None]
    failures = [Failure(s.item.key, s.error) for s in samples if s.error is not None]
    if not ok:
        return ImageBatch([], None, np.zeros((0,)), np.zeros((0, 2), np.int32), failures)
    pixels = torch.from_numpy(np.stack([s.pixels for s in ok]))  # type: ignore[misc]
    masks = np.stack([s.mask for s in ok])  # type: ignore[misc]
    hw = np.array([s.orig_size_hw for s in ok], dtype=np.int32)
    return ImageBatch([s.item for s in ok], pixels, masks, hw, failures)


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C in a terminal (and SIGTERM/SIGHUP sent to the whole process group, as
    # systemd and SLURM do) reach the decode workers too. The main process decides
    # when to stop and shuts the workers down; a worker dying on its own would turn a
    # clean stop into "DataLoader worker exited unexpectedly".
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True, slots=True)
class ImageReader:
    size: int
    grid: int
    batch_size: int
    workers: int = 0  # decode processes; 0 decodes in the calling process
    pin: bool = False  # page-locked batches, for fast copies to a CUDA device
    max_pixels: int = DEFAULT_MAX_PIXELS
    preprocess: Preprocess = DEFAULT_PREPROCESS  # the model family's resize and premultiply
    remote: Remote | None = None  # reads the unit's remote objects and shards

    def batches(self, unit: Sequence[ImageItem]) -> Iterator[ImageBatch]:
        """Batches of `unit` (files and objects in order, tar samples shard by shard);
        images that cannot be used are the batches' failures."""
        for dataset, workers in self._datasets(unit):
            yield from self._load(dataset, workers)

    def start(self, unit: Sequence[ImageItem]) -> Iterator[ImageBatch]:
        """`batches(unit)`, with its decode workers started now: they prefetch while the
        caller is busy with something else (the unit before, say)."""
        parts = self._datasets(unit)
        if not parts:
            return iter(())
        return self._started(iter(self._loader(*parts[0])), parts[1:])  # the first workers start here

    def _started(self, first: Iterator[ImageBatch], rest: list[tuple[Dataset[Sample], int]]) -> Iterator[ImageBatch]:
        try:
            yield from first
            for dataset, workers in rest:
                yield from self._load(dataset, workers)
        finally:
            shutdown = getattr(first, "_shutdown_workers", None)  # now, not when garbage-collected
            if shutdown is not None:
                shutdown()

    def _datasets(self, unit: Sequence[ImageItem]) -> list[tuple[Dataset[Sample], int]]:
        """What reads the unit: one dataset per kind of item, each with its worker count."""
        files = [it for it in unit if it.member is None and not is_url(it.path)]
        objects = [it for it in unit if it.member is None and is_url(it.path)]
        members = [it for it in unit if it.member is not None]
        out: list[tuple[Dataset[Sample], int]] = []
        if files:
            out.append((_ImageDataset(files, self.size, self.grid, self.max_pixels, self.preprocess), self.workers))
        if objects:
            remote = self.remote or Remote(objects[0].path.partition("://")[0])
            dataset = _ObjectDataset(objects, self.size, self.grid, self.max_pixels, self.preprocess, remote)
            out.append((dataset, self.workers))
        if members:
            shards = [(path, list(group)) for path, group in groupby(members, key=lambda it: it.path)]
            first = members[0].path
            opener = self.remote or (Remote(first.partition("://")[0]) if is_url(first) else None)
            tars = _ShardDataset(shards, self.size, self.grid, self.max_pixels, self.preprocess, opener)
            out.append((tars, min(self.workers, len(shards))))  # a worker with no shard would only cost a fork
        return out

    def _load(self, dataset: Dataset[Sample], workers: int) -> Iterator[ImageBatch]:
        yield from self._loader(dataset, workers)

    def _loader(self, dataset: Dataset[Sample], workers: int) -> DataLoader[Sample]:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if workers else None,
        )
