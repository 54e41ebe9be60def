"""A build's work as units, for many processes at once (torchrun, SLURM, `--shard I/N`).

The sorted image list becomes a plan (`featstore.store.plans`): units of whole shards,
each unit's keys going to its own shards, in the list's order. `Scheduler.stream`
turns this process's share of the plan into the runner's input: for each unit it
takes, a `UnitMark` (start), the reader's batches of the unit's images still to do,
and a `UnitMark` (end), on which the store's unit writer commits the unit and
releases it. One unit ahead is taken and its reader started while the current one is
encoded, so decode workers never start cold between units.

Which units a process takes: its own block of the plan first (process r of N: units
r*U/N up to (r+1)*U/N), then, unless it runs with `--shard` (exactly its part), the
units of the other blocks that nobody holds, from the end of the plan backwards (the
owners work forwards, so the two meet once). A unit is taken by acquiring its lease
(`featstore.store.leases`); a finished unit (it has a record) is skipped. When a
process runs out of units that it can take but some are still held by others, it
waits for them: they finish (their owners commit them) or their leases expire (a dead
process) and it takes them over. So every process ends when the plan is finished, and
the one that sees it first finalizes the store.

Without a store (`--npy-dir` alone) there is nowhere to keep leases: each process
encodes its own block of the listing's units (per-image files are complete one by
one, so a re-run with any number of processes does exactly what is missing).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

from featstore.batches import ImageBatch, ImageItem, UnitMark, Writer
from featstore.launch import Share
from featstore.reader import ImageReader
from featstore.signals import StopRequest
from featstore.store.plans import Plan, listing_digest
from featstore.store.units import UnitState, UnitStore

POLL_S = 0.5  # how often a process with nothing to take looks at the units others hold


def block(share: Share, units: int) -> range:
    """This process's own units of a plan of `units`."""
    return range(share.rank * units // share.world, (share.rank + 1) * units // share.world)


def listing_plan(keys: Sequence[str], unit_images: int) -> Plan:
    """Units of the listing itself: the plan of a build without a store."""
    return Plan(0, 0, max(1, unit_images), 1, len(keys), listing_digest(keys))


@dataclass
class SchedulerStats:
    units: int = 0  # units this process took
    stolen: int = 0  # of them, outside its own block
    planned: int = 0  # images of the units it took
    images: int = 0  # of them, those it handed to the reader (the others were done)
    waited_s: float = 0.0  # waiting for units other processes held


class Scheduler:
    def __init__(
        self,
        plan: Plan,
        items: Sequence[ImageItem],
        share: Share,
        *,
        store: UnitStore | None,
        writers: Sequence[Writer],
        stop: StopRequest | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        """`items`: the plan's items in its order (the listing, or the plan's own keys)."""
        self.plan, self.items, self.share = plan, list(items), share
        self.store, self.writers, self.stop = store, writers, stop
        self.poll_s = poll_s
        self.stats = SchedulerStats()
        own = block(share, plan.units)
        self._own_left = {u: len(range(*plan.unit_slice(u).indices(len(self.items)))) for u in own}

    def expected(self) -> int:
        """Images this process is expected to hand the reader: those of the units it took,
        and all of its own block's units not taken yet (for the progress bar)."""
        return self.stats.images + sum(self._own_left.values())

    def order(self) -> list[int]:
        own = block(self.share, self.plan.units)
        if not self.share.steal or self.store is None:
            return list(own)
        return list(own) + [u for u in reversed(range(self.plan.units)) if u not in own]

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.requested

    def stream(self, reader: ImageReader) -> Iterator[ImageBatch | UnitMark]:
        """The runner's input: for each unit taken, its start mark, its batches, its end mark.

        The next unit is taken, and its reader started, as soon as the current unit's
        first batch has arrived: its decode workers prefetch while the current unit is
        encoded, so the model does not wait for workers to start at each unit. (So a
        process holds the leases of two units at a time.)"""
        units = self._units()
        ahead: tuple[UnitState, Iterator[ImageBatch]] | None = None
        batches: Iterator[ImageBatch] = iter(())
        try:
            while not self._stopped():
                if ahead is None:
                    ahead = self._next(units, reader, block=True)
                    if ahead is None:
                        return
                (state, batches), ahead = ahead, None
                yield UnitMark(state, start=True)
                for batch in batches:
                    if ahead is None and not self._stopped():  # before the batch goes to the encoder
                        ahead = self._next(units, reader, block=False)
                    yield batch
                yield UnitMark(state, start=False)
        finally:  # stopped: shut the decode workers down now (a unit taken ahead is released at close)
            for it in (batches, ahead[1] if ahead is not None else iter(())):
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            units.close()

    def _next(
        self, units: Iterator[UnitState | None], reader: ImageReader, *, block: bool
    ) -> tuple[UnitState, Iterator[ImageBatch]] | None:
        """The next unit taken and its batches (started), or None: none left, or (without
        `block`) none to take right now."""
        for state in units:
            if state is None:  # every unit left is held by another process
                if not block:
                    return None
                t0 = time.monotonic()
                self._stop_wait(self.poll_s)
                self.stats.waited_s += time.monotonic() - t0
                if self._stopped():
                    return None
                continue
            todo = self._todo(state)
            self.stats.images += len(todo)
            self.stats.planned += len(state.items)
            return state, reader.start(todo) if todo else iter(())
        return None

    def _units(self) -> Generator[UnitState | None, None, None]:
        """Units as this process takes them (in `order`); None whenever all the units left
        are held by others (the caller waits and asks again)."""
        store = self.store
        finished = store.finished() if store is not None else set()
        remaining = [u for u in self.order() if self.plan.unit_id(u) not in finished]
        for u in list(self._own_left):
            if self.plan.unit_id(u) in finished:
                del self._own_left[u]
        own = block(self.share, self.plan.units)
        while remaining:
            held: list[int] = []
            for u in remaining:
                state = self._take(u)
                if state != "held":
                    self._own_left.pop(u, None)
                if state == "held":
                    held.append(u)
                elif isinstance(state, UnitState):
                    self.stats.units += 1
                    self.stats.stolen += u not in own
                    yield state
            remaining = held
            if remaining:
                yield None

    def _stop_wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self._stopped():
            time.sleep(min(0.05, seconds))

    def _take(self, u: int) -> UnitState | str | None:
        """The unit's state if this process now owns it; "held" if another does; None if finished."""
        items = self.items[self.plan.unit_slice(u)]
        store = self.store
        if store is None:
            return UnitState(self.plan, u, items, [])
        uid = self.plan.unit_id(u)
        if not store.leases.acquire(uid):
            return "held"
        if store.is_finished(uid):  # finished (the process's first listing said which were)
            store.leases.release(uid)
            return None
        return store.unit_state(self.plan, u, items)

    def _todo(self, state: UnitState) -> list[ImageItem]:
        keys = [it.key for it in state.items]
        needed: set[str] = set(keys) - state.done_keys if self.store is not None else set()
        for w in self.writers:
            if not hasattr(w, "begin_unit"):  # per-image files: theirs to say
                needed |= w.pending(keys)
        return [it for it in state.items if it.key in needed]
