"""The benchmark commands run and produce what their README describes (not the numbers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_run_quick_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    cmd = [sys.executable, "benchmarks/run.py", "--quick", "--only", "model,e2e,read", "--no-cold", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report.get("errors"), report["errors"]
    results, ratios = report["results"], report["ratios"]
    assert results["model_only"]["best_images_per_s"] > 0
    for writer in ("zarr", "h5", "npy"):
        assert results["end_to_end"][writer]["images"] == 16
        assert 0 < ratios[f"e2e_{writer}_model_busy"] <= 1
    for fmt in ("zarr", "h5"):
        read = results["read"][fmt]
        assert read["engine"] == "direct"
        assert read["single_random"]["store"]["warm_rows_per_s"] > 0
    statuses = {c["check"]: c["status"] for c in report["checks"]}
    assert statuses["read zarr, cold: single random row, reader >= .npy"] == "SKIP"  # --no-cold
    assert "Targets" in proc.stdout


def test_store_write_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "write.json"
    cmd = [sys.executable, "benchmarks/store_write.py", "--rows", "128", "--repeats", "1", "--dir", str(tmp_path)]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = json.loads(out.read_text())["best"]
    for shape in ("ViT-B/32 fp16", "ViT-L/14 fp16"):
        assert len(best[shape]) == 5 and all(r["rows_per_s"] > 0 for r in best[shape].values())
    assert [p.name for p in tmp_path.iterdir()] == ["write.json"]  # its work folder is gone


def test_distributed_benchmark_compares_the_three_paths(tmp_path: Path) -> None:
    out = tmp_path / "distributed.json"
    cmd = [sys.executable, "benchmarks/distributed.py", "--model", "tiny", "--images", "8", "--no-cli", "--no-s3",
           "--coord-units", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report.get("errors"), report["errors"]
    results = report["results"]
    stores = results["stores"]
    assert {"shard 1", "torchrun 1"} <= set(stores) and all(v["ok"] for k, v in stores.items() if k != "reference")
    for mode in ("plain", "shard", "torchrun"):
        assert results["builds"][0][mode]["encoded"] == 8
    coord = results["coordination"]["local"]
    assert coord["1"]["requests_per_unit"] > 0
    assert coord["8"]["requests_per_unit"] == coord["1"]["requests_per_unit"]  # the per-shard check makes none


def test_ecosystem_benchmark_runs_every_path(tmp_path: Path) -> None:
    out = tmp_path / "eco.json"
    cmd = [sys.executable, "benchmarks/ecosystem.py", "--rows", "40", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 6 and all(r["rows_per_s"] > 0 for r in results.values())
    assert results["featstore iter_batches"]["time_vs_featstore"] == 1


def test_multi_benchmark_compares_shared_and_separate_decodes(tmp_path: Path) -> None:
    out = tmp_path / "multi.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/multi.py", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["models"] for r in report["decode_side"]] == [1, 2, 3]
    for r in report["decode_side"]:
        assert r["shared_ms"] > 0 and r["separate_ms"] > 0 and r["decode_ms"] > 0
    assert [len(r["models"]) for r in report["wall"]] == [2, 3]
    assert all(r["one_build_s"] > 0 and r["one_after_another_s"] > 0 for r in report["wall"])
