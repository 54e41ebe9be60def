"""benchmarks/feed.py runs and writes what its docstring describes (not the numbers), and
benchmarks/inputs.py's tar shards hold every sample of folders made of hard links."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_shards_of_a_hard_linked_folder_hold_every_sample(tmp_path: Path) -> None:
    import _images
    from inputs import make_shards

    from featstore.sources import as_source

    pool = _images.make_pool(tmp_path / "pool", "png", 2)
    folder = _images.fill(tmp_path / "folder", [pool], 12)  # 12 links to 2 files
    found = as_source(make_shards(folder, tmp_path / "tars", 4)).discover()
    assert len(found.items) == 12 and not found.failures


@pytest.mark.slow
def test_feed_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "feed.json"
    cmd = [sys.executable, "benchmarks/feed.py", "--quick", "--kinds", "render512,photo05"]
    cmd += ["--sizes", "224", "--no-s3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "torch uint8" in report["preprocessing"]["torch"] and "torch" not in report["preprocessing"]["pillow"]
    assert "else Pillow" in report["preprocessing"]["auto"]
    render = report["builds"]["render512"]
    assert any(k.startswith("224/folder/auto/tiny model, ") for k in render)
    for key in (
        "224/folder/auto",
        "224/folder/pillow",
        "224/folder/torch",
        "224/tar/auto",
        "224/folder/auto/tiny model",
        "224/folder/auto/featstore build, tiny model",  # the CLI in a new process
        *(k for k in render if k.startswith("224/folder/auto/tiny model, ")),  # torch's thread count
    ):
        assert render[key]["images"] == render["images"] and render[key]["failed"] == 0, key
        assert render[key]["ratio_to_pillow_bare_decode"] > 0
    fast = "featstore fastdecode (libdeflate + libspng)"
    for decoders in (report["choices"]["render512"]["decode_ms"], report["decode_ms_glibc_defaults"]["render512"]):
        assert decoders[fast] > 0 and decoders["pillow open+load (the bare decode)"] > 0
        assert decoders["pyspng alone (libspng inflates with zlib)"] > 0
    assert report["choices"]["photo05"]["decode_ms"][fast] is None  # JPEG: declined
    assert {r["model"] for r in report["gpu_workers"]} == {"ViT-B/32", "ViT-L/14", "dinov2-large"}
    assert "decode workers to feed an H100" in proc.stdout
    resized = report["choices"]["render512"]["resize_224"]
    assert (
        resized["auto (default)"]["patch_masks_differing"]
        == 0
        == resized["torch uint8 antialiased"]["patch_masks_differing"]
    )
