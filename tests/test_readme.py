"""The README's quick start works on a fresh clone, as written (tiny models stand in for the hub's)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from tests.test_cli import REPO, featstore

README = (REPO / "README.md").read_text()


def _block(after: str, lang: str) -> str:
    start = README.index(after)
    return re.search(rf"```{lang}\n(.*?)```", README[start:], re.S).group(1)  # type: ignore[union-attr]


def test_top_level_is_the_documented_layout():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an unpacked archive): nothing to compare
        return
    top = {p.split("/")[0] for p in tracked if not p.startswith(".")}
    assert top == {"featstore", "cli", "tests", "benchmarks", "pyproject.toml", "uv.lock", "README.md"}


def test_quick_start_commands_and_reading_examples(tiny_models, tmp_path):
    models = {"ViT-B/32": tiny_models["clip"], "facebook/dinov2-small": tiny_models["dino"]}
    commands = [shlex.split(line) for line in _block("## Quick start", "bash").splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["featstore", "build"], ["featstore", "build"], ["featstore", "info"]]
    for cmd in commands:
        args = [str(REPO / a) if a == "tests/data/images" else models.get(a, a) for a in cmd[1:]]
        if cmd[1] == "build":
            args += ["--size", "32", "--device", "cpu"]
        p = featstore(*args, cwd=tmp_path)
        if cmd[1] == "build":
            assert "encoded 4, skipped 0, failed 0" in p.stderr
    assert (tmp_path / "out" / "npy" / "renders" / "ring_mask.npy").exists()
    assert (tmp_path / "out" / "npy" / "landscape.json").exists()

    quick = _block("Read it from Python", "python")
    loader = _block("A training loader", "python").replace("num_workers=4", "num_workers=0").replace("...", "break")
    script = quick + "\n" + loader + "\nprint('labels', sorted(y.tolist()), sorted(keys))\n"
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("4 dinov2_patch_features ['landscape.jpg', 'renders/ring.png'")
    assert "labels [0, 1] ['renders/ring.png', 'renders/sphere_red.png']" in p.stdout
