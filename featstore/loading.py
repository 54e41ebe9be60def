"""Turning a model name, folder or checkpoint file into a loaded torch module.

- registered names and Hugging Face repo ids: `from_pretrained` (safetensors, or
  .bin through transformers' `weights_only` loader; never `trust_remote_code`);
- a local folder written by `save_pretrained` (its preprocessor_config.json, when
  present, gives mean, std and the resampling filter);
- an OpenAI-format CLIP checkpoint file (`.pt`): `featstore.openai_checkpoint`;
- a preset (`--preset trellis`), optionally with `--model` pointing at its weights.

Which class to build and which weights may be absent come from the family adapter
(`featstore.models.family`). `random_model` builds the same architectures from their
configs with random weights, for tests and benchmarks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from featstore.errors import ConfigError, ModelError, ModelNotFoundError
from featstore.fingerprint import CONTENT_KEY, folder_fingerprint, weight_files
from featstore.models import (
    REGISTRY,
    ModelSpec,
    looks_registered,
    lookup,
    spec_from_hf_config,
    suggest,
    with_preprocessor_config,
)
from featstore.models.siglip import naflex_refusal

PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    spec: ModelSpec
    module: torch.nn.Module  # the family's transformers class (spec.adapter.model_class)
    source: dict[str, str]  # how it was found: kind, id or path, revision or sha256
    absent: frozenset[str] = field(default=frozenset())  # optional weights the checkpoint lacks

    @property
    def offers_embedding(self) -> bool:
        return not self.absent


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _not_found(name: str, target: str, reason: str, spec: ModelSpec | None = None) -> ModelNotFoundError:
    reason = reason.strip().splitlines()[0][:200].rstrip(".") if reason.strip() else "unknown error"
    if spec is not None and spec.gated:
        return ModelNotFoundError(
            f"cannot load model {name!r} ({target}): {reason}. Its weights are gated on the hub: accept the "
            f"licence at https://huggingface.co/{spec.source}, log in (`hf auth login`), run `featstore prefetch "
            f"{spec.source} --to DIR` and pass that folder to --model"
        )
    prefetch = f"`featstore prefetch {name}`"
    if _offline():
        hint = (
            f"HF_HUB_OFFLINE is set, so only the local Hugging Face cache ({_hub_cache()}) was searched: run "
            f"{prefetch} on a machine with internet (into that cache, or with --to DIR, then --model DIR)"
        )
    else:
        hint = (
            f"HF_HUB_OFFLINE is not set (the hub was asked). Without internet here, run {prefetch} on a machine "
            "with internet, then build with HF_HUB_OFFLINE=1 (or --to DIR, then --model DIR)"
        )
    close = "" if spec is not None else _did_you_mean(name)
    return ModelNotFoundError(f"cannot load model {name!r} ({target}): {reason}.{close} {hint}")


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # an old or broken huggingface_hub: its default
        return "~/.cache/huggingface/hub"


def hub_snapshot(repo: str) -> Path | None:
    """The Hugging Face cache's snapshot folder of `repo` (its refs/main) when it holds all
    that a build reads (config.json and every weight file), else None. Reads the local
    cache only: a build that finds its model here makes no hub request at all, whether
    or not HF_HUB_OFFLINE is set (a prefetched model, on a node without internet)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json")
    except Exception:  # not a valid repo id, no huggingface_hub cache: not cached
        return None
    if not isinstance(cached, str):
        return None
    folder = Path(cached).parent
    files = weight_files(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: every shard the index names must be there
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if not shards or not all((folder / s).is_file() for s in shards):
            return None
    return folder if files else None


def _looks_like_path(name: str) -> bool:
    """`./x`, `../x`, `/x`, `~/x`, a checkpoint file name, or `a/b` where `a` exists here:
    a path, never a hub id (a missing one is refused at once, without asking the hub)."""
    if name.startswith(("./", "../", "/", "~", ".\\")) or name in (".", ".."):
        return True
    if "/" not in name:
        return False
    if name.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return True
    return os.path.lexists(name.split("/", 1)[0])


def _missing_path(name: str) -> ModelNotFoundError:
    """`model path ... does not exist`, naming the nearest folder that does and close names in it."""
    import difflib

    path = Path(os.path.abspath(Path(name).expanduser()))
    near = path.parent
    while not near.is_dir() and near != near.parent:
        near = near.parent
    missing = path.relative_to(near).parts[0]
    try:
        entries = sorted(p.name for p in near.iterdir())
    except OSError:
        entries = []
    close = difflib.get_close_matches(missing, entries, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(str(near / c)) for c in close)}?" if close else ""
    why = "" if name.startswith(("./", "../", "/", "~")) else f" ({name.split('/', 1)[0]} exists here, so it is a path)"
    return ModelNotFoundError(f"model path {name!r} does not exist{why}: no {missing!r} in {near}{hint}")


def _did_you_mean(name: str) -> str:
    close = suggest(name)
    return f" Did you mean {' or '.join(close)}? (`featstore models` lists the registered names)" if close else ""


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """The hub's "Retrying in Ns" warnings stay off the terminal; featstore prints one line."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def _processor_config(source: str, kind: str) -> dict[str, Any] | None:
    """The checkpoint's preprocessor_config.json: in a local folder, or already in the hub cache."""
    if kind == "local":
        path = Path(source) / PREPROCESSOR_CONFIG
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, PREPROCESSOR_CONFIG)
        except Exception:  # a malformed repo id, an unreadable cache: use the family's defaults
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _resolve(name: str) -> tuple[ModelSpec, str]:
    path = Path(name).expanduser()
    if path.is_file():
        from featstore.openai_checkpoint import openai_to_hf, read_openai_state_dict

        config, _ = openai_to_hf(read_openai_state_dict(path))
        cfg = config.to_dict()
        cfg["model_type"] = "clip_vision_model"
        return spec_from_hf_config(name, str(path.resolve()), cfg), "openai-checkpoint"
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelNotFoundError(f"model folder {name!r} has no config.json (expected a save_pretrained folder)")
        spec = spec_from_hf_config(name, str(path.resolve()), json.loads(cfg_file.read_text()))
        processor = _processor_config(spec.source, "local")
        return (with_preprocessor_config(spec, processor) if processor else spec), "local"
    if _looks_like_path(name):
        raise _missing_path(name)
    if "naflex" in name.lower():
        raise naflex_refusal(name)
    registered = lookup(name)
    if registered is None and looks_registered(name):
        raise ModelNotFoundError(f"{name!r} is not a registered model name, folder or file.{_did_you_mean(name)}")
    if registered is not None:
        spec = registered
    else:
        from transformers import AutoConfig

        snapshot = hub_snapshot(name)
        if snapshot is not None:  # cached: no hub request
            cfg = json.loads((snapshot / "config.json").read_text())
        else:
            _quiet_transformers()
            try:
                with _quiet_hub():
                    cfg = AutoConfig.from_pretrained(name, trust_remote_code=False).to_dict()
            except Exception as e:  # hub errors come in many types; all mean "cannot get it"
                raise _not_found(name, "Hugging Face hub", str(e)) from None
        spec = spec_from_hf_config(name, name, cfg)
    if not spec.preset:
        processor = _processor_config(spec.source, "hf")
        if processor:
            spec = with_preprocessor_config(spec, processor)
    return spec, "hf"


def preset_spec(preset: str) -> ModelSpec:
    spec = REGISTRY.get(preset.strip().lower())
    if spec is None or not spec.preset:
        names = ", ".join(s.name for s in REGISTRY.values() if s.preset)
        raise ConfigError(f"--preset {preset!r}: expected one of {names} (see `featstore models`)")
    return spec


def resolve_spec(name: str | None, *, preset: str | None = None) -> tuple[ModelSpec, str]:
    """The spec for a name (or a preset, optionally with other weights) and the kind of
    source ("hf", "local", "openai-checkpoint"). Reads only config files, never weights."""
    if not preset:
        if not name:
            raise ConfigError("give --model (see `featstore models`) or --preset")
        return _resolve(name)
    base = preset_spec(preset)
    if not name:
        return base, "hf"
    weights, kind = _resolve(name)
    if weights.family != base.family:
        raise ConfigError(f"--preset {base.name} needs {base.family} weights; {name!r} is a {weights.family} model")
    # the weights' architecture; the preset's preprocessing and tensor
    return replace(
        weights,
        default_size=base.default_size,
        mean=base.mean,
        std=base.std,
        preprocess=base.preprocess,
        layers=base.layers,
        norm=base.norm,
        preset=base.preset,
    ), kind


def load_model(
    name: str | None,
    *,
    dtype: torch.dtype = torch.float32,
    clip_output: str = "raw",
    preset: str | None = None,
) -> LoadedModel:
    """Load weights for `name` (see module docstring), on the CPU, in eval mode."""
    if not preset and name and Path(name).expanduser().is_file():  # read once: the config comes from the model
        from featstore.openai_checkpoint import load_openai_checkpoint

        module, source = load_openai_checkpoint(Path(name).expanduser(), dtype=dtype)
        cfg = {**module.config.to_dict(), "model_type": "clip_vision_model"}
        return LoadedModel(spec_from_hf_config(name, source["path"], cfg), module.eval(), source)
    spec, kind = resolve_spec(name, preset=preset)
    spec.out_dim(clip_output)  # refuses --clip-output projected for families without it, before loading
    cls = spec.adapter.model_class(spec)
    # a hub model already in the cache loads from its snapshot folder: no hub request
    snapshot = hub_snapshot(spec.source) if kind == "hf" else None
    _quiet_transformers()
    try:
        with _quiet_hub():
            module, info = cls.from_pretrained(
                str(snapshot) if snapshot is not None else spec.source,
                dtype=dtype,
                attn_implementation="sdpa",
                trust_remote_code=False,
                output_loading_info=True,
            )
    except Exception as e:
        raise _not_found(name or spec.name, spec.source, str(e), spec) from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    optional = spec.adapter.optional_weights
    absent = frozenset(p for p in optional if any(k.startswith(p) for k in missing))
    if clip_output == "projected" and absent:
        raise ModelError(f"{name!r}: checkpoint lacks {optional[min(absent)]}, needed by --clip-output projected")
    missing = [k for k in missing if not any(k.startswith(p) for p in optional)]
    if missing:
        raise ModelError(f"{name!r}: checkpoint lacks weights for {len(missing)} parameters, e.g. {missing[0]}")
    source = {"kind": kind, "id": spec.source}
    if spec.preset:
        source["preset"] = preset or spec.name
    revision = snapshot.name if snapshot is not None else getattr(module.config, "_commit_hash", None)
    if revision:
        source["revision"] = str(revision)
    folder = snapshot if snapshot is not None else Path(spec.source) if kind == "local" else _fetched_snapshot(spec)
    content = folder_fingerprint(folder) if folder is not None else None
    if content:
        source[CONTENT_KEY] = content
    return LoadedModel(spec, module.eval(), source, absent)


def _fetched_snapshot(spec: ModelSpec) -> Path | None:
    """The cache snapshot `from_pretrained` just downloaded into (None if it kept none)."""
    return hub_snapshot(spec.source)


def _quiet_transformers() -> None:
    """No per-tensor progress bars or load reports: featstore reports what matters itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def hf_config(spec: ModelSpec) -> Any:
    """A transformers config for the spec's architecture (used for random weights)."""
    return spec.adapter.hf_config(spec)


def random_model(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """The spec's architecture with random weights (no download)."""
    torch.manual_seed(seed)
    config = hf_config(spec)
    config._attn_implementation = "sdpa"
    module = spec.adapter.model_class(spec)(config).to(dtype).eval()
    return LoadedModel(spec, module, {"kind": "random", "id": spec.name, "seed": str(seed)})


def check_preset_options(
    spec: ModelSpec, *, size: int | None, layers: tuple[int, ...] | None, norm: str | None
) -> None:
    """A preset fixes the size and the tensor: refuse options that would change them."""
    if not spec.preset:
        return
    if size is not None and size != spec.default_size:
        raise ConfigError(f"this preset encodes at --size {spec.default_size} exactly; drop --size (or --preset)")
    if layers is not None or norm is not None:
        raise ConfigError("this preset fixes --layers and --norm; drop them (or --preset)")
