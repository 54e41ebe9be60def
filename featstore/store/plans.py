"""Work plans: how a distributed build cuts its image list into units, kept in the store.

A plan is the list of keys one build (all of its processes, and every re-run of it)
encodes, cut into units of `unit_shards` consecutive shards (`unit_shards * shard_rows`
keys each, in the list's order), placed at shards `base, base + 1, ...`. Unit `u`'s keys
go to shards `base + u * unit_shards` on, packed in order, so the store's rows come out
in the list's order: a distributed build's keys are in the same order as a
single-process build's.

Plan `p` is the object `plans/c/<p>` (a chunk of the `plans` string array), created
conditionally: processes that race to plan the same build all use the one that was
created first. It holds the base, the unit size, the key count and a digest of the
listing it was made from, the keys themselves unless they are the whole listing (a new
store), and the failures found while listing. A process re-running the same command
finds the latest plan with its listing's digest and takes it up again (the units are
the same, whatever the number of processes); a listing that changed (images added) gets
a new plan of the keys not yet stored, placed after every shard of the earlier plans.
A writer that appends outside of any plan (a single-process build, import-npy) closes
the plans first (a `closed` record), so that a later plan starts after its rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featstore.batches import Failure
from featstore.errors import CorruptStoreError
from featstore.store._blobs import Blobs

PLANS = "plans"  # one chunk per plan
UNITS = "units"  # one chunk per finished unit (by its first shard): its failures
DEFAULT_UNIT_IMAGES = 4096  # keys per unit, rounded up to whole shards


def listing_digest(keys: Sequence[str]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def _chunk_ids(keys: Sequence[str], prefix: str) -> list[int]:
    out = []
    for k in keys:
        rest = k[len(prefix) :] if k.startswith(prefix) else ""
        if rest.isdigit():
            out.append(int(rest))
    return sorted(out)


def encode_text(text: str) -> bytes:
    from numcodecs import VLenUTF8, Zstd

    return bytes(Zstd(level=3).encode(VLenUTF8().encode(np.array([text], dtype=object))))


def decode_text(data: bytes) -> str:
    from numcodecs import VLenUTF8, Zstd

    return str(VLenUTF8().decode(Zstd().decode(data))[0])


@dataclass(frozen=True)
class Plan:
    index: int
    base: int  # first shard
    shard_rows: int
    unit_shards: int
    count: int  # keys planned
    digest: str  # of the listing the plan was made from
    keys: list[str] | None = None  # None: the listing itself
    failures: list[Failure] = field(default_factory=list)  # found while listing
    closed: bool = False  # a barrier: rows were appended outside of any plan

    @property
    def unit_rows(self) -> int:
        return self.unit_shards * self.shard_rows

    @property
    def units(self) -> int:
        return math.ceil(self.count / self.unit_rows) if self.count else 0

    @property
    def end(self) -> int:
        """The first shard after this plan's."""
        return self.base + self.units * self.unit_shards

    def unit_id(self, u: int) -> int:
        """A unit is named by its first shard (unique across plans)."""
        return self.base + u * self.unit_shards

    def unit_slice(self, u: int) -> slice:
        return slice(u * self.unit_rows, min((u + 1) * self.unit_rows, self.count))

    def to_json(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "base": self.base,
                "shard_rows": self.shard_rows,
                "unit_shards": self.unit_shards,
                "count": self.count,
                "digest": self.digest,
                "keys": self.keys,
                "failures": [{"key": f.key, "reason": f.reason} for f in self.failures],
                "closed": self.closed,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> Plan:
        try:
            d: dict[str, Any] = json.loads(text)
            return cls(
                index=int(d["index"]),
                base=int(d["base"]),
                shard_rows=int(d["shard_rows"]),
                unit_shards=int(d["unit_shards"]),
                count=int(d["count"]),
                digest=str(d["digest"]),
                keys=None if d.get("keys") is None else [str(k) for k in d["keys"]],
                failures=[Failure(str(f["key"]), str(f["reason"])) for f in d.get("failures") or []],
                closed=bool(d.get("closed")),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptStoreError(f"{where}: damaged plan ({e})") from None


def plan_key(index: int) -> str:
    return f"{PLANS}/c/{index}"


def plan_ids(blobs: Blobs) -> list[int]:
    return _chunk_ids(blobs.list(f"{PLANS}/c"), f"{PLANS}/c/")


def read_plan(blobs: Blobs, index: int) -> Plan | None:
    data = blobs.read(plan_key(index))
    return None if data is None else Plan.from_json(decode_text(data), f"{blobs.location}/{plan_key(index)}")


def latest_plan(blobs: Blobs) -> Plan | None:
    ids = plan_ids(blobs)
    return read_plan(blobs, ids[-1]) if ids else None


def create_plan(blobs: Blobs, plan: Plan) -> bool:
    return blobs.create(plan_key(plan.index), encode_text(plan.to_json()))


def plans_end(blobs: Blobs) -> int:
    """The first shard after every plan's (0 without plans)."""
    ids = plan_ids(blobs)
    ends = [p.end for p in (read_plan(blobs, i) for i in ids) if p is not None]
    return max(ends, default=0)


def close_plans(blobs: Blobs) -> None:
    """Record that rows are appended outside of the plans (see the module docstring)."""
    ids = plan_ids(blobs)
    if not ids:
        return
    latest = read_plan(blobs, ids[-1])
    if latest is None or latest.closed:
        return
    end = plans_end(blobs)
    barrier = Plan(ids[-1] + 1, end, latest.shard_rows, latest.unit_shards, 0, "", keys=[], closed=True)
    create_plan(blobs, barrier)  # if another process wrote plan p+1 meanwhile, that one stands


def unit_key(unit_id: int) -> str:
    return f"{UNITS}/c/{unit_id}"


def finished_units(blobs: Blobs) -> set[int]:
    return set(_chunk_ids(blobs.list(f"{UNITS}/c"), f"{UNITS}/c/"))


def write_unit_record(blobs: Blobs, unit_id: int, rows: int, failures: Sequence[Failure]) -> None:
    doc = {"rows": rows, "failures": [{"key": f.key, "reason": f.reason} for f in failures]}
    blobs.write_many({unit_key(unit_id): encode_text(json.dumps(doc, ensure_ascii=False))})


def read_unit_failures(blobs: Blobs, unit_ids: Sequence[int]) -> list[Failure]:
    out: list[Failure] = []
    for uid, data in zip(unit_ids, blobs.read_many([unit_key(u) for u in unit_ids]), strict=True):
        if data is None:
            continue
        try:
            doc = json.loads(decode_text(data))
            out += [Failure(str(f["key"]), str(f["reason"])) for f in doc.get("failures") or []]
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptStoreError(f"{blobs.location}/{unit_key(uid)}: damaged unit record ({e})") from None
    return out
