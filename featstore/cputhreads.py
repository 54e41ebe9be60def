"""On a CPU build, the model's threads give way to the decode workers where that is faster.

The model (torch's intra-op threads, one per core by default) and the decode workers share
the CPU. A large model is the limit: the workers idle most of the time, and the model
should keep every core. A small one is not: its threads (which spin between operations)
take the core a worker needs, both slow down, and fewer model threads make the whole build
faster. Measured on the project's 2-core machine, one worker, 512x512 renders at 224, with
the 2-layer DINOv2 of benchmarks/feed.py: 0.65-0.86x of Pillow's bare decode rate with
torch's 2 threads for nearly all of a 160-image build, 0.86-1.33x with one (this VM's
run-to-run noise is large); `featstore build` with OMP_NUM_THREADS=2 on other renders,
0.61-0.72x against 0.85-1.09x with 1.

Which case a build is cannot be told before it runs, so `ModelThreads.observe` (a progress
callback) watches the main thread's waiting for the reader, which each batch measures
for itself:

- While the main thread does not wait (beyond `WAITING` of a batch's time), the model is
  the limit, and nothing changes: a large model keeps every core and loses no time to a
  trial. The workers' head start also passes this way: the batches they decoded while the
  model loaded and warmed up come without waiting, and say nothing about the reader.
- Once `WAITED` batches in a row waited for it (the first one aside: it includes the
  start), the reader is the limit with torch's threads. The next `WINDOW` batches run with the cores
  the workers leave (at least one). If the main thread still waits there, the model's
  extra threads only took CPU from the reader: the fewer count is kept.
- Only where fewer threads made the model the limit do the next `WINDOW` batches run with
  torch's threads again, and the faster of the two windows' counts is kept.

The decision rests on waiting, not on comparing the rates of two short windows where it
can: on this VM such rates moved by a third from window to window, and the window after
the first batch ran fast on prefetched batches (a build with the tiny model above kept
torch's 2 threads after such a comparison, and ran 15% slower). `restore` puts torch's
count back at the end of the build. Nothing changes where OMP_NUM_THREADS is set (the
user's choice), on a GPU, in a distributed build (`featstore.launch` divides the cores
there), without decode workers, or where the workers leave every core to the model anyway.
"""

from __future__ import annotations

import os

import torch

from featstore.launch import host_cpus
from featstore.runner import RunResult

WINDOW = 4  # batches per measurement (64 images at the CPU default batch of 16)
WAITING = 0.03  # share of the main thread's time waiting for the reader below which the model is the limit
WAITED = 2  # batches in a row that waited for the reader: one alone may be a slow file or a busy disk


class ModelThreads:
    def __init__(self, workers: int, *, applies: bool = True, cpus: int | None = None) -> None:
        self.threads = torch.get_num_threads()
        self.fewer = max(1, (cpus or host_cpus()) - workers)
        self.trying = applies and workers > 0 and "OMP_NUM_THREADS" not in os.environ and self.threads > self.fewer
        self.rates: list[float] = []  # images/s of each window: fewer threads, then (maybe) torch's
        self.waiting: list[float] = []  # the share of each window the main thread waited for the reader
        self._batches = 0
        self._waited = 0  # batches in a row that waited
        self._last = (0, 0.0, 0.0)  # images, seconds, waiting after the previous batch
        self._mark: tuple[int, int, float, float] | None = None  # batches, images, seconds, waiting at a window's start

    def observe(self, run: RunResult) -> None:
        """After each batch."""
        if not self.trying or run.finished:
            return
        self._batches += 1
        now = (run.encoded, run.seconds, run.stages.decode_wait)
        last, self._last = self._last, now
        if self._mark is None:  # the model is the limit so far
            took = now[1] - last[1]
            waited = self._batches > 1 and took > 0 and (now[2] - last[2]) / took >= WAITING
            self._waited = self._waited + 1 if waited else 0
            if self._waited == WAITED:
                self._start_window(self.fewer)
            return
        if self._batches - self._mark[0] < WINDOW:
            return
        seconds = max(run.seconds - self._mark[2], 1e-9)
        self.rates.append((run.encoded - self._mark[1]) / seconds)
        self.waiting.append((run.stages.decode_wait - self._mark[3]) / seconds)
        if len(self.rates) == 1 and self.waiting[0] < WAITING:  # fewer made the model the limit: torch's again
            self._start_window(self.threads)
            return
        self.trying = False
        if len(self.rates) == 2 and self.rates[1] < self.rates[0]:
            torch.set_num_threads(self.fewer)

    def _start_window(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self._mark = (self._batches, *self._last)

    def restore(self) -> None:
        """torch's thread count as it was before the build."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        self.trying = False
