"""Sources (featstore.sources) and the reader over them: brace ranges, WebDataset shards
written by the `webdataset` package itself, file lists, retries, decoding from bytes.
No model: the pipeline-level tests are in test_inputs_build.py."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from featstore.batches import ImageItem
from featstore.errors import ConfigError
from featstore.images import load_sample
from featstore.reader import ImageReader
from featstore.sources import as_source, expand_braces, split_member, with_retries
from tests.conftest import make_rgba


def png_bytes(seed: int, h: int = 32, w: int = 40, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    arr = make_rgba(h, w, seed)
    Image.fromarray(arr if fmt == "PNG" else arr[..., :3]).save(b, format=fmt)
    return b.getvalue()


def write_shard(path: Path, samples: list[dict[str, object]]) -> None:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """data/train-000000.tar and -000001.tar, 3 samples each (png + json; one jpg sample)."""
    d = tmp_path / "data"
    d.mkdir()
    for s in range(2):
        samples: list[dict[str, object]] = [
            {"__key__": f"img{i:03d}", "png": png_bytes(10 * s + i), "json": {"i": i}} for i in range(3)
        ]
        samples[1] = {"__key__": "img001", "jpg": png_bytes(10 * s + 1, fmt="JPEG"), "txt": "a photo"}
        write_shard(d / f"train-{s:06d}.tar", samples)
    return d


# ---------------------------------------------------------------- names


def test_brace_ranges_expand_as_webdataset_writes_them():
    assert expand_braces("d/train-{000000..000002}.tar") == [f"d/train-00000{i}.tar" for i in range(3)]
    assert expand_braces("s3://b/{a,b}-{8..10}.tar") == [
        "s3://b/a-8.tar",
        "s3://b/a-9.tar",
        "s3://b/a-10.tar",
        "s3://b/b-8.tar",
        "s3://b/b-9.tar",
        "s3://b/b-10.tar",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ConfigError, match="empty"):
        expand_braces("x-{5..2}.tar")
    with pytest.raises(ConfigError, match=r"FIRST\.\.LAST"):
        expand_braces("x-{abc}.tar")


@pytest.mark.parametrize("name", ["a.png", "dir/a.b.jpg", "x/y/img001.seg.png", "k.json", "k.tar.gz"])
def test_member_names_split_as_webdataset_splits_them(name):
    key, ext = split_member(name)
    assert (key, ext) == tuple(base_plus_ext(name))


# ---------------------------------------------------------------- tar shards


def test_shards_by_brace_range_by_folder_and_by_single_file(shards, monkeypatch):
    keys = [f"train-00000{s}/img00{i}.{'jpg' if i == 1 else 'png'}" for s in range(2) for i in range(3)]
    by_range = as_source(str(shards / "train-{000000..000001}.tar")).discover()
    assert [it.key for it in by_range.items] == keys and by_range.failures == []
    assert by_range.items[0].path == str(shards / "train-000000.tar") and by_range.items[0].member == "img000.png"
    by_folder = as_source(shards).discover()
    assert [it.key for it in by_folder.items] == keys
    single = as_source(str(shards / "train-000001.tar")).discover()
    assert [it.key for it in single.items] == keys[3:]
    nested = shards.parent / "nested" / "part"
    nested.mkdir(parents=True)
    (shards / "train-000000.tar").rename(nested / "train-000000.tar")
    monkeypatch.chdir(shards.parent)  # a relative, unnormalised --input: the keys do not change
    assert [it.key for it in as_source("./nested/").discover().items] == ["part/" + k for k in keys[:3]]


def test_image_key_picks_the_member(tmp_path):
    write_shard(tmp_path / "s.tar", [{"__key__": "a", "png": png_bytes(1), "seg.png": png_bytes(2)}])
    assert [it.member for it in as_source(str(tmp_path / "s.tar")).discover().items] == ["a.png"]
    picked = as_source(str(tmp_path / "s.tar"), image_key="seg.png").discover().items
    assert [(it.key, it.member) for it in picked] == [("s/a.seg.png", "a.seg.png")]


def test_bad_shards_are_reported_by_name_and_the_rest_is_listed(shards):
    write_shard(shards / "train-000002.tar", [{"__key__": "lonely", "json": {"x": 1}, "txt": "no picture"}])
    whole = (shards / "train-000001.tar").read_bytes()
    with tarfile.open(shards / "train-000001.tar") as tf:
        last = tf.getmember("img002.png").offset_data
    (shards / "train-000001.tar").write_bytes(whole[: last + 100])  # the last image's data cut short
    found = as_source(str(shards / "train-{000000..000003}.tar")).discover()
    reasons = {f.key: f.reason for f in found.failures}
    assert reasons == {
        "train-000001/img002.png": "truncated tar: the member's data is cut short",
        "train-000001.tar": "truncated or corrupt tar after 3 samples: unexpected end of data",
        "train-000002/lonely": "sample has no image member (.jpg .jpeg .png .webp); it has .json, .txt",
        "train-000003.tar": f"missing shard: {shards / 'train-000003.tar'} does not exist",
    }
    assert [it.key for it in found.items] == [
        "train-000000/img000.png",
        "train-000000/img001.jpg",
        "train-000000/img002.png",
        "train-000001/img000.png",
        "train-000001/img001.jpg",
    ]


def test_a_tar_cut_inside_a_header_and_an_unsafe_member_are_reported(tmp_path):
    write_shard(tmp_path / "t.tar", [{"__key__": f"k{i}", "png": png_bytes(i)} for i in range(3)])
    data = (tmp_path / "t.tar").read_bytes()
    with tarfile.open(tmp_path / "t.tar") as tf:
        third = tf.getmember("k2.png").offset
    (tmp_path / "t.tar").write_bytes(data[: third + 100])  # inside the third member's header
    with tarfile.open(tmp_path / "evil.tar", "w") as tf:
        info = tarfile.TarInfo("../escape.png")
        payload = png_bytes(0)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    found = as_source(tmp_path).discover()
    reasons = {f.key: f.reason for f in found.failures}
    assert [it.key for it in found.items] == ["t/k0.png", "t/k1.png"]
    assert reasons["t.tar"].startswith("truncated or corrupt tar after 2 samples")
    assert reasons["evil/../escape.png"] == "unsafe member name '../escape.png' in the tar"


def test_reader_streams_each_shard_in_one_worker_and_decodes_like_files(shards, tmp_path):
    items = as_source(shards).discover().items
    reader = ImageReader(size=32, grid=4, batch_size=2, workers=2)
    batches = list(reader.batches(items))
    got = {it.key: (b.pixels[j].numpy(), b.masks[j]) for b in batches for j, it in enumerate(b.items)}
    assert sorted(got) == sorted(it.key for it in items) and not any(b.failures for b in batches)
    for b in batches:  # a batch never mixes shards: each shard is one worker's stream
        assert len({it.path for it in b.items}) == 1
    with tarfile.open(shards / "train-000001.tar") as tf:  # the same bytes as a file give the same pixels
        tf.extract("img002.png", tmp_path, filter="data")
    ref = load_sample(ImageItem("x", str(tmp_path / "img002.png")), size=32, grid=4)
    np.testing.assert_array_equal(got["train-000001/img002.png"][0], ref.pixels)
    np.testing.assert_array_equal(got["train-000001/img002.png"][1], ref.mask)


def test_a_shard_changed_after_listing_fails_its_remaining_samples_by_name(shards):
    items = as_source(shards).discover().items
    whole = (shards / "train-000000.tar").read_bytes()
    with tarfile.open(shards / "train-000000.tar") as tf:
        cut = min(m.offset for m in tf.getmembers() if m.name.startswith("img001"))
    (shards / "train-000000.tar").write_bytes(whole[: cut + 700])  # the first sample survives, whole
    batches = list(ImageReader(size=32, grid=4, batch_size=8).batches(items))
    failed = {f.key: f.reason for b in batches for f in b.failures}
    assert set(failed) == {"train-000000/img001.jpg", "train-000000/img002.png"}
    assert all(r.startswith(f"truncated or corrupt tar shard {shards / 'train-000000.tar'}") for r in failed.values())
    assert sum(len(b.items) for b in batches) == 4


def test_decoding_bytes_keeps_the_file_messages(tmp_path):
    (tmp_path / "page.png").write_bytes(b"<!doctype html><html>not found</html>")
    (tmp_path / "cut.png").write_bytes(png_bytes(3)[:200])
    for name in ("page.png", "cut.png"):
        from_file = load_sample(ImageItem(name, str(tmp_path / name)), size=32, grid=4)
        from_bytes = load_sample(ImageItem(name, "unused"), size=32, grid=4, data=(tmp_path / name).read_bytes())
        assert from_file.error is not None and from_bytes.error == from_file.error
    assert load_sample(ImageItem("e", "unused"), size=32, grid=4, data=b"").error == "empty file (0 bytes)"


# ---------------------------------------------------------------- file lists


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (d / name).write_bytes(png_bytes(len(name)))
    return d


def test_text_list_keeps_its_order_resolves_against_input_and_reports_missing(folder, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# chosen\nsub/c.png\n\na.png\nmissing.png\n{folder / 'b.png'}\na.png\n")
    found = as_source(folder, files=lst).discover()
    assert [(it.key, it.path) for it in found.items] == [
        ("sub/c.png", str(folder / "sub" / "c.png")),
        ("a.png", str(folder / "a.png")),
        ("b.png", str(folder / "b.png")),
    ]
    assert {f.key: f.reason for f in found.failures} == {
        "missing.png": f"listed in {lst} but not found: {folder / 'missing.png'}",
        "a.png": f"listed more than once in {lst} (encoded once)",
    }


def test_csv_and_parquet_lists_need_their_column(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.csv").write_text("id,path\n1,b.png\n2,sub/c.png\n")
    pq.write_table(pa.table({"path": ["sub/c.png", "a.png"], "n": [1, 2]}), tmp_path / "t.parquet")
    csv_keys = [it.key for it in as_source(folder, files=tmp_path / "t.csv", column="path").discover().items]
    pq_keys = [it.key for it in as_source(folder, files=tmp_path / "t.parquet", column="path").discover().items]
    assert csv_keys == ["b.png", "sub/c.png"] and pq_keys == ["sub/c.png", "a.png"]
    with pytest.raises(ConfigError, match=r"needs --column NAME"):
        as_source(folder, files=tmp_path / "t.csv").discover()
    with pytest.raises(ConfigError, match=r"--column nope: not a column of .*t.parquet"):
        as_source(folder, files=tmp_path / "t.parquet", column="nope").discover()
    with pytest.raises(ConfigError, match=r"--files .*absent.txt: no such file"):
        as_source(folder, files=tmp_path / "absent.txt").discover()


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="does not exist or is not a folder"):
        as_source("/no/such/folder")
    with pytest.raises(ConfigError, match=r"must name \.tar files"):
        as_source("imgs-{1..3}.png")
    with pytest.raises(ConfigError, match="give --files too"):
        as_source(os.getcwd(), column="path")


# ---------------------------------------------------------------- retries


def test_retries_back_off_then_give_up_and_never_retry_a_missing_object():
    slept: list[float] = []
    calls = {"n": 0}

    def flaky() -> bytes:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionResetError("reset by peer")
        return b"ok"

    assert with_retries(flaky, sleep=slept.append) == b"ok" and slept == [0.5, 1.0]

    def down() -> bytes:
        raise ConnectionRefusedError("connection refused")

    slept.clear()
    with pytest.raises(ConnectionRefusedError):
        with_retries(down, sleep=slept.append)
    assert slept == [0.5, 1.0, 2.0]

    def silent() -> bytes:  # a request that already had its FEATSTORE_S3_ATTEMPTS tries
        raise TimeoutError("timed out")

    slept.clear()
    with pytest.raises(TimeoutError):
        with_retries(silent, sleep=slept.append)
    assert slept == []

    def missing() -> bytes:
        raise FileNotFoundError("s3://b/x.png")

    slept.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, sleep=slept.append)
    assert slept == []
