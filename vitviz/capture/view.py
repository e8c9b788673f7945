"""The capture's own view of a model: plain attention answered without hooks or a torch function mode.

When every layer is a plain site (``core.plain_hooks``: timm's Attention, RelPosAttention, EvaAttention,
AttentionRope and BEiT's attention) held as ``model.blocks[i].attn`` with fused attention on, a capture without
autograd runs a view of the model made for that one forward instead of the model itself. The view is a shallow
copy of the path from the root to each attention module (the root, ``blocks``, each block and its ``attn``);
every other module, and every parameter, buffer and hook dictionary, is the model's own. Each attention copy runs
its class's own ``forward``, the same code, with the globals through which that code reaches
``scaled_dot_product_attention`` (``F``, ``nn`` or ``torch``) seen through a namespace that answers that one
function explicitly (``explicit.answered_attention``, as ``ExplicitAttention`` does) and hands the probabilities
over. The maps are the ones the function mode reads, bit for bit (a test).

Why: the function mode costs Python for every torch call inside its span, and the hooks around it cost a module
call's slow path twice a layer. On EVA-02, whose rope runs about 35 torch calls between ``k_norm`` and the
attention call, that made the capture 15% slower than the view at 32 px, where the forward is almost all
Python (docs/benchmarks.md, "The view"); the view costs the copies of about 2L + 2 modules, once per forward.

Nothing of the model changes and no other thread sees the view. Hooks on the model's blocks, their children or
its final norm fire as in the model's own forward, since the view's modules share the hook dictionaries (the
block-output and feature streams rely on it). Any other model, or a layer read otherwise, takes the hooks
(``CaptureSession.installed``).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.capture.core import AttentionSite, CaptureSession, plain_hooks
from vitviz.capture.explicit import answered_attention


class _Answering:
    """A module seen through: its own attributes, except the one step towards scaled_dot_product_attention."""

    def __init__(self, real: types.ModuleType, **overrides: Any) -> None:
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _answering(real: Any, sdpa: Callable[..., torch.Tensor]) -> Any:
    """What a global of the forward becomes: ``F``, ``nn`` and ``torch`` seen through, the function replaced."""
    if real is F.scaled_dot_product_attention:
        return sdpa
    if real is F:
        return _Answering(F, scaled_dot_product_attention=sdpa)
    if real is nn:
        return _Answering(nn, functional=_answering(F, sdpa))
    return _Answering(torch, nn=_answering(nn, sdpa))


@functools.cache
def _answered_globals(forward: types.FunctionType) -> tuple[str, ...]:
    """The globals of ``forward`` on a path to ``scaled_dot_product_attention``; empty when it reaches the function
    by no global (then the view cannot answer it)."""
    ways = (torch, nn, F, F.scaled_dot_product_attention)
    names = forward.__code__.co_names
    return tuple(name for name in names if any(forward.__globals__.get(name) is way for way in ways))


def _answered_forward(forward: types.FunctionType, deliver: Callable[[torch.Tensor], None]) -> types.FunctionType:
    """``forward``'s own code with its path to ``scaled_dot_product_attention`` answered explicitly."""

    def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
        return answered_attention(deliver, args, kwargs)

    namespace = dict(forward.__globals__)
    for name in _answered_globals(forward):
        namespace[name] = _answering(namespace[name], scaled_dot_product_attention)
    answered = types.FunctionType(
        forward.__code__, namespace, forward.__name__, forward.__defaults__, forward.__closure__
    )
    answered.__kwdefaults__ = forward.__kwdefaults__
    return answered


def _shallow(module: nn.Module) -> nn.Module:
    """A module object of the same class sharing everything with ``module`` but its own dict of children."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__["_modules"] = dict(module._modules)
    return view


def _viewable(model: nn.Module, sites: Sequence[AttentionSite]) -> list[tuple[str, nn.Module]] | None:
    """(key in model.blocks, block) per layer when the view can answer every layer, else None."""
    blocks = model._modules.get("blocks")
    if blocks is None or len(blocks._modules) != len(sites):
        return None
    layers = list(blocks._modules.items())
    for (_key, block), site in zip(layers, sites):
        owner = site.owner
        if (
            site.install is not plain_hooks
            or site.parts
            or site.assemble is not None
            or block is None
            or block._modules.get("attn") is not owner
            or not getattr(owner, "fused_attn", False)
            or "forward" in owner.__dict__
            or not _answered_globals(type(owner).forward)
        ):
            return None
    return layers  # type: ignore[return-value]


@contextmanager
def attention_view(
    model: nn.Module, sites: Sequence[AttentionSite], session: CaptureSession
) -> Iterator[nn.Module | None]:
    """The model's view for one forward delivering every layer to ``session``, or None when a layer is not a
    plain attention held as ``model.blocks[i].attn`` (then the capture installs its hooks). On exit each
    attention copy lets go of its forward, which refers to the copy itself and to the session: the view and the
    consumers are freed as soon as the caller drops them, without waiting for the cyclic garbage collector."""
    layers = _viewable(model, sites)
    if layers is None:
        yield None
        return
    root = _shallow(model)
    blocks = _shallow(model._modules["blocks"])
    root.__dict__["_modules"]["blocks"] = blocks
    answered = []
    for layer_index, (key, block) in enumerate(layers):
        block_view = _shallow(block)
        attn = _shallow(block._modules["attn"])
        deliver = functools.partial(session.deliver, layer_index)
        attn.__dict__["forward"] = types.MethodType(_answered_forward(type(attn).forward, deliver), attn)
        answered.append(attn)
        block_view.__dict__["_modules"]["attn"] = attn
        blocks.__dict__["_modules"][key] = block_view
    try:
        yield root
    finally:
        for attn in answered:
            del attn.__dict__["forward"]
