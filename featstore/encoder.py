"""A loaded model -> (B, C, grid, grid) patch-feature maps, and pooled embeddings.

Input is what the image workers produce: premultiplied RGB, (B, size, size, 3), uint8
(float32 in [0, 1] for float-premultiplied presets). The encoder moves it to the
device as it is (uint8: 4x fewer bytes than float), normalises there, runs the model
and keeps the patch tokens only (the family's prefix tokens dropped). Which tensor
(`--layers`, `--norm`) and the embedding follow the family adapter; this module holds
no family branches.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from featstore.batches import EncodingInfo
from featstore.errors import ConfigError
from featstore.loading import LoadedModel
from featstore.models import ModelSpec, resolve_tensor

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Encoded = tuple[torch.Tensor, torch.Tensor | None]  # (features, embedding or None)


class Encoder(Protocol):
    """What the runner needs from a model: `PatchEncoder`, or a test's fake. One that also
    makes pooled embeddings has `embedding_dim` > 0 and `encode_batch` (see below)."""

    device: torch.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) -> (B, C, S/p, S/p) (or (B, L, C, S/p, S/p)) in the storage dtype, on `device`."""
        ...


def encode_with_embedding(encoder: Encoder, pixels: torch.Tensor) -> Encoded:
    """Features and (when the encoder makes one) the pooled embedding of a batch."""
    if getattr(encoder, "embedding_dim", 0):  # fakes in tests may only have `encode`
        return encoder.encode_batch(pixels)  # type: ignore[attr-defined]
    return encoder.encode(pixels), None


class PatchEncoder:
    """Patch features (and pooled embeddings) of any registered family from a `LoadedModel`."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        size: int,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        clip_output: str = "raw",
        compile: bool = False,
        layers: tuple[int, ...] | None = None,
        norm: str | None = None,
        embedding: bool | None = False,
    ) -> None:
        self.spec: ModelSpec = loaded.spec
        self.adapter = self.spec.adapter
        self.size = size
        self.grid = self.spec.grid(size)
        self.native_grid = self.spec.native_size // self.spec.patch_size  # the position embeddings' grid
        self.device = torch.device(device)
        self.compute_dtype = PRECISIONS[precision]
        self.store_dtype = torch.float32 if precision == "fp32" else torch.float16
        self.out_dim = self.spec.out_dim(clip_output)  # refuses projected where the family has none
        self.clip_output = clip_output
        self.layers, self.norm = resolve_tensor(self.spec, layers, norm)
        if self.layers and clip_output == "projected":
            raise ConfigError("--clip-output projected is a tensor of its own: drop --layers/--norm, or use raw")
        if embedding and not loaded.offers_embedding:
            raise ConfigError(f"--embedding: {self.spec.name}'s checkpoint lacks {', '.join(sorted(loaded.absent))}")
        on = loaded.offers_embedding if embedding is None else embedding  # None: on when the model offers one
        self.embedding_dim = self.spec.embedding_dim() if on else 0
        self.model = loaded.module.to(device=self.device, dtype=self.compute_dtype).eval()
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        # torch.compile (optional): normalisation, model and token selection as one graph.
        # The first batch compiles (tens of seconds); a batch of another size (the last
        # one, an out-of-memory split) compiles once more, with dynamic shapes.
        self.compiled = compile
        self._run = torch.compile(self._forward) if compile else self._forward

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        # Channels first in memory, in a new tensor, before any arithmetic; then the same
        # arithmetic, in place. Broadcasting the per-channel mean over the channels-last view
        # ran element by element on the CPU: 0.7-0.9 ms per 224 image on one thread against
        # 0.17-0.28 (as much as the tiny benchmark model's own forward pass).
        view = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = torch.empty(view.shape, dtype=torch.float32, device=view.device)
        x.copy_(view)
        if view.dtype == torch.uint8:
            x.div_(255)
        return x.sub_(self._mean).div_(self._std).to(self.compute_dtype)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(pixels.to(self.device, non_blocking=True))[0]

    @torch.inference_mode()
    def encode_batch(self, pixels: torch.Tensor) -> Encoded:
        """(features, embedding): embedding is (B, E) in the storage dtype, or None when off."""
        return self._run(pixels.to(self.device, non_blocking=True))

    def _forward(self, pixels: torch.Tensor) -> Encoded:
        x = self.normalize(pixels)
        out = self.adapter.forward(
            self.model, x, interpolate=self.grid != self.native_grid, hidden_states=bool(self.layers)
        )
        prefix = self.spec.num_prefix_tokens
        if not self.layers:
            maps = self._to_maps(self.adapter.standard_tokens(self.model, out, self.clip_output, prefix))
        else:
            selected = [self._to_maps(self._normed(out.hidden_states[k][:, prefix:])) for k in self.layers]
            maps = selected[0] if len(selected) == 1 else torch.stack(selected, dim=1)
        embedding = None
        if self.embedding_dim:
            embedding = self.adapter.embedding(self.model, out).to(self.store_dtype).contiguous()
        return maps, embedding

    def _normed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.norm == "model":
            return self.adapter.final_norm(self.model)(tokens)
        if self.norm == "plain":  # a layer norm without affine weights (TRELLIS.2)
            return F.layer_norm(tokens, tokens.shape[-1:])
        return tokens

    def _to_maps(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        g = self.grid
        if n != g * g:
            raise RuntimeError(f"model returned {n} patch tokens, expected {g}x{g}")
        return tokens.transpose(1, 2).reshape(b, c, g, g).to(self.store_dtype).contiguous()

    def info(self, model_name: str, model_source: dict[str, str]) -> EncodingInfo:
        """How these features are made: the per-image JSON and the store attributes."""
        spec, pre = self.spec, self.spec.preprocess
        return EncodingInfo(
            model=model_name,
            model_source=model_source,
            family=spec.family,
            feature_type=spec.feature_type(self.clip_output),
            clip_output=self.clip_output,
            size=self.size,
            grid=self.grid,
            hidden_dim=self.out_dim,
            dtype="float32" if self.store_dtype == torch.float32 else "float16",
            mean=spec.mean,
            std=spec.std,
            resize=pre.describe_resize(),
            premultiply=pre.describe_premultiply(),
            preprocessing="float_alpha_multiplication" if pre.premultiply == "float" else "opencv_alpha_multiplication",
            embedding_dim=self.embedding_dim,
            layers=self.layers,
            norm=self.norm,
        )
