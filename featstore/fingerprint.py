"""A model's identity by content: one sha256 over its config and weight files.

A store records it (`model_source["content_sha256"]`), so appending with the same
weights from a copied or moved folder, the hub cache or a `--to` folder of `featstore
prefetch` is accepted, and other weights are refused, whatever their path says.

    content_sha256 = sha256("config " + sha256(canonical config)
                            + for each weight file, by name: "NAME sha256(file)")

The canonical config is config.json without the keys a save adds on its own
(`_name_or_path`, `transformers_version`, ...). Weight files are the ones
`from_pretrained` reads: `model.safetensors` or its shards, else `pytorch_model.bin`
or its shards; an OpenAI `.pt` is its own one file (its config comes from its weights).

Cost: hashing reads every byte (about 1 GB/s on one core, so ~1 s for ViT-L/14, ~25 s
for the 27 GB DINOv3-7B). It is paid once per file: a file in the Hugging Face cache is
named by the hub after its sha256 (a blob), which is taken as is; any other file's hash
is cached by path, size, modification time and inode in
`$XDG_CACHE_HOME/featstore/sha256.json` (`~/.cache/...`), so later builds only `stat`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

CONTENT_KEY = "content_sha256"
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SAFETENSORS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
_BIN = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "featstore" / "sha256.json"


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(entries: dict[str, Any]) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)  # concurrent builds: the last writer wins, every version is whole
    except OSError:
        pass  # a read-only home: hash again next time


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes: the hub cache's blob name, a cached value, or read now."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if _HEX64.fullmatch(name) and os.path.basename(os.path.dirname(real)) == "blobs":
        return name  # huggingface_hub stores LFS files under their sha256
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    cache = _read_cache()
    hit = cache.get(real)
    if isinstance(hit, dict) and hit.get("stat") == stamp and isinstance(hit.get("sha256"), str):
        return str(hit["sha256"])
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    cache = _read_cache()  # re-read: another build may have added entries meanwhile
    cache[real] = {"stat": stamp, "sha256": digest}
    _write_cache(cache)
    return digest


def weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files `from_pretrained` reads from a save_pretrained folder, by name."""
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    chosen = [n for n in names if _SAFETENSORS.fullmatch(n)] or [n for n in names if _BIN.fullmatch(n)]
    return [Path(folder) / n for n in chosen]


def config_sha256(config: dict[str, Any]) -> str:
    canonical = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()


def folder_fingerprint(folder: str | os.PathLike[str]) -> str | None:
    """The content hash of a save_pretrained folder (or a hub cache snapshot); None
    without config.json or weights."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        files = weight_files(folder)
    except (OSError, ValueError):
        return None
    if not files or not isinstance(config, dict):
        return None
    h = hashlib.sha256(f"config {config_sha256(config)}\n".encode())
    for f in files:
        h.update(f"{f.name} {file_sha256(f)}\n".encode())
    return h.hexdigest()


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """The content hash of a single-file checkpoint (an OpenAI `.pt`)."""
    return hashlib.sha256(f"checkpoint {file_sha256(path)}\n".encode()).hexdigest()
