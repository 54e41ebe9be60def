"""One suite every store backend must pass: written through StoreWriter, read through open_store.

Each backend's class only says where its store lives (suffix, local or S3) and which
read engine it uses: local Zarr, Zarr on a real S3 server (SeaweedFS), HDF5.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from featstore.batches import EncodedBatch, Failure, ImageItem
from featstore.errors import CorruptStoreError, IncompatibleStoreError, StoreError, StoreLockedError
from featstore.store import FeatureStore, Row, open_store, open_store_writer
from featstore.store.writer import refuse_busy_store
from tests.store_helpers import (
    C,
    G,
    blobs,
    delete_array,
    edit_attrs,
    embedding_values,
    make_batch,
    make_info,
    row_values,
)

KEYS = [f"img{i:02d}.png" for i in range(11)]
ODD_KEYS = ["with space/a b.png", "ünïcödé/猫.jpg", "emoji 🐈.webp", "x.png"]


Where = Path | str  # a local path or an s3:// URL


def write(path: Where, batches: list[list[str]], *, shard_rows: int = 4, overwrite: bool = False, **info) -> None:
    encoding = make_info(**info)
    with open_store_writer(path, encoding, overwrite=overwrite, shard_rows=shard_rows) as w:
        w.pending([k for b in batches for k in b])
        for keys in batches:
            w.write(make_batch(keys, info=encoding))


def assert_row(row: Row, key: str, index: int) -> None:
    feats, mask, orig = row_values(key)
    assert (row.key, row.index, row.source, row.orig_size_hw) == (key, index, f"imgs/{key}", tuple(orig))
    np.testing.assert_array_equal(row.features, feats)
    np.testing.assert_array_equal(row.mask, mask)
    assert row.features.dtype == np.float16 and row.mask.dtype == np.uint8


class StoreContract:
    suffix = ".zarr"
    engine = "auto"
    reads_with = "direct"  # the engine that `engine` must end up using
    local = True

    @pytest.fixture
    def path(self, tmp_path: Path) -> Where:
        return tmp_path / f"feats{self.suffix}"

    def open(self, path: Where) -> FeatureStore:
        return open_store(path, engine=self.engine)

    def uncommit(self, path: Where, rows: int) -> int:
        """Make the store look as if a writer died after writing its last shard's rows but
        before committing them; the number of rows still committed."""
        if self.suffix == ".zarr":  # the last shard's commit record (its keys chunk) never came
            last = (rows - 1) // 4
            blobs(path).delete_many([f"keys/c/{last}"])
            return last * 4
        edit_attrs(path, num_rows=7)
        return 7

    def test_engine(self, path: Where) -> None:
        write(path, [KEYS[:5]])
        with self.open(path) as s:
            assert s.engine == self.reads_with  # type: ignore[attr-defined]

    def test_read_by_key_and_index(self, path: Where) -> None:
        write(path, [KEYS[:3], KEYS[3:4], KEYS[4:]])
        with self.open(path) as s:
            assert len(s) == 11 and s.keys() == KEYS
            assert s.format == self.suffix.lstrip(".").replace("h5", "hdf5") and s.path == path
            for i, k in enumerate(KEYS):
                assert_row(s[k], k, i)
                assert_row(s[i], k, i)
            assert_row(s[-1], KEYS[-1], 10)
            assert KEYS[0] in s and "nope.png" not in s and 3 not in s
            with pytest.raises(KeyError, match=r"nope\.png"):
                s["nope.png"]
            with pytest.raises(IndexError):
                s[11]
            with pytest.raises(IndexError):
                s[-12]
            assert [r.key for r in s] == KEYS

    def test_get_batch(self, path: Where) -> None:
        write(path, [KEYS])
        with self.open(path) as s:
            order = [7, "img01.png", -1, 7, np.int64(0)]
            b = s.get_batch(order)
            want = ["img07.png", "img01.png", "img10.png", "img07.png", "img00.png"]
            assert b.keys == want and list(b.indices) == [7, 1, 10, 7, 0] and len(b) == 5
            assert b.features.shape == (5, C, G, G) and b.masks.shape == (5, G, G)
            for j, k in enumerate(want):
                feats, mask, orig = row_values(k)
                np.testing.assert_array_equal(b.features[j], feats)
                np.testing.assert_array_equal(b.masks[j], mask)
                assert list(b.orig_size_hw[j]) == orig
            empty = s.get_batch([])
            assert empty.features.shape == (0, C, G, G) and empty.keys == []
            batches = list(s.iter_batches(batch_size=4))
            assert [len(x) for x in batches] == [4, 4, 3]
            np.testing.assert_array_equal(np.concatenate([x.features for x in batches]), s.get_batch(KEYS).features)

    def test_attrs_and_info(self, path: Where) -> None:
        info = make_info()
        write(path, [KEYS[:5]])
        with self.open(path) as s:
            attrs = s.attrs
            assert len(s) == 5 and attrs["layout_version"] == 2 and attrs["failed"] == []
            assert attrs["featstore_version"] and attrs["created"]
            for k, v in info.to_attrs().items():
                assert attrs[k] == v, k
            assert s.info == info
            attrs["failed"] = [{"key": "x"}]  # a copy
            assert s.attrs["failed"] == []

    def test_append_across_partial_shards(self, path: Where) -> None:
        write(path, [KEYS[:6]])
        info = make_info()
        with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
            assert w.pending(KEYS) == set(KEYS[6:])
            w.write(make_batch(KEYS[4:9]))  # 4, 5 are in already: skipped
            w.write(make_batch(["img09.png", "img09.png"]))  # a repeat within a batch
        write(path, [KEYS])
        with self.open(path) as s:
            assert s.keys() == KEYS
            for i, k in enumerate(KEYS):
                assert_row(s[i], k, i)

    def test_odd_keys(self, path: Where) -> None:
        write(path, [ODD_KEYS])
        with self.open(path) as s:
            assert s.keys() == ODD_KEYS
            for i, k in enumerate(ODD_KEYS):
                assert_row(s[k], k, i)

    def test_key_that_is_not_utf8_becomes_a_failure(self, path: Where) -> None:
        bad = "caf\udce9.png"  # os.listdir's surrogate escape of a Latin-1 file name
        with open_store_writer(path, make_info(), overwrite=False, shard_rows=4) as w:
            w.write(make_batch(["ok.png", bad]))
        with self.open(path) as s:
            assert s.keys() == ["ok.png"]
            assert len(s.failed) == 1 and "UTF-8" in s.failed[0].reason

    @pytest.mark.parametrize(
        ("field", "value"),
        [("grid", 8), ("dtype", "float32"), ("hidden_dim", 32), ("clip_output", "projected"), ("size", 336)],
    )
    def test_incompatible_info_refused(self, path: Where, field: str, value: object) -> None:
        write(path, [KEYS[:2]])
        with pytest.raises(IncompatibleStoreError) as e:
            open_store_writer(path, make_info(**{field: value}), overwrite=False)
        msg = str(e.value)
        assert f"{field}=" in msg and repr(value) in msg and "\n" not in msg
        write(path, [KEYS[:2]], overwrite=True, **{field: value})  # --overwrite replaces it

    def test_other_model_source_refused(self, path: Where) -> None:
        write(path, [KEYS[:2]])
        other = make_info(model_source={"kind": "hf", "id": "someone/finetuned-clip", "revision": "y"})
        with pytest.raises(
            IncompatibleStoreError, match=r"other weights: model .*\(Hugging Face someone/finetuned-clip"
        ):
            open_store_writer(path, other, overwrite=False)

    def test_weights_are_identified_by_content(self, path: Where) -> None:
        hub = {"kind": "hf", "id": "openai/clip-vit-base-patch32", "revision": "x", "content_sha256": "a" * 64}
        write(path, [KEYS[:2]], model_source=hub)
        moved = {"kind": "local", "id": "/elsewhere/clip-copy", "content_sha256": "a" * 64}
        open_store_writer(path, make_info(model_source=moved), overwrite=False).close()  # same weights: accepted
        other = {**moved, "content_sha256": "b" * 64}
        with pytest.raises(IncompatibleStoreError) as e:
            open_store_writer(path, make_info(model_source=other), overwrite=False)
        assert (
            "{" not in str(e.value)
            and "weights aaaaaaaaaaaa" in str(e.value)
            and "weights bbbbbbbbbbbb" in str(e.value)
        )

    def test_second_writer_refused(self, path: Where) -> None:
        w = open_store_writer(path, make_info(), overwrite=False, shard_rows=4)
        try:
            w.write(make_batch(KEYS[:4]))
            # Zarr: the first writer's claim names this host and a running pid; HDF5: its lock
            with pytest.raises(StoreLockedError, match=rf"another featstore build \(pid {os.getpid()}\)"):
                open_store_writer(path, make_info(), overwrite=False)
            with pytest.raises(StoreLockedError, match=rf"another featstore build \(pid {os.getpid()}\)"):
                refuse_busy_store(path)  # the check a build makes before loading its model
        finally:
            w.close()
        refuse_busy_store(path)  # released on close
        with self.open(path) as s:  # the first writer's rows, untouched
            assert s.keys() == KEYS[:4]
            for i, k in enumerate(s.keys()):
                assert_row(s[i], k, i)
        open_store_writer(path, make_info(), overwrite=False).close()
        if self.local:
            assert sorted(p.name for p in Path(path).parent.iterdir()) == [Path(path).name]  # no lock or stage

    def test_overwrite_replaces_the_store(self, path: Where) -> None:
        write(path, [KEYS[:9]])
        with open_store_writer(path, make_info(), overwrite=True, shard_rows=4) as w:
            assert w.pending(KEYS[:5]) == set(KEYS[:5])
            w.write(make_batch(KEYS[3:7]))
            with self.open(path) as during:
                if self.suffix == ".zarr":  # the old rows are gone, the new ones come as committed
                    assert during.keys() in ([], KEYS[3:7])
                else:  # an HDF5 file is replaced whole at close
                    assert during.keys() == KEYS[:9]
        with self.open(path) as s:
            assert s.keys() == KEYS[3:7]
            for i, k in enumerate(KEYS[3:7]):
                assert_row(s[i], k, i)
        if self.local:
            assert sorted(p.name for p in Path(path).parent.iterdir()) == [Path(path).name]

    def test_failures_recorded_and_cleared_on_success(self, path: Where) -> None:
        with open_store_writer(path, make_info(), overwrite=False, shard_rows=4) as w:
            w.write(make_batch(KEYS[:2]))
            w.record_failures([Failure("a.png", "cannot decode"), Failure("b.png", "too big")])
        with self.open(path) as s:
            assert s.attrs["failed"] == [
                {"key": "a.png", "reason": "cannot decode"},
                {"key": "b.png", "reason": "too big"},
            ]
        with open_store_writer(path, make_info(), overwrite=False, shard_rows=4) as w:
            assert w.pending(["a.png", "b.png", KEYS[0]]) == {"a.png", "b.png"}
            w.write(make_batch(["a.png"]))
            w.record_failures([Failure("b.png", "still too big")])
        with self.open(path) as s:
            assert s.failed == [Failure("b.png", "still too big")]
            assert s.keys() == [*KEYS[:2], "a.png"]

    def test_empty_store(self, path: Where) -> None:
        open_store_writer(path, make_info(), overwrite=False).close()
        with self.open(path) as s:
            assert len(s) == 0 and s.keys() == [] and list(s) == []

    def test_batch_of_wrong_shape_refused(self, path: Where) -> None:
        with open_store_writer(path, make_info(), overwrite=False) as w:
            bad = make_batch(["a.png"])
            with pytest.raises(StoreError, match="do not match"):
                w.write(EncodedBatch(bad.items, bad.features.astype(np.float32), bad.masks, bad.orig_size_hw))
            with pytest.raises(StoreError, match="do not match"):
                w.write(EncodedBatch(bad.items, bad.features[:, :, :2], bad.masks, bad.orig_size_hw))

    def test_missing_and_misnamed(self, path: Where, tmp_path: Path) -> None:
        with pytest.raises(StoreError, match="no store at"):
            self.open(str(path)[: -len(f"feats{self.suffix}")] + f"absent{self.suffix}")
        with pytest.raises(StoreError, match=r"must end in \.zarr"):
            open_store(tmp_path / "x.parquet")
        with pytest.raises(StoreError, match="read-only"):
            open_store(tmp_path / f"absent{self.suffix}", mode="a")

    def test_not_a_store(self, path: Where) -> None:
        if self.suffix == ".zarr":
            blobs(path).write_many({"zarr.json": b"{not json"})
        else:
            Path(path).write_bytes(b"not hdf5")
        with pytest.raises(CorruptStoreError):
            self.open(path)

    def test_store_that_lies_is_refused(self, path: Where) -> None:
        write(path, [KEYS[:5]])
        edit_attrs(path, hidden_dim=C * 2)
        with pytest.raises(CorruptStoreError, match="features"):
            self.open(path)
        edit_attrs(path, hidden_dim=C)
        if self.suffix != ".zarr":  # HDF5 files still count their rows
            edit_attrs(path, num_rows=6)
            with pytest.raises(CorruptStoreError, match="num_rows is 6"):
                self.open(path)
            edit_attrs(path, num_rows=5)
        edit_attrs(path, dtype="float32")
        with pytest.raises(CorruptStoreError, match="dtype"):
            self.open(path)
        edit_attrs(path, dtype="float16")
        self.open(path).close()
        delete_array(path, "masks")
        with pytest.raises(CorruptStoreError, match="'masks' is missing"):
            self.open(path)
        with pytest.raises(CorruptStoreError):
            open_store_writer(path, make_info(), overwrite=False)
        write(path, [KEYS[:2]], overwrite=True)  # --overwrite replaces a damaged store

    def test_only_committed_rows_are_read(self, path: Where) -> None:
        write(path, [KEYS[:10]])
        n = self.uncommit(path, 10)  # as if a crash came between writing rows and committing them
        with self.open(path) as s:
            assert len(s) == n and s.keys() == KEYS[:n]
            assert KEYS[8] not in s
            with pytest.raises(IndexError):
                s[n]
        write(path, [KEYS])
        with self.open(path) as s:
            assert s.keys() == KEYS
            for i, k in enumerate(KEYS):
                assert_row(s[i], k, i)


class TestZarr(StoreContract):
    suffix = ".zarr"


class TestZarrOnS3(StoreContract):
    """The same suite against a real S3 server (SeaweedFS on 127.0.0.1), credentials and
    endpoint from the standard AWS environment variables."""

    suffix = ".zarr"
    local = False

    @pytest.fixture
    def path(self, s3_server, monkeypatch: pytest.MonkeyPatch) -> Where:  # type: ignore[no-untyped-def]
        for k, v in s3_server.env().items():
            monkeypatch.setenv(k, v)
        return s3_server.url(f"feats{self.suffix}")


class TestZarrWithTensorStore(StoreContract):
    """The same store read by TensorStore (what layouts that "direct" cannot read get)."""

    suffix = ".zarr"
    engine = reads_with = "tensorstore"

    @pytest.fixture(autouse=True)
    def _needs_tensorstore(self) -> None:
        pytest.importorskip("tensorstore")


class TestZarrWithZarrPython(StoreContract):
    """The same store read by zarr-python."""

    suffix = ".zarr"
    engine = reads_with = "zarr"


class TestHdf5(StoreContract):
    suffix = ".h5"


def rechunk_hdf5(path: Path) -> None:
    """Rewrite an HDF5 store in the chunked layout of earlier featstore versions (features 1 row per chunk)."""
    import h5py

    if not h5py.is_hdf5(path):
        return
    with h5py.File(path, "r+", locking=False) as f:
        for name in ("features", "masks", "keys", "sources", "orig_size_hw"):
            ds = f.get(name)
            if ds is None:
                continue
            if ds.chunks is not None or ds.shape[0] == 0:
                continue
            data, dtype, shape = ds[...], ds.dtype, ds.shape
            del f[name]
            rows = 1 if name == "features" else 1024
            new = f.create_dataset(
                name, shape=shape, maxshape=(None, *shape[1:]), dtype=dtype, chunks=(rows, *shape[1:])
            )
            new[...] = data


class TestHdf5ChunkedWithH5py(StoreContract):
    """Files in the earlier chunked layout are read through h5py."""

    suffix = ".h5"
    reads_with = "h5py"

    def open(self, path: Where) -> FeatureStore:
        path = Path(path)
        if path.is_file():
            rechunk_hdf5(path)
        return open_store(path)


def _counting_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from featstore.store._blobs import Blobs, LocalBlobs, RemoteBlobs

    writes: list[str] = []
    for cls in (LocalBlobs, RemoteBlobs):
        real_many, real_create = cls.write_many, cls.create

        def write_many(self: Blobs, objects, real=real_many):  # type: ignore[no-untyped-def]
            writes.extend(objects)
            return real(self, objects)

        def create(self: Blobs, key: str, data: bytes, real=real_create) -> bool:  # type: ignore[no-untyped-def]
            writes.append(key)
            return real(self, key, data)

        monkeypatch.setattr(cls, "write_many", write_many)
        monkeypatch.setattr(cls, "create", create)
    return writes


def test_zarr_writes_each_shard_object_once_commit_record_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are buffered: each shard object is written once per commit, never once per batch,
    and the shard's keys chunk (its commit record) after all its other objects."""
    path = tmp_path / "s.zarr"
    write(path, [KEYS[:6]])
    writes = _counting_writes(monkeypatch)
    with open_store_writer(path, make_info(), overwrite=False) as w:
        for k in KEYS[6:]:  # one row at a time
            w.write(make_batch([k]))
    chunks = [k for k in writes if "/c/" in k and not k.startswith("claims/")]
    assert len(chunks) == len(set(chunks)) == 14  # 7 arrays x 2 shards (1: refilled, 2: new), each once
    for shard in (1, 2):
        mine = [k for k in chunks if k.split("/c/")[1].split("/")[0] == str(shard)]
        assert mine[-1] == f"keys/c/{shard}" and len(mine) == 7 and f"key_hash/c/{shard}" in mine
        assert writes.index(f"claims/c/{shard}") < writes.index(f"features/c/{shard}/0/0/0")  # owned first
    monkeypatch.undo()
    with open_store(path) as s:
        assert s.keys() == KEYS


@pytest.mark.parametrize("where", ["local", "s3"])
def test_plain_zarr_and_tensorstore_read_the_store(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The store is a plain Zarr v3 group: zarr-python (and TensorStore, locally) read it directly."""
    import zarr

    if where == "s3":
        server = request.getfixturevalue("s3_server")
        path: Where = server.url("plain.zarr")
        write_opts = server.options
    else:
        path, write_opts = tmp_path / "plain.zarr", {}
    info = make_info(embedding_dim=6)
    with open_store_writer(path, info, overwrite=False, shard_rows=4, storage_options=write_opts) as w:
        w.write(make_batch(KEYS[:7], info=info))
        w.write(make_batch(KEYS[7:], info=info))
    if where == "s3":
        from zarr.storage import FsspecStore

        group = zarr.open_group(FsspecStore.from_url(str(path), storage_options=write_opts, read_only=True), mode="r")
    else:
        group = zarr.open_group(path, mode="r")
    assert sorted(group.array_keys()) == [
        *("claims", "embedding", "features", "key", "key_hash", "keys", "masks", "orig_size_hw", "sources")
    ]
    assert group.attrs["layout_version"] == 2 and group.attrs["embedding_dim"] == 6
    assert [str(k) for k in group["keys"][:]] == KEYS
    for i, k in enumerate(KEYS):
        feats, mask, orig = row_values(k)
        np.testing.assert_array_equal(group["features"][i], feats)
        np.testing.assert_array_equal(group["masks"][i], mask)
        assert list(group["orig_size_hw"][i]) == orig and str(group["sources"][i]) == f"imgs/{k}"
        np.testing.assert_array_equal(group["embedding"][i], embedding_values(k, 6))
    if where == "local":
        ts = pytest.importorskip("tensorstore")
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "features")}}
        arr = ts.open(spec, read=True).result()
        assert arr.shape[0] == len(KEYS)
        np.testing.assert_array_equal(arr[5].read().result(), row_values(KEYS[5])[0])


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_embedding_rows(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"e{suffix}"
    info = make_info(embedding_dim=5)
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        w.write(make_batch(KEYS[:6], info=info))
        bad = make_batch(["x.png"], info=info)
        with pytest.raises(StoreError, match="embedding"):
            w.write(EncodedBatch(bad.items, bad.features, bad.masks, bad.orig_size_hw, None))
    with open_store_writer(path, info, overwrite=False) as w:  # appending refills the partial shard
        w.write(make_batch(KEYS[6:], info=info))
    with open_store(path) as s:
        assert s.has_embedding and s.info.embedding_dim == 5
        for k in KEYS:
            emb = s[k].embedding
            assert emb is not None and emb.dtype == np.float32
            np.testing.assert_array_equal(emb, embedding_values(k, 5))
        b = s.get_batch([3, 0, 3])
        assert b.embedding is not None
        np.testing.assert_array_equal(b.embedding[1], embedding_values(KEYS[0], 5))
        np.testing.assert_array_equal(b.embedding[0], b.embedding[2])
    with _plain(tmp_path, suffix) as s:
        assert not s.has_embedding and s[0].embedding is None and s.get_batch([0]).embedding is None
    with pytest.raises(IncompatibleStoreError, match="embedding_dim"):
        open_store_writer(path, make_info(), overwrite=False)


def _plain(tmp_path: Path, suffix: str) -> FeatureStore:
    write(tmp_path / f"plain{suffix}", [KEYS[:2]])
    return open_store(tmp_path / f"plain{suffix}")


def test_hdf5_file_layout(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "s.hdf5"
    write(path, [KEYS])
    with h5py.File(path, "r") as f:
        # the rows, and the dimensions netCDF readers name (see _hdf5.attach_dimension_scales)
        assert set(f) == {"features", "masks", "keys", "sources", "orig_size_hw", "key", "channel", "y", "x", "hw"}
        for name in f:  # contiguous: row i at a fixed offset (what the direct reader relies on)
            assert f[name].chunks is None and f[name].compression is None, name
        assert f["features"].id.get_offset() is not None


def test_writer_item_path_is_source(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    b = make_batch(["a.png"])
    b = EncodedBatch([ImageItem("a.png", "/abs/root/a.png")], b.features, b.masks, b.orig_size_hw)
    with open_store_writer(path, make_info(), overwrite=False) as w:
        w.write(b)
    with open_store(path) as s:
        assert s["a.png"].source == "/abs/root/a.png" and s.sources() == ["/abs/root/a.png"]


def test_reading_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    for name in ("s.zarr", "s.h5"):
        write(tmp_path / name, [KEYS[:3]])
    code = (
        "import sys\nfrom featstore.store import open_store\n"
        "for p in sys.argv[1:]:\n"
        "    with open_store(p) as s:\n        s[0], s.get_batch([0, 2]), list(s)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.zarr"), str(tmp_path / "s.h5")], check=True)
