"""StoreWriter under crashes (SIGKILL at random moments, local and on S3), readers polling
while a writer appends, and HDF5's staged rewrite."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featstore.store import as_location, open_store, open_store_writer
from featstore.store._hdf5 import STAGE_SUFFIX
from tests.store_helpers import blobs, make_batch, make_info, row_values
from tests.store_kill_worker import all_keys, build

REPO = Path(__file__).resolve().parents[1]
Where = Path | str


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _exists(where: Where) -> bool:
    return as_location(where).exists()


def assert_prefix_of(path: Where, keys: list[str]) -> int:
    """The store opens, holds a prefix of `keys` (in order, no repeats) with the right rows.

    An HDF5 build's stage (a Zarr store) must hold the keys that follow, from where the
    file stood when the run began.
    """
    n = 0
    if _exists(path):
        with open_store(path) as s:
            got = s.keys()
            assert got == keys[: len(got)]
            if got:
                idx = sorted({0, len(got) - 1, len(got) // 2})
                b = s.get_batch(idx)
                for j, i in enumerate(idx):
                    np.testing.assert_array_equal(b.features[j], row_values(keys[i])[0])
            n = len(got)
    if str(path).endswith(".h5"):
        stage = sibling(Path(path), STAGE_SUFFIX)
        if (stage / "zarr.json").exists():
            with open_store(stage) as s:
                got = s.keys()
                if got:
                    start = keys.index(got[0])
                    assert start <= n and got == keys[start : start + len(got)]
                    np.testing.assert_array_equal(s[-1].features, row_values(got[-1])[0])
                    n = max(n, start + len(got))
    return n


def assert_same_store(a: Where, b: Where) -> None:
    with open_store(a) as x, open_store(b) as y:
        assert x.keys() == y.keys() and x.sources() == y.sources()
        np.testing.assert_array_equal(x.orig_sizes(), y.orig_sizes())
        for bx, by in zip(x.iter_batches(), y.iter_batches(), strict=True):
            np.testing.assert_array_equal(bx.features, by.features)
            np.testing.assert_array_equal(bx.masks, by.masks)
        ax, ay = x.attrs, y.attrs
        for volatile in ("created", "featstore_version"):
            ax.pop(volatile), ay.pop(volatile)
        assert ax == ay


class ProgressKills:
    """Kill instants that do not depend on the machine's speed. Each run is killed once it has
    written a random number of keys (at most an even share of what is left per kill still
    to come, so the build never finishes first), then after a random part of the time its
    last batch took, so kills also land inside a write, a commit, a swap or a rebuild."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def target(self, before: int, n: int, kills_left: int) -> int:
        return before + self.rng.randint(1, max(1, (n - before) // (kills_left + 1)))

    def kill_when(self, proc: subprocess.Popen[bytes], target: int) -> bool:
        """Read the worker's "wrote K" lines; kill it once K >= target. False if it ended first."""
        assert proc.stdout is not None
        last = time.monotonic()
        gap = 0.0
        for line in proc.stdout:
            now = time.monotonic()
            gap, last = now - last, now
            if line.startswith(b"wrote") and int(line.split()[1]) >= target:
                time.sleep(self.rng.uniform(0, gap))
                proc.kill()
                proc.wait()
                return True
        proc.wait()
        return False


def kill_and_resume(path: Where, kills: int, n: int, seed: int, env: dict[str, str] | None = None) -> list[int]:
    """Kill a build `kills` times at random points of its progress, checking the store after
    each; then finish it and compare with an uninterrupted build. Returns the rows after each kill."""
    keys = all_keys(n)
    cycle = 50 if str(path).endswith(".h5") else 150  # HDF5: rebuild the file often, so kills hit that too
    run_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    schedule = ProgressKills(seed)
    seen: list[int] = []
    for k in range(20 * kills):  # a bound; only kills after a run committed rows count
        if len(seen) == kills:
            break
        before = assert_prefix_of(path, keys)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.store_kill_worker", str(path), str(n), str(cycle), str(k)],
            cwd=REPO,
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        killed = schedule.kill_when(proc, schedule.target(before, n, kills - len(seen)))
        assert killed, "the build finished before its kill"
        after = assert_prefix_of(path, keys)
        assert before <= after < n
        if after > before:  # killed in the middle of a build that was making progress
            seen.append(after)
    assert len(seen) == kills, seen
    done = subprocess.run(
        [sys.executable, "-m", "tests.store_kill_worker", str(path), str(n), str(cycle), "99"],
        cwd=REPO,
        env=run_env,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    if isinstance(path, Path):
        reference: Where = path.with_name("reference" + path.suffix)
    else:
        reference = path.rsplit("/", 1)[0] + "/reference.zarr"
    build(str(reference), n, n, 0)  # uninterrupted, one run
    assert_same_store(path, reference)
    if isinstance(path, Path):
        leftovers = {p.name for p in path.parent.iterdir()} - {path.name, reference.name}  # type: ignore[union-attr]
        assert not leftovers, leftovers
        if path.suffix == ".zarr":
            assert not [p for p in path.rglob("*.partial")]
    print(f"rows (file + stage) after each kill: {seen}")
    return seen


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path: Path, suffix: str) -> None:
    kill_and_resume(tmp_path / f"s{suffix}", kills=3, n=400, seed=1)


def test_sigkill_during_s3_build_then_rerun_equals_uninterrupted(s3_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    seen = kill_and_resume(s3_server.url("s.zarr"), kills=2, n=400, seed=3, env=s3_server.env())
    assert seen == sorted(seen)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_sigkill_many_times(tmp_path: Path, suffix: str) -> None:
    kill_and_resume(tmp_path / f"s{suffix}", kills=12, n=2400, seed=2)


def test_crash_while_creating_a_store_leaves_no_store(tmp_path: Path) -> None:
    """Arrays' metadata written, the group's zarr.json (the store's existence) not yet."""
    from featstore.store._zarr import new_attrs
    from featstore.store._zarr_meta import metadata_documents, put_json

    path = tmp_path / "s.zarr"
    info = make_info()
    docs = metadata_documents(new_attrs(info, "test", 4), info, 4)
    blobs(path).write_many({k: put_json(v) for k, v in docs.items() if k != "zarr.json"})
    with pytest.raises(Exception, match="no store at"):
        open_store(path)
    with open_store_writer(path, info, overwrite=False) as w:
        w.write(make_batch(["a.png"]))
    with open_store(path) as s:
        assert s.keys() == ["a.png"]


def test_killed_writer_data_without_commit_is_invisible_and_redone(tmp_path: Path) -> None:
    """A writer that died after writing a new shard's objects but before its keys chunk."""
    path = tmp_path / "s.zarr"
    info = make_info()
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        w.write(make_batch([f"k{i}.png" for i in range(6)]))
    (path / "keys" / "c" / "1").unlink()  # shard 1's commit record never came
    with open_store(path) as s:
        assert s.keys() == [f"k{i}.png" for i in range(4)]
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        assert w.pending([f"k{i}.png" for i in range(8)]) == {f"k{i}.png" for i in range(4, 8)}
        w.write(make_batch([f"k{i}.png" for i in range(4, 8)]))
    with open_store(path) as s:
        assert s.keys() == [f"k{i}.png" for i in range(8)]
        np.testing.assert_array_equal(s[5].features, row_values("k5.png")[0])


def test_hdf5_stage_resumes_after_crash(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    info = make_info()
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        w.write(make_batch(["a.png", "b.png"]))
    w = open_store_writer(path, info, overwrite=False, shard_rows=4)
    w.write(make_batch([f"n{i}.png" for i in range(6)]))  # one full shard committed to the stage
    w._sink.lock.release()  # crash: the file is untouched, the stage holds 4 committed rows
    with open_store(path) as s:
        assert s.keys() == ["a.png", "b.png"]
    with open_store(sibling(path, STAGE_SUFFIX)) as stage:
        assert len(stage) == 4
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        assert w.pending([f"n{i}.png" for i in range(6)]) == {"n4.png", "n5.png"}
        w.write(make_batch(["n4.png", "n5.png"]))
    with open_store(path) as s:
        assert s.keys() == ["a.png", "b.png", *[f"n{i}.png" for i in range(6)]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_hdf5_rows_in_file_and_stage_are_not_doubled(tmp_path: Path) -> None:
    """A crash after the new file was renamed in, before the stage was deleted."""
    import shutil

    path = tmp_path / "s.h5"
    info = make_info()
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        w.write(make_batch(["a.png"]))
    w = open_store_writer(path, info, overwrite=False, shard_rows=4)
    w.write(make_batch(["b.png", "c.png"]))
    w._sink.stage.commit({})  # type: ignore[attr-defined]
    stage = sibling(path, STAGE_SUFFIX)
    shutil.copytree(stage, tmp_path / "stage-copy")
    w.close()
    shutil.copytree(tmp_path / "stage-copy", stage)
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        w.write(make_batch(["d.png"]))
    with open_store(path) as s:
        assert s.keys() == ["a.png", "b.png", "c.png", "d.png"]


def test_writer_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "s.zarr"
    open_store_writer(path, make_info(), overwrite=False).close()
    assert open_store(path).keys() == []


def _poll_while_writing(path: Where, n: int) -> list[int]:
    """A reader opening the store again and again while a writer appends: every time a
    prefix of complete, correct rows, never fewer than the time before."""
    import threading

    keys = [f"img{i:03d}.png" for i in range(n)]
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with open_store_writer(path, make_info(), overwrite=False, shard_rows=4) as w:
                w.pending(keys)
                for i in range(0, len(keys), 3):
                    w.write(make_batch(keys[i : i + 3]))
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen = []
    while not done.is_set():
        try:
            seen.append(assert_prefix_of(path, keys))
        except Exception as e:  # a store not yet created is the only allowed miss
            assert "no store" in str(e), e
    thread.join()
    assert not errors, errors
    assert seen == sorted(seen), seen
    assert assert_prefix_of(path, keys) == n
    return seen


def test_reader_during_appends_sees_complete_rows(tmp_path: Path) -> None:
    seen = _poll_while_writing(tmp_path / "s.zarr", 60)
    assert len(seen) > 2


def test_reader_polling_an_s3_store_while_a_writer_appends(s3_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    seen = _poll_while_writing(s3_server.url("poll.zarr"), 48)
    assert len(seen) > 2
