"""The command line as users run it: real subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fake_featstore import wait_until_held
from tests.test_signals import FAKE_CLI, _fake_build

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def featstore(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "featstore", *args, **kw)


def test_models_lists_every_registered_name():
    out = featstore("models").stdout
    assert "ViT-B/32" in out and "(768, 7, 7)" in out
    assert "facebook/dinov2-with-registers-giant" in out and "(1536, 16, 16)" in out
    from featstore.models import REGISTRY

    assert len(out.strip().splitlines()) == 1 + len(REGISTRY)


def test_help_documents_build_options():
    out = featstore("build", "--help").stdout
    for opt in [
        "--input",
        "--npy-dir",
        "--store",
        "--model",
        "--size",
        "--precision",
        "--fp16",
        "--batch-size",
        "--workers",
        "--save-meta",
        "--overwrite",
        "--clip-output",
    ]:
        assert opt in out


def test_build_writes_mirrored_outputs_and_a_summary(tiny_models, image_dir, tmp_path):
    out = tmp_path / "out"
    p = featstore(
        "build",
        "-i",
        str(image_dir),
        "-m",
        tiny_models["clip"],
        "--npy-dir",
        str(out),
        "--size",
        "32",
        "--save-meta",
        "--device",
        "cpu",
        "--workers",
        "1",
    )
    assert "loading model" not in p.stderr  # status lines are for terminals; logs get the summary
    assert "encoded 5, skipped 0, failed 0 in " in p.stderr and "; start-up " in p.stderr
    assert np.load(out / "sub" / "e.npy").shape == (64, 4, 4)
    assert json.loads((out / "sub" / "e.json").read_text())["source"] == str(image_dir / "sub" / "e.png")
    again = featstore("build", "-i", str(image_dir), "-m", tiny_models["clip"], "--npy-dir", str(out), "--size", "32")
    assert "encoded 0, skipped 5" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
        (["-m", "ViT-B/32"], "HF_HUB_OFFLINE is set"),
        (["-m", "/does/not/exist.pt"], "does not exist"),
        (["-m", "TINY", "--size", "30"], "nearest valid sizes: 24 or 32"),
        (["-m", "TINY", "--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_errors_are_one_line_without_traceback(tiny_models, image_dir, tmp_path, args, message):
    args = [tiny_models["clip"] if a == "TINY" else a for a in args]
    p = featstore("build", "-i", str(image_dir), "--npy-dir", str(tmp_path / "o"), *args, ok=False)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], p.stderr


def test_missing_input_folder(tmp_path, tiny_models):
    p = featstore(
        "build", "-i", str(tmp_path / "nope"), "-m", tiny_models["clip"], "--npy-dir", str(tmp_path), ok=False
    )
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_compat_scripts_run_from_any_folder(tiny_models, image_dir, tmp_path):
    out = tmp_path / "compat"
    run(
        str(REPO / "cli" / "encode_dino_features.sh"),
        "--input",
        str(image_dir),
        "--output",
        str(out),
        "--model",
        tiny_models["dino_reg"],
        "--size",
        "32",
        "--device",
        "cpu",
        "--save_meta",
        cwd=tmp_path,
    )
    # top-level images only, like the reference scripts
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(
        [f"{n}{s}.npy" for n in ["a_rgba", "b_rgb", "c_gray", "d_photo"] for s in ["", "_mask"]]
    )
    meta = json.loads((out / "a_rgba.json").read_text())
    assert meta["feature_type"] == "dinov2_patch_features" and meta["model"] == tiny_models["dino_reg"]
    p = run(
        sys.executable,
        str(REPO / "cli" / "encode_with_clip.py"),
        "--input",
        str(image_dir),
        "--output",
        str(tmp_path / "c"),
        "--model",
        tiny_models["clip"],
        "--size",
        "32",
        "--device",
        "cpu",
        "--fp16",
        cwd=tmp_path,
    )
    assert "encoded 4" in p.stderr
    assert np.load(tmp_path / "c" / "a_rgba.npy").dtype == np.float16


def test_compat_script_help_keeps_the_seed_options():
    out = run(sys.executable, str(REPO / "cli" / "encode_with_clip.py"), "--help").stdout
    for opt in ["--input", "--output", "--model", "--size", "--device", "--fp16", "--overwrite", "--save_meta"]:
        assert opt in out
    assert "ViT-L/14" in out


def test_empty_input_folder_is_refused_and_creates_nothing(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    p = featstore(
        "build", "-i", str(tmp_path / "empty"), "-m", "ViT-B/32", "--store", str(tmp_path / "out" / "s.zarr"),
        "--npy-dir", str(tmp_path / "npy"), ok=False,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        f"featstore: error: no images found under {tmp_path / 'empty'} "
        "(looked for .bmp .gif .jpeg .jpg .png .tif .tiff .webp, any case)"
    ]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["empty"]


def test_a_locked_store_is_refused_before_the_model_loads(image_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    holder = _fake_build(image_dir, work, ["--store", "s.zarr"], hold=True)  # holds the store's lock
    try:
        wait_until_held(work / "held", holder)
        # a model that cannot load: refusing it first would prove the lock was checked later
        p = featstore(
            "build", "-i", str(image_dir), "-m", "no-such-org/no-such-model", "--store", str(work / "s.zarr"),
            ok=False,
        )  # fmt: skip
        assert p.returncode == 2 and "loading model" not in p.stderr
        assert p.stderr.strip().splitlines() == [
            f"featstore: error: {work / 's.zarr'} is being written by another featstore build (pid {holder.pid})"
        ]
    finally:
        (work / "release").touch()
        holder.communicate(timeout=600)
    assert holder.returncode == 0


def test_fake_cli_is_the_real_command(image_dir, tmp_path):
    p = run(sys.executable, str(FAKE_CLI), "build", "-i", str(image_dir), "-m", "fake", "--npy-dir", str(tmp_path))
    assert "encoded 5, skipped 0, failed 0" in p.stderr and "loading model" not in p.stderr
    assert np.load(tmp_path / "sub" / "e.npy").shape == (6, 4, 4)


def test_compat_wrapper_names_python_when_featstore_is_missing(image_dir, tmp_path):
    bare = tmp_path / "python-without-featstore"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')  # no site-packages, no PYTHONPATH
    bare.chmod(0o755)
    env = dict(os.environ, PYTHON=str(bare))
    p = subprocess.run(
        [str(REPO / "cli" / "encode_clip_features.sh"), "--input", str(image_dir), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "featstore is not installed" in lines[0] and "PYTHON=" in lines[0], p.stderr


def test_on_a_terminal_build_says_it_loads_the_model_and_the_bar_ends_at_the_summary_rate(tiny_models, image_dir):
    import pty
    import re

    primary, secondary = pty.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="160", TERM="xterm")
    args = ["build", "-i", str(image_dir), "-m", tiny_models["clip"], "--npy-dir", "out", "--size", "32"]
    with subprocess.Popen(
        [sys.executable, "-m", "featstore", *args, "--device", "cpu", "--workers", "0", "--batch-size", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary, env=env, cwd=image_dir.parent,
    ) as proc:  # fmt: skip
        os.close(secondary)
        chunks = []
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=300)
    os.close(primary)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert rc == 0, text
    assert text.lstrip().startswith(f"loading model {tiny_models['clip']} ..."), text
    summary = re.search(r"encoded 5, skipped 0, failed 0 in [0-9.]+ s \(([0-9.]+) images/s\)", text)
    bar_rates = re.findall(r"([0-9.]+) img/s", text)
    assert summary and bar_rates, text
    assert bar_rates[-1] == summary[1]  # the bar's last rate is the summary's
