"""Attention capture: the one way vitviz reads post-softmax attention out of a timm ViT.

The model keeps its fused attention: nothing on it is flipped or replaced. While an attention module runs in
the capturing thread, from its ``k_norm`` to its output projection ``proj`` (rope, when the block has it, is
applied in between; BEiT's attention has no ``k_norm``, so there the span is its whole forward up to ``proj``;
timm's ParallelScalingBlock spans ``k_norm`` to its MLP activation), a torch function mode (modes are
per thread) catches its call to ``scaled_dot_product_attention`` and computes it explicitly, once, as timm's
non-fused path does (scale, q @ k^T, attention mask or relative-position bias, softmax, @ v): the
probabilities [B, H, N, N] are handed over and the module continues with the same output. So the attention is
computed once, not fused and then again for capture. Without autograd, a model whose every layer is such a
plain attention held as ``model.blocks[i].attn`` runs instead as a view made for the forward (view.py): the
same attention code with its call answered by the same explicit computation, and no hook or mode at all. A
module whose ``fused_attn`` is off is read where timm's non-fused path passes its probabilities, through
``attn_drop``. A wrapped Hugging Face model
(``vitviz.models.hf``, eager attention) is read from what each attention module returns, (output, probabilities).
Differential attention hands over S1 - lambda S2, the map that multiplies v, and SAM's windowed attention its
windows placed on the real token grid (docs/design.md, "Attention in every timm family"). A ParallelThingsBlock's
branches are each read as above and handed over side by side along the head axis, [B, K*H, N, N]. CaiT has no
attention call in its self-attention blocks: their softmax before the heads are mixed is read where proj_w takes
it (timm's own tensor); its class-attention blocks are read as any attention call. Every CaiT layer is handed over
as a map over [class, patches]: the class token its own row while it is not in the sequence, the patches their
own rows in the class-attention layers (which come after model.blocks: L = depth + depth_token_only).

Each layer's attention is handed to the consumers as soon as it exists and then dropped, so the extra memory
is about one layer's attention whatever the depth. A consumer is any object with
``consume(layer_index, attn) -> None`` and ``result()``; layers arrive in order, 0 to L-1, once per forward.
Consumers may be fed several forwards in a row (batches of one image set); each documents how it combines them.

The package keeps one module per model family, as timm keeps a file per family, around a small core:
    core.py          where a layer is read (AttentionSite), the family declaration (Reader), the hooks of one
                     capture (CaptureSession) and HOOK_LOCK
    explicit.py      the attention call computed explicitly (the torch function mode every reader enters)
    view.py          the view of a plain model: its attention forwards answered without hooks or the mode
    readers.py       READERS, the declared list of family readers, and what it says about a model
    consumers.py     AttentionConsumer, KeepAllAttention, QueryAttention
    api.py           capture_attention, attention_maps, attention_gradients
    standard.py      timm Attention, RelPosAttention, EvaAttention, AttentionRope; BEiT
    parallel.py      ParallelScalingBlock; ParallelThingsBlock's branches
    differential.py  DiffAttention, DiffParallelScalingBlock
    sam.py           SAM's windowed attention
    cait.py          CaiT's talking heads and class attention
    hf.py            a wrapped Hugging Face model's eager attention
A new family is one module declaring its Reader plus one line in readers.READERS.

Public API:
    capture_attention(model, images, consumers, *, with_logits=True) -> logits [B, classes] or None
    attention_maps(model, images) -> list of L tensors [B, H, N, N]
    attention_gradients(model, images, target_class=None) -> AttentionGradients(logits, target_class,
        attentions, gradients), gradients = d logit_c / d attn per layer
    attention_modules(model) -> the attention module of every block, checked to be capturable (a module vitviz
        cannot read exactly is refused with one line naming the model and the attention class)
    unreadable_reason(model) -> None, or that line: lets a caller mark the attention analyses not applicable
    class_attention_layers(model) -> the layers in which only the class token queries (CaiT's class attention)
    KeepAllAttention, QueryAttention: consumers (analysis/ holds the rollout and distance accumulators)

Sharing one model: the app serves several sessions from one cached model in several threads. A view is the
capturing thread's own object and changes nothing on the model. Hooks are registered and removed under a lock
(torch's hook bookkeeping is not thread-safe), act only on forwards of the thread that installed them, and are
removed on every exit path. The model's parameters, their
``requires_grad``, its buffers and its train/eval mode are never changed. The model must be in eval mode:
in training mode dropout makes attention random and BatchNorm in hybrid stems would update its statistics.

Gradients: ``attention_gradients`` enables autograd locally (also under a caller's ``torch.no_grad`` or
``torch.inference_mode``). The explicit attention above is differentiable, so every layer's probabilities
sit in the autograd graph and feed the rest of the forward; the gradients come from ``torch.autograd.grad``
with respect to those tensors only, so no ``.grad`` of any parameter is touched.
"""

from __future__ import annotations

from vitviz.capture.api import AttentionGradients, attention_gradients, attention_maps, capture_attention
from vitviz.capture.consumers import AttentionConsumer, KeepAllAttention, QueryAttention
from vitviz.capture.core import HOOK_LOCK
from vitviz.capture.readers import attention_depth, attention_modules, class_attention_layers, unreadable_reason

__all__ = [
    "HOOK_LOCK",
    "AttentionConsumer",
    "AttentionGradients",
    "KeepAllAttention",
    "QueryAttention",
    "attention_depth",
    "attention_gradients",
    "attention_maps",
    "attention_modules",
    "capture_attention",
    "class_attention_layers",
    "unreadable_reason",
]
