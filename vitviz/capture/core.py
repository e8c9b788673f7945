"""The capture's core: where a layer's attention is read (``AttentionSite``), which family reads which block
(``Reader``, declared by each family module and listed in ``readers.READERS``), and the hooks of one capture
(``CaptureSession``), installed under ``HOOK_LOCK`` and acting only in the thread that installed them.

A site is read by its ``install``: the hooks it puts on the model for one session. The plain reading
(``plain_hooks``) is the fused-SDPA interception: ``ExplicitAttention`` is entered after ``enter`` runs (before
it, when ``enter_before``) and left before ``exit`` runs; with the owner's ``fused_attn`` off the probabilities
are read where timm's non-fused path passes them, through ``drop`` (timm's attn_drop). Families whose attention
is more than one plain call bring their own ``install`` and mode (``span_hooks``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitviz.capture.explicit import ExplicitAttention
from vitviz.errors import VitvizError

# torch's RemovableHandle ids and hook dictionaries are updated without a lock; serialise our own updates.
HOOK_LOCK = threading.Lock()

Handles = list[torch.utils.hooks.RemovableHandle]


def plain_hooks(session: CaptureSession, layer_index: int, site: AttentionSite) -> Handles:
    """One attention call read by ``ExplicitAttention`` from ``enter`` to ``exit``; with fused attention off, the
    probabilities timm passes through ``drop``."""
    if not site.owner.fused_attn:
        return [site.drop.register_forward_hook(session.unfused_hook(layer_index))]
    # The mode spans k_norm's output to proj's input: the attention call and the few reshapes around it.
    # Spanning the whole module would also route qkv and proj through it, which costs about 2% of a ViT-S/16
    # forward at batch 1 (measured) for nothing. Both forwards call proj after the attention; if the forward
    # raises in between, the mode is left when the session's hooks are removed.
    enter = session.enter_hook(layer_index)
    if site.enter_before:
        handle = site.enter.register_forward_pre_hook(enter)
    else:
        handle = site.enter.register_forward_hook(enter)
    return [handle, site.exit.register_forward_pre_hook(session.exit_hook)]


@dataclass(frozen=True)
class AttentionSite:
    """Where one layer's attention is read, and how (``install``: the hooks a session puts on the model)."""

    owner: nn.Module  # the module holding fused_attn: the attention module, or a parallel block
    enter: nn.Module
    enter_before: bool
    exit: nn.Module
    drop: nn.Module
    install: Callable[[CaptureSession, int, AttentionSite], Handles] = plain_hooks
    block: nn.Module | None = None  # the block, for readers that need its input (SAM's grid)
    # Layers read as several tensors, or as one that is not yet the map over the whole sequence (parallel branches,
    # CaiT): ``assemble(read, maps)`` makes the layer's map from what was read (maps=True) and, from the gradients
    # of those tensors, the map's gradient (maps=False: zero where the map is fixed, such as identity rows).
    parts: tuple[AttentionSite, ...] = ()  # the branches' own plain sites, read in order (ParallelThingsBlock)
    assemble: Callable[[Sequence[torch.Tensor], bool], torch.Tensor] | None = None
    class_queries_only: bool = False  # only the class token queries (CaiT's class attention)


@dataclass(frozen=True)
class Reader:
    """One family's reader, declared by its module and listed once in ``readers.READERS``.

    ``site(block, model)``: the block's attention site when the block is of this family, else None.
    ``layers(model)``, for a family read as a whole model: the modules read as layers 0..L-1, in order, when the
    model is of this family (this reader alone then reads them), else None. Any other model's layers are its
    ``model.blocks``, each read by the first reader whose ``site`` takes it.
    """

    family: str
    site: Callable[[nn.Module, nn.Module], AttentionSite | None]
    layers: Callable[[nn.Module], Sequence[nn.Module] | None] | None = None


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{architecture} ({type(model).__name__})" if architecture else type(model).__name__


def transformer_blocks(model: nn.Module) -> nn.Module:
    """``model.blocks``, refused with one line when the model has none."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module) or len(blocks) == 0:
        raise VitvizError(
            f"{model_name(model)} has no transformer blocks (model.blocks); "
            "vitviz reads attention from timm VisionTransformer-family models"
        )
    return blocks


class CaptureSession:
    """Hooks for one capture: they act only in the thread that created the session."""

    def __init__(
        self,
        sites: Sequence[AttentionSite],
        on_attention: Callable[[int, torch.Tensor], None],
        keep_read: bool = False,
    ) -> None:
        self.sites = list(sites)
        self.on_attention = on_attention
        self.pending: dict[int, list[torch.Tensor]] = {}  # a layer's tensors read so far (assembled sites)
        self.read: list[list[torch.Tensor]] | None = [] if keep_read else None  # per layer, the tensors read
        self.owner = threading.get_ident()
        self.active_modes: list[ExplicitAttention] = []
        self.layers_seen: list[int] = []

    def deliver(self, layer_index: int, attn: torch.Tensor) -> None:
        site = self.sites[layer_index]
        if site.assemble is None:
            read = [attn]
        else:  # the layer's map is made from its tensors once all have been read
            read = self.pending.setdefault(layer_index, [])
            read.append(attn)
            if len(read) < max(1, len(site.parts)):
                return
            del self.pending[layer_index]
            attn = site.assemble(read, True)
        if self.read is not None:
            self.read.append(read)
        self.layers_seen.append(layer_index)
        self.on_attention(layer_index, attn)

    def enter_hook(self, layer_index: int) -> Callable[..., None]:
        # A forward hook of the attention's k_norm: q, k and v exist and the attention call comes next.
        # Variadic: hooks of other threads' sessions may be called with either hook signature while
        # a registration or removal is half-way through in another thread.
        mode = ExplicitAttention(functools.partial(self.deliver, layer_index))  # entered once per forward

        def hook(module: nn.Module, *_rest: Any) -> None:
            if threading.get_ident() != self.owner:
                return None
            mode.__enter__()
            self.active_modes.append(mode)
            return None

        return hook

    def exit_hook(self, module: nn.Module, *_rest: Any) -> None:
        # A forward pre-hook of the attention's proj.
        if threading.get_ident() == self.owner and self.active_modes:
            self.active_modes.pop().__exit__(None, None, None)

    def unfused_hook(self, layer_index: int) -> Callable[..., None]:
        # timm's non-fused path (fused_attn off) passes the probabilities through attn_drop: read them there.
        def hook(module: nn.Module, args: Any, *rest: Any) -> None:
            if threading.get_ident() == self.owner:
                self.deliver(layer_index, rest[-1])
            return None

        return hook

    def span_hooks(self, site: AttentionSite, mode: ExplicitAttention, fused: bool) -> Handles:
        """A reader's own mode, spanning the attention call(s) to the product with v: from ``enter``'s output
        (fused path) or ``drop``'s (non-fused path, after timm's softmax) to ``exit``."""

        def enter(module: nn.Module, *_rest: Any) -> None:
            if threading.get_ident() == self.owner:
                mode.__enter__()
                self.active_modes.append(mode)
            return None

        return [
            (site.enter if fused else site.drop).register_forward_hook(enter),
            site.exit.register_forward_pre_hook(self.exit_hook),
        ]

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Install the hooks for the duration of the block; they are removed however it exits."""
        handles: Handles = []
        try:
            with HOOK_LOCK:
                for layer_index, site in enumerate(self.sites):
                    handles.extend(site.install(self, layer_index, site))
            yield
        finally:
            while self.active_modes:  # a forward that raised inside an attention module
                self.active_modes.pop().__exit__(None, None, None)
            with HOOK_LOCK:
                for handle in handles:
                    handle.remove()

    def check_complete(self) -> None:
        expected = list(range(len(self.sites)))
        if self.layers_seen != expected:
            raise RuntimeError(f"captured layers {self.layers_seen}, expected {expected}")
