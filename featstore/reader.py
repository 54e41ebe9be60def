"""The reader: decoded, preprocessed image batches for a work unit.

A work unit is any sequence of `ImageItem`s, usually a slice of the sorted image list
(a single-process build reads one unit holding everything still to do; a distributed
build hands each process its units). `ImageReader.batches(unit)` decodes the unit in a
torch DataLoader whose worker processes run `featstore.images.load_sample`, and yields
uint8 `ImageBatch`es in the unit's order. The reader holds no state between units.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featstore.batches import Failure, ImageBatch, ImageItem, Sample
from featstore.images import DEFAULT_MAX_PIXELS, DEFAULT_PREPROCESS, Preprocess, load_sample


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

    def batches(self, unit: Sequence[ImageItem]) -> Iterator[ImageBatch]:
        """Batches of `unit`, in order; images that cannot be used are the batches' failures."""
        loader = DataLoader(
            _ImageDataset(unit, self.size, self.grid, self.max_pixels, self.preprocess),
            batch_size=self.batch_size,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.pin,
            prefetch_factor=4 if self.workers else None,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if self.workers else None,
        )
        yield from loader
