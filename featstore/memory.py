"""Whether the models of a build fit their device together: an estimate, before encoding.

A build of several models keeps all of them on one device and runs them one after
another on each batch. So the device must hold every model's weights (resident once
loaded) plus the activations of one model at a time: the largest of them. Activations
are estimated from the model's shape at the build's batch size: per token the
residual stream, the MLP's intermediate (4x) and the attention scores (one row per
head: an upper bound, fused attention kernels need less), and the hidden states a
`--layers` selection keeps. It is an estimate, with a margin; an out-of-memory error
while encoding still splits that model's batch (`featstore.runner.encode_splitting`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from featstore.errors import ConfigError
from featstore.options import default_batch_size

MARGIN = 1.25  # over the estimate: allocator fragmentation, workspace, the batch itself
GIB = 1024**3


def weight_bytes(encoder: Any) -> int:
    """Bytes of the model's parameters and buffers (0 for an encoder without a torch model)."""
    model = getattr(getattr(encoder, "patch_encoder", encoder), "model", None)
    if not isinstance(model, torch.nn.Module):
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def activation_bytes(encoder: Any, batch_size: int) -> int:
    """Peak activation bytes of one forward pass of `batch_size` images (an estimate)."""
    inner = getattr(encoder, "patch_encoder", encoder)
    model = getattr(inner, "model", None)
    if not isinstance(model, torch.nn.Module):
        return 0
    info = encoder.info
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", config)
    hidden = int(getattr(vision, "hidden_size", info.hidden_dim))
    heads = int(getattr(vision, "num_attention_heads", max(1, hidden // 64)))
    mlp = int(getattr(vision, "intermediate_size", 4 * hidden))
    layers_kept = len(getattr(inner, "layers", ()) or ())
    depth = int(getattr(vision, "num_hidden_layers", 12))
    tokens = info.grid * info.grid + 5  # patches, CLS and registers
    dtype_bytes = getattr(inner, "compute_dtype", torch.float32).itemsize
    per_token = 3 * hidden + mlp + heads * tokens + (depth + 1 if layers_kept else 0) * hidden
    return int(batch_size * tokens * per_token * dtype_bytes * MARGIN)


def available_bytes(device: torch.device) -> int:
    """Free memory on `device` now: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(encoders: Sequence[Any], batch_size: int | None, free: int | None = None) -> None:
    """Refuse (one line, naming what to drop) models whose activations will not fit beside
    their weights, which are loaded on the device already. `free`: the device's free
    bytes (default: asked of the device now)."""
    device = encoders[0].device
    need = [activation_bytes(e, batch_size or default_batch_size(device, e.info.hidden_dim)) for e in encoders]
    free = available_bytes(device) if free is None else free
    if max(need) <= free:
        return
    weights = sum(weight_bytes(e) for e in encoders)
    largest = max(range(len(encoders)), key=lambda i: weight_bytes(encoders[i]) + need[i])
    raise ConfigError(
        f"{len(encoders)} models do not fit {device} together: their weights take {weights / GIB:.1f} GiB and "
        f"{encoders[largest].info.model} needs about {need[largest] / GIB:.1f} GiB more for a batch, "
        f"with {free / GIB:.1f} GiB free; drop --model {encoders[largest].info.model} or lower --batch-size"
    )


def no_room_to_load(name: str, loaded: Sequence[str]) -> str:
    beside = f" beside {', '.join(loaded)}" if loaded else ""
    return f"out of device memory loading {name}{beside}: drop a --model, or build the models one at a time"
