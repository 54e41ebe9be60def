"""OpenAI-format CLIP checkpoints (`clip.load`'s files) mapped into transformers.

Two file kinds are read, neither by running code from the file:

- a plain state dict written by `torch.save` (optionally wrapped under "state_dict" or
  "model"): `torch.load(..., weights_only=True)`;
- a TorchScript archive as `clip.load` downloads (`~/.cache/clip/ViT-L-14.pt`, written
  by `torch.jit.save`). `torch.jit.load` would compile and run the archive's code, so it
  is never called: `<archive>/data.pkl` is read with a restricted unpickler that only
  knows the tensor rebuild functions, storage types and `collections.OrderedDict`, and
  turns every `__torch__.*` module class into an inert record of its attributes. The
  tensors are read from `<archive>/data/<key>`, and the recorded module tree is walked
  into a flat state dict (`visual.conv1.weight`, ...).

Any other global in a pickle is refused with `UnsafeCheckpointError` before anything
is called; files that are not checkpoints give `ModelError`.

`openai_to_hf` infers the vision tower's dimensions from the tensors and renames them
for `CLIPVisionModelWithProjection` (QuickGELU, layer-norm eps 1e-5, `in_proj` split
into q, k, v, `proj` transposed into `visual_projection`). Weights are used as stored
(no float16 rounding as `clip.load`'s `convert_weights` does).
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from featstore.errors import ModelError, UnsafeCheckpointError

__all__ = ["load_openai_checkpoint", "openai_to_hf", "read_openai_state_dict"]

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


# ---------------------------------------------------------------------------------------
# reading


def read_openai_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict in an OpenAI CLIP checkpoint: a `torch.save`d state dict or a
    `torch.jit.save`d archive (read without `torch.jit.load`; see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} is not a file")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                prefix = _archive_prefix(names)
                if prefix is not None and _is_torchscript(names, prefix):
                    return _read_torchscript(zf, prefix, path)
        except zipfile.BadZipFile as e:
            raise ModelError(f"{path.name}: not a readable checkpoint (bad zip archive: {e})") from None
    return _read_torch_save(path)


def _archive_prefix(names: list[str]) -> str | None:
    """The top folder of a torch zip archive (the one holding data.pkl)."""
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            return parts[0]
    return None


def _is_torchscript(names: list[str], prefix: str) -> bool:
    # torch.serialization._is_torchscript_zip looks for constants.pkl; code/ is the other tell
    return f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names)


def _read_torch_save(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = _unsafe_globals(path)
        if unsafe or "GLOBAL" in str(e):
            what = unsafe[0] if unsafe else "a non-tensor global"
            raise UnsafeCheckpointError(
                f"{path.name}: refusing to load a checkpoint that would import {what} (code execution)"
            ) from None
        raise ModelError(f"{path.name}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise ModelError(f"{path.name}: holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise ModelError(f"{path.name}: holds no tensors")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _unsafe_globals(path: Path) -> list[str]:
    """Globals other than tensor plumbing named by the pickles in a file (scanned, not run)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                blobs = [zf.read(n) for n in zf.namelist() if n.endswith(".pkl")]
        else:
            blobs = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    for blob in blobs:
        found += [g for g in _scan_globals(blob) if not _is_tensor_global(g)]
    return found


def _scan_globals(data: bytes) -> list[str]:
    """Names of the globals in a pickle stream (and the pickles after it: torch's legacy
    format is several pickles back to back), by reading opcodes only."""
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # garbage after (or instead of) a pickle: nothing more to scan
            break
    return found


def _is_tensor_global(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if module == "torch._utils" and attr.startswith("_rebuild_"):
        return True
    if module == "torch":
        return (
            attr in _STORAGE_DTYPES or attr in ("Size", "device") or isinstance(getattr(torch, attr, None), torch.dtype)
        )
    return name in ("collections.OrderedDict", "torch.storage.UntypedStorage", "torch.serialization._get_layout")


# ---------------------------------------------------------------------------------------
# TorchScript archives


class _ScriptObject:
    """An inert stand-in for a `__torch__.*` class: it records its pickled state only."""

    _qualname = "__torch__"

    def __init__(self, *args: Any) -> None:
        self._args = args
        self._state: Any = None

    def __setstate__(self, state: Any) -> None:
        self._state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, storage_offset: int, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise ModelError("malformed TorchScript archive: a tensor without storage")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(storage_offset))


def _rebuild_tensor_v2(
    storage: torch.Tensor,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: torch.Tensor, requires_grad: Any = True, backward_hooks: Any = None) -> torch.Tensor:
    return data


def _rebuild_parameter_with_state(
    data: torch.Tensor, requires_grad: Any, backward_hooks: Any, state: Any = None
) -> torch.Tensor:
    return data


def _identity(x: Any, *args: Any) -> Any:
    return x


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # typed lists / dicts in TorchScript pickles of older torch versions
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_floatlist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}
_ALLOWED.update({("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, load_storage: Any) -> None:
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage
        self._classes: dict[str, type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            cls = self._classes.get(qualname)
            if cls is None:
                cls = type(name, (_ScriptObject,), {"_qualname": qualname})
                self._classes[qualname] = cls
            return cls
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(
                f"refusing to load a TorchScript archive whose data.pkl imports {module}.{name} (code execution)"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ModelError(f"malformed TorchScript archive: unknown persistent id {str(pid)[:80]}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise ModelError("malformed TorchScript archive: storage of an unknown type")
        if not isinstance(numel, int) or numel < 0:
            raise ModelError("malformed TorchScript archive: bad storage size")
        return self._load_storage(str(key), storage_type.dtype, numel)


def _read_torchscript(zf: zipfile.ZipFile, prefix: str, path: Path) -> dict[str, torch.Tensor]:
    cache: dict[str, torch.Tensor] = {}

    def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key not in cache:
            try:
                info = zf.getinfo(f"{prefix}/data/{key}")
            except KeyError:
                raise ModelError(f"{path.name}: TorchScript archive lacks storage {key!r}") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if info.file_size < numel * itemsize:
                raise ModelError(f"{path.name}: storage {key!r} is truncated")
            buf = bytearray(info.file_size)
            with zf.open(info) as f:
                view = memoryview(buf)
                got = 0
                while got < len(buf):
                    n = f.readinto(view[got:])  # type: ignore[attr-defined]  # a ZipExtFile
                    if not n:
                        raise ModelError(f"{path.name}: storage {key!r} is truncated")
                    got += n
            if numel:
                cache[key] = torch.frombuffer(buf, dtype=torch.uint8)[: numel * itemsize].view(dtype)
            else:
                cache[key] = torch.empty(0, dtype=dtype)
        return cache[key]

    try:
        root = _RestrictedUnpickler(zf.read(f"{prefix}/data.pkl"), load_storage).load()
    except (UnsafeCheckpointError, ModelError):
        raise
    except Exception as e:
        raise ModelError(f"{path.name}: not a readable TorchScript archive ({_first_line(e)})") from None
    state: dict[str, torch.Tensor] = {}
    _walk(root, "", state, set())
    if not state:
        raise ModelError(f"{path.name}: TorchScript archive holds no tensors")
    return state


def _walk(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """Collect the tensor attributes of a recorded module tree under dotted names."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, _ScriptObject):
        obj = obj._state
    if not isinstance(obj, dict):
        return
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value
        elif isinstance(value, _ScriptObject):
            _walk(value, f"{prefix}{key}.", out, seen)


# ---------------------------------------------------------------------------------------
# mapping into transformers


def openai_to_hf(state_dict: dict[str, torch.Tensor], *, num_heads: int | None = None) -> tuple[Any, dict]:
    """A `CLIPVisionConfig` and a state dict for `CLIPVisionModelWithProjection`, from the
    vision tower of an OpenAI CLIP state dict (keys `visual.*`, or a bare `VisionTransformer`'s).

    Heads default to width // 64 (OpenAI's rule for every released ViT). Tensors keep
    their stored dtype.
    """
    from transformers import CLIPVisionConfig

    sd = state_dict
    if "visual.conv1.weight" in sd:
        p = "visual."
    elif "conv1.weight" in sd and "transformer.resblocks.0.attn.in_proj_weight" in sd:
        p = ""
    elif any(k.startswith("visual.layer1.") for k in sd):
        raise ModelError("OpenAI ResNet CLIP checkpoints (RN50, ...) are not supported; use a ViT model")
    else:
        raise ModelError("not an OpenAI CLIP checkpoint: no visual.conv1.weight")

    def get(key: str) -> torch.Tensor:
        try:
            return sd[p + key]
        except KeyError:
            raise ModelError(f"OpenAI CLIP checkpoint lacks {p + key}") from None

    conv = get("conv1.weight")
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise ModelError(f"unexpected {p}conv1.weight shape {tuple(conv.shape)}")
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    block = f"{p}transformer.resblocks."
    layers = len({k[len(block) :].split(".")[0] for k in sd if k.startswith(block)})
    if layers == 0:
        raise ModelError(f"OpenAI CLIP checkpoint has no {block}* weights")
    n_pos = int(get("positional_embedding").shape[0])
    grid = math.isqrt(n_pos - 1)
    if grid * grid + 1 != n_pos:
        raise ModelError(f"{p}positional_embedding has {n_pos} rows, not a square grid plus one")
    proj = get("proj")
    heads = num_heads if num_heads is not None else max(1, width // 64)
    if width % heads:
        raise ModelError(f"width {width} is not divisible by {heads} heads")
    intermediate = int(get("transformer.resblocks.0.mlp.c_fc.weight").shape[0])

    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        projection_dim=int(proj.shape[1]),
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        num_channels=int(conv.shape[1]),
    )

    v = "vision_model."
    out: dict[str, torch.Tensor] = {
        f"{v}embeddings.patch_embedding.weight": conv,
        f"{v}embeddings.class_embedding": get("class_embedding"),
        f"{v}embeddings.position_embedding.weight": get("positional_embedding"),
        f"{v}pre_layrnorm.weight": get("ln_pre.weight"),
        f"{v}pre_layrnorm.bias": get("ln_pre.bias"),
        f"{v}post_layernorm.weight": get("ln_post.weight"),
        f"{v}post_layernorm.bias": get("ln_post.bias"),
        "visual_projection.weight": proj.t().contiguous(),
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        in_w, in_b = get(src + "attn.in_proj_weight"), get(src + "attn.in_proj_bias")
        if in_w.shape[0] != 3 * width or in_b.shape[0] != 3 * width:
            raise ModelError(f"unexpected {p}{src}attn.in_proj_weight shape {tuple(in_w.shape)}")
        for name, w, b in zip(("q", "k", "v"), in_w.chunk(3), in_b.chunk(3), strict=True):
            out[f"{dst}self_attn.{name}_proj.weight"] = w.contiguous()
            out[f"{dst}self_attn.{name}_proj.bias"] = b.contiguous()
        for a, c in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
            ("ln_2", "layer_norm2"),
        ):
            out[f"{dst}{c}.weight"] = get(f"{src}{a}.weight")
            out[f"{dst}{c}.bias"] = get(f"{src}{a}.bias")
    return config, out


def _no_init() -> contextlib.AbstractContextManager:
    import importlib

    for where in ("transformers.initialization", "transformers.modeling_utils"):  # 5.x, 4.x
        try:
            no_init_weights: Any = importlib.import_module(where).no_init_weights
        except (ImportError, AttributeError):
            continue
        return no_init_weights()
    return contextlib.nullcontext()


def load_openai_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[Any, dict[str, str]]:
    """A `CLIPVisionModelWithProjection` (eval mode, CPU, `dtype`) holding an OpenAI CLIP
    checkpoint's vision tower, and a source record: kind, absolute path, sha256."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path).expanduser().resolve()
    config, weights = openai_to_hf(read_openai_state_dict(path))
    config._attn_implementation = "sdpa"
    with _no_init():
        model = CLIPVisionModelWithProjection(config)
    # every persistent tensor comes from the checkpoint (checked below), so skipping init is safe
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ModelError(f"{path.name}: weights do not fit CLIPVisionModelWithProjection (e.g. {bad})")
    emb = model.vision_model.embeddings
    emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))  # a buffer, not in the state dict
    torch.nn.Module.to(model, dtype=dtype).eval()  # transformers' typed `to` wrapper confuses mypy
    from featstore.fingerprint import CONTENT_KEY, checkpoint_fingerprint, file_sha256

    source = {"kind": "openai-checkpoint", "path": str(path), "sha256": file_sha256(path)}
    source[CONTENT_KEY] = checkpoint_fingerprint(path)
    return model, source
