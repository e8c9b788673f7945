"""The ``attnlrp`` map method: AttnLRP (Achtibat et al. 2024) with the rules of the lxt package.

Relevance starts as the target logit (every other logit 0) and flows back to the token sequence the first block
reads (patch embeddings with their position embeddings, and the prefix tokens): the map is each patch token's
relevance summed over its channels [gh, gw]; the prefix tokens' relevance is not drawn. Rules, each lxt's own
(``lxt.explicit``): epsilon rule for every linear layer, the residual additions and the mean pooling; the attention
products q k^T and A v by the uniform-epsilon rule (each factor gets half); the softmax by its Taylor decomposition
at the scores; LayerNorm by the identity rule on the division by the standard deviation; the identity rule for the
MLP's activation and for LayerScale. Conservation: the relevance over the input sums to the target logit, less what
the biases (and the softmax's own bias term) absorb.

Why not ``lxt.efficient.monkey_patch``, lxt's entry point for ViTs: it patches torchvision's VisionTransformer
classes only (no timm or transformers ViT), it patches classes process-wide (``torch.nn.LayerNorm.forward``
among them), and lxt 2.1's ``lxt.efficient`` does not import under transformers 5. So the rules are applied here by
re-running the model's own blocks through ``lxt.explicit.functional``, with the model's own weights, detached: the
model is never patched or changed.

Applies to timm's VisionTransformer with plain blocks (LayerNorm, Attention, Mlp, optional LayerScale), any patch
embedding, class token or none, registers, token or average pooling; anything else gets a one-line reason.
Registered in vitviz.methods.
"""

from __future__ import annotations

import torch
from torch import nn

from vitviz.methods import GRADIENT, MapBatch, register_method
from vitviz.models import any_training

__all__ = ["EXPLAINED", "lrp_logits", "token_relevance"]

EXPLAINED = "timm's VisionTransformer with plain blocks (LayerNorm, Attention, Mlp, LayerScale)"
POOLS = ("token", "avg")


def _not_applicable(model: nn.Module) -> str | None:
    from timm.layers import Attention, LayerScale, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    why = f"attnlrp has rules for {EXPLAINED} only"
    if type(model) is not VisionTransformer:
        return f"{type(model).__name__} is not timm's VisionTransformer: {why}"
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in POOLS:
        return f"{type(model).__name__} pools with {model.global_pool!r}: attnlrp follows token or avg pooling only"
    if getattr(model, "pool_include_prefix", False):
        return f"{type(model).__name__} pools over its prefix tokens too: attnlrp follows patch-token pooling only"
    parts: list[tuple[str, nn.Module, tuple[type, ...]]] = [
        ("norm_pre", model.norm_pre, (nn.Identity, nn.LayerNorm)),
        ("norm", model.norm, (nn.Identity, nn.LayerNorm)),
        ("fc_norm", model.fc_norm, (nn.Identity, nn.LayerNorm)),
        ("head", model.head, (nn.Linear,)),
    ]
    for index, block in enumerate(model.blocks):
        name = f"blocks.{index}"
        if type(block) is not Block:
            return f"{name} is a {type(block).__name__}: {why}"
        attn, mlp = block.attn, block.mlp
        if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
            return f"{name}.attn is a {type(attn).__name__}{' with a gate' if type(attn) is Attention else ''}: {why}"
        if type(mlp) is not Mlp:
            return f"{name}.mlp is a {type(mlp).__name__}: {why}"
        parts += [
            (f"{name}.norm1", block.norm1, (nn.LayerNorm,)),
            (f"{name}.norm2", block.norm2, (nn.LayerNorm,)),
            (f"{name}.ls1", block.ls1, (nn.Identity, LayerScale)),
            (f"{name}.ls2", block.ls2, (nn.Identity, LayerScale)),
            (f"{name}.attn.q_norm", attn.q_norm, (nn.Identity,)),
            (f"{name}.attn.k_norm", attn.k_norm, (nn.Identity,)),
            (f"{name}.attn.norm", attn.norm, (nn.Identity,)),
            (f"{name}.mlp.fc1", mlp.fc1, (nn.Linear,)),
            (f"{name}.mlp.norm", mlp.norm, (nn.Identity,)),
            (f"{name}.mlp.fc2", mlp.fc2, (nn.Linear,)),
        ]
    for name, module, allowed in parts:
        if not any(isinstance(module, a) for a in allowed):
            return f"{name} is a {type(module).__name__}: {why}"
    return None


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    import lxt.explicit.functional as lf

    return lf.linear_epsilon(x, layer.weight.detach(), _detached(layer.bias))


def _norm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import lxt.explicit.functional as lf

    if isinstance(layer, nn.Identity):
        return x
    assert isinstance(layer, nn.LayerNorm)
    return lf.layer_norm(x, _detached(layer.weight), _detached(layer.bias), layer.eps)


def _scale(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerScale: the identity rule (a constant factor per channel)."""
    import lxt.explicit.functional as lf

    if isinstance(layer, nn.Identity):
        return x
    return lf.mul2(x, layer.gamma.detach())


def _attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import lxt.explicit.functional as lf

    batch, count, _ = x.shape
    qkv = _linear(attn.qkv, x).reshape(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    scores = lf.matmul(q, k.transpose(-2, -1))
    probabilities = lf.softmax(scores, -1, temperature=1.0 / attn.scale)  # softmax(scale * q k^T)
    out = lf.matmul(probabilities, v).transpose(1, 2).reshape(batch, count, -1)
    return _linear(attn.proj, out)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from lxt.explicit.rules import identity

    return _linear(mlp.fc2, identity(mlp.act, _linear(mlp.fc1, x)))


def lrp_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits [B, classes] from the tokens [B, N, D] its first block reads, through lxt's rules: the
    same numbers as the model's own forward; a backward of relevance gives relevance instead of gradients."""
    import lxt.explicit.functional as lf

    x = _norm(model.norm_pre, tokens)
    for block in model.blocks:
        x = lf.add2(x, _scale(block.ls1, _attention(block.attn, _norm(block.norm1, x))))
        x = lf.add2(x, _scale(block.ls2, _mlp(block.mlp, _norm(block.norm2, x))))
    x = _norm(model.norm, x)
    x = lf.mean(x[:, model.num_prefix_tokens :], 1, False) if model.global_pool == "avg" else x[:, 0]
    return _linear(model.head, _norm(model.fc_norm, x))


def input_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, N, D]: what the model's first block reads (patch embedding, position embeddings, prefix tokens)."""
    with torch.no_grad():
        return model.patch_drop(model._pos_embed(model.patch_embed(images)))


def token_relevance(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnLRP relevance of every input token [B, N, D] and the target logits [B] it explains."""
    if any_training(model):
        raise ValueError("attnlrp needs model.eval()")
    with torch.inference_mode(False), torch.enable_grad():
        tokens = input_tokens(model, images.detach().clone()).detach().clone().requires_grad_(True)
        logits = lrp_logits(model, tokens)
        chosen = torch.zeros_like(logits)
        rows = torch.arange(logits.shape[0], device=logits.device)
        chosen[rows, targets] = logits.detach()[rows, targets]
        (relevance,) = torch.autograd.grad(logits, tokens, chosen)
    return relevance.detach(), logits.detach()[rows, targets]


@register_method(
    "attnlrp",
    label="AttnLRP",
    kind=GRADIENT,
    description="AttnLRP (Achtibat et al. 2024), lxt's rules: the target logit's relevance of each patch token "
    "entering the first block (one forward and one backward).",
    needs_logits=True,
    default=False,
    applies=_not_applicable,
)
def _attnlrp(batch: MapBatch) -> torch.Tensor:
    relevance, _ = token_relevance(batch.model, batch.images, batch.targets)
    patches = relevance.sum(dim=-1)[:, batch.layout.num_prefix_tokens :]
    return patches.reshape(patches.shape[0], *batch.layout.grid).to(torch.float64)
