"""Writing Zarr stores (layout 2), local or on object storage: creating and deleting a
store, the single-process shard writer (`ZarrShardWriter`, the StoreWriter sink
`ZarrSink`), claims and the check for a running writer, and upgrading older stores
(`upgrade_store`, `bring_current`).

The commit protocol is described in `featstore.store`: a shard's objects (one per array)
are each written whole, its `keys` chunk last, which is its commit record.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from typing import Any

import numpy as np

from featstore.batches import EncodingInfo
from featstore.errors import StoreError, StoreLockedError
from featstore.store._blobs import Blobs, LocalBlobs, RemoteBlobs, open_blobs
from featstore.store._direct import ChunkedRows, ShardedRows, zarr_rows
from featstore.store._zarr_layout import Layout, _chunk_ids, _doc
from featstore.store._zarr_meta import (
    CLAIMS,
    DERIVED,
    KEY,
    group_document,
    key_hashes,
    metadata_documents,
    put_json,
    with_dimension_names,
)
from featstore.store.base import (
    EMBEDDING,
    FEATURES,
    KEYS,
    LAYOUT_VERSION,
    MASKS,
    ORIG_SIZE,
    SOURCES,
    check_compatible,
)
from featstore.store.location import Location
from featstore.store.plans import close_plans, plans_end


def new_attrs(info: EncodingInfo, featstore_version: str, shard_rows: int) -> dict[str, Any]:
    return {
        "featstore_version": featstore_version,
        "layout_version": LAYOUT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **info.to_attrs(),
        "embedding_dim": info.embedding_dim,
        "shard_rows": shard_rows,
        "failed": [],
    }


def delete_store(blobs: Blobs) -> None:
    """Remove a store so that it never looks half-deleted: every shard's commit record (keys
    chunk) first, so readers see whole shards vanish; then the group's zarr.json (no store
    from here on; leftovers are invisible and overwritten by a new store); then the rest."""
    blobs.delete_many(blobs.list(f"{KEYS}/c"))
    blobs.delete_many(["zarr.json"])
    if isinstance(blobs, LocalBlobs):
        import shutil

        shutil.rmtree(blobs.location.path, ignore_errors=True)
    else:
        blobs.delete_many(blobs.list(""))


def create_store(blobs: Blobs, attrs: dict[str, Any], info: EncodingInfo, shard_rows: int) -> bool:
    """Write a new empty store; False if another writer created one meanwhile.

    The arrays' metadata first, then the group's `zarr.json` by a conditional create:
    the store exists from that one write on.
    """
    docs = metadata_documents(attrs, info, shard_rows)
    blobs.write_many({k: put_json(v) for k, v in docs.items() if k != "zarr.json"})
    return blobs.create("zarr.json", put_json(docs["zarr.json"]))


def _running_here(claim: str) -> int | None:
    """The pid in a claim made on this host by a process that still runs, else None.

    Claims name host and pid (see `ZarrShardWriter._init_claims`) and are deleted by the
    writer when it closes, so one that remains belongs to a running build or a killed one.
    A claim of another host cannot be checked from here: it counts as left by a killed build.
    """
    import socket

    fields = dict(f.split("=", 1) for f in claim.split()[1:] if "=" in f)
    if fields.get("host") != socket.gethostname() or not fields.get("pid", "").isdigit():
        return None
    pid = int(fields["pid"])
    if pid == os.getpid():  # another writer object in this process (a writer releases its claims on close)
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: it runs
        pass
    return pid


def live_writer(blobs: Blobs, *, leases: bool = True) -> int | None:
    """The pid of a build that writes the store at `blobs` now, or None: a build on this
    host that claimed an unfinished shard and still runs, or (`leases`) a process of a
    distributed build holding a live lease on a unit (see `featstore.store.leases`)."""
    if leases:
        from featstore.store.leases import live_holder

        if (holder := live_holder(blobs)) is not None:
            return holder.pid
    ids = _chunk_ids(blobs.list(f"{CLAIMS}/c"))
    if not ids:
        return None
    meta = _doc(blobs.read(f"{CLAIMS}/zarr.json"), f"{blobs.location}/{CLAIMS}/zarr.json")
    claims = zarr_rows(blobs, CLAIMS, meta, ()) if meta is not None else None
    if not isinstance(claims, ChunkedRows):
        return None
    committed = _chunk_ids(blobs.list(f"{KEYS}/c"))
    last = max(committed) if committed else 0  # the last committed shard may be refilled
    open_ids = [i for i in ids if i >= last]
    for found in claims.chunks(open_ids) if open_ids else []:
        if (pid := _running_here(str(found[0]))) is not None:
            return pid
    return None


def open_for_writing(
    location: Location,
    info: EncodingInfo,
    *,
    version: str,
    overwrite: bool,
    shard_rows: int,
    guarded: bool = False,
    sole: bool = True,
    commits: bool = True,
) -> tuple[Blobs, Layout]:
    """Open the store at `location` for writing rows made as `info` says, creating it
    (metadata first, then the group by a conditional create) if there is none.

    Refuses a store a running build on this host writes (unless `guarded`), one of an
    older layout, and one whose rows were made differently. `overwrite` deletes the old
    store first. `sole`: no other process writes the store now, so temporary files
    found are a killed writer's and are deleted (a distributed build's processes leave
    them to the one that finalizes). `commits`: see `Layout`.
    """
    blobs = open_blobs(location)
    try:
        if isinstance(blobs, RemoteBlobs):
            blobs.check_reachable()
        exists = blobs.read("zarr.json") is not None
        if exists and not guarded and (pid := live_writer(blobs, leases=sole)) is not None:  # before touching
            raise StoreLockedError(f"{location} is being written by another featstore build (pid {pid})")
        if exists and overwrite:
            delete_store(blobs)
            exists = False
        if not exists:
            if isinstance(blobs, LocalBlobs) and sole:
                blobs.remove_partials("")
            attrs = new_attrs(info, version, shard_rows)
            create_store(blobs, attrs, info, shard_rows)  # if another won the race, we open its store
        layout = Layout(blobs, commits=commits)
        if layout.version == LAYOUT_VERSION:
            check_compatible(location, layout.info, info)
        if isinstance(blobs, LocalBlobs) and sole:
            blobs.remove_partials("")  # temporary files of a killed writer's unfinished writes
    except BaseException:
        blobs.close()
        raise
    return blobs, layout


class ZarrShardWriter:
    """Appends rows to a Zarr store (layout 2), a whole shard at a time.

    This writer owns the shards from the store's last partial one on: it refills that
    shard (its committed rows read back first, so the object is rewritten whole, never
    patched) and then writes new shards in order. The shard's commit record is created
    conditionally, so a second writer of the same shard fails instead of overwriting.
    It is also the store's metadata writer: it raises the arrays' shapes after each
    commit (for plain Zarr readers) and writes the group attributes at `commit`.
    """

    def __init__(
        self,
        location: Location,
        info: EncodingInfo,
        *,
        version: str,
        overwrite: bool,
        shard_rows: int,
        guarded: bool = False,
    ) -> None:
        """`guarded`: the caller already holds a lock that keeps other writers out (the
        HDF5 backend's stage), so claims found at open are never a running writer's."""
        self.location = location
        self.blobs, self.layout = open_for_writing(
            location, info, version=version, overwrite=overwrite, shard_rows=shard_rows, guarded=guarded
        )
        if self.layout.version == LAYOUT_VERSION and not self.layout.current:
            bring_current(self.layout)  # this writer is the store's metadata writer
        self._setup()
        self.committed_keys: list[str] = self._read_keys()
        self.extent = self.layout.extent
        self._init_claims()
        shards, counts = self.layout.shards, self.layout.counts
        s = self.shard_rows
        start = plans_end(self.blobs)  # a distributed build's planned shards stay its own
        if len(shards) and counts[-1] < s and int(shards[-1]) >= start:  # refill the last, partial shard
            self.shard = int(shards[-1])
            self.shard_committed = int(counts[-1])
            self._reload(self.shard, self.shard_committed)
        else:
            self.shard = max(int(shards[-1]) + 1 if len(shards) else 0, start)
            self.shard_committed = 0
        if start:
            close_plans(self.blobs)  # this writer's keys are not in the plans: a later plan starts anew
        # Claims on shards not yet complete, as found now: their writers are gone (one build
        # per store at a time), so this writer may take exactly these over.
        ids = [i for i in _chunk_ids(self.blobs.list(f"{CLAIMS}/c")) if i >= self.shard]
        found = self.claims.chunks(ids) if ids else []
        self.stale_claims = {i: str(c[0]) for i, c in zip(ids, found, strict=True)}
        self.my_claims: set[int] = set()
        self._claim(self.shard)  # from now on a second build on this host is refused at once

    def _setup(self) -> None:
        """Readers and the open shard's buffers, from `self.layout`."""
        location = self.location
        check = self.layout
        if check.version != LAYOUT_VERSION:
            raise StoreError(
                f"{location} has layout {check.version} (featstore 0.1): run `featstore upgrade {location}` "
                "once to append to it (reading works as is)"
            )
        feats = self.layout.readers[FEATURES]
        if not isinstance(feats, ShardedRows) or not feats.index_at_end or not self.layout.readers[MASKS]:
            raise StoreError(f"{location}: this store's layout was not written by featstore; convert it first")
        self.feats: ShardedRows = feats
        self.chunked = {n: r for n, r in self.layout.readers.items() if isinstance(r, ChunkedRows)}
        if len(self.chunked) != len(self.layout.readers) - 1:
            raise StoreError(f"{location}: this store's layout was not written by featstore; convert it first")
        for name in DERIVED:  # absent until a metadata writer brings an old store current
            reader = zarr_rows(self.layout.blobs, name, self.layout.meta.get(name), ())
            if isinstance(reader, ChunkedRows):
                self.chunked[name] = reader
        self.info = self.layout.info
        self.attrs = dict(self.layout.attrs)
        s = self.shard_rows = self.layout.shard_rows
        g, e = self.info.grid, self.info.embedding_dim
        self.row_bytes = feats.row_bytes
        self._buf = bytearray(s * self.row_bytes + feats.index_bytes)
        self._rows = np.frombuffer(self._buf, dtype=feats.dtype, count=s * int(np.prod(feats.row_shape)))
        self._rows = self._rows.reshape(s, *feats.row_shape)
        self.masks = np.zeros((s, g, g), dtype=np.uint8)
        self.orig = np.zeros((s, 2), dtype=np.int32)
        self.emb = np.zeros((s, e), dtype=np.float32) if e else None
        self.keys: list[str] = []
        self.sources: list[str] = []

    def _init_claims(self) -> None:
        import socket
        import uuid

        meta = self.layout.claims_meta
        if meta is None:  # a store upgraded from layout 1: the claims array comes now
            docs = metadata_documents(self.attrs, self.info, self.shard_rows)
            meta = docs[f"{CLAIMS}/zarr.json"]
            self.blobs.write_many({f"{CLAIMS}/zarr.json": put_json(meta)})
        self.claims_meta = meta
        reader = zarr_rows(self.blobs, CLAIMS, meta, ())
        if not isinstance(reader, ChunkedRows):
            raise StoreError(f"{self.location}: claims array of an unknown layout")
        self.claims = reader
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.claim_text = f"{uuid.uuid4().hex} host={socket.gethostname()} pid={os.getpid()} since={now}"

    def _holder(self, shard: int) -> str | None:
        key = self.claims.key(shard)
        data = self.blobs.read(key)
        return None if data is None else str(self.claims.decode(data, key)[0])

    def _claim(self, shard: int) -> None:
        """Own `shard` before writing any of its objects: create its claim, or find it ours,
        or take over one that was stale when this writer opened; else StoreLockedError."""
        key, mine = self.claims.key(shard), self.claims.encode([self.claim_text])
        if self.blobs.create(key, mine):
            self.my_claims.add(shard)
            return
        holder = self._holder(shard)
        if holder == self.claim_text:
            return
        if holder is None or self.stale_claims.get(shard) == holder:
            self.blobs.write_many({key: mine})
            self.my_claims.add(shard)
            return
        raise StoreLockedError(
            f"{self.location}: shard {shard} is being written by another writer ({holder.split(' since')[0]}); "
            "one build per store at a time"
        )

    def _read_keys(self) -> list[str]:
        reader = self.chunked[KEYS]
        out: list[str] = []
        for chunk, k in zip(reader.chunks(self.layout.shards.tolist()), self.layout.counts.tolist(), strict=True):
            out += [str(v) for v in chunk[:k].tolist()]
        return out

    def _reload(self, shard: int, k: int) -> None:
        rows = np.arange(shard * self.shard_rows, shard * self.shard_rows + k, dtype=np.int64)
        r = self.chunked
        self.feats.read(rows, self._rows[:k])
        r[MASKS].read(rows, self.masks[:k])
        r[ORIG_SIZE].read(rows, self.orig[:k])
        if self.emb is not None:
            r[EMBEDDING].read(rows, self.emb[:k])
        for name, dest in ((KEYS, self.keys), (SOURCES, self.sources)):
            out = np.empty(k, dtype=object)
            r[name].read(rows, out)
            dest += [str(v) for v in out.tolist()]

    @property
    def committed(self) -> int:
        return len(self.committed_keys)

    def append(
        self,
        keys: list[str],
        sources: list[str],
        features: np.ndarray,
        masks: np.ndarray,
        orig: np.ndarray,
        embedding: np.ndarray | None,
    ) -> None:
        done = 0
        while done < len(keys):
            at = len(self.keys)
            k = min(len(keys) - done, self.shard_rows - at)
            self._rows[at : at + k] = features[done : done + k]
            self.masks[at : at + k] = masks[done : done + k]
            self.orig[at : at + k] = orig[done : done + k]
            if self.emb is not None and embedding is not None:
                self.emb[at : at + k] = embedding[done : done + k]
            self.keys += keys[done : done + k]
            self.sources += sources[done : done + k]
            done += k
            if len(self.keys) == self.shard_rows:
                self._commit_shard()

    def _commit_shard(self) -> None:
        """Write the open shard's objects, then its commit record; start the next shard."""
        k, s, r = len(self.keys), self.shard, self.chunked
        if k > self.shard_committed:
            end = k * self.row_bytes
            index = self.feats.index_for(k)
            self._buf[end : end + len(index)] = index
            objects: dict[str, bytes | memoryview] = {
                self.feats.key(s): memoryview(self._buf)[: end + len(index)],
                r[MASKS].key(s): r[MASKS].encode(self.masks[:k]),
                r[ORIG_SIZE].key(s): r[ORIG_SIZE].encode(self.orig[:k]),
                r[SOURCES].key(s): r[SOURCES].encode(self.sources),
            }
            if self.emb is not None:
                objects[r[EMBEDDING].key(s)] = r[EMBEDDING].encode(self.emb[:k])
            for name in DERIVED:
                if name in r:
                    objects[r[name].key(s)] = r[name].encode(self.keys if name == KEY else key_hashes(self.keys))
            self._own(s)
            self.blobs.write_many(objects)
            if not self._still_own(s):  # taken over meanwhile: the new owner rewrites it all
                raise StoreLockedError(f"{self.location}: shard {s} was taken over by another writer meanwhile")
            record = r[KEYS].encode(self.keys)
            if self.shard_committed:  # a rewrite of this writer's own shard: replaces the record
                self.blobs.write_many({r[KEYS].key(s): record})
            elif not self.blobs.create(r[KEYS].key(s), record):
                raise StoreLockedError(
                    f"{self.location}: shard {s} was committed by another writer meanwhile "
                    "(two builds of one store at once?); nothing of this shard was kept"
                )
            self.committed_keys += self.keys[self.shard_committed :]
            self.shard_committed = k
            self.extent = max(self.extent, s * self.shard_rows + k)
            self._after_commit()
        if k == self.shard_rows:
            self.shard += 1
            self.shard_committed = 0
            self.keys, self.sources = [], []
            self.masks[:] = 0
            self.orig[:] = 0

    # Ownership and metadata: this single writer claims shard by shard and raises the
    # shapes after each commit; a distributed build's unit writer overrides these.
    def _own(self, shard: int) -> None:
        self._claim(shard)

    def _still_own(self, shard: int) -> bool:
        return self._holder(shard) == self.claim_text

    def _after_commit(self) -> None:
        self._update_shapes()

    def _update_shapes(self) -> None:
        docs = {}
        for name, meta in self.layout.meta.items():
            if meta["shape"][0] != self.extent:
                meta["shape"] = [self.extent, *meta["shape"][1:]]
                docs[f"{name}/zarr.json"] = put_json(meta)
        shards = math.ceil(self.extent / self.shard_rows)
        if self.claims_meta["shape"][0] < shards:
            self.claims_meta["shape"] = [shards]
            docs[f"{CLAIMS}/zarr.json"] = put_json(self.claims_meta)
        self.blobs.write_many(docs)
        self._write_group()  # after the arrays' documents: never ahead of them

    def _write_group(self) -> None:
        """The group's zarr.json: attributes, `num_rows` and the consolidated metadata."""
        docs = {**self.layout.documents(), CLAIMS: self.claims_meta}
        self.blobs.write_many({"zarr.json": put_json(group_document(self.attrs, docs, num_rows=self.committed))})

    def commit(self, attrs: dict[str, Any]) -> None:
        """Commit the open (partial) shard if it has new rows, then write these group attributes."""
        if len(self.keys) > self.shard_committed:
            self._commit_shard()
        if attrs:
            self.attrs.update(attrs)
            self._write_group()

    def close(self) -> None:
        """Release this writer's claims (those still its own), so that the next build finds
        none of a running writer, then the connection."""
        try:
            mine = [self.claims.key(s) for s in sorted(self.my_claims) if self._holder(s) == self.claim_text]
            self.blobs.delete_many(mine)
        except Exception:
            pass
        self.my_claims.clear()
        self.blobs.close()


def upgrade_store(location: Location) -> tuple[int, int]:
    """Bring a store to the current layout and metadata in place; (old, new) layout versions.

    Layout 1 (featstore 0.1) to 2: data objects stay; only commit records change: the
    last shard's keys chunk is cut to the committed rows, keys chunks beyond them are
    deleted, and then the attributes say layout 2 (the switch: a single write). Shapes are
    set to the committed rows last. Then `bring_current` adds what older stores lack.
    Refused while a build writes the store (metadata has one writer).
    """
    blobs = open_blobs(location)
    try:
        if (pid := live_writer(blobs)) is not None:
            raise StoreLockedError(f"{location} is being written by a featstore build (pid {pid}); upgrade it after")
        layout = Layout(blobs)
        old = layout.version
        if old != LAYOUT_VERSION:
            _upgrade_layout1(layout)
            layout = Layout(blobs)
        bring_current(layout)  # also re-consolidates a store another tool edited
        return old, LAYOUT_VERSION
    finally:
        blobs.close()


def _upgrade_layout1(layout: Layout) -> None:
    blobs, location = layout.blobs, layout.location
    keys = layout.readers[KEYS]
    if not isinstance(keys, ChunkedRows) or keys.chunk_rows != layout.shard_rows:
        raise StoreError(f"{location}: keys are not chunked a shard at a time; use `featstore convert` instead")
    s, n = layout.shard_rows, layout.num_rows
    last = math.ceil(n / s)
    if n % s:
        (chunk,) = keys.chunks([last - 1])
        blobs.write_many({keys.key(last - 1): keys.encode([str(v) for v in chunk[: n % s].tolist()])})
    blobs.delete_many(k for k in blobs.list(f"{KEYS}/c") if _chunk_ids([k]) and _chunk_ids([k])[0] >= last)
    attrs = dict(layout.attrs)
    attrs.pop("num_rows", None)
    attrs.update(layout_version=LAYOUT_VERSION, shard_rows=s, embedding_dim=layout.info.embedding_dim)
    blobs.write_many({"zarr.json": put_json({"zarr_format": 3, "node_type": "group", "attributes": attrs})})
    docs = {}
    for name, meta in layout.meta.items():
        meta["shape"] = [n, *meta["shape"][1:]]
        docs[f"{name}/zarr.json"] = put_json(meta)
    blobs.write_many(docs)


def bring_current(layout: Layout) -> None:
    """Add, in place, what a layout-2 store written by an older featstore lacks: `key` and
    `key_hash` of every committed row (their chunks, then their documents), dimension names
    on every array, and last the group's document with `num_rows` and consolidated metadata.
    Only the store's metadata writer calls this (the layout must have its commits loaded);
    rows and commit records stay as they are."""
    blobs, info = layout.blobs, layout.info
    missing = [name for name in DERIVED if name not in layout.meta]
    if missing:
        docs = metadata_documents(layout.attrs, info, layout.shard_rows)
        writers = {name: zarr_rows(blobs, name, docs[f"{name}/zarr.json"], ()) for name in missing}
        keys = layout.readers[KEYS]
        if not isinstance(keys, ChunkedRows) or not all(isinstance(w, ChunkedRows) for w in writers.values()):
            raise StoreError(f"{layout.location}: this store's layout was not written by featstore; convert it first")
        ids = layout.shards.tolist()
        for i in range(0, len(ids), 256):  # a few hundred small objects per round trip
            part = ids[i : i + 256]
            objects = {}
            for s, chunk in zip(part, keys.chunks(part), strict=True):
                values = [str(v) for v in chunk.tolist()]
                for name, w in writers.items():
                    objects[w.key(s)] = w.encode(values if name == KEY else key_hashes(values))  # type: ignore[union-attr]
                keys.forget(s)
            blobs.write_many(objects)
        for name in missing:  # documents after their chunks
            layout.meta[name] = docs[f"{name}/zarr.json"]
            layout.meta[name]["shape"] = [layout.meta[KEYS]["shape"][0]]
    changed = set(missing)
    docs = layout.documents()
    changed.update(name for name, doc in docs.items() if with_dimension_names(name, doc, info))
    blobs.write_many({f"{name}/zarr.json": put_json(docs[name]) for name in sorted(changed)})
    blobs.write_many({"zarr.json": put_json(layout.group_document())})
    layout.consolidated = True


class ZarrSink(ZarrShardWriter):
    """The Zarr backend's side of `StoreWriter`."""

    def __init__(self, location: Location, info: EncodingInfo, **options: Any) -> None:
        super().__init__(location, info, **options)  # version, overwrite, shard_rows, guarded: see there
        from featstore.store.base import failures_from_attrs

        self.old_failures = failures_from_attrs(self.attrs)
        self.present: set[str] = set(self.committed_keys) | set(self.keys)

    def finish(self, failed: list[dict[str, str]]) -> None:
        self.commit({"failed": failed})
        self.close()

    def abort(self) -> None:
        self.close()
