"""benchmarks/inputs.py runs and writes what its docstring describes (not the numbers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_inputs_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "inputs.json"
    cmd = [sys.executable, "benchmarks/inputs.py", "--quick", "--no-s3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for kind in ("folder", "tar"):
        assert report["rate"][kind]["images"] == report["rate"][kind]["done"] == 24
        assert report["rate"][kind]["images_per_s_per_worker"] > 0
    for count in ("12", "24"):
        assert report["memory_from_tar"][count]["images"] == int(count), report["memory_from_tar"][count]
        assert report["memory_from_tar"][count]["failed"] == 0
