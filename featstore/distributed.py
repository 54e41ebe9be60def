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
from dataclasses import dataclass, field

from featstore.batches import Failure, ImageBatch, ImageItem, UnitMark, Writer
from featstore.errors import ConfigError
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
class ModelUnits:
    """One model's side of a distributed build: its store's handle (None: per-image files
    only), its writers, the keys it needs (grown unit by unit, read by the runner's
    lane) and the keys its per-image files cannot take."""

    store: UnitStore | None
    writers: Sequence[Writer]
    needs: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)
    plan: Plan | None = None  # its store's plan (the same units as every other model's)

    @property
    def unit_store(self) -> UnitStore:
        assert self.store is not None, "a model without a store"
        return self.store

    @property
    def store_plan(self) -> Plan:
        assert self.plan is not None, "a store without its plan"
        return self.plan

    def unit_id(self, u: int) -> int:
        """Unit `u` of the build as this model's store names it."""
        return self.store_plan.unit_id(u)


@dataclass
class SchedulerStats:
    units: int = 0  # units this process took
    stolen: int = 0  # of them, outside its own block
    planned: int = 0  # images of the units it took
    images: int = 0  # of them, those it handed to the reader (the others were done)
    waited_s: float = 0.0  # waiting for units other processes held


class Scheduler:
    """Takes this process's units and streams them to the runner. With several models,
    one unit is the same images for all of them: the first model with a store holds
    the leases, and a unit is finished when every model's store has finished it."""

    def __init__(
        self,
        plan: Plan,
        items: Sequence[ImageItem],
        share: Share,
        *,
        models: Sequence[ModelUnits],
        stop: StopRequest | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        """`items`: the plan's items in its order (the listing, or the plan's own keys)."""
        self.plan, self.items, self.share = plan, list(items), share
        self.models, self.stop = list(models), stop
        self.stores = [m for m in self.models if m.store is not None]
        self.poll_s = poll_s
        self.stats = SchedulerStats()
        own = block(share, plan.units)
        self._own_left = {u: len(range(*plan.unit_slice(u).indices(len(self.items)))) for u in own}

    @classmethod
    def for_build(
        cls,
        items: Sequence[ImageItem],
        failures: Sequence[Failure],
        models: Sequence[ModelUnits],
        share: Share,
        stop: StopRequest | None,
        unit_images: int,
    ) -> Scheduler:
        """The build's plan (its stores', or the listing's without one) and this process's
        scheduler. `items`: the listing (`featstore.buildplan` has left out what no model takes)."""
        keys = [it.key for it in items]
        stores = [m for m in models if m.store is not None]
        if not stores:
            return cls(listing_plan(keys, unit_images), items, share, models=models, stop=stop)
        # units are whole shards of every store: a multiple of the largest shard (powers of two)
        largest = max(m.unit_store.shard_rows for m in stores)
        unit_images = -(-unit_images // largest) * largest
        for m in stores:
            m.plan = m.unit_store.plan(keys, failures, unit_images)
        plan = stores[0].store_plan
        for m in stores[1:]:
            other = m.store_plan
            if (other.count, other.unit_rows, other.keys) != (plan.count, plan.unit_rows, plan.keys):
                raise ConfigError(
                    f"{m.unit_store.location} and {stores[0].unit_store.location} are at different points "
                    "(one holds images the other lacks, or an unfinished build of other images): a distributed "
                    "build of several models needs them alike; build them one model at a time, or from one process"
                )
        if plan.keys is None:
            planned = list(items)
        else:
            by_key = {it.key: it for it in items}
            planned = [by_key[k] for k in plan.keys]
        return cls(plan, planned, share, models=models, stop=stop)

    @property
    def plans(self) -> list[Plan | None]:
        """Each model's store's plan (None: no store)."""
        return [m.plan for m in self.models]

    def expected(self) -> int:
        """Images this process is expected to hand the reader: those of the units it took,
        and all of its own block's units not taken yet (for the progress bar)."""
        return self.stats.images + sum(self._own_left.values())

    def order(self) -> list[int]:
        own = block(self.share, self.plan.units)
        if not self.share.steal or not self.stores:
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
        ahead: tuple[Taken, Iterator[ImageBatch]] | None = None
        batches: Iterator[ImageBatch] = iter(())
        try:
            while not self._stopped():
                if ahead is None:
                    ahead = self._next(units, reader, block=True)
                    if ahead is None:
                        return
                (taken, batches), ahead = ahead, None
                yield UnitMark(taken.states, start=True)
                for batch in batches:
                    if ahead is None and not self._stopped():  # before the batch goes to the encoder
                        ahead = self._next(units, reader, block=False)
                    yield batch
                yield UnitMark(taken.states, start=False)
                self._release(taken.release, taken.index)
        finally:  # stopped: shut the decode workers down now (a unit taken ahead is released at close)
            for it in (batches, ahead[1] if ahead is not None else iter(())):
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            units.close()

    def _next(
        self, units: Iterator[Taken | None], reader: ImageReader, *, block: bool
    ) -> tuple[Taken, Iterator[ImageBatch]] | None:
        """The next unit taken and its batches (started), or None: none left, or (without
        `block`) none to take right now."""
        for taken in units:
            if taken is None:  # every unit left is held by another process
                if not block:
                    return None
                t0 = time.monotonic()
                self._stop_wait(self.poll_s)
                self.stats.waited_s += time.monotonic() - t0
                if self._stopped():
                    return None
                continue
            todo = self._todo(taken)
            self.stats.images += len(todo)
            self.stats.planned += len(taken.items)
            return taken, reader.start(todo) if todo else iter(())
        return None

    def _finished(self) -> set[int]:
        """Units of the plan every model's store has finished."""
        done = set(range(self.plan.units))
        for m in self.stores:
            ids = m.unit_store.finished()
            done &= {u for u in done if m.unit_id(u) in ids}
        return done

    def _units(self) -> Generator[Taken | None, None, None]:
        """Units as this process takes them (in `order`); None whenever all the units left
        are held by others (the caller waits and asks again)."""
        finished = self._finished() if self.stores else set()
        remaining = [u for u in self.order() if u not in finished]
        for u in list(self._own_left):
            if u in finished:
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
                elif isinstance(state, Taken):
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

    def _take(self, u: int) -> Taken | str | None:
        """The unit if this process now owns it; "held" if another does; None if finished.

        The first store's lease is the unit's (every process of the build takes it
        first); then each store that has not finished the unit is leased too, so its
        writer owns its shards as in a build of one model. A store that has finished
        the unit gets no state: its model needs nothing of it."""
        items = self.items[self.plan.unit_slice(u)]
        if not self.stores:
            return Taken(u, items, tuple(None for _ in self.models))
        lead = self.stores[0]
        uid = self.plan.unit_id(u)
        if not lead.unit_store.leases.acquire(uid):
            return "held"
        unfinished = [m for m in self.stores if not m.unit_store.is_finished(m.unit_id(u))]
        leased = [lead]
        for m in unfinished:
            if m is not lead and not m.unit_store.leases.acquire(m.unit_id(u)):
                self._release(leased, u)  # another build writes that store now
                return "held"
            leased.append(m)
        if not unfinished:  # finished (the process's first listing said which were)
            self._release(leased, u)
            return None
        states = tuple(
            m.unit_store.unit_state(m.store_plan, u, items) if m in unfinished else None for m in self.models
        )
        return Taken(u, items, states, release=() if lead in unfinished else (lead,))

    @staticmethod
    def _release(models: Sequence[ModelUnits], u: int) -> None:
        for m in models:
            m.unit_store.leases.release(m.unit_id(u))

    def _todo(self, taken: Taken) -> list[ImageItem]:
        """The unit's images some model still needs; each model's needs grow by its own."""
        keys = [it.key for it in taken.items]
        every: set[str] = set()
        for m, state in zip(self.models, taken.states, strict=True):
            allowed = [k for k in keys if k not in m.excluded]
            needed = set(allowed) - state.done_keys if state is not None else set()
            for w in m.writers:
                if not hasattr(w, "begin_unit"):  # per-image files: theirs to say
                    needed |= w.pending(allowed)
            m.needs |= needed
            every |= needed
        return [it for it in taken.items if it.key in every]


@dataclass(frozen=True, slots=True)
class Taken:
    """A unit this process owns: its images and each model's state of it (None: no store)."""

    index: int
    items: list[ImageItem]
    states: tuple[UnitState | None, ...]
    # leases to release once its batches are out: the first store's, when that store had
    # finished the unit (the other stores' writers release their own as they commit it)
    release: tuple[ModelUnits, ...] = ()
