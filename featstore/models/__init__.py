"""The model registry: a name maps to a small frozen record (`ModelSpec`), and
everything else (shapes, preprocessing, the `featstore models` table) is derived from
it. Each family registers itself from its own module (clip, dinov2, dinov3, siglip);
presets are registry entries too.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import replace
from typing import Any

from featstore.errors import ConfigError
from featstore.images import RESAMPLE_BY_PIL_CODE

# Registration order is the order of `featstore models`.
from featstore.models import clip, dinov2, dinov3, siglip  # noqa: F401
from featstore.models import presets as _presets  # noqa: F401
from featstore.models.family import (
    FAMILIES,
    NORMS,
    REGISTRY,
    Family,
    family_for_model_type,
    parse_layers,
    resolve_tensor,
)
from featstore.models.siglip import NAFLEX_MODEL_TYPES, naflex_refusal
from featstore.models.spec import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ModelSpec, check_size

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMS",
    "REGISTRY",
    "Family",
    "ModelSpec",
    "check_size",
    "lookup",
    "models_table",
    "parse_layers",
    "preprocessing_for",
    "resolve_tensor",
    "spec_from_hf_config",
    "suggest",
    "with_preprocessor_config",
]

# Also accept a registered model's repo id, and short names ("dinov2-large", "siglip2-base-patch16-224").
_ALIASES: dict[str, str] = {}
for _spec in REGISTRY.values():
    _ALIASES[_spec.source.lower()] = _spec.name
    _ALIASES[_spec.name.lower()] = _spec.name
    if "/" in _spec.source and not _spec.preset:
        _ALIASES.setdefault(_spec.source.split("/")[1].lower(), _spec.name)


def lookup(name: str) -> ModelSpec | None:
    """The registered spec for a name, repo id or alias; None if not registered."""
    canonical = _ALIASES.get(name.strip().lower())
    return REGISTRY[canonical] if canonical else None


def suggest(name: str, n: int = 3) -> list[str]:
    """Registered names close to a mistyped one ("ViT-L/16" -> ["ViT-L/14", ...])."""
    matches = difflib.get_close_matches(name.strip().lower(), list(_ALIASES), n=n * 3, cutoff=0.75)
    out: list[str] = []
    for m in matches:
        if _ALIASES[m] not in out:
            out.append(_ALIASES[m])
    return out[:n]


_CLIP_STYLE = re.compile(r"^vit-[^/]*/\d", re.IGNORECASE)


def looks_registered(name: str) -> bool:
    """A name that cannot be a Hugging Face repo id ("dinov2-smal": no owner; "ViT-L/16":
    OpenAI's naming): a miss is a typo, never worth asking the hub about."""
    return "/" not in name or bool(_CLIP_STYLE.match(name.strip()))


def spec_from_hf_config(name: str, source: str, config: dict[str, Any]) -> ModelSpec:
    """A spec for any supported Hugging Face checkpoint, read from its config.json."""
    model_type = str(config.get("model_type", ""))
    if model_type in NAFLEX_MODEL_TYPES:
        raise naflex_refusal(name)
    family = family_for_model_type(model_type)
    if family is None:
        kinds = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
        raise ConfigError(f"{name}: model_type {model_type!r} is not supported (featstore reads {kinds})")
    return family.spec_from_config(name, source, config)


def with_preprocessor_config(spec: ModelSpec, processor: dict[str, Any]) -> ModelSpec:
    """The spec with the mean, std and resampling filter of the checkpoint's own
    preprocessor_config.json (the resize policy stays the family's)."""
    mean, std = processor.get("image_mean"), processor.get("image_std")
    changes: dict[str, Any] = {}
    if isinstance(mean, list) and len(mean) == 3 and isinstance(std, list) and len(std) == 3:
        changes["mean"] = tuple(float(x) for x in mean)
        changes["std"] = tuple(float(x) for x in std)
    resample = RESAMPLE_BY_PIL_CODE.get(processor.get("resample"))  # type: ignore[arg-type]
    if resample:
        changes["preprocess"] = replace(spec.preprocess, resample=resample)
    return replace(spec, **changes) if changes else spec


def preprocessing_for(
    model: str | None, feature_type: str = ""
) -> tuple[str, tuple[float, float, float], tuple[float, float, float]] | None:
    """(family, mean, std) for features made by `model` (a registered name) or, failing
    that, of a registered family's `feature_type`; None when neither is known. What
    `import-npy` records for files that do not say."""
    spec = lookup(model) if model else None
    if spec is not None:
        return spec.family, spec.mean, spec.std
    for family in FAMILIES.values():
        if feature_type in family.feature_types.values():
            example = next(s for s in REGISTRY.values() if s.family == family.name)
            return family.name, example.mean, example.std
    return None


def models_table() -> list[str]:
    """The `featstore models` listing: one line per registered name and preset."""
    rows = [("name", "family", "patch", "size", "shape@size", "embedding", "notes")]
    for spec in REGISTRY.values():
        g = spec.default_size // spec.patch_size
        notes = []
        if spec.preset:
            notes.append(f"preset: {spec.preset}")
        if spec.layers or spec.norm:
            notes.append(f"--layers {','.join(map(str, spec.layers))} --norm {spec.norm}")
        if spec.gated:
            notes.append("gated on the hub")
        if not spec.cls_token:
            notes.append("no CLS")
        if spec.num_registers:
            notes.append(f"{spec.num_registers} registers")
        rows.append(
            (
                spec.name,
                spec.family,
                str(spec.patch_size),
                str(spec.default_size),
                f"({spec.hidden_dim}, {g}, {g})",
                str(spec.embedding_dim()),
                "; ".join(notes),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
