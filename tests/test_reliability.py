"""Bad images, faults and hostile inputs never lose work.

- the corpus of tests/corpus.py, file by file (`load_sample`) and through whole builds
  (per-image files and a store): each file decodes to the right pixels or fails with
  its reason, recorded in the failure log / the store, never stopping the run;
- SIGKILL at random instants (a driver process imports torch once and forks a real CLI
  run per kill), CUDA out-of-memory, an output folder that cannot be created, disk full.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.batches import ImageItem
from featstore.cli import main as cli_main
from featstore.encoder import PatchEncoder
from featstore.errors import OutputError
from featstore.images import discover, load_sample, open_image, patch_mask, premultiply, resize_center_crop
from featstore.npy import FAILURES_FILE
from featstore.pipeline import BuildOptions, build
from tests.conftest import make_rgba
from tests.corpus import SIZE, make_corpus

REPO = Path(__file__).resolve().parents[1]
GRID = 4  # tiny models: patch 8 at size 32


def _options(model: str, **kw) -> BuildOptions:
    kw.setdefault("workers", 0)
    kw.setdefault("size", SIZE)
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", 4)
    return BuildOptions(model=model, **kw)


def _stem(key: str) -> str:
    return os.path.splitext(key)[0]


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The real CLI entry point, in this process (no torch import per call): (exit code, stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    code = exc.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def _store_api():
    """featstore.store's writer and reader, or a skip while that package is missing."""
    pytest.importorskip("featstore.store.writer", reason="featstore.store is not written yet")
    from featstore.store import open_store

    return open_store


# ---------------------------------------------------------------- the corpus, file by file


def test_each_corpus_file_decodes_exactly_or_fails_with_its_reason(tmp_path):
    root = tmp_path / "corpus"
    cases = make_corpus(root)
    items = discover(root)
    assert {it.key for it in items} == set(cases)  # the folder `folder.png` itself is not listed
    problems = []
    for it in items:
        c = cases[it.key]
        start = time.perf_counter()
        s = load_sample(it, size=SIZE, grid=GRID)
        seconds = time.perf_counter() - start
        if not c.decodes:
            if s.error is None or c.reason not in s.error:
                problems.append(f"{it.key}: expected failure {c.reason!r}, got {s.error!r}")
            continue
        if s.error is not None:
            problems.append(f"{it.key}: expected to decode, failed: {s.error}")
            continue
        expected = resize_center_crop(c.rgba, SIZE)
        diff = np.abs(s.pixels.astype(int) - premultiply(expected)).max()
        if diff > c.atol:
            problems.append(f"{it.key}: pixels differ by {diff} (allowed {c.atol})")
        if not (s.mask == patch_mask(expected[..., 3], GRID)).all():
            problems.append(f"{it.key}: mask {s.mask.tolist()}")
        if s.orig_size_hw != (c.orig_size_hw or c.rgba.shape[:2]):
            problems.append(f"{it.key}: orig_size_hw {s.orig_size_hw}")
        if seconds > 2:
            problems.append(f"{it.key}: took {seconds:.1f} s")
    assert not problems, "\n".join(problems)


def test_bombs_are_refused_from_the_header_fast_and_the_limit_can_be_raised(tmp_path):
    cases = make_corpus(tmp_path)
    for key in ["bomb.png", "huge_13500.png"]:
        start = time.perf_counter()
        s = load_sample(ImageItem(key, str(tmp_path / key)), size=SIZE, grid=GRID)
        assert time.perf_counter() - start < 0.5  # refused before any pixel is decoded
        assert cases[key].reason in s.error and "pixels is over the limit of 178,956,970" in s.error
    strip = ImageItem("strip_1x3000.png", str(tmp_path / "strip_1x3000.png"))
    assert "over the limit of 2,999" in load_sample(strip, size=SIZE, grid=GRID, max_pixels=2_999).error
    assert load_sample(strip, size=SIZE, grid=GRID, max_pixels=3_000).error is None


def test_extreme_aspect_ratios_are_resampled_without_materialising_the_full_resize():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (2, 3000, 4), dtype=np.uint8)
    full = Image.fromarray(np.ascontiguousarray(wide[..., :3])).resize((48_000, 32), Image.Resampling.BICUBIC)
    expected = np.asarray(full)[:, 23_984:24_016]  # shorter side to 32, center crop
    got = resize_center_crop(wide, 32)
    assert got.shape == (32, 32, 4) and np.abs(got[..., :3].astype(int) - expected).max() <= 1
    # 1 x 200000 at 224 would be 224 x 44.8M pixels (30 GB) if resized whole
    start = time.perf_counter()
    tall = resize_center_crop(rng.integers(0, 256, (200_000, 1, 4), dtype=np.uint8), 224)
    assert tall.shape == (224, 224, 4) and time.perf_counter() - start < 2


def test_transparency_keys_of_gray_and_16_bit_pngs(tmp_path):
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g).save(tmp_path / "l.png", transparency=7)
    rgba, _ = open_image(str(tmp_path / "l.png"), size=16)
    assert (rgba[..., 3] == np.where(g == 7, 0, 255)).all()
    g16 = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    Image.fromarray(g16).save(tmp_path / "l16.png", transparency=int(g16[3, 3]))
    rgba, _ = open_image(str(tmp_path / "l16.png"), size=16)
    assert (rgba[..., 0] == g16 >> 8).all() and (rgba[..., 3] == np.where(g16 == g16[3, 3], 0, 255)).all()


def test_unreadable_file_really_without_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (simulated in the next test)")
    p = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(p)
    p.chmod(0)
    assert load_sample(ImageItem("x.png", str(p)), size=SIZE, grid=GRID).error == "permission denied"


def test_unreadable_file_simulated_in_a_build(tiny_models, image_dir, tmp_path, monkeypatch):
    import builtins

    import featstore.images

    locked = str(image_dir / "c_gray.png")

    def fake_open(path, *args, **kw):
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return builtins.open(path, *args, **kw)

    monkeypatch.setattr(featstore.images, "open", fake_open, raising=False)
    res = build(image_dir, _options(tiny_models["dino"]), npy_dir=tmp_path / "o")
    assert res.encoded == 4 and [(f.key, f.reason) for f in res.failures] == [("c_gray.png", "permission denied")]


def test_names_that_cannot_be_keys_are_refused_per_file(tiny_models, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for name in [b"ok.png", b"bad\xff.png", b"back\\slash.png", b"new\nline.png"]:
        Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(os.fsdecode(os.path.join(os.fsencode(d), name)), format="PNG")
    res = build(d, _options(tiny_models["dino"]), npy_dir=tmp_path / "o", save_meta=True)
    assert res.encoded == 2
    assert {(f.key, f.reason) for f in res.failures} == {
        ("bad\\xff.png", "file name is not valid UTF-8 (rename the file)"),
        ("back\\slash.png", "file name contains a backslash (rename the file)"),
    }
    assert np.load(tmp_path / "o" / "new\nline_mask.npy").shape == (GRID, GRID)
    log = [json.loads(line) for line in (tmp_path / "o" / FAILURES_FILE).read_text("utf-8").splitlines()]
    assert {e["key"] for e in log} == {"bad\\xff.png", "back\\slash.png"}


# ---------------------------------------------------------------- the corpus through whole builds


def _expected_failures(cases, *, npy: bool) -> set[str]:
    keys = {k for k, c in cases.items() if not c.decodes}
    return keys | {"same.png"} if npy else keys


def _twins(cases, root: Path, twin_dir: Path) -> None:
    """Clean 8-bit RGBA PNGs of what each decodable file must decode to (same output stems)."""
    for key, c in cases.items():
        if not c.decodes or key == "same.png":
            continue
        rgba = c.rgba if c.atol == 0 else open_image(str(root / key), size=SIZE)[0]  # lossy: checked above
        out = twin_dir / (_stem(key) + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba).save(out)


def test_npy_build_of_the_corpus_records_every_failure_and_encodes_the_rest(tiny_models, tmp_path):
    root = tmp_path / "corpus"
    cases = make_corpus(root, huge=False)
    model = tiny_models["dino"]
    out = tmp_path / "out"
    res = build(root, _options(model), npy_dir=out, save_meta=True)

    failed = {f.key: f.reason for f in res.failures}
    assert set(failed) == _expected_failures(cases, npy=True)
    for key, reason in failed.items():
        assert (cases[key].reason or "collides with 'same.jpg'") in reason
    decoded = {k for k, c in cases.items() if c.decodes} - {"same.png"}
    assert res.encoded == len(decoded) and res.total == len(cases)
    log = [json.loads(line) for line in (out / FAILURES_FILE).read_text("utf-8").splitlines()]
    assert {e["key"]: e["reason"] for e in log} == failed

    twin_dir = tmp_path / "twins"
    _twins(cases, root, twin_dir)
    build(twin_dir, _options(model), npy_dir=tmp_path / "twin_out")
    for key in decoded:
        got = np.load(out / (_stem(key) + ".npy"))
        np.testing.assert_allclose(got, np.load(tmp_path / "twin_out" / (_stem(key) + ".npy")), atol=1e-5)
        assert (
            np.load(out / (_stem(key) + "_mask.npy")) == np.load(tmp_path / "twin_out" / (_stem(key) + "_mask.npy"))
        ).all()
        assert json.loads((out / (_stem(key) + ".json")).read_text("utf-8"))["source"] == str(root / key)
    assert json.loads((out / "exif_rotated.json").read_text())["orig_size_hw"] == [48, 32]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # a re-run retries exactly the failed images (they have no outputs); a fixed one now works
    (root / "truncated_png.png").unlink()
    Image.fromarray(make_rgba(SIZE, SIZE, 3)).save(root / "truncated_png.png")
    again = build(root, _options(model), npy_dir=out, save_meta=True)
    assert (again.encoded, again.skipped) == (1, len(decoded))
    assert {f.key for f in again.failures} == set(failed) - {"truncated_png.png"}
    assert {json.loads(line)["key"] for line in (out / FAILURES_FILE).read_text().splitlines()} == set(failed) - {
        "truncated_png.png"
    }


def test_cli_summary_strict_exit_and_max_pixels(tiny_models, tmp_path, capsys):
    root = tmp_path / "corpus"
    cases = make_corpus(root, huge=False)
    out = tmp_path / "out"
    base = ["build", "-i", str(root), "-m", tiny_models["clip"], "--npy-dir", str(out), "--size", str(SIZE)]
    base += ["--device", "cpu", "--workers", "0", "--batch-size", "3"]
    code, err = _cli([*base, "--max-pixels", "2999"], capsys)
    failed = _expected_failures(cases, npy=True) | {"strip_1x3000.png"}
    assert code == 0, err
    assert f"failed {len(failed)} in" in err and "Traceback" not in err
    listed = dict(re.findall(r"^  failed: (.+?): (.+)$", err, flags=re.M))
    assert set(listed) == failed
    assert "--max-pixels" in listed["strip_1x3000.png"] and "an HTML page" in listed["error_page.jpg"]

    code, err = _cli([*base, "--strict"], capsys)  # the strip is retried under the default limit
    assert code == 3
    assert "encoded 1, skipped" in err and f"failed {len(failed) - 1} in" in err
    assert np.load(out / "strip_1x3000.npy").shape == (64, GRID, GRID)


def test_store_build_of_the_corpus_keeps_both_same_stem_images_and_records_failures(tiny_models, tmp_path):
    open_store = _store_api()
    root = tmp_path / "corpus"
    cases = make_corpus(root, huge=False)
    model = tiny_models["dino"]
    store_path = tmp_path / "s.zarr"
    res = build(root, _options(model), store=store_path)
    expected_failed = _expected_failures(cases, npy=False)
    assert {f.key for f in res.failures} == expected_failed
    decoded = sorted(k for k, c in cases.items() if c.decodes)
    assert res.encoded == len(decoded)
    build(root, _options(model), npy_dir=tmp_path / "npy")
    with open_store(store_path) as store:
        assert sorted(store.keys()) == decoded  # same.jpg and same.png both kept
        assert {f.key: f.reason for f in store.failed} == {f.key: f.reason for f in res.failures}
        for key in decoded:
            if key != "same.png":
                np.testing.assert_allclose(
                    store[key].features, np.load(tmp_path / "npy" / (_stem(key) + ".npy")), atol=1e-5
                )
        assert not np.allclose(store["same.png"].features, store["same.jpg"].features)
        assert store["exif_rotated.jpg"].orig_size_hw == (48, 32)

    # a re-run retries the failed images only; a fixed one is added, the rest stay failed
    (root / "truncated_png.png").unlink()
    Image.fromarray(make_rgba(SIZE, SIZE, 3)).save(root / "truncated_png.png")
    again = build(root, _options(model), store=store_path)
    assert (again.encoded, again.skipped) == (1, len(decoded))
    with open_store(store_path) as store:
        assert len(store) == len(decoded) + 1 and "truncated_png.png" in store
        assert {f.key for f in store.failed} == expected_failed - {"truncated_png.png"}


def test_store_that_cannot_be_created_and_disk_full_keep_committed_rows(
    tiny_models, image_dir, tmp_path, capsys, monkeypatch
):
    open_store = _store_api()
    import zarr.storage._local as zarr_local

    model = tiny_models["dino"]
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    args = ["build", "-i", str(image_dir), "-m", model, "--size", "32", "--device", "cpu", "--workers", "0"]
    code, err = _cli([*args, "--store", str(blocker / "s.zarr")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot create" in lines[0] and "Traceback" not in err, err

    store_path = tmp_path / "s.zarr"
    code, err = _cli([*args, "--store", str(store_path)], capsys)
    assert code == 0, err
    with open_store(store_path) as store:
        before = {r.key: r.features for r in store}
    for i in range(3):
        Image.fromarray(make_rgba(SIZE, SIZE, 20 + i)).save(image_dir / f"new{i}.png")

    def disk_full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr_local, "_put", disk_full)
    code, err = _cli([*args, "--store", str(store_path)], capsys)
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert (
        lines[0]
        == f"featstore: error: cannot write output {store_path}: disk full; work committed before this point is kept"
    )
    with open_store(store_path) as store:  # the committed rows, untouched
        assert len(store) == 5
        for key, feats in before.items():
            assert (store[key].features == feats).all()
    code, err = _cli([*args, "--store", str(store_path)], capsys)
    assert code == 0 and "encoded 3, skipped 5, failed 0" in err
    with open_store(store_path) as store:
        assert len(store) == 8 and len(set(store.keys())) == 8


# ---------------------------------------------------------------- faults: out of memory, unwritable output


def test_cuda_out_of_memory_in_a_build_splits_batches_and_completes(tiny_models, image_dir, tmp_path, monkeypatch):
    model = tiny_models["clip"]
    build(image_dir, _options(model, batch_size=4), npy_dir=tmp_path / "plain")
    calls: list[int] = []
    encode = PatchEncoder.encode

    def small_gpu(self, pixels):
        if len(pixels) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        calls.append(len(pixels))
        return encode(self, pixels)

    monkeypatch.setattr(PatchEncoder, "encode", small_gpu)
    res = build(image_dir, _options(model, batch_size=4), npy_dir=tmp_path / "oom", save_meta=True)
    assert (res.encoded, res.failed) == (5, 0)
    assert calls == [2, 2, 1]
    for f in sorted((tmp_path / "plain").rglob("*.npy")):
        np.testing.assert_allclose(np.load(f), np.load(tmp_path / "oom" / f.relative_to(tmp_path / "plain")), atol=1e-5)


def test_output_folder_that_cannot_be_created_is_one_line_exit_2(tiny_models, image_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    # refused before the model loads (featstore.outputs), naming the file in the way
    with pytest.raises(OutputError, match=r"cannot create --npy-dir .*a_file is a file, not a folder"):
        build(image_dir, _options(tiny_models["dino"]), npy_dir=blocker / "out")
    code, err = _cli(
        ["build", "-i", str(image_dir), "-m", tiny_models["dino"], "--npy-dir", str(blocker / "out"), "--size", "32"],
        capsys,
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("featstore: error: cannot create --npy-dir"), err


def _check_npy_outputs(out: Path, ref: Path, keys: list[str], *, meta: bool) -> int:
    """Everything a killed/failed run left behind is either complete and right, or not an output.

    Returns how many images are complete (their `_mask.npy` exists)."""
    allowed = {FAILURES_FILE}
    for k in keys:
        allowed |= {_stem(k) + s for s in (".npy", "_mask.npy", ".json")}
    complete = 0
    for p in out.rglob("*"):
        if p.is_dir():
            continue
        rel = p.relative_to(out).as_posix()
        if p.name.endswith(".tmp"):
            assert p.name.startswith("."), rel  # hidden temporaries, never read as outputs
            continue
        assert rel in allowed, rel
        if rel == FAILURES_FILE:
            continue
        if rel.endswith("_mask.npy"):
            complete += 1
            stem = rel[: -len("_mask.npy")]
            assert (out / (stem + ".npy")).exists(), f"{rel} without its .npy"
            assert not meta or (out / (stem + ".json")).exists(), f"{rel} without its .json"
            assert (np.load(p) == np.load(ref / rel)).all(), rel
        elif rel.endswith(".npy"):
            got = np.load(p)
            assert got.shape == (32, GRID, GRID) and got.dtype == np.float32, rel
            np.testing.assert_allclose(got, np.load(ref / rel), atol=1e-5, err_msg=rel)
        else:
            assert json.loads(p.read_text("utf-8")) == json.loads((ref / rel).read_text("utf-8")), rel
    return complete


@pytest.mark.parametrize(("failing", "works"), [("numpy.save", 5), ("os.replace", 7)])
def test_disk_full_part_way_keeps_finished_images_and_a_rerun_completes(
    tiny_models, image_dir, tmp_path, monkeypatch, capsys, failing, works
):
    model = tiny_models["dino"]
    keys = [it.key for it in discover(image_dir)]
    build(image_dir, _options(model), npy_dir=tmp_path / "ref", save_meta=True)
    module, name = failing.split(".")
    target = np if module == "numpy" else os
    real = getattr(target, name)
    count = [0]

    def fills_up(*args, **kw):
        count[0] += 1
        if count[0] > works:  # two images complete, the third half-written (2 saves or 3 renames each)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    out = tmp_path / "out"
    args = ["build", "-i", str(image_dir), "-m", model, "--npy-dir", str(out), "--size", "32", "--save-meta"]
    args += ["--device", "cpu", "--workers", "0", "--batch-size", "2"]
    monkeypatch.setattr(target, name, fills_up)
    code, err = _cli(args, capsys)
    monkeypatch.setattr(target, name, real)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "disk full; work committed before this point is kept" in lines[0]
    assert _check_npy_outputs(out, tmp_path / "ref", keys, meta=True) == 2
    assert not [p for p in out.rglob("*.tmp")]  # the failed write cleaned up its temporary

    code, err = _cli(args, capsys)
    assert code == 0 and "encoded 3, skipped 2, failed 0" in err
    assert _check_npy_outputs(out, tmp_path / "ref", keys, meta=True) == 5


# ---------------------------------------------------------------- SIGKILL at random instants


def kill_driver() -> None:
    """Runs in a subprocess: imports featstore and torch once, then per stdin line forks a
    real CLI build, SIGKILLs it after `delay` seconds (None: lets it finish) and reports.
    The parent runs no torch op, so forking is safe."""
    import transformers

    import featstore.cli
    import featstore.pipeline

    with contextlib.suppress(ImportError):
        import featstore.store.writer
    transformers.Dinov2Model  # noqa: B018  (transformers imports model code lazily)
    for line in sys.stdin:
        job = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: one CLI run, output to its log
            code = 1
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if job["shard_rows"]:  # small shards: several commits per run (as for big models)
                    import featstore.store._zarr

                    featstore.store._zarr.default_shard_rows = lambda info, n=job["shard_rows"]: n
                featstore.cli.main(job["args"])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                os._exit(code)
        killed, first_output = False, None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.monotonic() - start
            if first_output is None and os.path.exists(job["watch"]):
                first_output = now
            if job["delay"] is not None and now >= job["delay"]:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        result = {
            "killed": killed,
            "rc": os.waitstatus_to_exitcode(status),
            "seconds": time.monotonic() - start,
            "first_output": first_output,
        }
        print(json.dumps(result), flush=True)


class _Driver:
    def __init__(self) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_reliability import kill_driver; kill_driver()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )

    def run(self, args: list[str], delay: float | None, log: Path, watch: Path, shard_rows: int | None) -> dict:
        """One CLI run, killed after `delay` s; also says when `watch` appeared (s after start)."""
        assert self.proc.stdin and self.proc.stdout
        job = {"args": args, "delay": delay, "log": str(log), "watch": str(watch), "shard_rows": shard_rows}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the kill driver died"
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def driver():
    d = _Driver()
    yield d
    d.close()


@pytest.fixture(scope="module")
def forty_images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("forty")
    (d / "sub").mkdir()
    for i in range(40):
        name = f"sub/img{i:02d}.png" if i % 5 == 0 else f"img {i:02d}.png"
        Image.fromarray(make_rgba(32 + 8 * (i % 3), 32, seed=i)).save(d / name)
    return d


def _summary(log: Path) -> tuple[int, int, int]:
    m = re.search(r"encoded (\d+), skipped (\d+), failed (\d+)", log.read_text())
    assert m, log.read_text()
    return int(m[1]), int(m[2]), int(m[3])


def _kill_loop(driver, tmp_path: Path, args_for, output_of, check, *, kills: int, seed: int, shard_rows=None) -> dict:
    """Cycles of: a fresh output; runs SIGKILLed at random instants until one finishes
    uninterrupted. `check(out)` (the number of complete images) after every run: it never
    goes down; the run that finishes must encode exactly the missing images.

    Two thirds of the kills fall in the encoding phase (after the first output appeared
    in an uninterrupted run), the others anywhere before (start-up, model loading).
    Nothing here trusts the timed reference run to stay representative: CI machines
    change speed under a test. The kill window is scaled by `stretch`, which grows after
    every encoding-phase kill that found no progress (the machine got slower: a fixed
    window would kill every run before its first commit) and shrinks after a run that the
    kill came too late for (the machine got faster). Runs go on past `kills` until 2 kills
    landed mid-run (some progress, not done)."""
    rng = random.Random(seed)
    ref_log = tmp_path / "ref.log"
    ref = driver.run(args_for(tmp_path / "ref"), None, ref_log, output_of(tmp_path / "ref"), shard_rows)
    assert ref["rc"] == 0 and _summary(ref_log) == (40, 0, 0), ref_log.read_text()
    total, startup = ref["seconds"], ref["first_output"]
    stats: dict = {"kills": 0, "mid_run_kills": 0, "cycles": 0, "stretch": 1.0}
    stretch = 1.0
    while stats["kills"] < kills or (stats["mid_run_kills"] < 2 and stats["kills"] < 5 * kills):
        assert stats["cycles"] < 20 * kills, f"the kill window never settled: {stats}"
        out = tmp_path / f"out{stats['cycles']}"
        stats["cycles"] += 1
        done = 0
        for attempt in range(50):  # ~2/3 of no-progress runs stretch the window 1.5x: 50 always suffice
            log = tmp_path / f"run{stats['cycles']}_{attempt}.log"
            in_encoding = rng.random() < 2 / 3
            at = rng.uniform(startup, total) if in_encoding else rng.uniform(0.05, startup)
            r = driver.run(args_for(out), at * stretch, log, output_of(out), shard_rows)
            before = done
            done = check(out)
            assert done >= before, "a kill lost finished work"
            if not r["killed"]:
                assert r["rc"] == 0, log.read_text()
                assert _summary(log) == (40 - before, before, 0)  # the missing images, once each
                assert done == 40
                if attempt == 0:  # killed too late to land at all: the machine is faster than the window
                    stretch /= 1.5
                break
            stats["kills"] += 1
            stats["mid_run_kills"] += before < done < 40
            if in_encoding and done == before:  # meant to land after the first commit; it came before
                stretch *= 1.5
        else:
            pytest.fail(f"50 runs never finished: {stats}")
        stats["stretch"] = round(stretch, 3)
    return stats


def test_sigkill_at_random_instants_npy(driver, tiny_models, forty_images, tmp_path):
    def args_for(out: Path) -> list[str]:
        return [
            "build", "-i", str(forty_images), "-m", tiny_models["dino"], "--npy-dir", str(out), "--size", "32",
            "--device", "cpu", "--workers", "0", "--batch-size", "2", "--save-meta", "-q",
        ]  # fmt: skip

    keys = [it.key for it in discover(forty_images)]
    ref = tmp_path / "ref"
    stats = _kill_loop(
        driver,
        tmp_path,
        args_for,
        lambda out: out,
        lambda out: _check_npy_outputs(out, ref, keys, meta=True) if out.exists() else 0,
        kills=12,
        seed=1,
    )
    assert stats["mid_run_kills"] >= 2, stats
    stats["tmp_leftovers"] = sum(1 for p in tmp_path.rglob("*.tmp"))  # hidden, ignored, never outputs
    print("npy kill stats", stats)


def test_sigkill_at_random_instants_store(driver, tiny_models, forty_images, tmp_path):
    open_store = _store_api()

    def zarr_path(p: Path) -> Path:
        return p.with_name(p.name + ".zarr")

    def args_for(out: Path) -> list[str]:
        return [
            "build", "-i", str(forty_images), "-m", tiny_models["dino"], "--store", str(zarr_path(out)),
            "--size", "32", "--device", "cpu", "--workers", "0", "--batch-size", "3", "-q",
        ]  # fmt: skip

    ref: dict[str, object] = {}

    def check(out: Path) -> int:
        if not ref:
            with open_store(zarr_path(tmp_path / "ref")) as store:
                ref.update({r.key: r for r in store})
            assert len(ref) == 40
        # Killed before the store was created, or while creating it (its arrays' metadata
        # written, the group's zarr.json, the store's existence, not yet): no store.
        if not (zarr_path(out) / "zarr.json").exists():
            return 0
        with open_store(zarr_path(out)) as store:
            keys = store.keys()
            assert len(set(keys)) == len(keys) == len(store)
            assert store.failed == []
            for row in store:
                want = ref[row.key]
                np.testing.assert_allclose(row.features, want.features, atol=1e-5, err_msg=row.key)
                assert (row.mask == want.mask).all() and row.orig_size_hw == want.orig_size_hw
                assert row.source == want.source
            return len(keys)

    stats = _kill_loop(driver, tmp_path, args_for, zarr_path, check, kills=12, seed=2, shard_rows=4)
    assert stats["mid_run_kills"] >= 2, stats
    print("store kill stats", stats)
