"""Every kind of input through a real build: the same images as a folder, as WebDataset
tar shards (local and on S3), as an S3 prefix (a real SeaweedFS server, tests/s3_server.py)
and as a file list give the same features under their own keys; bad input is reported
by name and never stops the run; a tar build stopped or killed resumes.

The fake encoder (tests/fake_featstore.py) makes the features; one test uses a tiny
real model. Stops are placed with the fake encoder's hold-a-batch mechanism, never a
timer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import featstore
from featstore.pipeline import BuildOptions, build
from featstore.sources import as_source
from tests.fake_featstore import FakeEncoder, wait_until_held
from tests.test_sources import png_bytes

FAKE_CLI = Path(__file__).with_name("fake_featstore.py")
REPO = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD = 2, 5
WAIT_S = 600  # generous: only a build that never gets going would use it up


def _ext(i: int) -> str:
    return "jpg" if i % 3 == 1 else "png"


@pytest.fixture
def collection(tmp_path: Path) -> dict[str, Path]:
    return make_collection(tmp_path)


def make_collection(tmp_path: Path) -> dict[str, Path]:
    """The same images as a folder (shard0/img000.png, ...) and as tar shards (shard0.tar holding img000.png ...)."""
    folder, tars = tmp_path / "folder", tmp_path / "tars"
    tars.mkdir()
    for s in range(SHARDS):
        (folder / f"shard{s}").mkdir(parents=True)
        with wds.TarWriter(str(tars / f"shard{s}.tar")) as w:
            for i in range(PER_SHARD):
                data = png_bytes(10 * s + i, h=30 + i, w=40, fmt="JPEG" if _ext(i) == "jpg" else "PNG")
                (folder / f"shard{s}" / f"img{i:03d}.{_ext(i)}").write_bytes(data)
                w.write({"__key__": f"img{i:03d}", _ext(i): data, "json": {"i": i}})
    return {"folder": folder, "tars": tars}


KEYS = [f"shard{s}/img{i:03d}.{_ext(i)}" for s in range(SHARDS) for i in range(PER_SHARD)]


def _build(source, out: Path, workers: int = 1):  # type: ignore[no-untyped-def]
    options = BuildOptions(model="fake", device="cpu", batch_size=3, workers=workers)
    return build(source, options, store=out, encoder=FakeEncoder())


def _features(store: Path) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    with featstore.open(store) as s:
        return {row.key: (row.features, row.mask, tuple(row.orig_size_hw)) for row in s}


def _assert_same(got: dict, want: dict) -> None:  # type: ignore[type-arg]
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k][0], want[k][0], err_msg=k)
        np.testing.assert_array_equal(got[k][1], want[k][1], err_msg=k)
        assert got[k][2] == want[k][2], k


def _upload(s3_server, local: Path, name: str) -> str:  # type: ignore[no-untyped-def]
    import s3fs

    url = s3_server.url(name)
    fs = s3fs.S3FileSystem(**s3_server.options, skip_instance_cache=True)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{url.removeprefix('s3://')}/{p.relative_to(local).as_posix()}", p.read_bytes())
    return url


def test_folder_tar_shards_and_file_list_give_the_same_features(collection, tmp_path):
    ref = _build(collection["folder"], tmp_path / "folder.zarr")
    assert ref.encoded == len(KEYS) and ref.failures == []
    want = _features(tmp_path / "folder.zarr")
    assert sorted(want) == sorted(KEYS)

    for n, source in enumerate(
        [as_source(str(collection["tars"] / "shard{0..1}.tar")), as_source(collection["tars"])]
    ):  # two workers: each reads one shard
        got = _build(source, tmp_path / f"tars{n}.zarr", workers=2)
        assert (got.encoded, got.failures) == (len(KEYS), [])
        _assert_same(_features(tmp_path / f"tars{n}.zarr"), want)

    chosen = [KEYS[7], KEYS[0], KEYS[3]]
    (tmp_path / "list.txt").write_text("\n".join(chosen) + "\n")
    listed = _build(as_source(collection["folder"], files=tmp_path / "list.txt"), tmp_path / "list.zarr")
    assert listed.encoded == 3
    with featstore.open(tmp_path / "list.zarr") as s:
        assert list(s.keys()) == chosen  # the list's order
    _assert_same(_features(tmp_path / "list.zarr"), {k: want[k] for k in chosen})


def test_s3_prefix_s3_tar_shards_and_an_s3_file_list(collection, tmp_path, s3_server):
    _build(collection["folder"], tmp_path / "ref.zarr")
    want = _features(tmp_path / "ref.zarr")
    prefix = _upload(s3_server, collection["folder"], "renders")
    got = _build(as_source(prefix + "/", storage_options=s3_server.options), tmp_path / "s3.zarr", workers=2)
    assert (got.encoded, got.failures) == (len(KEYS), [])
    _assert_same(_features(tmp_path / "s3.zarr"), want)

    tars = _upload(s3_server, collection["tars"], "shards")
    got = _build(as_source(tars + "/shard{0..1}.tar", storage_options=s3_server.options), tmp_path / "s3tar.zarr")
    assert (got.encoded, got.failures) == (len(KEYS), [])
    _assert_same(_features(tmp_path / "s3tar.zarr"), want)

    (tmp_path / "list.txt").write_text(f"{KEYS[2]}\nshard1/absent.png\n{prefix}/{KEYS[5]}\n")
    got = _build(
        as_source(prefix, files=tmp_path / "list.txt", storage_options=s3_server.options), tmp_path / "s3list.zarr"
    )
    assert got.encoded == 2
    assert [(f.key, f.reason) for f in got.failures] == [("shard1/absent.png", "not found")]
    _assert_same(_features(tmp_path / "s3list.zarr"), {k: want[k] for k in (KEYS[2], KEYS[5])})


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(FAKE_CLI), *args], capture_output=True, text=True, env=full, cwd=cwd, timeout=WAIT_S
    )


def test_cli_s3_prefix_with_the_standard_variables_and_resume(collection, tmp_path, s3_server):
    prefix = _upload(s3_server, collection["folder"], "cli")
    args = ["build", "--input", prefix + "/", "-m", "fake", "--store", str(tmp_path / "s.zarr"), "--workers", "1"]
    first = _cli(*args, env=s3_server.env())
    assert first.returncode == 0 and f"encoded {len(KEYS)}, skipped 0, failed 0" in first.stderr, first.stderr
    assert "Traceback" not in first.stderr, first.stderr
    again = _cli(*args, env=s3_server.env())
    assert again.returncode == 0 and f"encoded 0, skipped {len(KEYS)}, failed 0" in again.stderr, again.stderr
    opts = [f"--storage-option={k}={v}" for k, v in s3_server.options.items()]
    other = _cli(*args[:-4], "--store", str(tmp_path / "o.zarr"), *opts)  # options instead of the environment
    assert other.returncode == 0 and f"encoded {len(KEYS)}," in other.stderr, other.stderr
    missing = _cli("build", "--input", "s3://no-such-bucket-here/x/", "-m", "fake", "--store", "x.zarr",
                   env=s3_server.env(), cwd=tmp_path)  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("featstore: error: input s3://no-such-bucket-here/x/:"), missing.stderr


def test_every_bad_input_is_reported_by_name_and_the_rest_encoded(collection, tmp_path):
    tars = collection["tars"]
    with wds.TarWriter(str(tars / "shard2.tar")) as w:
        w.write({"__key__": "caption-only", "txt": "no image here"})
        w.write({"__key__": "broken", "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 50})
        w.write({"__key__": "fine", "png": png_bytes(99)})
    whole = (tars / "shard1.tar").read_bytes()
    (tars / "shard1.tar").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "s.zarr"
    p = _cli("build", "--input", str(tars / "shard{0..3}.tar"), "-m", "fake", "--store", str(out), "--strict")
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr
    failed = [line.strip() for line in p.stderr.splitlines() if line.startswith("  failed: ")]
    names = {line.removeprefix("failed: ").split(": ")[0] for line in failed}
    assert {"shard1.tar", "shard2/caption-only", "shard2/broken.png", "shard3.tar"} <= names, p.stderr
    assert any(n.startswith("shard1/") for n in names) or "shard1.tar" in names
    with featstore.open(out) as s:
        keys = set(s.keys())
        recorded = {f.key for f in s.failed}
    assert {f"shard0/img{i:03d}.{_ext(i)}" for i in range(PER_SHARD)} | {"shard2/fine.png"} <= keys
    assert names == recorded  # the store's failure log names the same images


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_network_error_on_one_object_is_retried_then_reported(collection, tmp_path):
    """An object on a server that refuses connections: retried with backoff, then one failure; the rest is encoded."""
    bad = f"http://127.0.0.1:{_closed_port()}/img.png"
    (tmp_path / "list.txt").write_text(f"{KEYS[0]}\n{bad}\n{KEYS[1]}\n")
    got = _build(as_source(collection["folder"], files=tmp_path / "list.txt"), tmp_path / "s.zarr")
    assert got.encoded == 2
    [failure] = got.failures
    assert failure.key == bad.removeprefix("http://")
    assert failure.reason.startswith("cannot read after 4 tries: ")


def test_cli_file_list_csv_column(collection, tmp_path):
    (tmp_path / "meta.csv").write_text("sha,file\n" + "".join(f"{i},{k}\n" for i, k in enumerate(KEYS[::-2])))
    out = tmp_path / "s.zarr"
    p = _cli("build", "-i", str(collection["folder"]), "--files", str(tmp_path / "meta.csv"), "--column", "file",
             "-m", "fake", "--store", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    with featstore.open(out) as s:
        assert list(s.keys()) == KEYS[::-2]
    p = _cli("build", "-i", str(collection["folder"]), "--files", str(tmp_path / "meta.csv"), "-m", "fake",
             "--store", str(out))  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().endswith("needs --column NAME (the column holding the paths)")


# ---------------------------------------------------------------- stop and resume a tar build

HOLD_AFTER, BATCH = 2, 2


def _held_build(tars: Path, work: Path, hold: bool) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", FAKE_HOLD_DIR=str(work))
    if hold:
        env["FAKE_HOLD_AFTER"] = str(HOLD_AFTER)
    args = ["build", "-i", str(tars), "-m", "fake", "--batch-size", str(BATCH), "--workers", "1", "--store", "s.zarr"]
    return subprocess.Popen(
        [sys.executable, str(FAKE_CLI), *args],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_tar_build_stopped_mid_shard_resumes_to_the_same_store(collection, tmp_path, sig):
    _build(collection["folder"], tmp_path / "ref.zarr")
    want = _features(tmp_path / "ref.zarr")
    work = tmp_path / "work"
    work.mkdir()
    proc = _held_build(collection["tars"], work, hold=True)
    wait_until_held(work / "held", proc, WAIT_S)  # two batches done, the third in the encoder
    proc.send_signal(sig)
    (work / "release").touch()
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == (128 + sig if sig != signal.SIGKILL else -sig), err
    kept = (HOLD_AFTER + 1) * BATCH
    if sig == signal.SIGTERM:  # a clean stop commits exactly what was encoded: the first samples of shard0
        assert f"interrupted: {kept} images kept" in err
        with featstore.open(work / "s.zarr") as s:
            assert list(s.keys()) == KEYS[:kept]

    again = _held_build(collection["tars"], work, hold=False)
    _, err = again.communicate(timeout=WAIT_S)
    assert again.returncode == 0, err
    if sig == signal.SIGTERM:
        assert f"encoded {len(KEYS) - kept}, skipped {kept}, failed 0" in err
    _assert_same(_features(work / "s.zarr"), want)


def test_a_real_tiny_model_gives_the_same_features_from_tar_shards(tiny_models, collection, tmp_path):
    options = BuildOptions(model=tiny_models["clip"], device="cpu", batch_size=4, workers=1)
    build(collection["folder"], options, store=tmp_path / "f.zarr")
    got = build(str(collection["tars"] / "shard{0..1}.tar"), options, store=tmp_path / "t.zarr")
    assert got.encoded == len(KEYS)
    _assert_same(_features(tmp_path / "t.zarr"), _features(tmp_path / "f.zarr"))


def test_tar_samples_as_per_image_files_mirror_their_keys(collection, tmp_path):
    options = BuildOptions(model="fake", device="cpu", batch_size=3, workers=1)
    got = build(collection["tars"], options, npy_dir=tmp_path / "npy", encoder=FakeEncoder())
    assert got.encoded == len(KEYS)
    written = sorted(p.relative_to(tmp_path / "npy").as_posix() for p in (tmp_path / "npy").rglob("*_mask.npy"))
    assert written == sorted(k.rsplit(".", 1)[0] + "_mask.npy" for k in KEYS)
    again = build(collection["tars"], options, npy_dir=tmp_path / "npy", encoder=FakeEncoder())
    assert (again.encoded, again.skipped) == (0, len(KEYS))


def test_an_object_that_fails_twice_is_retried_and_encoded(collection, tmp_path):
    """A real HTTP server answering 503 to the first two requests for one object: it is encoded on the third."""
    import http.server
    import threading

    body = (collection["folder"] / KEYS[0]).read_bytes()
    seen: list[str] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if len(seen) <= 2:
                self.send_error(503, "busy")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/flaky.png"
        (tmp_path / "list.txt").write_text(url + "\n")
        got = _build(as_source(None, files=tmp_path / "list.txt"), tmp_path / "s.zarr")
    finally:
        server.shutdown()
    assert (got.encoded, got.failures) == (1, [])
    assert seen == ["/flaky.png"] * 3
    _build(collection["folder"], tmp_path / "ref.zarr")
    want = _features(tmp_path / "ref.zarr")[KEYS[0]]
    [(got_key, row)] = _features(tmp_path / "s.zarr").items()
    assert got_key == url.removeprefix("http://")
    np.testing.assert_array_equal(row[0], want[0])
