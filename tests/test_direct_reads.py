"""The "direct" read engine (`featstore.store._direct`): rows by byte offset.

The contract suite already reads every store through it; these tests cover what only
it can get wrong: damaged shard indexes, chunks that were never written, shards a
writer replaces while a reader has them open, eviction of open shards, and falling
back when a layout is not its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from featstore.batches import EncodedBatch
from featstore.errors import CorruptStoreError, StoreError
from featstore.store import open_store, open_store_writer
from tests.store_helpers import make_batch, make_info, row_values

KEYS = [f"img{i:03d}.png" for i in range(40)]


def write(path: Path, keys: list[str], shard_rows: int = 8, zero: frozenset[str] = frozenset()) -> None:
    """Rows from `row_values`; keys in `zero` get all-zero features and masks."""
    info = make_info()
    with open_store_writer(path, info, overwrite=False, shard_rows=shard_rows) as w:
        b = make_batch(keys, info=info)
        for j, k in enumerate(keys):
            if k in zero:
                b.features[j] = 0
                b.masks[j] = 0
        w.write(b)


def read_all(path: Path, engine: str) -> tuple[np.ndarray, np.ndarray]:
    with open_store(path, engine=engine) as s:
        order = np.random.default_rng(0).permutation(len(s))
        batch = s.get_batch([*order.tolist(), 3, 3])  # unsorted, repeats, across every shard
        whole = s.get_batch(list(range(len(s))))
        assert s.engine == engine
        np.testing.assert_array_equal(np.stack([s[i].features for i in range(len(s))]), whole.features)
        return batch.features, batch.masks


def test_direct_equals_zarr_python(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write(path, KEYS[:37])  # the last shard partial
    for got, want in zip(read_all(path, "direct"), read_all(path, "zarr"), strict=True):
        np.testing.assert_array_equal(got, want)


def test_unwritten_chunks_read_as_fill_values(tmp_path: Path) -> None:
    """Zarr does not write chunks that hold only the fill value (0): a shard of all-zero rows,
    single zero rows inside a shard and an all-zero mask chunk must read as zeros."""
    import zarr

    path = tmp_path / "s.zarr"
    zero = frozenset(KEYS[8:16]) | {KEYS[2], KEYS[20]}
    write(path, KEYS[:24], zero=zero)
    for name in ("features", "masks"):  # rewritten by zarr-python, which leaves out chunks of zeros
        array = zarr.open_array(path / name, mode="r+")
        array[...] = array[...]
    assert not (path / "features" / "c" / "1" / "0" / "0" / "0").exists()
    assert not (path / "masks" / "c" / "1" / "0" / "0").exists()
    with open_store(path, engine="direct") as s:
        for i, k in enumerate(KEYS[:24]):
            row = s[i]
            if k in zero:
                assert not row.features.any() and not row.mask.any()
            else:
                np.testing.assert_array_equal(row.features, row_values(k)[0])
    for got, want in zip(read_all(path, "direct"), read_all(path, "zarr"), strict=True):
        np.testing.assert_array_equal(got, want)


def _shard(path: Path, i: int) -> Path:
    return path / "features" / "c" / str(i) / "0" / "0" / "0"


def test_damaged_shard_index_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write(path, KEYS[:16])
    shard = _shard(path, 1)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index (offsets), before the crc32c
    shard.write_bytes(bytes(data))
    with open_store(path, engine="direct") as s:
        s[0]  # shard 0 is fine
        with pytest.raises(CorruptStoreError, match="checksum"):
            s[9]
    shard.write_bytes(bytes(data[:100]))  # truncated
    with open_store(path, engine="direct") as s, pytest.raises(CorruptStoreError, match=str(shard)):
        s[9]


def test_index_pointing_outside_the_shard_is_an_error(tmp_path: Path) -> None:
    """Even with a valid checksum (a bug elsewhere, not bit rot), offsets are checked against the file."""
    import google_crc32c

    path = tmp_path / "s.zarr"
    write(path, KEYS[:8])
    shard = _shard(path, 0)
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(8 * 16 + 4) : -4]), dtype="<u8").reshape(8, 2).copy()
    index[3, 0] = len(data)  # row 3 starts at the end of the file
    body = index.tobytes()
    data[-(8 * 16 + 4) :] = body + google_crc32c.value(body).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    with open_store(path, engine="direct") as s, pytest.raises(CorruptStoreError, match="outside the file"):
        s[3]


def test_reader_keeps_its_snapshot_while_a_writer_rewrites_the_open_shard(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write(path, KEYS[:6])  # shard 0 holds 6 of 8 rows
    with open_store(path, engine="direct") as old:
        np.testing.assert_array_equal(old[5].features, row_values(KEYS[5])[0])
        write(path, KEYS[6:20])  # rewrites shard 0 whole (new file), adds shards 1 and 2
        assert len(old) == 6
        for i in range(6):
            np.testing.assert_array_equal(old[i].features, row_values(KEYS[i])[0])
    with open_store(path, engine="direct") as new:
        assert len(new) == 20
        np.testing.assert_array_equal(new.get_batch(KEYS[:20]).features[19], row_values(KEYS[19])[0])


def test_open_shards_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import featstore.store._blobs as blobs

    monkeypatch.setattr(blobs, "OPEN_FILES", 2)
    path = tmp_path / "s.zarr"
    write(path, KEYS, shard_rows=2)  # 20 shards
    fds_before = len(os.listdir("/proc/self/fd"))
    with open_store(path, engine="direct") as s:
        for i in np.random.default_rng(1).permutation(len(KEYS)).tolist() * 2:
            np.testing.assert_array_equal(s[i].features, row_values(KEYS[i])[0])
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_layouts_it_cannot_read_fall_back(tmp_path: Path) -> None:
    """A store whose features are compressed (say, rewritten by another tool) is read by zarr-python."""
    import zarr
    from zarr.codecs import ZstdCodec

    path = tmp_path / "s.zarr"
    write(path, KEYS[:10])
    root = zarr.open_group(path, mode="r+", use_consolidated=False)  # an edit: the arrays' own metadata
    data = root["features"][...]
    del root["features"]
    root.create_array("features", data=data, chunks=(1, *data.shape[1:]), compressors=ZstdCodec(level=1))
    assert json.loads((path / "features" / "zarr.json").read_text())["codecs"][-1]["name"] == "zstd"
    with pytest.raises(StoreError, match="direct"):
        open_store(path, engine="direct")
    with open_store(path, engine=("direct", "zarr")) as s:
        assert s.engine == "zarr"
        np.testing.assert_array_equal(s[7].features, row_values(KEYS[7])[0])


def test_hdf5_direct_reads_equal_h5py(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "s.h5"
    info = make_info()
    with open_store_writer(path, info, overwrite=False) as w:
        for start in range(0, 37, 10):
            w.write(make_batch(KEYS[start : min(start + 10, 37)], info=info))
    order = [*np.random.default_rng(2).permutation(37).tolist(), 0, 0]
    with open_store(path) as s, h5py.File(path, "r") as f:  # h5py's defaults, beside featstore's file
        assert s.engine == "direct"
        b = s.get_batch(order)
        np.testing.assert_array_equal(b.features, f["features"][...][order])
        np.testing.assert_array_equal(b.masks, f["masks"][...][order])


def test_forked_child_reads_directly(tmp_path: Path) -> None:
    """Descriptors opened by the parent are not shared state for pread: a forked child reads correctly."""
    path = tmp_path / "s.zarr"
    write(path, KEYS[:20])
    with open_store(path) as s:
        s[0], s[12]  # the parent opens shards 0 and 1
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            ok = all(np.array_equal(s[i].features, row_values(KEYS[i])[0]) for i in (12, 0, 19, 5))
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
        np.testing.assert_array_equal(s[13].features, row_values(KEYS[13])[0])


def test_empty_batch_and_empty_store(tmp_path: Path) -> None:
    for name in ("e.zarr", "e.h5"):
        path = tmp_path / name
        open_store_writer(path, make_info(), overwrite=False).close()
        with open_store(path) as s:
            assert len(s) == 0 and s.get_batch([]).features.shape[0] == 0


def test_float32_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    info = make_info(dtype="float32", hidden_dim=5, grid=3)
    b = make_batch(KEYS[:9], info=info)
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        w.write(EncodedBatch(b.items, b.features, b.masks, b.orig_size_hw))
    with open_store(path, engine="direct") as s:
        np.testing.assert_array_equal(s.get_batch(list(range(9))).features, b.features)


def test_appender_continues_a_shard_after_a_partial_commit(tmp_path: Path) -> None:
    """commit() writes the open shard partially; rows appended afterwards rewrite it whole."""
    from featstore.store import as_location
    from featstore.store._zarr import ZarrShardWriter

    path = tmp_path / "s.zarr"
    write(path, [])
    writer = ZarrShardWriter(as_location(path), make_info(), version="test", overwrite=False, shard_rows=8)
    for part in (KEYS[:5], KEYS[5:11]):
        b = make_batch(part)
        writer.append(list(part), [it.path for it in b.items], b.features, b.masks, b.orig_size_hw, None)
        writer.commit({})
    writer.close()
    for engine in ("direct", "zarr"):
        with open_store(path, engine=engine) as s:
            assert s.keys() == KEYS[:11]
            np.testing.assert_array_equal(s.get_batch(KEYS[:11]).features, make_batch(KEYS[:11]).features)


def test_partial_shard_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write(path, KEYS[:10])  # shard 1 holds 2 rows: the next writer reopens it
    leftover = _shard(path, 1).with_name("0.0123abcd.partial")
    leftover.write_bytes(b"half a shard")
    write(path, KEYS[10:12])
    assert not leftover.exists()
    with open_store(path, engine="direct") as s:
        assert s.keys() == KEYS[:12]


def test_reads_without_preadv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the platform has no os.preadv, rows are read with os.pread and copied."""
    path = tmp_path / "s.zarr"
    write(path, KEYS[:20])
    h5 = tmp_path / "s.h5"
    with open_store_writer(h5, make_info(), overwrite=False) as w:
        w.write(make_batch(KEYS[:20]))
    monkeypatch.delattr(os, "preadv")
    for p in (path, h5):
        with open_store(p) as s:
            assert s.engine == "direct"
            np.testing.assert_array_equal(s.get_batch(KEYS[3:17]).features, make_batch(KEYS[3:17]).features)
