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

import logging
import os
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from featstore.batches import BatchInput, Failure, ImageBatch, ImageItem, Sample
from featstore.errors import DecodeWorkersError, FeatstoreError, ImageError, StorageTimeoutError
from featstore.heap import keep_freed_memory
from featstore.imagecheck import DEFAULT_MAX_IMAGE_BYTES, check_size
from featstore.images import DEFAULT_MAX_PIXELS, DEFAULT_PREPROCESS, Preprocess
from featstore.samples import InputSpec, load_views
from featstore.sources import FETCH_ATTEMPTS, FETCH_BACKOFF_S, Remote, fetch_error, is_url
from featstore.store.location import is_timeout, no_answer

FETCH_THREADS = 16  # remote requests in flight per decode worker


class _Decodes:
    """The decoding settings every dataset shares, and its one call of `load_views`."""

    specs: tuple[InputSpec, ...]  # what each model of the build takes from an image
    max_pixels: int
    max_bytes: int
    killed: dict[str, str]  # key -> reason: images that killed decode workers, not decoded again

    def _load(self, item: ImageItem, data: bytes | None = None) -> Sample:
        if item.key in self.killed:
            return Sample(item, error=self.killed[item.key])
        return load_views(item, self.specs, max_pixels=self.max_pixels, data=data, max_bytes=self.max_bytes)


class _ImageDataset(_Decodes, Dataset[Sample]):
    def __init__(
        self,
        items: Sequence[ImageItem],
        specs: tuple[InputSpec, ...],
        max_pixels: int,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        self.items, self.specs, self.max_pixels, self.max_bytes = list(items), specs, max_pixels, max_bytes
        self.killed = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        return self._load(self.items[i])


class _ObjectDataset(_ImageDataset):
    """Remote objects: a batch's fetches go out together (the DataLoader calls `__getitems__`)."""

    def __init__(
        self,
        items: Sequence[ImageItem],
        specs: tuple[InputSpec, ...],
        max_pixels: int,
        remote: Remote,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        super().__init__(items, specs, max_pixels, max_bytes)
        self.remote = remote
        self._pool: tuple[int, ThreadPoolExecutor] | None = None

    def __getstate__(self) -> dict[str, object]:  # spawned workers: the pool stays behind
        return {**self.__dict__, "_pool": None}

    def _fetch(self, item: ImageItem) -> bytes | str:
        if item.key in self.killed:
            return self.killed[item.key]
        try:
            data = self.remote.fetch(item.path, limit=self.max_bytes + 1)  # never more than the limit in memory
        except Exception as e:  # this object fails, the run goes on
            if is_timeout(e):  # object storage does not answer: the build stops (one line, exit 2)
                raise StorageTimeoutError(no_answer(item.path)) from None
            return fetch_error(e)
        try:
            check_size(len(data), self.max_bytes)
        except ImageError as e:
            return str(e).replace("file of ", "object of over ", 1)
        return data

    def _sample(self, item: ImageItem, data: bytes | str) -> Sample:
        if isinstance(data, str):
            return Sample(item, error=data)
        return self._load(item, data)

    def __getitem__(self, i: int) -> Sample:
        return self._sample(self.items[i], self._fetch(self.items[i]))

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        if self._pool is None or self._pool[0] != os.getpid():  # a forked worker: threads do not survive fork
            self._pool = (os.getpid(), ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="featstore-fetch"))
        items = [self.items[i] for i in indices]
        return [self._sample(it, data) for it, data in zip(items, self._pool[1].map(self._fetch, items), strict=True)]


class _ShardDataset(_Decodes, IterableDataset[Sample]):
    """Tar shards, each read start to end by one worker: [(shard path, its items to do), ...]."""

    def __init__(
        self,
        shards: list[tuple[str, list[ImageItem]]],
        specs: tuple[InputSpec, ...],
        max_pixels: int,
        remote: Remote | None,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        self.shards, self.specs, self.max_pixels, self.remote = shards, specs, max_pixels, remote
        self.max_bytes = max_bytes
        self.killed = {}

    @classmethod
    def like(cls, other: _ShardDataset, shards: list[tuple[str, list[ImageItem]]]) -> _ShardDataset:
        """The same reading of other shards (what is left of them after a worker died)."""
        out = cls(shards, other.specs, other.max_pixels, other.remote, other.max_bytes)
        out.killed = other.killed
        return out

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
                        if item.key in self.killed:
                            yield self._load(item)
                        elif m.size > self.max_bytes:  # refused before it is read
                            yield Sample(item, error=_over_limit(m.size, self.max_bytes))
                        else:
                            yield self._load(item, tf.extractfile(m).read())  # type: ignore[union-attr]
                        if not todo:
                            return
                break
            except (tarfile.TarError, EOFError) as e:  # changed or cut short since it was listed
                reason = f"truncated or corrupt tar shard {shard}: {e}"
                break
            except Exception as e:  # a network error: re-read the shard, skipping what was yielded
                reason = f"tar shard {shard}: {fetch_error(e)}"
                if is_timeout(e):  # object storage does not answer: the build stops (one line, exit 2)
                    raise StorageTimeoutError(no_answer(shard)) from None
                if remote is None or isinstance(e, (FileNotFoundError, PermissionError)):
                    break
                time.sleep(FETCH_BACKOFF_S * 2**attempt)
        for item in todo.values():
            yield Sample(item, error=reason)


def _over_limit(nbytes: int, max_bytes: int) -> str:
    try:
        check_size(nbytes, max_bytes)
    except ImageError as e:
        return str(e)
    return ""


def collate(samples: list[Sample]) -> ImageBatch:
    ok = [s for s in samples if s.error is None]
    failures = [Failure(s.item.key, s.error) for s in samples if s.error is not None]
    hw = np.array([s.orig_size_hw for s in ok], dtype=np.int32).reshape(-1, 2)
    if not ok:
        return ImageBatch([], [], hw, failures)
    inputs = []
    for m in range(len(ok[0].inputs)):  # each model's input, a batch of its own
        pixels = torch.from_numpy(np.stack([s.inputs[m].pixels for s in ok]))
        inputs.append(BatchInput(pixels, np.stack([s.inputs[m].mask for s in ok])))
    return ImageBatch([s.item for s in ok], inputs, hw, failures)


def _start_worker(_worker_id: int) -> None:
    """A decode worker's set-up: it ignores stop signals and keeps freed memory (`featstore.heap`)."""
    _ignore_stop_signals()
    keep_freed_memory()


def _ignore_stop_signals() -> None:
    # Ctrl-C in a terminal (and SIGTERM/SIGHUP sent to the whole process group, as
    # systemd and SLURM do) reach the decode workers too. The main process decides
    # when to stop and shuts the workers down; a worker dying on its own would turn a
    # clean stop into "DataLoader worker exited unexpectedly".
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # s3fs closes a collected client's session from whatever event loop is running, and in a
    # forked worker that can be another loop than the session's: asyncio then logs "Task
    # exception was never retrieved ... attached to a different loop" with a traceback
    # (seen with torch 2.15; the socket is closed all the same). A worker's real errors
    # reach the main process as exceptions, never through asyncio's log.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


KILLED = "decode worker killed while decoding this image (out of memory?)"
PREFETCH = 4  # batches asked of each worker ahead of time
UNEXPLAINED_DEATHS = 3  # worker deaths no single image explains before the build gives up


def _worker_died(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, RuntimeError) and "DataLoader worker" in text and ("killed" in text or "exited" in text)


def _one_line(e: FeatstoreError) -> FeatstoreError:
    """A featstore error raised in a worker: the DataLoader re-raises it with the worker's
    traceback in the message; the last line is ours."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return e
    return type(e)(lines[-1].split(": ", 1)[-1])


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
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # per image file, refused before reading
    also: tuple[InputSpec, ...] = ()  # the other models of a build of several: from the same decode

    @property
    def specs(self) -> tuple[InputSpec, ...]:
        """What each model takes from an image, in the build's order (a batch's `inputs`)."""
        return (InputSpec(self.size, self.grid, self.preprocess), *self.also)

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
        return self._started(_Supervised(self, *parts[0]), parts[1:])  # the first workers start here

    def _started(self, first: _Supervised, rest: list[tuple[Dataset[Sample], int]]) -> Iterator[ImageBatch]:
        try:
            yield from first
            for dataset, workers in rest:
                yield from self._load(dataset, workers)
        finally:
            first.close()  # now, not when garbage-collected

    def _datasets(self, unit: Sequence[ImageItem]) -> list[tuple[Dataset[Sample], int]]:
        """What reads the unit: one dataset per kind of item, each with its worker count."""
        files = [it for it in unit if it.member is None and not is_url(it.path)]
        objects = [it for it in unit if it.member is None and is_url(it.path)]
        members = [it for it in unit if it.member is not None]
        out: list[tuple[Dataset[Sample], int]] = []
        args = (self.specs, self.max_pixels)
        if files:
            out.append((_ImageDataset(files, *args, self.max_bytes), self.workers))
        if objects:
            remote = self.remote or Remote(objects[0].path.partition("://")[0])
            out.append((_ObjectDataset(objects, *args, remote, self.max_bytes), self.workers))
        if members:
            shards = [(path, list(group)) for path, group in groupby(members, key=lambda it: it.path)]
            first = members[0].path
            opener = self.remote or (Remote(first.partition("://")[0]) if is_url(first) else None)
            tars = _ShardDataset(shards, *args, opener, self.max_bytes)
            out.append((tars, min(self.workers, len(shards))))  # a worker with no shard would only cost a fork
        return out

    def _load(self, dataset: Dataset[Sample], workers: int) -> Iterator[ImageBatch]:
        supervised = _Supervised(self, dataset, workers)
        try:
            yield from supervised
        finally:
            supervised.close()

    def _loader(self, dataset: Dataset[Sample], workers: int, batches: list[list[int]] | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if batches is None else 1,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin,
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=False,
            worker_init_fn=_start_worker if workers else None,
        )


class _Supervised:
    """A dataset's batches from decode workers that are restarted when one is killed.

    A worker killed by a signal (the kernel's OOM killer sends SIGKILL) takes its images
    in flight with it. The batches not yet yielded are read again by new workers, in the
    same order. Every image in flight at a death (the next `PREFETCH` batches of every
    worker) gets a strike; those with two are decoded alone, one at a time, in a
    separate worker: one that kills it is the culprit and becomes a failure (`KILLED`),
    the others are innocent (their strikes cleared) and are read as usual. Deaths that
    no image explains (memory pressure from all workers together) end the build after
    `UNEXPLAINED_DEATHS` with one line (DecodeWorkersError).

    The DataLoader's SIGCHLD handler would raise the death in the main thread wherever
    it happens to be (inside the model, say); its worker pids are unregistered, so a
    death is found where the batch is awaited (within 5 s: torch's status check).
    """

    def __init__(self, reader: ImageReader, dataset: Dataset[Sample], workers: int) -> None:
        self.reader, self.dataset, self.workers = reader, dataset, workers
        self.tar = isinstance(dataset, _ShardDataset)
        self.done: set[str] = set()  # keys yielded (tar shards)
        self.next_batch = 0  # batches yielded (files, objects)
        self.strikes: Counter[str] = Counter()
        self.deaths = 0
        self.unexplained = 0
        self._it: Any = None
        self._open()

    # -- what is left, and what was in flight

    def _plan(self) -> tuple[Dataset[Sample], list[list[int]] | None]:
        if self.tar:
            assert isinstance(self.dataset, _ShardDataset)
            left = [(p, [it for it in items if it.key not in self.done]) for p, items in self.dataset.shards]
            rest = _ShardDataset.like(self.dataset, [(p, items) for p, items in left if items])
            return rest, None
        assert isinstance(self.dataset, _ImageDataset)
        n, bs = len(self.dataset.items), self.reader.batch_size
        return self.dataset, [list(range(i, min(i + bs, n))) for i in range(self.next_batch * bs, n, bs)]

    def _in_flight(self, dataset: Dataset[Sample], batches: list[list[int]] | None, workers: int) -> list[ImageItem]:
        ahead = PREFETCH * max(workers, 1)
        if batches is not None:
            assert isinstance(self.dataset, _ImageDataset)
            return [self.dataset.items[i] for b in batches[:ahead] for i in b]
        assert isinstance(dataset, _ShardDataset)
        out: list[ImageItem] = []
        for w in range(workers):  # each worker reads its shards in turn, PREFETCH batches ahead
            stream = [it for _, items in dataset.shards[w::workers] for it in items]
            out.extend(stream[: PREFETCH * self.reader.batch_size])
        return out

    def _open(self) -> None:
        dataset, batches = self._plan()
        self._current = (dataset, batches)
        workers = min(self.workers, len(dataset.shards)) if isinstance(dataset, _ShardDataset) else self.workers
        self._workers_now = workers
        if batches == [] or (isinstance(dataset, _ShardDataset) and not dataset.shards):
            self._it = iter(())
            return
        self._it = iter(self.reader._loader(dataset, workers, batches))
        _unregister_sigchld(self._it)

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None

    def __iter__(self) -> Iterator[ImageBatch]:
        while self._it is not None:
            try:
                batch = next(self._it)
            except StopIteration:
                self.close()
                return
            except FeatstoreError as e:
                raise _one_line(e) from None
            except RuntimeError as e:
                if not self.workers or not _worker_died(e):
                    raise
                self._after_death()
                continue
            self.next_batch += 1
            if self.tar:
                self.done.update(it.key for it in batch.items)
                self.done.update(f.key for f in batch.failures)
            yield batch

    # -- a worker died

    def _after_death(self) -> None:
        dataset, batches = self._current
        suspects = self._in_flight(dataset, batches, self._workers_now)
        self.close()
        self.deaths += 1
        self.strikes.update(it.key for it in suspects)
        twice = [it for it in suspects if self.strikes[it.key] >= 2]
        if twice:
            culprits = self._isolate(twice)
            for it in twice:
                self.strikes[it.key] = 0
            killed = self.dataset.killed  # type: ignore[attr-defined]
            killed.update(dict.fromkeys(culprits, KILLED))
            if not culprits:
                self.unexplained += 1
        if self.unexplained >= UNEXPLAINED_DEATHS:
            raise DecodeWorkersError(
                f"decode workers were killed {self.deaths} times and no single image explains it "
                "(out of memory? use fewer --workers or a smaller --batch-size); work committed before "
                "this point is kept, re-run to resume"
            )
        self._open()

    def _isolate(self, suspects: list[ImageItem]) -> list[str]:
        """Decode each suspect alone in one worker; the keys of those it died on."""
        culprits: list[str] = []
        left = list(suspects)
        while left:
            if self.tar:
                assert isinstance(self.dataset, _ShardDataset)
                keys = {it.key for it in left}
                shards = [(p, [it for it in items if it.key in keys]) for p, items in self.dataset.shards]
                alone: Dataset[Sample] = _ShardDataset.like(self.dataset, [(p, i) for p, i in shards if i])
                order = [it for _, items in shards for it in items]
                singles: list[list[int]] | None = None
            else:
                assert isinstance(self.dataset, _ImageDataset)
                index = {it.key: i for i, it in enumerate(self.dataset.items)}
                alone, order, singles = self.dataset, left, [[index[it.key]] for it in left]
            loader = DataLoader(
                alone,
                batch_size=1,
                batch_sampler=singles,
                num_workers=1,
                collate_fn=collate,
                prefetch_factor=1,
                worker_init_fn=_start_worker,
            )
            it: Any = iter(loader)
            _unregister_sigchld(it)
            seen = 0
            try:
                for _ in it:  # one image per batch, one batch in flight: a death names its image
                    seen += 1
                left = []
            except RuntimeError as e:
                if not _worker_died(e):
                    raise
                culprits.append(order[seen].key)
                left = order[seen + 1 :]
            finally:
                it._shutdown_workers()
        return culprits


def _unregister_sigchld(it: Any) -> None:
    """Take a DataLoader iterator's workers out of torch's SIGCHLD handler (see `_Supervised`)."""
    if getattr(it, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
