"""`featstore prefetch`: fetch, on a machine with internet, exactly the files a build reads.

For a registered name, preset or Hugging Face repo id: `config.json`, the
`preprocessor_config.json` when the repo has one (mean, std, resampling), and the
weights `from_pretrained` reads (`model.safetensors` or its shards with their index;
`pytorch_model.bin` only for repos without safetensors). Nothing else: no tokenizer,
no ONNX or Flax copies, no README. Into the Hugging Face cache (what `HF_HOME` /
`HF_HUB_CACHE` name, as the hub's own tools do), where builds find the model with no
hub request (`featstore.loading.hub_snapshot`), or into a folder (`--to DIR`) to pass
as `--model DIR`. An OpenAI `.pt` checkpoint is a single local file already: copy it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from featstore.errors import ConfigError, ModelError, ModelNotFoundError

_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_BIN_SHARD = re.compile(r"pytorch_model-\d+-of-\d+\.bin")


@dataclass(frozen=True, slots=True)
class Prefetched:
    repo: str
    revision: str
    folder: Path  # the snapshot folder in the cache, or --to
    files: tuple[str, ...]
    bytes: int
    cache: str | None  # the hub cache it went into; None with --to


def repo_for(model: str) -> str:
    """The hub repo a registered name, preset or repo id loads from; refuses local paths."""
    from featstore.loading import _looks_like_path
    from featstore.models import REGISTRY, looks_registered, lookup, suggest

    if Path(model).expanduser().exists() or _looks_like_path(model):
        raise ConfigError(f"{model!r} is a local path: builds read it directly, there is nothing to fetch")
    spec = REGISTRY.get(model.strip().lower()) or lookup(model)
    if spec is not None:
        return spec.source
    if looks_registered(model):
        close = suggest(model)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ModelNotFoundError(f"{model!r} is not a registered model name or a hub repo id (owner/name){hint}")
    return model


def needed_files(names: list[str]) -> list[str]:
    """Of a repo's files, those a build reads (see the module docstring)."""
    have = set(names)
    wanted = [n for n in ("config.json", "preprocessor_config.json") if n in have]
    if "model.safetensors" in have:
        weights = ["model.safetensors"]
    elif "model.safetensors.index.json" in have:
        weights = ["model.safetensors.index.json", *sorted(n for n in have if _SHARD.fullmatch(n))]
    elif "pytorch_model.bin" in have:
        weights = ["pytorch_model.bin"]
    else:
        weights = [n for n in ("pytorch_model.bin.index.json",) if n in have]
        weights += sorted(n for n in have if _BIN_SHARD.fullmatch(n))
    return wanted + weights if weights and "config.json" in have else []


def prefetch(model: str, *, to: Path | None = None) -> Prefetched:
    """Download what a build of `model` reads; see the module docstring."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import constants as hub_constants

    repo = repo_for(model)
    if hub_constants.HF_HUB_OFFLINE:
        raise ConfigError("HF_HUB_OFFLINE is set: prefetch downloads, so run it where the hub can be reached")
    try:
        info = HfApi().model_info(repo, files_metadata=False)
    except Exception as e:  # not found, gated, no network: one line
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"cannot fetch {repo!r} from the Hugging Face hub: {reason}") from None
    names = [s.rfilename for s in info.siblings or []]
    files = needed_files(names)
    if not files:
        raise ModelError(f"{repo!r} has no config.json and weights that a build could read (files: {len(names)})")
    commit = str(info.sha or "main")
    paths: list[Path] = []
    try:
        for name in files:
            got = hf_hub_download(repo, name, revision=commit, local_dir=str(to) if to is not None else None)
            paths.append(Path(str(got)))
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"cannot fetch {repo!r} ({name}): {reason}") from None
    folder = paths[0].parent
    _check_readable(folder, model)
    size = sum(p.stat().st_size for p in paths)
    cache = None if to is not None else str(hub_constants.HF_HUB_CACHE)
    if to is None:
        _point_main_at(repo, commit)
    return Prefetched(repo, commit, folder, tuple(files), size, cache)


def _point_main_at(repo: str, commit: str) -> None:
    """hf_hub_download by commit leaves refs/main alone; builds resolve `main`: point it here."""
    from huggingface_hub import constants as hub_constants

    refs = Path(hub_constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)


def _check_readable(folder: Path, model: str) -> None:
    """The fetched config is one featstore reads (a family it supports)."""
    from featstore.models import spec_from_hf_config

    spec_from_hf_config(model, str(folder), json.loads((folder / "config.json").read_text()))
