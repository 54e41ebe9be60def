"""Unit leases (featstore.store.leases) on local disk and on the S3 server: acquire,
refuse a live owner, take over an expired or dead one exactly once, notice a takeover
before committing, renew. Expired and foreign leases are written by hand (an expiry in
the past, another host's name), so nothing here waits on the clock."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from featstore.errors import StoreLockedError
from featstore.store._blobs import Blobs, open_blobs
from featstore.store.leases import Lease, Leases, _decode, _encode
from featstore.store.location import as_location


@pytest.fixture(params=["local", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Blobs:
    if request.param == "local":
        (tmp_path / "x.zarr").mkdir()
        return open_blobs(as_location(tmp_path / "x.zarr"))
    server = request.getfixturevalue("s3_server")
    return open_blobs(as_location(server.url("x.zarr"), server.options))


def _forge(blobs: Blobs, unit: int, gen: int, **fields: Any) -> None:
    lease = {"owner": "f" * 32, "host": "elsewhere", "pid": 1, "since": 0.0, "expires": time.time() + 3600, **fields}
    blobs.write_many({Leases.key(unit, gen): _encode(Lease(**lease).to_text())})


def _lease(blobs: Blobs, unit: int, gen: int) -> Lease | None:
    data = blobs.read(Leases.key(unit, gen))
    return None if data is None else Lease.parse(_decode(data))


def test_acquire_refuses_a_live_owner_and_release_frees(blobs: Blobs) -> None:
    a, b = Leases(blobs, ttl=3600), Leases(blobs, ttl=3600)
    assert a.acquire(7) and a.acquire(7)  # again: still its own
    assert not b.acquire(7)  # another owner in this (running) process: live
    assert b.holder(7) is not None and a.still_mine(7)
    a.release(7)
    assert b.holder(7) is None and b.acquire(7)
    assert not a.still_mine(7) and b.still_mine(7)
    a.release_all(), b.release_all()


def test_another_hosts_lease_is_live_until_it_expires(blobs: Blobs) -> None:
    _forge(blobs, 3, 0)
    mine = Leases(blobs, ttl=3600)
    assert not mine.acquire(3)
    _forge(blobs, 3, 0, expires=time.time() - 1)  # its owner stopped renewing
    assert mine.acquire(3)
    assert mine.held[3] == 1  # the next generation, the expired one deleted
    assert _lease(blobs, 3, 0) is None and mine.still_mine(3)
    mine.release_all()


def test_a_dead_process_on_this_host_is_taken_over_at_once(blobs: Blobs, tmp_path: Path) -> None:
    import socket

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _forge(blobs, 5, 2, host=socket.gethostname(), pid=int(done.stdout))  # unexpired, but its pid has ended
    mine = Leases(blobs, ttl=3600)
    assert mine.acquire(5) and mine.held[5] == 3
    mine.release_all()


def test_an_owner_notices_a_takeover_before_it_commits(blobs: Blobs) -> None:
    slow, taker, later = Leases(blobs, ttl=3600), Leases(blobs, ttl=3600), Leases(blobs, ttl=3600)
    assert slow.acquire(9)
    data = _lease(blobs, 9, 0)
    assert data is not None
    _forge(blobs, 9, 0, owner=slow.owner, expires=time.time() - 1)  # slow stalled past its expiry
    assert taker.acquire(9) and not slow.still_mine(9)
    taker.release(9)  # finished; the next owner starts at generation 0 again
    assert later.acquire(9) and later.held[9] == 0
    assert not slow.still_mine(9)  # same generation as slow's, another owner
    later.release_all()


def test_renewal_moves_the_expiry_and_a_stale_renewal_stops_commits(blobs: Blobs) -> None:
    mine = Leases(blobs, ttl=3600)
    assert mine.acquire(1)
    first = _lease(blobs, 1, 0)
    time.sleep(0.01)
    mine.renew()
    second = _lease(blobs, 1, 0)
    assert first is not None and second is not None and second.expires > first.expires
    assert mine.still_mine(1, check_store=False)  # a shard's commit: renewed recently, no request
    before = mine.requests
    mine.still_mine(1, check_store=False)
    assert mine.requests == before
    mine._renewed[1] -= mine.ttl  # as if the heartbeat had failed for a while
    assert not mine.still_mine(1) and not mine.still_mine(1, check_store=False)
    mine.release_all()


def test_a_single_process_build_is_refused_while_a_distributed_one_holds_leases(tmp_path: Path) -> None:
    from featstore.store.writer import open_store_writer, refuse_busy_store
    from tests.store_helpers import make_info

    path = tmp_path / "s.zarr"
    with open_store_writer(path, make_info(), overwrite=False, shard_rows=4):
        pass
    blobs = open_blobs(as_location(path))
    lease = Leases(blobs, ttl=3600)
    assert lease.acquire(0)
    with pytest.raises(StoreLockedError):
        refuse_busy_store(path)
    refuse_busy_store(path, leases=False)  # another process of the same build
    with pytest.raises(StoreLockedError):
        open_store_writer(path, make_info(), overwrite=False)
    lease.release_all()
    open_store_writer(path, make_info(), overwrite=False).close()
