"""The one model factory: `ViTConfig` -> a timm VisionTransformer-family model.

Everything is timm's (VisionTransformer, VisionTransformerRelPos, HybridEmbed over a ResNetV2), so the
model keeps timm's vocabulary (`patch_embed.grid_size`, `num_prefix_tokens`, `blocks[i].attn`, ...) and
`vitviz.tokens.token_layout` reads it like any timm ViT. Only the factorised position embedding and the
paper's pre-training head are added here, as small overrides.
"""

from __future__ import annotations

import difflib
import logging
import socket
from collections import OrderedDict
from functools import partial
from typing import Any

import timm
from timm.layers import HybridEmbed, StdConv2dSame, trunc_normal_
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from vitviz.errors import VitvizError
from vitviz.models.config import ViTConfig
from vitviz.models.posembed import FactorisedPosEmbedViT, sincos_pos_embed
from vitviz.tokens import token_layout

logger = logging.getLogger(__name__)

# Stage widths of the hybrid stem's ResNetV2 (those of ResNet-50, as in the paper's R50+ViT hybrids).
HYBRID_STAGE_CHANNELS = (256, 512, 1024, 2048)


def build_model(cfg: ViTConfig) -> nn.Module:
    """Build a freshly initialised model (train mode) for `cfg`."""
    common: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        global_pool=cfg.global_pool,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        class_token=cfg.class_token,
        drop_rate=cfg.drop_rate,
        proj_drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.stem == "hybrid":
        # Each cell of the ResNet's feature map is one token: a 1x1 "patch" over the feature map.
        common["embed_layer"] = partial(HybridEmbed, backbone=_hybrid_backbone(cfg))
        common["patch_size"] = 1

    if cfg.pos_embed == "relative":
        model: nn.Module = VisionTransformerRelPos(
            **common,
            init_values=None,  # plain pre-norm blocks like the other variants (timm's default adds layer scale)
            fc_norm=cfg.global_pool == "avg",  # same norm placement VisionTransformer picks for each pooling
            rel_pos_type="bias",  # a learned bias table per block, resized by timm when the input size changes
        )
    else:
        vit_args = dict(common, reg_tokens=cfg.reg_tokens, pos_drop_rate=cfg.drop_rate)
        if cfg.pos_embed == "learned_2d":
            model = FactorisedPosEmbedViT(**vit_args)
        elif cfg.pos_embed == "sincos":
            model = VisionTransformer(**vit_args, no_embed_class=True)
            table = sincos_pos_embed(model.patch_embed.grid_size, cfg.embed_dim)  # (gh*gw, D)
            model.pos_embed = nn.Parameter(table[None], requires_grad=False)
        elif cfg.pos_embed == "none":
            model = VisionTransformer(**vit_args, pos_embed="none")
        else:
            model = VisionTransformer(**vit_args)

    if cfg.head == "pretrain" and cfg.num_classes > 0:
        model.head = pretrain_head(cfg.embed_dim, cfg.num_classes)
    return model


def pretrain_head(embed_dim: int, num_classes: int) -> nn.Sequential:
    """The paper's pre-training head: Linear(D, D) -> tanh -> Linear(D, classes), timm-initialised."""
    head = nn.Sequential(
        OrderedDict(
            pre_logits=nn.Linear(embed_dim, embed_dim),
            act=nn.Tanh(),
            fc=nn.Linear(embed_dim, num_classes),
        )
    )
    for layer in (head.pre_logits, head.fc):
        trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    return head


def _hybrid_backbone(cfg: ViTConfig) -> nn.Module:
    """timm's hybrid ResNetV2 (as in `_resnetv2`): StdConv, GroupNorm, no pre-activation, no head."""
    num_stages = len(cfg.hybrid_layers)
    return ResNetV2(
        layers=list(cfg.hybrid_layers),
        channels=HYBRID_STAGE_CHANNELS[:num_stages],
        num_classes=0,
        global_pool="",
        in_chans=cfg.in_chans,
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
    )


def build_timm_model(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Create timm model `name` (train mode); unknown names, non-ViTs and failed downloads raise VitvizError."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise VitvizError(f"unknown timm model {name!r}{hint}")
    if pretrained and not _weights_cached(name) and not weights_host_reachable():
        # Offline, huggingface_hub retries for about a minute before giving up: say so at once instead.
        raise VitvizError(
            f"pretrained weights for timm:{name} could not be downloaded: they need the network and "
            f"{PRETRAINED_HOST[0]} cannot be reached; download them elsewhere and pass --weights FILE"
        )
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise VitvizError(f"timm model {name!r} cannot be built with {kwargs}: {exc}") from None
    except Exception as exc:  # hub/HTTP/offline errors come in many types; all mean "no weights"
        if not pretrained:
            raise
        raise VitvizError(
            f"pretrained weights for timm:{name} could not be downloaded (no network?): "
            f"{type(exc).__name__}; download them elsewhere and pass --weights FILE"
        ) from None
    try:  # the rule every analysis reads tokens by: a fixed patch grid, or NaFlexViT's at its input size
        token_layout(model)
    except TypeError:
        raise VitvizError(f"timm model {name!r} is not a Vision Transformer with a patch grid") from None
    return model


PRETRAINED_HOST = ("huggingface.co", 443)  # where timm fetches pretrained weights
NETWORK_TIMEOUT_S = 3.0


def weights_host_reachable(address: tuple[str, int] = PRETRAINED_HOST, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the weights host opens within `timeout` seconds."""
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def _weights_cached(name: str) -> bool:
    """Whether timm's pretrained weights for `name` are already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    except Exception:  # no hub id (other weight hosts) or an old huggingface_hub: let timm try
        return False
    if not hub_id:
        return False
    hub_id = hub_id.split("@")[0]
    return any(
        isinstance(try_to_load_from_cache(hub_id, filename), str)
        for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
