"""Stores on S3 (a real SeaweedFS server on 127.0.0.1, see tests/s3_server.py) end to end:
the CLI building into s3:// with the standard AWS variables, export equal to a local
build's, DataLoader workers (fork after the parent read, and spawn), one-line errors for
bad credentials and a missing bucket, and layout-1 stores of featstore 0.1 (local and on
S3) opening and upgrading. The contract suite (tests/test_store_contract.py) runs on S3 too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from featstore.errors import StoreError
from featstore.store import LAYOUT_VERSION, as_location, open_store, open_store_writer, upgrade_store
from featstore.torch import FeatureDataset
from tests.store_helpers import make_batch, make_info, row_values

REPO = Path(__file__).resolve().parents[1]
LAYOUT1 = REPO / "tests" / "data" / "layout1.zarr"  # written by featstore 0.1: 10 rows, shards of 4
LAYOUT1_KEYS = [f"img{i:02d}.png" for i in range(10)]


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # type: ignore[no-untyped-def]
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server.env()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "featstore", *args], capture_output=True, text=True, env=full)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_build_into_s3_reopen_and_export_equals_local(tiny_models, image_dir, tmp_path, s3_server) -> None:  # type: ignore[no-untyped-def]
    url = s3_server.url("feats.zarr")
    env = s3_server.env()
    args = ["build", "-i", str(image_dir), "-m", tiny_models["dino"], "--size", "32", "--device", "cpu"]
    args += ["--workers", "0", "--batch-size", "2"]
    p = _cli(*args, "--store", url, env=env)
    assert p.returncode == 0, p.stderr
    assert "encoded 5, skipped 0, failed 0" in p.stderr
    local = tmp_path / "local.zarr"
    assert _cli(*args, "--store", str(local)).returncode == 0
    again = _cli(*args, "--store", url, env=env)  # resume: nothing left to do
    assert again.returncode == 0 and "encoded 0, skipped 5" in again.stderr, again.stderr

    for p in (_cli("ls", url, env=env), _cli("info", url, env=env)):
        assert p.returncode == 0, p.stderr
    assert _cli("ls", url, env=env).stdout.split() == _cli("ls", str(local)).stdout.split()
    assert _cli("export-npy", url, str(tmp_path / "from_s3"), "--save-meta", env=env).returncode == 0
    assert _cli("export-npy", str(local), str(tmp_path / "from_disk"), "--save-meta").returncode == 0
    from_s3, from_disk = _files(tmp_path / "from_s3"), _files(tmp_path / "from_disk")
    assert from_s3 == from_disk and len(from_s3) == 15

    # The same store through the API: the endpoint and keys as storage options, no environment.
    for k in env:
        os.environ.pop(k, None)
    with open_store(url, storage_options=s3_server.options) as s, open_store(local) as ref:
        assert s.keys() == ref.keys() and len(s) == 5
        for key in ref.keys():  # noqa: SIM118 (a list of keys, not a dict)
            np.testing.assert_array_equal(s[key].features, ref[key].features)
            np.testing.assert_array_equal(s[key].mask, ref[key].mask)
        b = s.get_batch([4, 0, "sub/e.png"])
        np.testing.assert_array_equal(b.features, ref.get_batch([4, 0, "sub/e.png"]).features)


def test_storage_option_on_the_cli(tiny_models, image_dir, s3_server) -> None:  # type: ignore[no-untyped-def]
    url = s3_server.url("opts.zarr")
    opts = [f"--storage-option=endpoint_url={s3_server.endpoint}"]
    opts += [
        f"--storage-option=key={s3_server.options['key']}",
        f"--storage-option=secret={s3_server.options['secret']}",
    ]
    args = ["build", "-i", str(image_dir), "-m", tiny_models["dino"], "--size", "32", "--device", "cpu"]
    p = _cli(*args, "--workers", "0", "--store", url, *opts, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    assert p.returncode == 0, p.stderr
    assert len(_cli("ls", url, *opts).stdout.split()) == 5


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_over_s3_after_the_parent_read(s3_env, s3_server, context: str) -> None:  # type: ignore[no-untyped-def]
    """The parent opens and reads the S3 store, then forks (or spawns) 2 workers: each reads."""
    url = s3_server.url("loader.zarr")
    keys = [f"k{i:02d}.png" for i in range(30)]
    with open_store_writer(url, make_info(), overwrite=False, shard_rows=8) as w:
        w.write(make_batch(keys))
    ds = FeatureDataset(url)
    before = ds[3]["features"]  # the parent has used the S3 client before the workers start
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, multiprocessing_context=context, timeout=300)
    seen: list[str] = []
    for batch in loader:
        seen += batch["key"]
        for j, key in enumerate(batch["key"]):
            np.testing.assert_array_equal(batch["features"][j].numpy(), row_values(key)[0])
    assert sorted(seen) == keys
    assert torch.equal(ds[3]["features"], before)


def test_bad_credentials_and_missing_bucket_are_one_line_errors(s3_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = s3_server.url("x.zarr")
    with open_store_writer(url, make_info(), overwrite=False, storage_options=s3_server.options) as w:
        w.write(make_batch(["a.png"]))
    bad = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong"}
    cases = [
        (_cli("ls", url, env=bad), "credentials"),
        (_cli("info", url.replace("featstore-test", "no-such-bucket"), env=s3_server.env()), "does not exist"),
        (_cli("ls", url.rsplit("/", 1)[0] + "/absent.zarr", env=s3_server.env()), "no store at"),
        (_cli("ls", "s3://featstore-test/x.h5", env=s3_server.env()), "HDF5 stores are local files only"),
        (_cli("ls", "s3://B/x.zarr", env=s3_server.env()), "not a valid bucket name"),
    ]
    for p, words in cases:
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert words in lines[0], lines[0]
    with pytest.raises(StoreError, match="credentials"):
        open_store(url, storage_options={**s3_server.options, "secret": "wrong"})


def test_layout1_store_still_opens_and_upgrades(tmp_path: Path) -> None:
    path = tmp_path / "old.zarr"
    shutil.copytree(LAYOUT1, path)
    with open_store(path) as s:
        assert s.keys() == LAYOUT1_KEYS and s.attrs["layout_version"] == 1
        for i, k in enumerate(LAYOUT1_KEYS):
            np.testing.assert_array_equal(s[i].features, row_values(k)[0])
        assert [f.key for f in s.failed] == ["broken.png"]
    with pytest.raises(StoreError, match="featstore upgrade"):
        open_store_writer(path, make_info(), overwrite=False)
    p = _cli("upgrade", str(path))
    assert p.returncode == 0 and "layout 1 -> 2" in p.stdout, p.stderr
    with open_store_writer(path, make_info(), overwrite=False) as w:
        assert w.pending([*LAYOUT1_KEYS, "new.png"]) == {"new.png"}
        w.write(make_batch(["new.png"]))
    with open_store(path) as s:
        assert s.keys() == [*LAYOUT1_KEYS, "new.png"] and s.attrs["layout_version"] == LAYOUT_VERSION
        for i, k in enumerate(s.keys()):
            np.testing.assert_array_equal(s[i].features, row_values(k)[0])
    assert upgrade_store(path) == LAYOUT_VERSION  # nothing left to do


def test_layout1_store_opens_on_s3(s3_server) -> None:  # type: ignore[no-untyped-def]
    url = s3_server.url("old.zarr")
    from featstore.store._blobs import RemoteBlobs

    remote = RemoteBlobs(as_location(url, s3_server.options))
    remote.write_many({p.relative_to(LAYOUT1).as_posix(): p.read_bytes() for p in LAYOUT1.rglob("*") if p.is_file()})
    with open_store(url, storage_options=s3_server.options) as s:
        assert s.keys() == LAYOUT1_KEYS and s.engine == "direct"
        np.testing.assert_array_equal(s.get_batch([9, 0]).features[0], row_values(LAYOUT1_KEYS[9])[0])
