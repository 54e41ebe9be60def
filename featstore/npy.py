"""Per-image output in the reference scripts' format: `<name>.npy`, `<name>_mask.npy`
and (optionally) `<name>.json` and `<name>_embedding.npy`, mirrored under an output folder.

Every file is written under a temporary name and renamed into place, and the mask is
renamed last: a present `_mask.npy` means the image is complete (the reference's own
skip test looks for both `.npy` files).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from featstore.batches import EncodedBatch, EncodingInfo, Failure
from featstore.errors import UnsafeKeyError

FAILURES_FILE = "featstore_failures.jsonl"
EMBEDDING_SUFFIX = "_embedding.npy"


def output_stem(out_dir: Path, key: str) -> Path:
    """`out/sub/a` for key `sub/a.png`; refuses keys that would leave `out_dir`."""
    if not key or "\x00" in key or "\\" in key:
        raise UnsafeKeyError(f"unsafe key {key!r}: empty, NUL or backslash")
    p = PurePosixPath(key)
    if p.is_absolute() or any(part in ("..", "", ".") for part in key.split("/")):
        raise UnsafeKeyError(f"unsafe key {key!r}: absolute or contains '..'")
    return out_dir.joinpath(*p.with_suffix("").parts)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    """Same bytes as `np.save(path, array)`, but atomically."""
    _atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array)))


def save_json(path: Path, meta: dict[str, Any]) -> None:
    data = json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8")
    _atomic_write(path, lambda f: f.write(data))


def write_image_outputs(
    out_dir: Path,
    key: str,
    features: np.ndarray,
    mask: np.ndarray,
    meta: dict[str, Any] | None,
    embedding: np.ndarray | None = None,
) -> None:
    """Write one image's files; the mask goes last and marks the image complete."""
    stem = output_stem(out_dir, key)
    save_npy(stem.with_name(stem.name + ".npy"), features)
    if embedding is not None:
        save_npy(stem.with_name(stem.name + EMBEDDING_SUFFIX), embedding)
    if meta is not None:
        save_json(stem.with_name(stem.name + ".json"), meta)
    save_npy(stem.with_name(stem.name + "_mask.npy"), mask)


def is_complete(out_dir: Path, key: str) -> bool:
    stem = output_stem(out_dir, key)
    return stem.with_name(stem.name + ".npy").exists() and stem.with_name(stem.name + "_mask.npy").exists()


class NpyWriter:
    """The per-image writer stage of the pipeline."""

    def __init__(
        self,
        out_dir: Path,
        info: EncodingInfo,
        *,
        save_meta: bool,
        overwrite: bool,
        embedding: bool = False,
        failures_file: str = FAILURES_FILE,
    ) -> None:
        """`failures_file`: where this run's failures go (each process of a distributed
        build has its own)."""
        self.out_dir = Path(out_dir)
        self.failures_file = failures_file
        self.info = info
        self.save_meta = save_meta
        self.embedding = embedding  # write `<name>_embedding.npy` (when the batch carries one)
        self.overwrite = overwrite
        self._pending: set[str] = set()
        self.failures: list[Failure] = []

    def pending(self, keys: Sequence[str]) -> set[str]:
        """Keys without complete files (all with overwrite); they are written when encoded
        (calls add up: a distributed build asks unit by unit)."""
        found = set(keys) if self.overwrite else {k for k in keys if not is_complete(self.out_dir, k)}
        self._pending |= found
        return found

    def write(self, batch: EncodedBatch) -> None:
        for i, item in enumerate(batch.items):
            if item.key not in self._pending:
                continue
            meta = self.info.image_json(item, batch.orig_size_hw[i]) if self.save_meta else None
            emb = batch.embedding[i] if self.embedding and batch.embedding is not None else None
            write_image_outputs(self.out_dir, item.key, batch.features[i], batch.masks[i], meta, emb)
            self._pending.discard(item.key)

    def record_failures(self, failures: Sequence[Failure]) -> None:
        self.failures.extend(failures)

    def close(self) -> None:
        """Write this run's failures next to the output (one JSON object per line)."""
        path = self.out_dir / self.failures_file
        if self.failures:
            lines = "".join(
                json.dumps({"key": f.key, "reason": f.reason}, ensure_ascii=False) + "\n" for f in self.failures
            )
            _atomic_write(path, lambda f: f.write(lines.encode("utf-8")))
        elif path.exists():
            path.unlink()
