"""`ModelSpec`: the frozen record featstore keeps for one registered name, and the size rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featstore.errors import ConfigError
from featstore.images import DEFAULT_PREPROCESS, Preprocess

if TYPE_CHECKING:
    from featstore.models.family import Family

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What featstore needs to know about one vision transformer (or one preset)."""

    name: str
    family: str  # a key of featstore.models.family.FAMILIES
    source: str  # Hugging Face repo id, local folder or checkpoint file
    patch_size: int
    native_size: int  # the resolution its position embeddings were trained at
    default_size: int  # the --size used when none is given
    hidden_dim: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    embed_dim: int | None = None  # CLIP projection width
    num_registers: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra_config: tuple[tuple[str, Any], ...] = field(default=())  # architecture keys beyond the above
    cls_token: bool = True  # SigLIP has none: every token is a patch
    preprocess: Preprocess = DEFAULT_PREPROCESS
    layers: tuple[int, ...] = ()  # a preset's --layers; () = the family's standard output
    norm: str = ""  # a preset's --norm; "" = the family's standard output
    preset: str = ""  # for presets: what they reproduce exactly
    gated: bool = False  # the hub asks users to accept a licence before downloading

    @property
    def adapter(self) -> Family:
        from featstore.models.family import FAMILIES

        return FAMILIES[self.family]

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens: dropped before reshaping to a grid."""
        return int(self.cls_token) + self.num_registers

    def grid(self, size: int) -> int:
        check_size(self, size)
        return size // self.patch_size

    def out_dim(self, clip_output: str = "raw") -> int:
        if clip_output == "projected":
            if not self.adapter.offers_projected or self.embed_dim is None:
                raise ConfigError(
                    f"--clip-output projected needs a CLIP model; {self.name} is {self.family} (drop --clip-output)"
                )
            return self.embed_dim
        return self.hidden_dim

    def feature_type(self, clip_output: str = "raw") -> str:
        return self.adapter.feature_type(clip_output)

    def embedding_dim(self) -> int:
        """Width of the pooled embedding (CLIP: the projection; others: the hidden size)."""
        return self.adapter.embedding_dim(self)


def check_size(spec: ModelSpec, size: int) -> None:
    p = spec.patch_size
    if size <= 0 or size % p:
        lower = max(p, (size // p) * p)
        upper = lower + p if lower < size else lower
        options = sorted({lower, upper})
        raise ConfigError(
            f"--size {size} is not a multiple of {spec.name}'s patch size {p}; "
            f"nearest valid sizes: {' or '.join(map(str, options))}"
        )
