"""Peak RSS of one build, each in a fresh subprocess (this file is also that subprocess).

The child builds a random-weight model, runs `featstore.pipeline.build` on a folder
into a store (a .zarr, or an npy folder when the store package is missing) and prints
one JSON line: its own peak RSS during the build (the main process: reader loop,
encoder, writer thread; the high-water mark is reset after the model is built, so
model creation and imports do not hide the build's own growth) and the largest peak
among its waited-for children (the DataLoader workers).
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TINY = "tiny"  # a 2-layer, 64-wide DINOv2 (patch 14): the smallest model the real code path accepts


def tiny_spec() -> Any:
    from featstore.models import ModelSpec

    return ModelSpec(
        name=TINY,
        family="dinov2",
        source="random",
        patch_size=14,
        native_size=224,
        default_size=224,
        hidden_dim=64,
        num_layers=2,
        num_heads=2,
        intermediate_size=256,
        extra_config=(("use_swiglu_ffn", False),),
    )


def measure(cfg: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one child build with `cfg`; its JSON report, or {"error": ...}."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, json.dumps(cfg)], capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: {' | '.join(tail)}"}
    report = json.loads(lines[-1])
    report["subprocess_s"] = time.perf_counter() - t0
    return report


def _status_mb(field: str) -> float | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from featstore.loading import random_model
    from featstore.models import lookup
    from featstore.pipeline import BuildOptions, build

    torch.set_num_threads(cfg["threads"])
    spec = tiny_spec() if cfg["model"] == TINY else lookup(cfg["model"])
    if spec is None:
        raise SystemExit(f"unknown model {cfg['model']!r}")
    loaded = random_model(spec)
    options = BuildOptions(
        model=cfg["model"],
        size=cfg["size"],
        device=cfg["device"],
        precision=cfg["precision"],
        batch_size=cfg["batch_size"],
        workers=cfg["workers"],
        overwrite=True,
        recursive=False,
    )
    hwm_reset = _reset_peak()
    before_mb = _status_mb("VmRSS")
    out = Path(cfg["out"])
    try:
        import featstore.store.writer  # noqa: F401  (the store package may not exist yet)

        writer, kwargs = "zarr", {"store": out.with_suffix(".zarr")}
    except ImportError:
        writer, kwargs = "npy (store not available)", {"npy_dir": out.with_suffix(".npy")}
    result = build(cfg["input"], options, loaded=loaded, **kwargs)
    return {
        "images": result.encoded,
        "failed": result.failed,
        "writer": writer,
        "build_s": result.seconds,
        "rss_before_build_mb": before_mb,
        # VmHWM after a reset measures the build alone; ru_maxrss would also hold the
        # parent's RSS from before exec (Linux keeps it across exec).
        "peak_rss_main_mb": _status_mb("VmHWM")
        if hwm_reset
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_is_build_only": hwm_reset,
        "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
