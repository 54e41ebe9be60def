"""A model family as an adapter: everything featstore does differently per family.

One module per family (clip.py, dinov2.py, dinov3.py, siglip.py) subclasses `Family`,
registers one instance with `register_family` and its names with `register`. The
encoder, the loader and the store code ask the adapter; they hold no family branches.
Transformers and torch are imported inside the methods: reading a store or listing
models never imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from featstore.errors import ConfigError
from featstore.images import Preprocess
from featstore.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch

FAMILIES: dict[str, Family] = {}
REGISTRY: dict[str, ModelSpec] = {}

NORMS = ("model", "none", "plain")


class Family:
    """The contract of one family; subclasses fill in the class attributes and methods."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.json `model_type`s this family reads
    feature_types: ClassVar[dict[str, str]]  # clip_output -> feature_type (raw only, except CLIP)
    standard_norm: ClassVar[str]  # what the family's standard output applies after the last block
    preprocess: ClassVar[Preprocess] = Preprocess()
    # weights whose absence only disables something: prefix -> what it disables
    optional_weights: ClassVar[dict[str, str]] = {}
    embedding_name: ClassVar[str]  # what the pooled embedding is, for the docs and `featstore models`

    @property
    def offers_projected(self) -> bool:
        return "projected" in self.feature_types

    def feature_type(self, clip_output: str) -> str:
        return self.feature_types.get(clip_output, self.feature_types["raw"])

    # -- config <-> spec

    def spec_from_config(self, name: str, source: str, config: dict[str, Any]) -> ModelSpec:
        raise NotImplementedError

    def hf_config(self, spec: ModelSpec) -> Any:
        """A transformers config for the spec's architecture (random weights, benchmarks)."""
        raise NotImplementedError

    def tiny_config(self) -> Any:
        """A few-thousand-parameter config of this family, for tests and smoke runs."""
        raise NotImplementedError

    def model_class(self, spec: ModelSpec) -> Any:
        raise NotImplementedError

    # -- forward

    def forward(self, module: Any, x: torch.Tensor, *, interpolate: bool, hidden_states: bool) -> Any:
        """The model's output object (last_hidden_state, hidden_states when asked, pooled)."""
        raise NotImplementedError

    def standard_tokens(self, module: Any, out: Any, clip_output: str, prefix: int) -> torch.Tensor:
        """The family's standard patch tokens (B, N, C), prefix tokens dropped."""
        return out.last_hidden_state[:, prefix:]

    def final_norm(self, module: Any) -> Any:
        raise NotImplementedError

    def embedding(self, module: Any, out: Any) -> torch.Tensor:
        """(B, E): the pooled embedding the model itself returns."""
        return out.pooler_output

    def embedding_dim(self, spec: ModelSpec) -> int:
        return spec.hidden_dim


def vit_config_fields(spec: ModelSpec) -> dict[str, Any]:
    """The fields every ViT family's transformers config takes from a spec."""
    return dict(
        hidden_size=spec.hidden_dim,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        patch_size=spec.patch_size,
        image_size=spec.native_size,
    )


# A tiny ViT (2 layers, width 32, patch 8 at 32 px): random-weight tests and smoke benchmarks.
TINY_VIT: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32
)


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def register(*specs: ModelSpec) -> None:
    for spec in specs:
        if spec.name in REGISTRY:
            raise ValueError(f"{spec.name} registered twice")
        REGISTRY[spec.name] = spec


def family_for_model_type(model_type: str) -> Family | None:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None


# ---------------------------------------------------------------- which tensor


def parse_layers(text: str) -> tuple[int, ...]:
    """`"4,11,17,23"` -> (4, 11, 17, 23); `-1` is the last block's output."""
    try:
        layers = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected integers separated by commas, e.g. -1 or 4,11,17,23") from None
    if len(set(layers)) != len(layers):
        raise ConfigError(f"--layers {text!r}: a layer is listed twice")
    return layers


def resolve_tensor(spec: ModelSpec, layers: tuple[int, ...] | None, norm: str | None) -> tuple[tuple[int, ...], str]:
    """The (layers, norm) to encode; ((), "") means the family's standard output.

    An explicit choice equal to the standard output is recorded as the standard output,
    so that such stores append to each other.
    """
    layers = tuple(layers) if layers else tuple(spec.layers)
    norm = norm or spec.norm
    if norm and norm not in NORMS:
        raise ConfigError(f"--norm {norm!r}: expected model, none or plain")
    if not layers and not norm:
        return (), ""
    layers = layers or (-1,)
    norm = norm or spec.adapter.standard_norm
    n = spec.num_layers
    for k in layers:
        if not -(n + 1) <= k <= n:
            raise ConfigError(
                f"--layers {k}: {spec.name} has {n} blocks; use 0..{n} (0 = the embeddings) or -1..-{n + 1}"
            )
    if layers in ((-1,), (n,)) and norm == spec.adapter.standard_norm:
        return (), ""
    return layers, norm
