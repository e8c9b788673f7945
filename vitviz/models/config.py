"""The architecture of a project ViT as one frozen, validated dataclass.

A `ViTConfig` holds everything needed to rebuild a model (it travels inside every checkpoint), and it is
checked completely in `__post_init__`, so a hostile or mistyped config fails with one `VitvizError` before a
single tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vitviz.errors import VitvizError

POS_EMBED_KINDS = ("learned", "learned_2d", "sincos", "none", "relative")
STEM_KINDS = ("patch", "hybrid")
HEAD_KINDS = ("linear", "pretrain")
GLOBAL_POOL_KINDS = ("token", "avg")

# Generous ceilings that still stop a config from asking for an absurd allocation. ViT-e (3.9B parameters,
# width 1792, 56 layers) fits; a depth of 10**6 or a width of 10**5 does not.
MAX_IMG_SIDE = 8192
MAX_TOKENS = 65536
MAX_EMBED_DIM = 8192
MAX_DEPTH = 256
MAX_HEADS = 256
MAX_MLP_RATIO = 64.0
MAX_CLASSES = 100_000
MAX_REG_TOKENS = 64
MAX_PARAMS = 4_000_000_000

# The hybrid stem is timm's ResNetV2: its stem divides the image by 4 and every stage after the first by 2.
HYBRID_STEM_STRIDE = 4
HYBRID_MAX_STAGES = 4


def hybrid_stride(num_stages: int) -> int:
    """Total stride (pixels per feature-map cell) of a ResNetV2 hybrid stem with `num_stages` stages."""
    return HYBRID_STEM_STRIDE * 2 ** (num_stages - 1)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a project Vision Transformer (defaults: ViT-Ti/16 at 224 px, ImageNet-1k head)."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) input pixels; H and W may differ, each divisible by the stride
    patch_size: int = 16  # pixels per token along each axis (for a hybrid stem: the CNN's total stride)
    in_chans: int = 3  # input channels: 3 for RGB, 1 for greyscale
    num_classes: int = 1000  # classifier outputs; 0 means no head (features only)
    embed_dim: int = 192  # D, token width (ViT-Ti 192, ViT-S 384, ViT-B 768)
    depth: int = 12  # L, number of transformer blocks
    num_heads: int = 3  # H, attention heads per block; must divide embed_dim
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * embed_dim, as in the paper
    qkv_bias: bool = True  # bias on the query/key/value projection (timm and the paper's JAX code use one)
    drop_rate: float = 0.0  # dropout after the position embedding, after every MLP/projection and before the head
    attn_drop_rate: float = 0.0  # dropout on the attention probabilities
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this rate at the last block
    class_token: bool = True  # prepend a learned [class] token (the paper's default)
    global_pool: str = (
        "token"  # "token": classify from the class token (needs class_token); "avg": mean of patch tokens
    )
    reg_tokens: int = 0  # register tokens (Darcet et al. 2024), placed after the class token
    # "learned": one learned 1D table (the paper's default) | "learned_2d": factorised X and Y tables of width D/2,
    # concatenated | "sincos": fixed 2D sin-cos | "none" | "relative": timm's learned relative-position bias
    pos_embed: str = "learned"
    stem: str = "patch"  # "patch": linear patch projection | "hybrid": ResNetV2 whose feature-map cells are the tokens
    hybrid_layers: tuple[int, ...] = (2, 2)  # ResNetV2 blocks per stage; stride 4 * 2**(stages-1) must equal patch_size
    head: str = (
        "linear"  # "linear" classifier | "pretrain": the paper's pre-training head (tanh hidden layer of width D)
    )

    def __post_init__(self) -> None:
        # Normalise JSON-ish input (lists, ints for floats) so equal configs compare and hash equal.
        object.__setattr__(self, "img_size", _int_pair("img_size", self.img_size))
        object.__setattr__(self, "hybrid_layers", _int_tuple("hybrid_layers", self.hybrid_layers))
        for name in ("mlp_ratio", "drop_rate", "attn_drop_rate", "drop_path_rate"):
            object.__setattr__(self, name, _float(name, getattr(self, name)))
        for name in ("patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "reg_tokens"):
            _check_int(name, getattr(self, name))
        for name in ("qkv_bias", "class_token"):
            if not isinstance(getattr(self, name), bool):
                raise VitvizError(f"config field {name} must be true or false, got {getattr(self, name)!r}")
        for name, allowed in (
            ("global_pool", GLOBAL_POOL_KINDS),
            ("pos_embed", POS_EMBED_KINDS),
            ("stem", STEM_KINDS),
            ("head", HEAD_KINDS),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise VitvizError(f"config field {name} must be one of {', '.join(allowed)}; got {value!r}")
        self._check_ranges()
        self._check_combinations()

    def _check_ranges(self) -> None:
        height, width = self.img_size
        _check_range("img_size", height, 1, MAX_IMG_SIDE)
        _check_range("img_size", width, 1, MAX_IMG_SIDE)
        _check_range("patch_size", self.patch_size, 1, min(height, width))
        if self.in_chans not in (1, 3):
            raise VitvizError(f"config field in_chans must be 1 (greyscale) or 3 (RGB); got {self.in_chans}")
        _check_range("num_classes", self.num_classes, 0, MAX_CLASSES)
        _check_range("embed_dim", self.embed_dim, 1, MAX_EMBED_DIM)
        _check_range("depth", self.depth, 1, MAX_DEPTH)
        _check_range("num_heads", self.num_heads, 1, MAX_HEADS)
        _check_range("reg_tokens", self.reg_tokens, 0, MAX_REG_TOKENS)
        if not 0.0 < self.mlp_ratio <= MAX_MLP_RATIO:
            raise VitvizError(f"config field mlp_ratio must be in (0, {MAX_MLP_RATIO:g}]; got {self.mlp_ratio}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise VitvizError(f"config field {name} must be in [0, 1); got {getattr(self, name)}")
        if len(self.hybrid_layers) == 0 or len(self.hybrid_layers) > HYBRID_MAX_STAGES:
            raise VitvizError(
                f"config field hybrid_layers needs 1 to {HYBRID_MAX_STAGES} stages; got {self.hybrid_layers}"
            )
        for blocks in self.hybrid_layers:
            _check_range("hybrid_layers", blocks, 1, 64)

    def _check_combinations(self) -> None:
        height, width = self.img_size
        if height % self.patch_size or width % self.patch_size:
            raise VitvizError(
                f"img_size {height}x{width} is not divisible by patch_size {self.patch_size}; "
                "pick a size that is a multiple of the patch size"
            )
        num_tokens = (height // self.patch_size) * (width // self.patch_size)
        if num_tokens > MAX_TOKENS:
            raise VitvizError(f"img_size / patch_size gives {num_tokens} tokens; at most {MAX_TOKENS} are supported")
        if self.embed_dim % self.num_heads:
            raise VitvizError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool == "token" and not self.class_token:
            raise VitvizError('global_pool "token" needs class_token=true; use global_pool "avg" without a class token')
        if self.pos_embed == "learned_2d" and self.embed_dim % 2:
            raise VitvizError(f'pos_embed "learned_2d" needs an even embed_dim (two halves); got {self.embed_dim}')
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise VitvizError(f'pos_embed "sincos" needs embed_dim divisible by 4; got {self.embed_dim}')
        if self.pos_embed == "relative" and self.reg_tokens:
            raise VitvizError('pos_embed "relative" (timm VisionTransformerRelPos) does not support register tokens')
        if self.stem == "hybrid":
            stride = hybrid_stride(len(self.hybrid_layers))
            if stride != self.patch_size:
                stages = {hybrid_stride(n): n for n in range(1, HYBRID_MAX_STAGES + 1)}
                hint = (
                    f"use {stages[self.patch_size]} stages for patch_size {self.patch_size}"
                    if self.patch_size in stages
                    else f"patch_size must be one of {sorted(stages)}"
                )
                raise VitvizError(
                    f"a hybrid stem with {len(self.hybrid_layers)} stages has stride {stride}, "
                    f"but patch_size is {self.patch_size}; {hint}"
                )
        params = self.approx_num_params()
        if params > MAX_PARAMS:
            raise VitvizError(
                f"this config would have about {params:.3g} parameters; at most {MAX_PARAMS:.3g} are supported"
            )

    def approx_num_params(self) -> int:
        """Rough parameter count (transformer blocks, embeddings and head) used to refuse absurd configs."""
        width = self.embed_dim
        hidden = int(width * self.mlp_ratio)
        per_block = 4 * width * width + 2 * width * hidden
        tokens = (self.img_size[0] // self.patch_size) * (self.img_size[1] // self.patch_size)
        embed = self.in_chans * self.patch_size**2 * width + tokens * width
        return self.depth * per_block + embed + (width + 1) * self.num_classes

    @property
    def grid_size(self) -> tuple[int, int]:
        """(gh, gw): the patch grid this config produces."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists) that `from_dict` turns back into an equal config."""
        out = dataclasses.asdict(self)
        out["img_size"] = list(self.img_size)
        out["hybrid_layers"] = list(self.hybrid_layers)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        """Build a config from JSON data, refusing unknown keys, wrong types and absurd values."""
        if not isinstance(d, dict):
            raise VitvizError(f"a model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise VitvizError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


def _check_int(name: str, value: object) -> None:
    # bool is an int subclass; true/false for a count is a type error, not a 1 or 0.
    if not isinstance(value, int) or isinstance(value, bool):
        raise VitvizError(f"config field {name} must be an integer, got {value!r}")


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise VitvizError(f"config field {name} must be between {low} and {high}; got {value}")


def _float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VitvizError(f"config field {name} must be a finite number, got {value!r}")
    return float(value)


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise VitvizError(f"config field {name} must be a list of integers, got {value!r}")
    for item in value:
        _check_int(name, item)
    return tuple(value)


def _int_pair(name: str, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    pair = _int_tuple(name, value)
    if len(pair) != 2:
        raise VitvizError(f"config field {name} must be [height, width], got {value!r}")
    return (pair[0], pair[1])
