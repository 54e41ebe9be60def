"""Operations on whole stores: export to / import from the reference per-image .npy
format, convert between Zarr and HDF5, upgrade, and describe a store (`info`).

They sit above `featstore.store` (which knows nothing of the .npy format or the model
registry) and take store locations as the store package does: paths or URLs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featstore.batches import EncodedBatch, EncodingInfo, Failure, ImageItem
from featstore.errors import ConfigError, StoreError, UnsafeKeyError
from featstore.npy import output_stem, write_image_outputs
from featstore.store import Location, as_location, disk_usage, open_store, open_store_writer
from featstore.store.base import encoded_batches

Where = str | os.PathLike[str] | Location


def _version() -> str:
    from featstore import __version__

    return __version__


# ---------------------------------------------------------------------------------------
# export


@dataclass
class ExportResult:
    written: int = 0
    refused: list[Failure] = field(default_factory=list)  # unsafe keys, never written


def export_npy(
    store_path: Where,
    out_dir: str | os.PathLike[str],
    *,
    save_meta: bool,
    keys: Sequence[str] | None = None,
    embedding: bool = False,
) -> ExportResult:
    """Write each row as the reference scripts do: `<stem>.npy`, `<stem>_mask.npy` and, with
    `save_meta`, `<stem>.json`, byte-identical to what `build --npy-dir` writes.

    Keys that would leave `out_dir` (absolute, `..`, NUL, backslash) are refused and
    reported, never written. Unknown `keys` raise KeyError. `embedding` also writes
    `<stem>_embedding.npy` (stores that hold embeddings).
    """
    out = Path(out_dir)
    result = ExportResult()
    with open_store(store_path) as store:
        info, sources = store.info, store.sources()
        wanted = list(store.keys()) if keys is None else list(keys)
        unknown = [k for k in wanted if k not in store]
        if unknown:  # before anything is written
            raise KeyError(
                f"{store.path} has no row with key {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )
        safe: list[str] = []
        for key in wanted:
            try:
                output_stem(out, key)
            except UnsafeKeyError as e:
                result.refused.append(Failure(key, str(e)))
            else:
                safe.append(key)
        for start in range(0, len(safe), 256):
            batch = store.get_batch(safe[start : start + 256])
            for j, key in enumerate(batch.keys):
                orig = batch.orig_size_hw[j]
                meta = info.image_json(ImageItem(key, sources[int(batch.indices[j])]), orig) if save_meta else None
                write_image_outputs(out, key, batch.features[j], batch.masks[j], meta)
                if embedding and batch.embedding is not None:
                    stem = output_stem(out, key)
                    _save_npy(stem.with_name(stem.name + "_embedding.npy"), batch.embedding[j])
                result.written += 1
    return result


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary name, then renamed into place: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# import

_FAMILY_BY_FEATURE_TYPE = {
    "clip_vit_last_layer": ("clip", "raw"),
    "clip_vit_last_layer_processed": ("clip", "projected"),
    "dinov2_patch_features": ("dinov2", "raw"),
}
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True, slots=True)
class _NpyEntry:
    stem: str  # POSIX path relative to npy_dir, without ".npy"
    features: Path
    mask: Path
    meta: dict[str, Any] | None


def _scan_npy_dir(root: Path) -> Iterator[_NpyEntry]:
    """Every `<stem>.npy` that has a `<stem>_mask.npy`, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        for name in sorted(filenames):
            if not name.endswith(".npy"):
                continue
            stem = name[: -len(".npy")]
            if f"{stem}_mask.npy" not in names:
                continue
            d = Path(dirpath)
            meta = None
            if f"{stem}.json" in names:
                try:
                    meta = json.loads((d / f"{stem}.json").read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise StoreError(f"{d / (stem + '.json')}: unreadable JSON ({e})") from None
            rel = (d / stem).relative_to(root).as_posix()
            yield _NpyEntry(rel, d / name, d / f"{stem}_mask.npy", meta)


def import_key(stem: str, meta: dict[str, Any] | None) -> str:
    """The store key of an imported file: its path relative to the folder, with the image's
    extension taken from the JSON "source" when it names a file of that stem, else ".npy".

    `sub/a.npy` + {"source": "imgs/sub/a.png"} -> `sub/a.png`; without JSON -> `sub/a.npy`.
    Either way `export_npy` writes the files back under the same names (`output_stem`
    drops the last extension).
    """
    source = (meta or {}).get("source")
    if isinstance(source, str):
        base = source.replace("\\", "/").rsplit("/", 1)[-1]
        name_stem, ext = os.path.splitext(base)
        if ext and name_stem == stem.rsplit("/", 1)[-1]:
            return stem + ext
    return stem + ".npy"


def _info_from_meta(meta: dict[str, Any], model: str | None) -> EncodingInfo:
    feature_type = str(meta.get("feature_type", ""))
    family, clip_output = _FAMILY_BY_FEATURE_TYPE.get(
        feature_type, ("clip" if "clip" in feature_type else "dinov2", "raw")
    )
    mean, std = CLIP_MEAN_STD if family == "clip" else IMAGENET_MEAN_STD
    name = model or str(meta.get("model", "unknown"))
    from featstore.models import lookup, preprocessing_for  # the registry knows each family's preprocessing

    known = preprocessing_for(name, feature_type)
    if known is not None:
        family, mean, std = known
    spec = lookup(model) if model else None  # --model names who made them: it must fit the channels
    if spec is not None and "hidden_dim" in meta:
        clip_output = _clip_output_for(spec, int(meta["hidden_dim"]), model or name)
    try:
        c, g = int(meta["hidden_dim"]), int(meta["grid_size"])
        return EncodingInfo(
            model=name,
            model_source={"kind": "imported", "id": name},
            family=family,
            feature_type=feature_type,
            clip_output=clip_output,
            size=int(meta["size_input"]),
            grid=g,
            hidden_dim=c,
            dtype=str(meta["dtype"]),
            mean=mean,
            std=std,
            preprocessing=str(meta.get("preprocessing", "opencv_alpha_multiplication")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"per-image JSON lacks or garbles {e}; expected the reference scripts' fields") from None


def _clip_output_for(spec: Any, channels: int, model: str) -> str:
    """Which output of `spec` has `channels` channels (raw, or CLIP's projected), or a
    ConfigError saying that these features were not made by that model."""
    outputs = {spec.hidden_dim: "raw"}
    if spec.adapter.offers_projected and spec.embed_dim:
        outputs.setdefault(spec.embed_dim, "projected")
    if channels not in outputs:
        made = " or ".join(f"{c} ({o})" for c, o in outputs.items())
        raise ConfigError(f"the features have {channels} channels, but {model} makes {made}: a different model?")
    return outputs[channels]


def _info_from_arrays(features: np.ndarray, model: str) -> EncodingInfo:
    try:
        from featstore.models import lookup
    except ImportError:  # pragma: no cover - the registry is part of the package

        def lookup(name: str) -> Any:  # type: ignore[misc]
            return None

    if features.ndim != 3 or features.shape[1] != features.shape[2]:
        raise StoreError(f"features of shape {features.shape} are not a (C, g, g) map")
    c, g = int(features.shape[0]), int(features.shape[1])
    spec = lookup(model)
    if spec is None:
        raise ConfigError(
            f"{model!r} is not a registered model (see `featstore models`) and the files have no per-image .json: "
            "the input size, preprocessing and feature type of these features are unknown; name the registered "
            "model that made them, or import files written with their .json (--save-meta)"
        )
    clip_output = _clip_output_for(spec, c, model)
    family, feature_type, size = spec.family, spec.feature_type(clip_output), g * spec.patch_size
    mean, std = spec.mean, spec.std
    return EncodingInfo(
        model=model,
        model_source={"kind": "imported", "id": model},
        family=family,
        feature_type=feature_type,
        clip_output=clip_output,
        size=size,
        grid=g,
        hidden_dim=c,
        dtype=str(features.dtype),
        mean=mean,
        std=std,
    )


@dataclass
class ImportResult:
    imported: int = 0
    skipped: int = 0  # already in the store
    refused: list[Failure] = field(default_factory=list)


def import_npy(npy_dir: str | os.PathLike[str], store_path: Where, *, model: str | None = None) -> ImportResult:
    """Ingest a folder of reference-format outputs (`x.npy`, `x_mask.npy`, optional `x.json`).

    The encoding (model, feature type, size, grid, channels, dtype) comes from the JSON
    files when present (`model` overrides the name); without JSON `model` is required and
    grid, channels and dtype come from the arrays. Keys: see `import_key`. Rows already in
    the store are skipped, so an interrupted import can be rerun. Files whose shape or
    dtype differs from the first file's are refused and reported.
    """
    root = Path(npy_dir)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    entries = iter(_scan_npy_dir(root))
    first = next(entries, None)
    if first is None:
        raise StoreError(f"{root}: no reference-format outputs (x.npy with x_mask.npy) found")
    first_feats = np.load(first.features, allow_pickle=False)
    if first.meta is not None:
        info = _info_from_meta(first.meta, model)
    elif model:
        info = _info_from_arrays(first_feats, model)
    else:
        raise ConfigError(f"{root} has no per-image .json files: say which model made the features with --model")

    result = ImportResult()
    shape, g = info.feature_shape(), info.grid
    with open_store_writer(store_path, info, overwrite=False, featstore_version=_version()) as writer:
        batch: list[tuple[str, str, np.ndarray, np.ndarray, list[int]]] = []

        def flush() -> None:
            if batch:
                writer.write(
                    EncodedBatch(
                        items=[ImageItem(k, s) for k, s, *_ in batch],
                        features=np.stack([b[2] for b in batch]),
                        masks=np.stack([b[3] for b in batch]),
                        orig_size_hw=np.array([b[4] for b in batch], dtype=np.int32),
                    )
                )
                batch.clear()

        for entry in _chain_first(first, entries):
            key = import_key(entry.stem, entry.meta)
            if not writer.pending([key]):
                result.skipped += 1
                continue
            feats = first_feats if entry is first else np.load(entry.features, allow_pickle=False)
            mask = np.load(entry.mask, allow_pickle=False)
            if feats.shape != shape or str(feats.dtype) != info.dtype or mask.shape != (g, g):
                why = f"features {feats.shape} {feats.dtype}, mask {mask.shape}; want {shape} {info.dtype}, {(g, g)}"
                result.refused.append(Failure(key, why))
                continue
            meta = entry.meta or {}
            source = str(meta.get("source", entry.features.as_posix()))
            orig = [int(x) for x in meta.get("orig_size_hw", (0, 0))]
            batch.append((key, source, feats, mask.astype(np.uint8, copy=False), orig))
            result.imported += 1
            if len(batch) >= 64:
                flush()
        flush()
    return result


def _chain_first(first: _NpyEntry, rest: Iterator[_NpyEntry]) -> Iterator[_NpyEntry]:
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------
# convert


def convert(src: Where, dst: Where, *, overwrite: bool = False) -> int:
    """Copy every row of `src` into a new store `dst` of the other (or same) format; returns rows.

    Rows keep their order; the encoding and `failed` are carried over (`created` is now).
    Either side may be on object storage (Zarr).
    """
    src, dst = as_location(src), as_location(dst)
    dst.format  # noqa: B018  (a bad suffix fails before anything is read)
    if src.url == dst.url:
        raise StoreError("source and destination are the same store")
    if dst.exists() and not overwrite:
        raise StoreError(f"{dst} exists; choose a new path or pass --overwrite")
    with (
        open_store(src) as store,
        open_store_writer(dst, store.info, overwrite=overwrite, featstore_version=_version()) as writer,
    ):
        for batch in encoded_batches(store):
            writer.write(batch)
        writer.record_failures(store.failed)
        return len(store)


# ---------------------------------------------------------------------------------------
# info


def info(where: Where) -> dict[str, Any]:
    """A description of a store: encoding, row counts, arrays, and disk use."""
    location = as_location(where)
    with open_store(location) as store:
        attrs = store.attrs
        arrays = store.array_details()
        n = len(store)
        uncompressed = 0  # of the numeric arrays; strings have no fixed size
        for a in arrays.values():
            if a["dtype"] != "str":
                uncompressed += n * int(np.prod(a["shape"][1:], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize
        on_disk, files = disk_usage(location)
        return {
            "path": str(location),
            "format": store.format,
            "layout_version": attrs["layout_version"],
            "featstore_version": attrs["featstore_version"],
            "created": attrs["created"],
            "model": attrs["model"],
            "model_source": attrs["model_source"],
            "family": attrs["family"],
            "feature_type": attrs["feature_type"],
            "clip_output": attrs["clip_output"],
            "size": attrs["size"],
            "feature_shape": list(store.info.feature_shape()),
            "embedding_dim": store.info.embedding_dim,
            "dtype": attrs["dtype"],
            "num_rows": n,
            "shard_rows": store.shard_rows,
            "num_failed": len(attrs["failed"]),
            "failed": attrs["failed"],
            "preprocessing": attrs.get("preprocessing"),
            "arrays": arrays,
            "bytes_on_disk": on_disk,
            "uncompressed_bytes": uncompressed,
            "compression_ratio": round(uncompressed / on_disk, 3) if on_disk else None,
            "file_count": files,
        }
