"""Typed values that flow through the pipeline: reader -> encoder -> writer.

A `Sample` is one decoded image (made in a worker process), an `ImageBatch` is what
the encoder consumes, an `EncodedBatch` is what every writer receives, and
`EncodingInfo` describes how the features were made (it becomes the per-image JSON
and the store attributes).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One image found in the input: a file, an object, or a member of a tar shard."""

    key: str  # POSIX path relative to the input root: the index of every output
    path: str  # the path or URL as featstore opens it (input root as given + key)
    member: str | None = None  # set for a sample of a tar shard: its member name; `path` is the shard


@dataclass(frozen=True, slots=True)
class Failure:
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class ModelInput:
    """One image as one model of the build takes it."""

    pixels: np.ndarray  # (size, size, 3) premultiplied RGB: uint8, or float32 in [0, 1]
    mask: np.ndarray  # (grid, grid) uint8


@dataclass(frozen=True, slots=True)
class Sample:
    """One decoded image, preprocessed for every model of the build, or the reason it could not be."""

    item: ImageItem
    inputs: tuple[ModelInput, ...] = ()  # one per model, in the build's order (one decode for all)
    orig_size_hw: tuple[int, int] = (0, 0)
    error: str | None = None

    @property
    def pixels(self) -> np.ndarray | None:
        """The first (in a one-model build: the only) model's input."""
        return self.inputs[0].pixels if self.inputs else None

    @property
    def mask(self) -> np.ndarray | None:
        return self.inputs[0].mask if self.inputs else None


@dataclass(slots=True)
class BatchInput:
    """A batch as one model takes it."""

    pixels: Any  # torch.Tensor (B, size, size, 3) uint8 (float32 for float-premultiplied presets)
    masks: np.ndarray  # (B, grid, grid) uint8


@dataclass(slots=True)
class ImageBatch:
    items: list[ImageItem]
    inputs: list[BatchInput]  # one per model, in the build's order (empty when every image failed)
    orig_size_hw: np.ndarray  # (B, 2) int32
    failures: list[Failure] = field(default_factory=list)

    @property
    def pixels(self) -> Any:
        """The first (in a one-model build: the only) model's pixels."""
        return self.inputs[0].pixels if self.inputs else None

    @property
    def masks(self) -> np.ndarray:
        return self.inputs[0].masks if self.inputs else np.zeros((0,), np.uint8)

    def for_model(self, m: int, needs: Collection[str] | None = None) -> ImageBatch:
        """Model `m`'s input alone, keeping the images it `needs` (None: all of them) and
        the failures among them."""
        failures = self.failures if needs is None else [f for f in self.failures if f.key in needs]
        if not self.items:
            return ImageBatch([], [], self.orig_size_hw, failures)
        keep = None if needs is None else [i for i, it in enumerate(self.items) if it.key in needs]
        one = self.inputs[m]
        if keep is None or len(keep) == len(self.items):
            return ImageBatch(self.items, [one], self.orig_size_hw, failures)
        if not keep:
            return ImageBatch([], [], self.orig_size_hw[:0], failures)
        rows = np.asarray(keep)
        return ImageBatch(
            [self.items[i] for i in keep],
            [BatchInput(one.pixels[rows], one.masks[rows])],
            self.orig_size_hw[rows],
            failures,
        )

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader's pinning thread (pin_memory=True) on CUDA runs."""
        for one in self.inputs:
            one.pixels = one.pixels.pin_memory()
        return self


@dataclass(slots=True)
class EncodedBatch:
    """Features of a batch, on the host, ready to be written."""

    items: list[ImageItem]
    features: np.ndarray  # (B, C, grid, grid) or (B, L, C, grid, grid), float16 or float32
    masks: np.ndarray  # (B, grid, grid) uint8
    orig_size_hw: np.ndarray  # (B, 2) int32
    embedding: np.ndarray | None = None  # (B, E) pooled embedding, or None

    @property
    def keys(self) -> list[str]:
        return [it.key for it in self.items]

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class UnitMark:
    """In a distributed build's batch stream: a work unit starts (its batches follow) or
    ends. The runner passes it to every writer that has `begin_unit` / `end_unit`, in
    order with the batches (see `featstore.distributed`)."""

    unit: Any
    start: bool


@dataclass(frozen=True, slots=True)
class EncodingInfo:
    """How the features were made. Two stores with different infos must not mix."""

    model: str  # the name the user gave
    model_source: dict[str, str]  # kind (hf|local|openai-checkpoint), id/path, revision or sha256
    family: str
    feature_type: str
    clip_output: str  # raw | projected (CLIP); raw for DINOv2
    size: int
    grid: int
    hidden_dim: int  # channels of the stored map
    dtype: str  # float16 | float32
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shorter-side bicubic (antialiased), center crop"
    premultiply: str = "rgb = uint8(rgb/255 * alpha/255 * 255)"
    preprocessing: str = "opencv_alpha_multiplication"  # the reference's JSON value
    embedding_dim: int = 0  # width of the pooled embedding stored beside the maps; 0 = none
    layers: tuple[int, ...] = ()  # hidden_states indices (--layers); () = the family's standard output
    norm: str = ""  # model | none | plain (--norm); "" = the family's standard output

    # What must match for rows to be appended to an existing store.
    COMPATIBILITY_FIELDS = (
        "family",
        "feature_type",
        "clip_output",
        "size",
        "grid",
        "hidden_dim",
        "dtype",
        "layers",
        "norm",
    )

    def feature_shape(self) -> tuple[int, ...]:
        """(C, g, g), or (L, C, g, g) when several layers are selected."""
        if len(self.layers) > 1:
            return (len(self.layers), self.hidden_dim, self.grid, self.grid)
        return (self.hidden_dim, self.grid, self.grid)

    def to_attrs(self) -> dict[str, Any]:
        attrs = {
            "model": self.model,
            "model_source": dict(self.model_source),
            "family": self.family,
            "feature_type": self.feature_type,
            "clip_output": self.clip_output,
            "size": self.size,
            "grid": self.grid,
            "hidden_dim": self.hidden_dim,
            "dtype": self.dtype,
            "preprocessing": {
                "name": self.preprocessing,
                "mean": list(self.mean),
                "std": list(self.std),
                "resize": self.resize,
                "premultiply": self.premultiply,
            },
        }
        if self.layers or self.norm:  # absent for the standard output, as in stores made before
            attrs["layers"] = list(self.layers)
            attrs["norm"] = self.norm
        if self.embedding_dim:
            attrs["embedding_dim"] = self.embedding_dim
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> EncodingInfo:
        pre = attrs.get("preprocessing", {})
        return cls(
            model=str(attrs["model"]),
            model_source={str(k): str(v) for k, v in dict(attrs.get("model_source", {})).items()},
            family=str(attrs["family"]),
            feature_type=str(attrs["feature_type"]),
            clip_output=str(attrs.get("clip_output", "raw")),
            size=int(attrs["size"]),
            grid=int(attrs["grid"]),
            hidden_dim=int(attrs["hidden_dim"]),
            dtype=str(attrs["dtype"]),
            mean=tuple(float(x) for x in pre.get("mean", (0, 0, 0))),  # type: ignore[arg-type]
            std=tuple(float(x) for x in pre.get("std", (1, 1, 1))),  # type: ignore[arg-type]
            **{k: str(pre[k]) for k in ("resize", "premultiply") if k in pre},
            preprocessing=str(pre.get("name", "opencv_alpha_multiplication")),
            embedding_dim=int(attrs.get("embedding_dim", 0)),
            layers=tuple(int(k) for k in attrs.get("layers", ())),
            norm=str(attrs.get("norm", "")),
        )

    def image_json(self, item: ImageItem, orig_size_hw: Sequence[int]) -> dict[str, Any]:
        """The per-image JSON of the reference scripts (keys exactly as theirs, in order)."""
        return {
            "source": item.path,
            "orig_size_hw": [int(orig_size_hw[0]), int(orig_size_hw[1])],
            "size_input": self.size,
            "feature_shape": list(self.feature_shape()),
            "mask_shape": [self.grid, self.grid],
            "dtype": self.dtype,
            "model": self.model,
            "feature_type": self.feature_type,
            "preprocessing": self.preprocessing,
            "grid_size": self.grid,
            "hidden_dim": self.hidden_dim,
            **({"layers": list(self.layers), "norm": self.norm} if self.layers or self.norm else {}),
            # rows resized by torch's kernels (anywhere) say so; Pillow's keep the reference's keys
            **({"resize": self.resize} if "torch" in self.resize else {}),
        }


class Writer(Protocol):
    """A pipeline output. `build` drives one or more of them with the same batches."""

    def pending(self, keys: Sequence[str]) -> set[str]:
        """Which of these keys this writer still needs encoded (all of them with overwrite)."""
        ...

    def write(self, batch: EncodedBatch) -> None:
        """Write the rows this writer still needs; durable once `close` returns."""
        ...

    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Images that could not be used; called as they are found, in order with `write`."""
        ...

    def close(self) -> None:
        """Flush and commit everything written so far (also called after an interrupt)."""
        ...


def source_path(root: str, key: str) -> str:
    """The image path as the reference scripts print it: the input root as given + key."""
    return os.path.join(root, *key.split("/"))
