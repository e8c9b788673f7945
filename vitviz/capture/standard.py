"""timm's standard attention forwards, read by the fused-SDPA interception (``core.plain_hooks``).

``Attention``, ``RelPosAttention``, ``EvaAttention`` and ``AttentionRope`` pass q, k, v (rope already applied),
the mask or bias and nothing else to one ``scaled_dot_product_attention`` call (or their probabilities through
attn_drop), so the explicit computation reproduces them exactly; the mode spans ``k_norm`` to ``proj`` (rope,
when the block has it, is applied in between). BEiT's attention has no ``k_norm`` and may run its qkv projection
as F.linear, so there the span is its whole forward up to ``proj``; its relative-position bias (own table plus
the shared one) reaches the call as its float mask. Subclasses that keep the forward are read too; any other
forward is left to the other readers, or refused.
"""

from __future__ import annotations

from timm.layers.attention import Attention, AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.vision_transformer_relpos import RelPosAttention
from torch import nn

from vitviz.capture.core import AttentionSite, Reader

KNORM_TO_PROJ = (Attention.forward, RelPosAttention.forward, EvaAttention.forward, AttentionRope.forward)


def plain_site(attn: nn.Module) -> AttentionSite:
    """q, k, v exist after k_norm (rope, when present, is applied after it and before the call)."""
    return AttentionSite(attn, attn.k_norm, False, attn.proj, attn.attn_drop)


def _attention_site(block: nn.Module, model: nn.Module) -> AttentionSite | None:
    attn = getattr(block, "attn", None)
    if attn is None or type(attn).forward not in KNORM_TO_PROJ:
        return None
    return plain_site(attn)


def _beit_site(block: nn.Module, model: nn.Module) -> AttentionSite | None:
    attn = getattr(block, "attn", None)
    if attn is None or type(attn).forward is not BeitAttention.forward:
        return None
    return AttentionSite(attn, attn, True, attn.proj, attn.attn_drop)


ATTENTION = Reader("timm Attention, RelPosAttention, EvaAttention, AttentionRope", _attention_site)
BEIT = Reader("BEiT attention (relative-position bias)", _beit_site)
