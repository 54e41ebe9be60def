"""Leases on work units: which process of a distributed build writes a unit now.

A lease is one small object per unit and generation, `leases/c/<unit>/<generation>`
(a chunk of the store's 2-D `leases` string array, so plain Zarr sees a valid array),
holding its owner (a random id, host, pid, start) and when it expires. It needs only
what object storage gives (a conditional create, `If-None-Match: *`), no server and no
`If-Match`:

- **Acquire.** Create generation 0. If the unit already has leases, the highest
  generation is the current one: a live one (not expired, and not of a process of this
  host that no longer runs) refuses; an expired or dead one is taken over by creating
  the next generation (the conditional create lets exactly one taker win), then
  deleting the old one.
- **Renew.** A heartbeat thread rewrites each held lease with a later expiry every
  `ttl / 4`, so a live owner's lease never expires unless its process stalls for most
  of `ttl`.
- **Still mine?** Before each commit the owner checks that its last renewal is recent
  (under `ttl / 2` ago): a taker needs the lease expired, i.e. no renewal for `ttl`, so
  a lease renewed that recently cannot have been taken over (clocks agreeing to within
  `ttl / 2`). At the end of a unit it also reads the store: its own generation still
  names it and no next generation exists (two reads). A stalled owner stops there,
  before its commit record.
- **Release.** The owner deletes its lease when the unit is committed (or when it
  stops). After a release the next owner starts again at generation 0, which is why
  "still mine" compares the owner id, not only the generation.

A process on the same host can tell a dead owner at once (its pid is gone): a killed
worker's units are taken over immediately by the re-run (torchrun restarts, SIGKILL).
Owners on other hosts are trusted until their lease expires (`ttl`, default
`DEFAULT_TTL_S`; `FEATSTORE_LEASE_SECONDS` overrides it). Clocks must agree to well
within `ttl` (NTP does).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from featstore.store._blobs import Blobs

LEASES = "leases"  # the array: (unit, generation) -> owner
DEFAULT_TTL_S = 120.0


def lease_ttl() -> float:
    value = os.environ.get("FEATSTORE_LEASE_SECONDS")
    return float(value) if value else DEFAULT_TTL_S


def _encode(text: str) -> bytes:
    from numcodecs import VLenUTF8

    return bytes(VLenUTF8().encode(np.array([text], dtype=object)))


def _decode(data: bytes) -> str:
    from numcodecs import VLenUTF8

    return str(VLenUTF8().decode(data)[0])


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    host: str
    pid: int
    since: float
    expires: float

    def to_text(self) -> str:
        return json.dumps(
            {"owner": self.owner, "host": self.host, "pid": self.pid, "since": self.since, "expires": self.expires}
        )

    @classmethod
    def parse(cls, text: str) -> Lease | None:
        try:
            d = json.loads(text)
            return cls(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["since"]), float(d["expires"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: counts as expired

    def live(self, now: float | None = None) -> bool:
        """Not expired, and not made on this host by a process that has ended."""
        if (now if now is not None else time.time()) >= self.expires:
            return False
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it runs
            pass
        return True

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}"


def live_holder(blobs: Blobs) -> Lease | None:
    """A live lease on any unit of the store (a distributed build writes it now), or None."""
    keys = [k for k in blobs.list(f"{LEASES}/c") if k.count("/") == 3]
    for data in blobs.read_many(keys) if keys else []:
        lease = None if data is None else Lease.parse(_decode(data))
        if lease is not None and lease.live():
            return lease
    return None


class Leases:
    """This process's leases on units of one store; see the module docstring."""

    def __init__(self, blobs: Blobs, *, ttl: float | None = None) -> None:
        self.blobs = blobs
        self.ttl = lease_ttl() if ttl is None else ttl
        self.owner = uuid.uuid4().hex
        self.since = time.time()
        self.held: dict[int, int] = {}  # unit -> generation
        self._renewed: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.requests = 0  # lease operations made (creates, reads, lists, renewals, deletes)

    # -- keys ---------------------------------------------------------------------------

    @staticmethod
    def key(unit: int, generation: int) -> str:
        return f"{LEASES}/c/{unit}/{generation}"

    def _generations(self, unit: int) -> list[int]:
        self.requests += 1
        out = []
        for k in self.blobs.list(f"{LEASES}/c/{unit}"):
            parts = k.split("/")
            if len(parts) == 4 and parts[2] == str(unit) and parts[3].isdigit():
                out.append(int(parts[3]))
        return sorted(out)

    def _read(self, unit: int, generation: int) -> Lease | None:
        self.requests += 1
        data = self.blobs.read(self.key(unit, generation))
        return None if data is None else Lease.parse(_decode(data))

    def _mine(self) -> Lease:
        return Lease(self.owner, socket.gethostname(), os.getpid(), self.since, time.time() + self.ttl)

    # -- the protocol -------------------------------------------------------------------

    def holder(self, unit: int) -> Lease | None:
        """The unit's current lease if it is live (another process works on it), else None."""
        gens = self._generations(unit)
        if not gens:
            return None
        lease = self._read(unit, gens[-1])
        return lease if lease is not None and lease.live() else None

    def acquire(self, unit: int) -> bool:
        """Own `unit` now: True, or False if another live process holds it."""
        for _ in range(8):  # a few rounds of races with other takers, then give up for now
            gens = self._generations(unit)
            if not gens:
                if self._create(unit, 0):
                    return True
                continue
            top = gens[-1]
            lease = self._read(unit, top)
            if lease is not None and lease.owner == self.owner:
                self._hold(unit, top)
                return True
            if lease is not None and lease.live():
                return False
            if lease is None and self.blobs.read(self.key(unit, top)) is None:
                continue  # released meanwhile: start over
            if self._create(unit, top + 1):  # take over an expired or dead owner's lease
                self.requests += 1
                self.blobs.delete_many([self.key(unit, g) for g in gens])
                return True
        return False

    def _create(self, unit: int, generation: int) -> bool:
        self.requests += 1
        if self.blobs.create(self.key(unit, generation), _encode(self._mine().to_text())):
            self._hold(unit, generation)
            return True
        return False

    def _hold(self, unit: int, generation: int) -> None:
        with self._lock:
            self.held[unit] = generation
            self._renewed[unit] = time.monotonic()
        self._start_heartbeat()

    def still_mine(self, unit: int, *, check_store: bool = True) -> bool:
        """Whether this process may commit `unit` now (see the module docstring);
        `check_store=False`: from the renewal time alone, without a request."""
        with self._lock:
            gen, renewed = self.held.get(unit), self._renewed.get(unit, 0.0)
        if gen is None or time.monotonic() - renewed > self.ttl / 2:
            return False
        if not check_store:
            return True
        self.requests += 2
        own, nxt = self.blobs.read_many([self.key(unit, gen), self.key(unit, gen + 1)])
        lease = None if own is None else Lease.parse(_decode(own))
        return lease is not None and lease.owner == self.owner and nxt is None

    def release(self, unit: int) -> None:
        with self._lock:
            gen = self.held.pop(unit, None)
            self._renewed.pop(unit, None)
        if gen is not None:
            self.requests += 1
            self.blobs.delete_many([self.key(unit, gen)])

    def release_all(self) -> None:
        for unit in list(self.held):
            with contextlib.suppress(Exception):  # an unreachable store: the lease expires
                self.release(unit)
        self._stop.set()

    # -- heartbeat ----------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="featstore-leases", daemon=True)
            self._thread.start()

    def renew(self) -> None:
        """Rewrite every held lease with a later expiry."""
        with self._lock:
            held = dict(self.held)
        if not held:
            return
        started = time.monotonic()
        text = _encode(self._mine().to_text())
        self.requests += len(held)
        self.blobs.write_many({self.key(u, g): text for u, g in held.items()})
        with self._lock:
            for u in held:
                if u in self._renewed:
                    self._renewed[u] = started

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with contextlib.suppress(Exception):  # a failed renewal: `still_mine` notices the stale lease
                self.renew()
