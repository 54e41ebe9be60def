"""A loaded model -> (B, C, grid, grid) patch-feature maps.

Input is what the image workers produce: premultiplied RGB, uint8, (B, size, size, 3).
The encoder moves it to the device as uint8 (4x fewer bytes than float), normalises
there, runs the model and keeps the patch tokens only (CLS and registers dropped).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from featstore.loading import LoadedModel
from featstore.models import ModelSpec

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Encoder(Protocol):
    """What the pipeline needs from a model. Tests stand in a tiny fake."""

    device: torch.device
    out_dim: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, C, S/p, S/p) in the storage dtype, on `device`."""
        ...


class PatchEncoder:
    """CLIP or DINOv2 patch features from a `LoadedModel`."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        size: int,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        clip_output: str = "raw",
        compile: bool = False,
    ) -> None:
        self.spec: ModelSpec = loaded.spec
        self.size = size
        self.grid = self.spec.grid(size)
        self.device = torch.device(device)
        self.compute_dtype = PRECISIONS[precision]
        self.store_dtype = torch.float32 if precision == "fp32" else torch.float16
        self.clip_output = clip_output if self.spec.family == "clip" else "raw"
        self.out_dim = self.spec.out_dim(self.clip_output)
        self.model = loaded.module.to(device=self.device, dtype=self.compute_dtype).eval()
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        # torch.compile (optional): normalisation, model and token selection as one graph.
        # The first batch compiles (tens of seconds); a batch of another size (the last
        # one, an out-of-memory split) compiles once more, with dynamic shapes.
        self.compiled = compile
        self._run = torch.compile(self._tokens_to_maps) if compile else self._tokens_to_maps

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return ((x / 255 - self._mean) / self._std).to(self.compute_dtype)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(pixels.to(self.device, non_blocking=True))

    def _tokens_to_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        if self.spec.family == "clip":
            vision = self.model.vision_model  # type: ignore[union-attr]
            hidden = vision(pixel_values=x, interpolate_pos_encoding=self.size != self.spec.native_size)
            tokens = hidden.last_hidden_state[:, 1:]  # the last block's output, before ln_post
            if self.clip_output == "projected":
                tokens = self.model.visual_projection(vision.post_layernorm(tokens))  # type: ignore[union-attr]
                tokens = F.normalize(tokens.float(), dim=-1)
        else:
            tokens = self.model(pixel_values=x).last_hidden_state[:, self.spec.num_prefix_tokens :]
        b, n, c = tokens.shape
        g = self.grid
        if n != g * g:
            raise RuntimeError(f"model returned {n} patch tokens, expected {g}x{g}")
        return tokens.transpose(1, 2).reshape(b, c, g, g).to(self.store_dtype).contiguous()
