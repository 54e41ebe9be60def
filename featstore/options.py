"""A build's options (`featstore build`'s, or `featstore.build`'s from Python) and the
defaults that depend on the device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from featstore.errors import ConfigError
from featstore.imagecheck import DEFAULT_MAX_IMAGE_BYTES
from featstore.images import DEFAULT_MAX_PIXELS, RESIZERS


@dataclass(frozen=True, slots=True)
class BuildOptions:
    model: str | None = None  # optional with a preset (then it replaces only the weights)
    size: int | None = None
    device: str = "auto"
    precision: str | None = None  # fp32 | fp16 | bf16; None: fp16 on CUDA, fp32 on CPU
    batch_size: int | None = None
    workers: int | None = None
    clip_output: str = "raw"
    overwrite: bool = False
    recursive: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # per image file, refused before reading (memory bound)
    resizer: str = "auto"  # auto | pillow (exact) | torch (Preprocess.resizer); auto appends keep a store's own
    compile: bool = False  # torch.compile the model (CUDA: worth it for long runs)
    layers: tuple[int, ...] | None = None  # hidden_states indices; None: the family's standard output
    norm: str | None = None  # model | none | plain; None: what the family's standard output applies
    preset: str | None = None  # a preset registry entry (trellis, trellis2)
    embedding: bool | None = None  # pooled embedding beside the maps; None: on when the model has one


# ---------------------------------------------------------------- device defaults


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def default_precision(device: torch.device) -> str:
    return "fp16" if device.type == "cuda" else "fp32"


def default_batch_size(device: torch.device, hidden_dim: int) -> int:
    if device.type == "cpu":
        return 16
    return 256 if hidden_dim <= 768 else 128


def default_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return 1  # the model needs the cores; decode at CPU model speed is cheap
    return max(1, min(cpus - 1, 16))


def check_options(options: BuildOptions) -> None:
    if options.clip_output not in ("raw", "projected"):
        raise ConfigError(f"--clip-output {options.clip_output!r}: expected raw or projected")
    if options.precision is not None and options.precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--precision {options.precision!r}: expected fp32, fp16 or bf16")
    if options.resizer not in RESIZERS:
        raise ConfigError(f"--resizer {options.resizer!r}: expected {', '.join(RESIZERS)}")
    resolve_device(options.device)
