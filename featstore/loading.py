"""Turning a model name, folder or checkpoint file into a loaded torch module.

- registered names and Hugging Face repo ids: `from_pretrained` (safetensors, or
  .bin through transformers' `weights_only` loader; never `trust_remote_code`);
- a local folder written by `save_pretrained`;
- an OpenAI-format CLIP checkpoint file (`.pt`): `featstore.openai_checkpoint`.

`random_model` builds the same architectures from their configs with random weights,
for tests and benchmarks (throughput does not depend on weight values).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featstore.errors import ModelError, ModelNotFoundError
from featstore.models import ModelSpec, lookup, spec_from_hf_config


@dataclass(frozen=True, slots=True)
class LoadedModel:
    spec: ModelSpec
    module: torch.nn.Module  # CLIPVisionModelWithProjection, Dinov2Model or Dinov2WithRegistersModel
    source: dict[str, str]  # how it was found: kind, id or path, revision or sha256


def _not_found(name: str, target: str, reason: str) -> ModelNotFoundError:
    reason = reason.strip().splitlines()[0][:200].rstrip(".") if reason.strip() else "unknown error"
    return ModelNotFoundError(
        f"cannot load model {name!r} ({target}): {reason}. Use a local copy: pass a folder made by "
        f"save_pretrained or a .pt checkpoint to --model, or download it once and set HF_HUB_OFFLINE=1"
    )


def resolve_spec(name: str) -> tuple[ModelSpec, str]:
    """The spec for a name and the kind of source ("hf", "local", "openai-checkpoint").

    Reads only config files, never weights.
    """
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
        return spec_from_hf_config(name, str(path.resolve()), json.loads(cfg_file.read_text())), "local"
    if os.sep in name and (name.startswith((".", "/", "~")) or name.endswith((".pt", ".pth", ".bin"))):
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    spec = lookup(name)
    if spec is not None:
        return spec, "hf"
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=False).to_dict()
    except Exception as e:  # hub errors come in many types; all mean "cannot get it"
        raise _not_found(name, "Hugging Face hub", str(e)) from None
    return spec_from_hf_config(name, name, cfg), "hf"


def _model_class(spec: ModelSpec, *, with_registers: bool) -> Any:
    import transformers

    if spec.family == "clip":
        return transformers.CLIPVisionModelWithProjection
    return transformers.Dinov2WithRegistersModel if with_registers else transformers.Dinov2Model


def load_model(name: str, *, dtype: torch.dtype = torch.float32, clip_output: str = "raw") -> LoadedModel:
    """Load weights for `name` (see module docstring), on the CPU, in eval mode."""
    if Path(name).expanduser().is_file():  # read once: the config comes from the loaded model
        from featstore.openai_checkpoint import load_openai_checkpoint

        module, source = load_openai_checkpoint(Path(name).expanduser(), dtype=dtype)
        cfg = {**module.config.to_dict(), "model_type": "clip_vision_model"}
        return LoadedModel(spec_from_hf_config(name, source["path"], cfg), module.eval(), source)
    spec, kind = resolve_spec(name)
    cls = _model_class(spec, with_registers=spec.num_registers > 0)
    _quiet_transformers()
    try:
        module, info = cls.from_pretrained(
            spec.source,
            dtype=dtype,
            attn_implementation="sdpa",
            trust_remote_code=False,
            output_loading_info=True,
        )
    except Exception as e:
        raise _not_found(name, spec.source, str(e)) from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if spec.family == "clip" and clip_output == "raw":
        missing = [k for k in missing if not k.startswith("visual_projection")]
    if missing:
        raise ModelError(f"{name!r}: checkpoint lacks weights for {len(missing)} parameters, e.g. {missing[0]}")
    source = {"kind": kind, "id": spec.source}
    revision = getattr(module.config, "_commit_hash", None)
    if revision:
        source["revision"] = str(revision)
    return LoadedModel(spec, module.eval(), source)


def _quiet_transformers() -> None:
    """No per-tensor progress bars or load reports: featstore reports what matters itself."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def hf_config(spec: ModelSpec) -> Any:
    """A transformers config for the spec's architecture (used for random weights)."""
    import transformers

    if spec.family == "clip":
        return transformers.CLIPVisionConfig(
            hidden_size=spec.hidden_dim,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            patch_size=spec.patch_size,
            image_size=spec.native_size,
            projection_dim=spec.embed_dim or spec.hidden_dim,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
    kwargs: dict[str, Any] = dict(
        hidden_size=spec.hidden_dim,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        mlp_ratio=spec.intermediate_size // spec.hidden_dim,
        patch_size=spec.patch_size,
        image_size=spec.native_size,
        layerscale_value=1.0,
        **dict(spec.extra_config),
    )
    if spec.num_registers:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=spec.num_registers, **kwargs)
    return transformers.Dinov2Config(**kwargs)


def random_model(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """The spec's architecture with random weights (no download)."""
    torch.manual_seed(seed)
    config = hf_config(spec)
    config._attn_implementation = "sdpa"
    module = _model_class(spec, with_registers=spec.num_registers > 0)(config).to(dtype).eval()
    return LoadedModel(spec, module, {"kind": "random", "id": spec.name, "seed": str(seed)})
