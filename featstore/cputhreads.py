"""On a CPU build, the model's threads give way to the decode workers where that is faster.

The model (torch's intra-op threads, one per core by default) and the decode workers share
the CPU. A large model is the limit: the workers idle most of the time, and the model
should keep every core. A small one is not: its threads (which spin between operations)
take the core a worker needs, both slow down, and fewer model threads make the whole build
faster. Measured on the project's 2-core machine, one worker, 512x512 renders at 224, with
the 2-layer DINOv2 of benchmarks/feed.py: 0.65-0.86x of Pillow's bare decode rate with
torch's 2 threads throughout, 0.86-1.33x with one (this VM's run-to-run noise is large).

Which case a build is cannot be told before it runs, so `ModelThreads.observe` (a progress
callback) measures: after the first batch (workers starting), the images/s of `WINDOW`
batches with torch's threads. Where the main thread waited for the reader less than
`WAITING` of that time, the model is the limit and nothing changes (a large model loses no
time to a trial). Otherwise the next `WINDOW` batches run with the cores the workers leave
(at least one), and the faster of the two counts is kept for the rest of the build (the
2-layer model above waited 7-13% of its time with 2 threads, and ran 1.3-2x faster with
one); `restore` puts torch's count back at its end. Nothing changes where OMP_NUM_THREADS
is set (the user's choice), on a GPU, in a distributed build (`featstore.launch` divides
the cores there), without decode workers, or where the workers leave every core to the
model anyway.
"""

from __future__ import annotations

import os

import torch

from featstore.launch import host_cpus
from featstore.runner import RunResult

WINDOW = 4  # batches per measurement (64 images at the CPU default batch of 16)
WAITING = 0.03  # share of the main thread's time waiting for the reader below which the model is the limit


class ModelThreads:
    def __init__(self, workers: int, *, applies: bool = True, cpus: int | None = None) -> None:
        self.threads = torch.get_num_threads()
        self.fewer = max(1, (cpus or host_cpus()) - workers)
        self.trying = applies and workers > 0 and "OMP_NUM_THREADS" not in os.environ and self.threads > self.fewer
        self.rates: list[float] = []  # images/s: torch's threads, then fewer
        self._mark: tuple[int, int, float, float] | None = None  # batches, images, seconds, waiting at its start
        self._batches = 0

    def observe(self, run: RunResult) -> None:
        """After each batch."""
        if not self.trying or run.finished:
            return
        self._batches += 1
        if self._mark is not None and self._batches - self._mark[0] < WINDOW:
            return
        waited = 0.0
        if self._mark is not None:
            images, seconds = run.encoded - self._mark[1], max(run.seconds - self._mark[2], 1e-9)
            self.rates.append(images / seconds)
            waited = (run.stages.decode_wait - self._mark[3]) / seconds
        self._mark = (self._batches, run.encoded, run.seconds, run.stages.decode_wait)  # the first: workers started
        if not self.rates:
            return
        if len(self.rates) == 1:
            if waited < WAITING:  # the model is the limit: every core stays its
                self.trying = False
                return
            torch.set_num_threads(self.fewer)
        else:
            self.trying = False
            if self.rates[1] <= self.rates[0]:
                torch.set_num_threads(self.threads)

    def restore(self) -> None:
        """torch's thread count as it was before the build."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        self.trying = False
