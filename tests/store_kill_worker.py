"""A build that the SIGKILL tests kill at random moments: `python -m tests.store_kill_worker PATH N CYCLE SEED`.

Writes keys k00000.png... in order, in batches of 1-7 rows, closing and reopening the
writer every CYCLE keys (so kills also land in commits, swaps and HDF5 rebuilds), and
records the failure of one image each run. Prints "ready" once imported and
"wrote K" after each batch (K: keys written so far, this run and earlier ones), so the
tests time their kills by the build's own progress, not by the machine's speed.
"""

from __future__ import annotations

import random
import sys

from featstore.batches import Failure
from featstore.store import open_store_writer
from tests.store_helpers import make_batch, make_info


def all_keys(n: int) -> list[str]:
    return [f"k{i:05d}.png" for i in range(n)]


def build(path: str, n: int, cycle: int, seed: int, announce: bool = False) -> None:
    rng = random.Random(seed)
    keys = all_keys(n)
    while True:
        with open_store_writer(path, make_info(), overwrite=False, shard_rows=8) as w:
            pending = w.pending(keys)
            todo = [k for k in keys if k in pending][:cycle]
            i = 0
            while i < len(todo):
                step = rng.randint(1, 7)
                w.write(make_batch(todo[i : i + step]))
                i += step
                if announce:
                    print(f"wrote {n - len(pending) + min(i, len(todo))}", flush=True)
            w.record_failures([Failure("broken.png", "cannot decode")])
        if not todo:
            return


if __name__ == "__main__":
    print("ready", flush=True)
    build(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), announce=True)
    print("done", flush=True)
