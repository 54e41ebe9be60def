"""The store side of a distributed build: plan, leases, a writer per unit, finalize.

Many processes (on many hosts) write one Zarr store at once, each a unit at a time:

1. Every process opens the store (the first creates it: metadata, then the group by a
   conditional create) and gets the build's plan (`featstore.store.plans`): the one
   already there for its listing, or a new one, created conditionally.
2. For each unit it takes, it acquires the unit's lease (`featstore.store.leases`),
   checks the unit is not finished, reads the unit's keys chunks (what is committed of
   it) and hands the rest to the encoder. `UnitWriter` writes the unit's shards exactly
   as the single-process writer writes shards (each object whole, the keys chunk last:
   the commit record), refilling a partial shard a killed or stopped owner left, and
   checks before each commit that the lease is still its own.
3. When a unit's rows are all committed it writes the unit's record (`units/c/<id>`:
   its row count and failures) and releases the lease. A unit with a record is finished.
4. The process that finds every unit of the plan finished (and wins the finalize
   lease) is the store's metadata writer: it merges the failures of every unit into
   the group's `failed` attribute, once each, raises the arrays' shapes to the rows
   and rewrites the group's consolidated metadata and `num_rows` (for zarr-python,
   xarray and TensorStore; featstore's readers use the commit records). A store an older
   featstore made gets its `key`, `key_hash` and dimension names here (`bring_current`).

No process writes another's objects: a unit's shards belong to the unit's lease holder.
A process that dies leaves its unit's committed shards (whole), its lease (taken over
at once on the same host, after it expires elsewhere) and temporary files (deleted by
the finalizer).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from featstore.batches import EncodedBatch, EncodingInfo, Failure
from featstore.errors import StoreError, StoreLockedError
from featstore.store._blobs import Blobs, LocalBlobs, open_blobs
from featstore.store._zarr_layout import Layout, _committed, _doc
from featstore.store._zarr_meta import COORDINATION_DIMENSIONS, put_json
from featstore.store._zarr_write import ZarrShardWriter, bring_current, open_for_writing
from featstore.store.base import KEYS, failures_from_attrs
from featstore.store.leases import LEASES, Leases
from featstore.store.location import Location
from featstore.store.plans import (
    PLANS,
    UNITS,
    Plan,
    create_plan,
    finished_units,
    latest_plan,
    listing_digest,
    plans_end,
    read_unit_failures,
    write_unit_record,
)
from featstore.store.writer import StoreWriter

FINALIZE = 2**62  # the lease that elects the metadata writer (no unit has this id)


def _coordination_documents() -> dict[str, dict[str, Any]]:
    """zarr.json of the `plans`, `units` and `leases` arrays, as zarr-python writes them."""
    import zarr
    from zarr.codecs import VLenUTF8Codec, ZstdCodec
    from zarr.storage import MemoryStore

    store = MemoryStore()
    root = zarr.open_group(store, mode="w", zarr_format=3)
    for name in (PLANS, UNITS):
        root.create_array(
            name,
            shape=(0,),
            dtype=str,
            chunks=(1,),
            serializer=VLenUTF8Codec(),
            compressors=ZstdCodec(level=3),
            dimension_names=COORDINATION_DIMENSIONS[name],
        )
    root.create_array(
        LEASES,
        shape=(0, 0),
        dtype=str,
        chunks=(1, 1),
        serializer=VLenUTF8Codec(),
        compressors=None,
        dimension_names=COORDINATION_DIMENSIONS[LEASES],
    )
    return {k: json.loads(v.to_bytes()) for k, v in store._store_dict.items() if k.endswith("/zarr.json")}


@dataclass
class UnitState:
    """One unit of a plan as found in the store when its lease was acquired."""

    plan: Plan
    index: int  # u: the unit's place in the plan
    items: list[Any]  # the unit's ImageItems, in order
    committed: list[list[str]]  # per shard of the unit: its committed keys
    failures: list[Failure] = field(default_factory=list)  # recorded while writing it

    @property
    def id(self) -> int:
        """The unit's first shard (units are named by it)."""
        return self.plan.unit_id(self.index)

    @property
    def done_keys(self) -> set[str]:
        return {k for shard in self.committed for k in shard}


class UnitStore:
    """A distributed build's handle on one Zarr store (see the module docstring)."""

    def __init__(self, blobs: Blobs, layout: Layout) -> None:
        """Use `UnitStore.open` (a build) or `UnitStore.existing` (finalize)."""
        self.location = blobs.location
        self.blobs = blobs
        self.layout = layout
        self.info = layout.info
        self.shard_rows = layout.shard_rows
        missing = {k: v for k, v in _coordination_documents().items() if self.blobs.read(k) is None}
        if missing:  # identical documents, whoever writes them
            self.blobs.write_many({k: put_json(v) for k, v in missing.items()})
        self.leases = Leases(self.blobs)

    @classmethod
    def open(cls, location: Location, info: EncodingInfo, *, version: str, shard_rows: int) -> UnitStore:
        """Open the store for a build's process, creating it if there is none."""
        blobs, layout = open_for_writing(
            location, info, version=version, overwrite=False, shard_rows=shard_rows, sole=False, commits=False
        )  # each process reads the commits of the units it takes, not the whole store's
        return cls(blobs, layout)

    @classmethod
    def existing(cls, location: Location) -> UnitStore:
        blobs = open_blobs(location)
        try:
            return cls(blobs, Layout(blobs, commits=False))
        except BaseException:
            blobs.close()
            raise

    # -- the plan -----------------------------------------------------------------------

    def plan(self, keys: Sequence[str], failures: Sequence[Failure], unit_images: int) -> Plan:
        """The plan for this listing: the latest one made from it, or a new one."""
        digest = listing_digest(keys)
        for _ in range(4):
            latest = latest_plan(self.blobs)
            if latest is not None and not latest.closed and latest.digest == digest:
                return latest
            plan = self._new_plan(latest, keys, failures, digest, unit_images)
            if create_plan(self.blobs, plan):
                return plan
            winner = latest_plan(self.blobs)  # another process planned first
            if winner is not None and winner.index == plan.index and winner.digest != digest:
                raise StoreError(
                    f"{self.location}: another process of this build listed different images (were files being "
                    "added while it started?); re-run the same command"
                )
        raise StoreError(f"{self.location}: could not agree on a plan with the other processes")

    def _new_plan(
        self, latest: Plan | None, keys: Sequence[str], failures: Sequence[Failure], digest: str, unit_images: int
    ) -> Plan:
        if latest is not None and not latest.closed:
            self._refuse_running(latest)  # so no other process commits while the keys are read
        layout = self.layout
        layout.load_commits()  # what is committed now
        present: set[str] = set()
        ids = layout.shards.tolist()
        chunks = layout.readers[KEYS].chunks(ids) if ids else []  # type: ignore[union-attr]
        for chunk, k in zip(chunks, layout.counts.tolist(), strict=True):
            present.update(str(v) for v in chunk[:k].tolist())
        todo = [k for k in keys if k not in present]
        old_failed = failures_from_attrs(layout.attrs)
        base = max(plans_end(self.blobs), int(layout.shards[-1]) + 1 if len(layout.shards) else 0)
        s = self.shard_rows
        return Plan(
            index=latest.index + 1 if latest is not None else 0,
            base=base,
            shard_rows=s,
            unit_shards=max(1, math.ceil(unit_images / s)),
            count=len(todo),
            digest=digest,
            keys=None if not present and not old_failed and base == 0 else todo,
            failures=list(failures),
        )

    def _refuse_running(self, plan: Plan) -> None:
        done = finished_units(self.blobs)
        for u in range(plan.units):
            uid = plan.unit_id(u)
            if uid not in done and (lease := self.leases.holder(uid)) is not None:
                raise StoreLockedError(
                    f"{self.location} is being written by a build of a different image list ({lease.describe()}); "
                    "wait for it, or stop it first"
                )

    # -- units --------------------------------------------------------------------------

    def finished(self) -> set[int]:
        return finished_units(self.blobs)

    def is_finished(self, unit_id: int) -> bool:
        from featstore.store.plans import unit_key

        return self.blobs.read(unit_key(unit_id)) is not None

    def unit_state(self, plan: Plan, u: int, items: list[Any]) -> UnitState:
        """Unit `u` as committed now (read fresh: another process may have written it).

        A unit's shards are committed in order, each full before the next, so its keys
        chunks are read one by one up to the first missing or partial one: a unit
        nobody has started costs one read."""
        first = plan.unit_id(u)
        keys_reader = self.layout.readers[KEYS]
        committed: list[list[str]] = []
        for i in range(plan.unit_shards):
            key = keys_reader.key(first + i)  # type: ignore[union-attr]
            data = self.blobs.read(key)
            if data is None:
                break
            chunk = keys_reader.decode(data, key)  # type: ignore[union-attr]
            committed.append([str(v) for v in chunk[: _committed(chunk)].tolist()])
            if len(committed[-1]) < self.shard_rows:
                break
        committed += [[] for _ in range(plan.unit_shards - len(committed))]
        return UnitState(plan, u, items, committed)

    def writer_stage(self) -> UnitStoreWriter:
        """The pipeline's writer stage for this store."""
        return UnitStoreWriter(self)

    # -- finalize -----------------------------------------------------------------------

    def complete(self, plan: Plan) -> tuple[int, int]:
        """(finished units, units) of the plan."""
        done = self.finished()
        return sum(plan.unit_id(u) in done for u in range(plan.units)), plan.units

    def finalize(self, plan: Plan, poll_s: float = 0.2) -> bool:
        """If every unit of `plan` is finished: merge the failures into the store's
        attributes and raise the arrays' shapes, once (the finalize lease elects the
        process; the others wait for it). True when the store is finalized, False if
        units are still unfinished."""
        while True:
            done, total = self.complete(plan)
            if done < total:
                return False
            group = _doc(self.blobs.read("zarr.json"), "zarr.json") or {}
            if (group.get("attributes") or {}).get("plan") == plan.index:
                return True  # by another process, or an earlier run
            if self.leases.acquire(FINALIZE):
                break
            time.sleep(poll_s)  # another process finalizes now (or its lease expires)
        try:
            group = _doc(self.blobs.read("zarr.json"), "zarr.json") or {}
            attrs = dict(group.get("attributes") or {})
            if attrs.get("plan") == plan.index:
                return True
            planned = set(plan.keys) if plan.keys is not None else set()
            new = plan.failures + read_unit_failures(self.blobs, [plan.unit_id(u) for u in range(plan.units)])
            redone = {f.key for f in new} | planned
            merged: dict[str, str] = {f.key: f.reason for f in failures_from_attrs(attrs) if f.key not in redone}
            for f in new:
                merged.pop(f.key, None)
                merged[f.key] = f.reason
            layout = self._raise_shapes()
            if isinstance(self.blobs, LocalBlobs):
                self.blobs.remove_partials("")  # every unit is committed: these are killed writers'
            stale = [k for k in self.blobs.list(f"{LEASES}/c") if not k.startswith(f"{LEASES}/c/{FINALIZE}/")]
            self.blobs.delete_many(stale)
            attrs["failed"] = [{"key": k, "reason": r} for k, r in merged.items()]
            attrs["plan"] = plan.index
            layout.attrs = attrs
            if not layout.current:  # a store an older featstore made: its key_hash and dimension names
                bring_current(layout)
            else:  # after the arrays' documents: the consolidated metadata, `num_rows`, the attributes
                self.blobs.write_many({"zarr.json": put_json(layout.group_document())})
        finally:
            self.leases.release(FINALIZE)
        return True

    def _raise_shapes(self) -> Layout:
        """Raise the arrays' shapes to the committed rows; the store's layout as it is then
        (fresh metadata, every commit read)."""
        layout = Layout(self.blobs)
        docs = {}
        for name, meta in layout.meta.items():
            if meta["shape"][0] < layout.extent:
                meta["shape"] = [layout.extent, *meta["shape"][1:]]
                docs[f"{name}/zarr.json"] = put_json(meta)
        self.blobs.write_many(docs)
        return layout

    def close(self) -> None:
        self.leases.release_all()
        self.blobs.close()


def finalize_store(location: Location) -> tuple[int, int, bool]:
    """Finalize the store's latest plan if all its units are finished:
    (finished units, units, finalized). A store without plans counts as finalized."""
    store = UnitStore.existing(location)
    try:
        plan = latest_plan(store.blobs)
        if plan is None or plan.closed:
            return 0, 0, True
        done, total = store.complete(plan)
        return done, total, store.finalize(plan)
    finally:
        store.close()


class UnitWriter(ZarrShardWriter):
    """Writes one unit at a time into its own shards (see the module docstring). Commits
    go exactly as the single-process writer's; ownership is the unit's lease, and the
    metadata is left to the finalizer."""

    def __init__(self, store: UnitStore) -> None:  # the store is open: no second opening
        self.location, self.blobs, self.layout = store.location, store.blobs, store.layout
        self.store = store
        self.leases = store.leases
        self._setup()
        self.committed_keys = []
        self.extent = 0
        self.state: UnitState | None = None
        self.shard = self.shard_committed = 0
        self.present: set[str] = set()  # the `RowSink` side: `UnitStoreWriter` keeps it per unit
        self.old_failures: list[Failure] = []  # failures are merged at finalize, not here

    def begin(self, state: UnitState) -> None:
        """Position at the unit's first shard not yet full, refilling it if partial."""
        self.state = state
        self.keys, self.sources = [], []
        self.masks[:] = 0
        self.orig[:] = 0
        full = 0
        while full < len(state.committed) and len(state.committed[full]) == self.shard_rows:
            full += 1
        self.shard = state.id + full
        self.shard_committed = len(state.committed[full]) if full < len(state.committed) else 0
        if self.shard_committed:
            self.feats.forget(self.shard)
            for r in self.chunked.values():
                r.forget(self.shard)
            self._reload(self.shard, self.shard_committed)

    def _own(self, shard: int) -> None:
        state = self.state
        if state is None or not state.id <= shard < state.id + state.plan.unit_shards:
            raise StoreError(f"{self.location}: shard {shard} is outside the unit being written")

    def _still_own(self, shard: int) -> bool:  # before each shard's commit: no request
        return self.state is not None and self.leases.still_mine(self.state.id, check_store=False)

    def _after_commit(self) -> None:
        pass  # shapes and attributes: the finalizer's

    def end(self) -> None:
        """Commit the unit's last shard, write the unit's record, release its lease."""
        state = self.state
        if state is None:
            return
        if len(self.keys) > self.shard_committed:
            self._commit_shard()
        if not self.leases.still_mine(state.id):
            raise StoreLockedError(f"{self.location}: unit {state.id} was taken over by another process meanwhile")
        rows = (self.shard - state.id) * self.shard_rows + len(self.keys)  # the unit's rows, all committed
        write_unit_record(self.blobs, state.id, rows, state.failures)
        self.leases.release(state.id)
        self.state = None

    # -- the `RowSink` side, for a stop in the middle of a unit ------------------------

    def finish(self, failed: list[dict[str, str]]) -> None:
        """Commit what was written of the open unit (no record: it is not finished).
        `failed` is not stored: the finalizer merges the units' records."""
        if self.state is not None and len(self.keys) > self.shard_committed:
            self._commit_shard()

    def abort(self) -> None:
        """Release the open unit's lease (its committed shards stay)."""
        if self.state is not None:
            self.leases.release(self.state.id)
        self.state = None


class UnitStoreWriter(StoreWriter):
    """The pipeline's writer stage for a distributed build's store: `StoreWriter` (each key
    once, the batch checks, the rows handed to the sink) over a `UnitWriter`, plus
    `begin_unit` / `end_unit`, called by the runner in the stream's order; failures go
    to the open unit's record."""

    def __init__(self, store: UnitStore) -> None:
        self.store = store
        self._unit = UnitWriter(store)
        self._state: UnitState | None = None
        super().__init__(store.location, store.info, self._unit)

    def begin_unit(self, state: UnitState) -> None:
        self._state = state
        self._present = set(state.done_keys)  # what `pending` and `write` skip: the unit's committed keys
        self._unit.begin(state)

    def write(self, batch: EncodedBatch) -> None:
        if self._state is not None:  # no unit open: a unit this store has finished (another model's rows)
            super().write(batch)

    def record_failures(self, failures: Sequence[Failure]) -> None:
        if self._state is not None:
            self._state.failures.extend(failures)

    def end_unit(self, state: UnitState) -> None:
        self._unit.end()
        self._state = None

    def close(self) -> None:
        """Commit what was written of an open unit (it stays unfinished) and release the leases."""
        try:
            super().close()
        finally:
            self.store.leases.release_all()
