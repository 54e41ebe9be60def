"""Checks that need a CUDA device (marker `gpu`; skipped without one).

Run on a lent GPU by `benchmarks/gpu_check.sh`. Tiny random-weight models, as
everywhere else: these check the CUDA paths (uint8 upload, on-device normalisation,
half precision, pinned batches and the asynchronous copy back, torch.compile), not
the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.encoder import PatchEncoder
from featstore.loading import load_model
from featstore.pipeline import BuildOptions, build
from featstore.store import open_store

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("which", ["clip", "dino", "dino_reg"])
def test_cuda_matches_cpu(tiny_models, which):
    px = _pixels(6, 56)
    cpu = PatchEncoder(load_model(tiny_models[which]), size=56, device="cpu").encode(px)
    fp32 = PatchEncoder(load_model(tiny_models[which]), size=56, device="cuda").encode(px)
    assert fp32.device.type == "cuda" and fp32.dtype == torch.float32
    assert _rel(fp32, cpu) < 1e-4
    for precision in ("fp16", "bf16"):
        half = PatchEncoder(load_model(tiny_models[which]), size=56, device="cuda", precision=precision).encode(px)
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
        assert _rel(half, cpu) < 2e-2, precision


def test_compiled_matches_eager_on_cuda(tiny_models):
    px = _pixels(4, 56)
    eager = PatchEncoder(load_model(tiny_models["dino"]), size=56, device="cuda", precision="bf16").encode(px)
    enc = PatchEncoder(load_model(tiny_models["dino"]), size=56, device="cuda", precision="bf16", compile=True)
    assert _rel(enc.encode(px), eager) < 2e-2
    assert _rel(enc.encode(px[:3]), eager[:3]) < 2e-2  # another batch size


@pytest.mark.parametrize("fmt", [".zarr", ".h5"])
def test_cuda_build_matches_cpu_build(tiny_models, image_dir: Path, tmp_path: Path, fmt: str):
    rows = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}{fmt}"
        opts = BuildOptions(model=tiny_models["clip"], size=32, device=device, precision="fp32", batch_size=3)
        res = build(image_dir, opts, store=out)
        assert res.failed == 0 and res.encoded > 0
        with open_store(out) as s:
            rows[device] = s.get_batch(s.keys())
    assert rows["cpu"].keys == rows["cuda"].keys
    np.testing.assert_array_equal(rows["cpu"].masks, rows["cuda"].masks)
    assert _rel(torch.from_numpy(rows["cuda"].features), torch.from_numpy(rows["cpu"].features)) < 1e-4


def test_default_precision_on_cuda_is_half(tiny_models, image_dir: Path, tmp_path: Path):
    res = build(image_dir, BuildOptions(model=tiny_models["dino"], size=28, device="cuda"), store=tmp_path / "s.zarr")
    assert res.info is not None and res.info.dtype == "float16"
