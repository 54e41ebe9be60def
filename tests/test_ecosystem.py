"""Other tools read featstore's stores as their users expect, each through its real client:
xarray (Zarr local and on the S3 server, HDF5 through h5netcdf), dask, TensorStore,
zarr-python's consolidated metadata, h5py beside featstore in one process, and Hugging
Face datasets. Every check compares against featstore's own reader."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featstore.batches import EncodedBatch
from featstore.store import open_store, open_store_writer, upgrade_store
from tests.store_helpers import blobs, make_batch, make_info

REPO = Path(__file__).resolve().parents[1]
LAYOUT1 = REPO / "tests" / "data" / "layout1.zarr"  # written by featstore 0.1: 10 rows, shards of 4
KEYS = [f"img{i:02d}.png" for i in range(10)] + ["sub/ünï code.png"]
MORE = [f"more{i}.png" for i in range(6)]
ROWS = 4  # shard rows


def _where(kind: str, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        return server.url(f"{tmp_path.name}-{name}"), server.options
    return str(tmp_path / name), {}


def _write(where: str, keys: list[str], opts: dict[str, Any], **info: Any) -> None:
    i = make_info(embedding_dim=6, **info)
    with open_store_writer(where, i, overwrite=False, shard_rows=ROWS, storage_options=opts) as w:
        w.write(make_batch(keys, info=i))


def _open_xarray(where: str, opts: dict[str, Any]) -> Any:
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "consolidated metadata not found", no other complaint
        kwargs = {"storage_options": opts} if opts else {}
        return xr.open_zarr(where, chunks={"key": ROWS}, **kwargs)


def _assert_selection_equals_reader(ds: Any, where: str, opts: dict[str, Any], keys: list[str]) -> None:
    with open_store(where, storage_options=opts) as store:
        want = store.get_batch(keys)
        got = ds.sel(key=keys)
        assert [str(k) for k in got["key"].values] == keys
        np.testing.assert_array_equal(got["features"].values, want.features)
        np.testing.assert_array_equal(got["masks"].values, want.masks)
        if store.has_embedding:
            np.testing.assert_array_equal(got["embedding"].values, want.embedding)
        np.testing.assert_array_equal(got["orig_size_hw"].values, want.orig_size_hw)
        assert [str(s) for s in got["sources"].values] == [store[k].source for k in keys]
        attrs = {k: v for k, v in ds.attrs.items() if k != "num_rows"}
        assert attrs == {k: v for k, v in store.attrs.items() if k != "num_rows"}
        assert ds.attrs["num_rows"] == len(store)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_xarray_and_dask_read_a_store_then_its_append(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import dask
    import dask.array as da

    where, opts = _where(kind, "x.zarr", tmp_path, request)
    _write(where, KEYS, opts)
    ds = _open_xarray(where, opts)
    assert ds["features"].dims == ("key", "channel", "y", "x")
    assert ds["masks"].dims == ("key", "y", "x") and ds["embedding"].dims == ("key", "embedding_dim")
    assert ds["orig_size_hw"].dims == ("key", "hw") and "key" in ds.indexes  # the keys are the coordinate
    _assert_selection_equals_reader(ds, where, opts, [KEYS[7], KEYS[0], KEYS[-1]])

    # dask: one task per shard, and a full reduction equals featstore's
    assert ds["features"].chunks[0] == (4, 4, 3)
    with open_store(where, storage_options=opts) as store:
        want = sum(b.features.astype(np.float64).sum(axis=0) for b in store.iter_batches())
    got = ds["features"].astype("float64").sum("key").compute(scheduler="threads")
    np.testing.assert_allclose(got.values, want, rtol=1e-12)
    arr = da.from_zarr(where, component="features", chunks="auto", storage_options=opts or None)
    assert all(c % ROWS == 0 for c in arr.chunks[0][:-1])  # "auto" starts from the shards
    with dask.config.set(scheduler="threads"):
        np.testing.assert_allclose(arr.astype("float64").sum(axis=0).compute(), want, rtol=1e-12)

    _write(where, MORE, opts)  # an append: refills the partial shard, adds one
    ds = _open_xarray(where, opts)
    assert ds.sizes["key"] == len(KEYS) + len(MORE) == ds.attrs["num_rows"]
    _assert_selection_equals_reader(ds, where, opts, [MORE[-1], KEYS[3], MORE[0]])


def _group_doc(where: str) -> dict[str, Any]:
    return json.loads(blobs(where).read("zarr.json"))


def test_consolidated_metadata_is_current_after_every_commit(tmp_path: Path) -> None:
    import zarr

    where = str(tmp_path / "c.zarr")
    info = make_info(embedding_dim=6)
    with open_store_writer(where, info, overwrite=False, shard_rows=ROWS) as w:
        for i in range(0, 10, 2):
            w.write(make_batch(KEYS[i : i + 2], info=info))
            committed = (i + 2) // ROWS * ROWS  # the writer commits whole shards while it runs
            doc = _group_doc(where)
            assert doc["attributes"]["num_rows"] == committed
            meta = doc["consolidated_metadata"]["metadata"]
            assert meta["features"]["shape"][0] == committed
            # the consolidated copy is exactly the arrays' own documents
            for name, m in meta.items():
                assert m == json.loads(blobs(where).read(f"{name}/zarr.json")), name
    group = zarr.open_consolidated(where, zarr_format=3)
    assert group["features"].shape[0] == group.attrs["num_rows"] == 10 and group["key_hash"].shape == (10,)


def test_tensorstore_finds_a_row_by_key_hash(tmp_path: Path) -> None:
    ts = pytest.importorskip("tensorstore")
    where = tmp_path / "t.zarr"
    _write(str(where), KEYS, {})

    def spec(name: str) -> dict[str, Any]:
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(where / name)}}

    hashes = ts.open(spec("key_hash"), read=True).result().read().result()
    features = ts.open(spec("features"), read=True).result()
    with open_store(where) as store:
        for key in (KEYS[5], KEYS[-1]):
            h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")  # the documented formula
            (row,) = np.flatnonzero(hashes == np.uint64(h))
            assert row == store.index_of(key)
            np.testing.assert_array_equal(features[int(row)].read().result(), store[key].features)


def _strip_new_metadata(where: Path) -> None:
    """Make a store look written before this change: no dimension names, key_hash or consolidation."""
    for doc_path in where.glob("*/zarr.json"):
        doc = json.loads(doc_path.read_text())
        doc.pop("dimension_names", None)
        doc_path.write_text(json.dumps(doc))
    shutil.rmtree(where / "key_hash")
    shutil.rmtree(where / "key")
    group = json.loads((where / "zarr.json").read_text())
    group.pop("consolidated_metadata")
    group["attributes"].pop("num_rows")
    (where / "zarr.json").write_text(json.dumps(group))


def _data_objects(where: Path) -> dict[str, bytes]:
    return {
        p.relative_to(where).as_posix(): p.read_bytes()
        for p in where.rglob("*")
        if p.is_file() and "/c/" in p.as_posix()
    }


def test_upgrade_adds_the_new_metadata_to_older_stores(tmp_path: Path) -> None:
    import xarray as xr

    old = tmp_path / "old.zarr"
    _write(str(old), KEYS, {})
    _strip_new_metadata(old)
    with pytest.raises(KeyError, match="dimension_names"):
        xr.open_zarr(old, consolidated=False)
    with open_store(old) as store:  # featstore reads it as before
        assert store.keys() == KEYS
    before = _data_objects(old)
    p = subprocess.run(
        [sys.executable, "-m", "featstore", "upgrade", str(old)], capture_output=True, text=True, cwd=REPO
    )
    assert p.returncode == 0 and "metadata is current" in p.stdout, p.stderr
    after = _data_objects(old)
    assert {k: v for k, v in after.items() if not k.startswith(("key_hash/", "key/"))} == before  # rows untouched
    _assert_selection_equals_reader(_open_xarray(str(old), {}), str(old), {}, [KEYS[9], KEYS[2]])

    # A featstore 0.1 store (layout 1): upgraded to layout 2 and the new metadata at once.
    l1 = tmp_path / "l1.zarr"
    shutil.copytree(LAYOUT1, l1)
    assert upgrade_store(l1) == 1
    ds = _open_xarray(str(l1), {})
    with open_store(l1) as store:
        np.testing.assert_array_equal(ds.sel(key=["img03.png"])["features"].values[0], store["img03.png"].features)

    # An older store a build appends to is brought current by that build (its metadata writer).
    app = tmp_path / "app.zarr"
    _write(str(app), KEYS, {})
    _strip_new_metadata(app)
    _write(str(app), MORE, {})
    _assert_selection_equals_reader(_open_xarray(str(app), {}), str(app), {}, [KEYS[1], MORE[2]])


def test_a_distributed_build_consolidates_at_finalize(tmp_path: Path) -> None:
    """Two `--shard` processes one after the other: the one that finishes the last unit
    finalizes; xarray then sees every row (failed images leave empty rows, whose key is "")."""
    from PIL import Image

    from tests.conftest import make_rgba

    images = tmp_path / "images"
    images.mkdir()
    for i in range(14):
        Image.fromarray(make_rgba(32, 32, i)).save(images / f"img{i:02d}.png")
    (images / "img03_bad.png").write_bytes(b"not an image")
    fake = str(REPO / "tests" / "fake_featstore.py")
    env = {"HF_HUB_OFFLINE": "1", "FAKE_SHARD_ROWS": "4", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    common = ["build", "-i", str(images), "-m", "fake", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    for part in ("0/2", "1/2"):
        args = [*common, "--unit-images", "8", "--store", "d.zarr", "--shard", part]
        p = subprocess.run([sys.executable, fake, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    where = str(tmp_path / "d.zarr")
    ds = _open_xarray(where, {})
    with open_store(where) as store:
        assert ds.attrs["num_rows"] == len(store) == 14 and [f.key for f in store.failed] == ["img03_bad.png"]
    rows = ds.isel(key=ds["key"].values != "")  # the empty rows a failed image leaves in its unit
    assert sorted(str(k) for k in rows["key"].values) == sorted(store.keys())
    _assert_selection_equals_reader(rows, where, {}, ["img13.png", "img00.png"])


# ---------------------------------------------------------------------------------- HDF5


def test_h5py_and_featstore_hold_one_file_open_in_either_order(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "s.h5"
    _write(str(path), KEYS, {})
    with h5py.File(path, "r") as f, open_store(path) as store:  # h5py first
        assert [k.decode() for k in f["keys"][:2]] == store.keys()[:2]
    with open_store(path) as store, h5py.File(path, "r") as f:  # featstore first
        np.testing.assert_array_equal(f["features"][4], store[4].features)
    for locking in (False, True):  # h5py told otherwise, first: featstore follows it
        with h5py.File(path, "r", locking=locking), open_store(path) as store:
            assert len(store) == len(KEYS)


def test_xarray_h5netcdf_sees_named_dimensions_and_keys(tmp_path: Path) -> None:
    import xarray as xr

    path = tmp_path / "s.h5"
    _write(str(path), KEYS, {}, hidden_dim=6)  # channel and embedding axes of one length: still two names
    with xr.open_dataset(path, engine="h5netcdf") as ds, open_store(path) as store:
        assert ds["features"].dims == ("key", "channel", "y", "x")
        assert ds["embedding"].dims == ("key", "embedding_dim") and ds.sizes["channel"] == ds.sizes["embedding_dim"]
        sel = ds.sel(key=[KEYS[4], KEYS[-1]])
        want = store.get_batch([KEYS[4], KEYS[-1]])
        np.testing.assert_array_equal(sel["features"].values, want.features)
        np.testing.assert_array_equal(sel["masks"].values, want.masks)
        assert json.loads(ds.attrs["model"]) == store.info.model  # attributes: featstore's JSON text


def test_hdf5_upgrade_adds_dimension_scales(tmp_path: Path) -> None:
    import h5py
    import xarray as xr

    path = tmp_path / "old.h5"
    _write(str(path), KEYS, {})
    with h5py.File(path, "r+") as f:  # as written before: no scales
        for name in ("features", "masks", "keys", "sources", "orig_size_hw", "embedding"):
            for dim in f[name].dims:
                for scale in list(dim.values()):
                    dim.detach_scale(scale)
        for name in ("key", "channel", "y", "x", "hw", "embedding_dim"):
            del f[name]
    with xr.open_dataset(path, engine="h5netcdf", phony_dims="access") as ds:
        assert "key" not in ds["features"].dims
    assert upgrade_store(path) == 2
    with xr.open_dataset(path, engine="h5netcdf") as ds, open_store(path) as store:
        assert ds["features"].dims == ("key", "channel", "y", "x")
        np.testing.assert_array_equal(ds.sel(key=[KEYS[2]])["features"].values[0], store[KEYS[2]].features)


# ------------------------------------------------------------------------ HF datasets


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_hf_datasets_of_a_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import datasets

    from featstore.hf import store_attrs, to_hf_dataset

    where, opts = _where(kind, "h.zarr", tmp_path, request)
    _write(where, KEYS, opts)
    ds = to_hf_dataset(where, storage_options=opts, cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, datasets.Dataset) and len(ds) == len(KEYS)
    assert ds.features["features"] == datasets.Array3D(shape=(16, 4, 4), dtype="float16")
    assert ds.features["mask"] == datasets.Array2D(shape=(4, 4), dtype="uint8")
    typed = ds.with_format("numpy", dtype=None)  # datasets' default casts to float32 / int64
    with open_store(where, storage_options=opts) as store:
        attrs = store.attrs
        for i in (0, 7, len(KEYS) - 1):
            row = typed[i]
            assert row["key"] == store.keys()[i] and row["features"].dtype == np.float16
            np.testing.assert_array_equal(row["features"], store[i].features)
            np.testing.assert_array_equal(row["mask"], store[i].mask)
            np.testing.assert_array_equal(row["embedding"], store[i].embedding)
    assert store_attrs(ds) == attrs

    it = to_hf_dataset(where, storage_options=opts, streaming=True)
    assert isinstance(it, datasets.IterableDataset) and it.num_shards == 3  # one per store shard
    assert [r["key"] for r in it] == KEYS and store_attrs(it)["model"] == attrs["model"]

    _write(where, MORE, opts)  # an append: a new Dataset has the new rows (not the cached old ones)
    again = to_hf_dataset(where, storage_options=opts, cache_dir=str(tmp_path / "cache"))
    assert again["key"] == KEYS + MORE


def test_hf_dataset_of_several_layers_is_array4d(tmp_path: Path) -> None:
    import datasets

    from featstore.hf import to_hf_dataset

    where = str(tmp_path / "l.zarr")
    info = make_info(layers=(4, 11))
    batch = make_batch(KEYS[:3])
    layered = np.stack([batch.features, -batch.features], axis=1)  # (B, 2, C, g, g)
    with open_store_writer(where, info, overwrite=False, shard_rows=ROWS) as w:
        w.write(EncodedBatch(batch.items, layered, batch.masks, batch.orig_size_hw))
    ds = to_hf_dataset(where, cache_dir=str(tmp_path / "cache"))
    assert ds.features["features"] == datasets.Array4D(shape=(2, 16, 4, 4), dtype="float16")
    with open_store(where) as store:
        np.testing.assert_array_equal(ds.with_format("numpy", dtype=None)[1]["features"], store[1].features)
    assert _open_xarray(where, {})["features"].dims == ("key", "layer", "channel", "y", "x")
