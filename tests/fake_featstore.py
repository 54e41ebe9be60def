"""A tiny deterministic stand-in for the model, and the real CLI driven with it.

`FakeEncoder` implements the `build(..., encoder=...)` seam without any weights: each
channel of the (C, g, g) map is a fixed weighting of the patch's mean R, G and B,
computed per image, so outputs are fast, do not depend on the batch size, and are the
same on every run. Pipeline tests pass it to `build`; CLI tests run this file as the
`featstore` command:

    python tests/fake_featstore.py build --input DIR --model fake --store out.zarr

With FAKE_HOLD_AFTER=N and FAKE_HOLD_DIR=D in the environment, the encoder's call
number N+1 creates D/held and then waits until D/release exists before returning:
a test can signal the build at a known point without guessing how fast the machine is.
With FAKE_HOLD_AT_LOAD=1 it waits there where a real model would load (the first
read of `info`, after the build's checks, before any output is opened) instead.
FAKE_SHARD_ROWS=N gives new stores shards of N rows. `--model fake48` is a second fake
(size 48, grid 6, 5 channels, never held) for builds of several models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from featstore.batches import EncodingInfo
from featstore.images import DEFAULT_PREPROCESS


class FakeEncoder:
    def __init__(self, size: int = 32, patch: int = 8, channels: int = 6) -> None:
        self.size, self.grid, self.channels = size, size // patch, channels
        self.device = torch.device("cpu")
        self.preprocess = DEFAULT_PREPROCESS
        self.calls = 0
        self._info = EncodingInfo(
            model="fake",
            model_source={"kind": "fake"},
            family="fake",
            feature_type="fake_patch_means",
            clip_output="raw",
            size=size,
            grid=self.grid,
            hidden_dim=channels,
            dtype="float32",
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        )
        g = torch.Generator().manual_seed(0)
        self.weights = torch.rand(channels, 3, generator=g)
        hold = os.environ.get("FAKE_HOLD_AFTER")
        self.hold_after = int(hold) if hold else None
        self.hold_dir = Path(os.environ.get("FAKE_HOLD_DIR", "."))

        self.hold_at_load = os.environ.get("FAKE_HOLD_AT_LOAD") == "1"

    @property
    def info(self) -> EncodingInfo:
        if self.hold_at_load:  # `build` reads it where it would have loaded a model
            self.hold_at_load = False
            self._hold()
        return self._info

    def _hold(self) -> None:
        (self.hold_dir / "held").touch()
        while not (self.hold_dir / "release").exists():
            time.sleep(0.01)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.calls == self.hold_after:
            self._hold()
        self.calls += 1
        # one image at a time, so that a row does not depend on the batch it came in
        return torch.stack([self._one(p) for p in pixels]) if len(pixels) else torch.zeros(0)

    def _one(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().permute(2, 0, 1)[None] / 255  # (1, 3, S, S)
        patches = torch.nn.functional.avg_pool2d(x, self.size // self.grid)[0]  # (3, g, g)
        return torch.einsum("ck,kij->cij", self.weights, patches).contiguous()


def wait_until_held(held: Path, proc: subprocess.Popen[str], wait_s: float = 600) -> None:
    """Wait until the fake CLI in `proc` holds a batch (`held` exists); fail the test if it
    ends first, or never gets there within `wait_s` (generous: a build that never starts)."""
    import pytest

    deadline = time.monotonic() + wait_s
    while not held.exists():
        if proc.poll() is not None:
            pytest.fail(f"the build ended before reaching the held batch: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the build never reached the held batch")
        time.sleep(0.05)


if __name__ == "__main__":
    from featstore.cli import main

    if os.environ.get("FAKE_SHARD_ROWS"):  # small store shards, so that a test folder makes many
        from featstore.store import _zarr

        rows = int(os.environ["FAKE_SHARD_ROWS"])
        _zarr.default_shard_rows = lambda info: rows  # type: ignore[assignment]
    size = int(os.environ.get("FAKE_SIZE", "32"))
    second = FakeEncoder(size=48, channels=5)  # `--model fake48`: another grid, for builds of several models
    second.hold_after, second.hold_at_load = None, False
    second._info = replace(second._info, model="fake48")
    main(sys.argv[1:], encoder={"fake": FakeEncoder(size=size), "fake48": second})
