"""The command line as users run it: real subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
    assert "encoded 5, skipped 0, failed 0" in p.stderr
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
