"""SAM's attention (timm's vision_transformer_sam), read by a mode of its own.

A block attends within windows of w x w tokens of its [B, H, W, C] grid, padded with zero tokens to whole windows
(or, with window size 0, over the whole grid), with the decomposed relative-position bias added to the logits.
The capture hands over the map over the real grid, [B, heads, N, N] with N = H * W: the windows placed on the
real token grid (docs/design.md, "Attention in every timm family"). The block's pre-hook records its input grid;
the mode spans the attention call to ``proj``, from ``k_norm`` (fused path) or ``attn_drop`` (non-fused path).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import Block as SamBlock
from torch import nn

from vitviz.capture.core import AttentionSite, CaptureSession, Handles, Reader
from vitviz.capture.explicit import MATMUL, ExplicitAttention, explicit_probabilities, sdpa_arguments


@functools.lru_cache(maxsize=8)
def _window_pairs(
    height: int, width: int, window: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's windows over an H x W grid (padded at the bottom and right to whole windows, windows in row-major
    order, tokens row-major inside each, as timm's window_partition does): (src, dst, real) where src indexes the
    (query, key) pairs of real tokens in the flat windows' maps [num_windows * n * n], dst the same pairs in the
    flat grid map [N * N] (N = H * W), and real is the bool mask of src over the windows' maps."""
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    ys = torch.arange(padded_h)[:, None]
    xs = torch.arange(padded_w)[None, :]
    position = torch.where((ys < height) & (xs < width), ys * width + xs, -1)  # grid index, -1 on padding
    tokens = window * window
    windows = position.view(padded_h // window, window, padded_w // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, tokens)  # (num_windows, n)
    queries, keys = windows[:, :, None].expand(-1, -1, tokens), windows[:, None, :].expand(-1, tokens, -1)
    real = ((queries >= 0) & (keys >= 0)).reshape(-1)
    src = torch.nonzero(real).squeeze(1)
    dst = (queries * (height * width) + keys).reshape(-1)[real]
    return src.to(device), dst.to(device), real.to(device)


class WindowedAttention(ExplicitAttention):
    """SAM's attention (timm's vision_transformer_sam): a block attends within windows of w x w tokens of its
    [B, H, W, C] grid, padded with zero tokens to whole windows (or, with window size 0, over the whole grid),
    with the decomposed relative-position bias added to the logits. Hands over the map over the real grid,
    [B, heads, N, N] with N = H * W: a global block's probabilities as they are; a windowed block's windows
    placed at their tokens' grid positions, zero between windows, pad keys left out (so a query row of a window
    that holds padding sums to 1 minus what it gives the pad tokens).

    Fused path (entered after k_norm): the attention call is computed explicitly. Non-fused path (entered after
    attn_drop): the first product in the span is timm's own probabilities @ v. Either way the output is the
    windows' probabilities @ v as timm's non-fused path computes it; under autograd the windows are read back
    from the grid map (pad keys from the probabilities), so the grid map's gradient is the model's.
    """

    def __init__(self, deliver: Callable[[torch.Tensor], None], heads: int, window: int, fused: bool) -> None:
        super().__init__(deliver)
        self.heads = heads
        self.window = window
        self.fused = fused
        self.grid: tuple[int, int, int] | None = None  # (B, H, W) of the block's input, set by its pre-hook
        self._done = False

    def __enter__(self) -> WindowedAttention:
        self._done = False
        return super().__enter__()

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._done:
            return func(*args, **kwargs)
        if self.fused and func is F.scaled_dot_product_attention:
            named = sdpa_arguments(args, kwargs)  # q, k, v [B' * heads, n, d]; the bias [B' * heads, n, n]
            query, key, value = named.pop("query"), named.pop("key"), named.pop("value")
            tokens = query.shape[-2]
            if named.get("attn_mask") is not None:
                named["attn_mask"] = named["attn_mask"].reshape(-1, self.heads, tokens, tokens)
            probabilities = explicit_probabilities(
                query.reshape(-1, self.heads, tokens, query.shape[-1]),
                key.reshape(-1, self.heads, tokens, key.shape[-1]),
                **named,
            )
            return self._read(probabilities, value)
        if not self.fused and func in MATMUL:
            probabilities, value = args[0], args[1]
            tokens = probabilities.shape[-1]
            return self._read(probabilities.reshape(-1, self.heads, tokens, tokens), value)
        return func(*args, **kwargs)

    def _read(self, probabilities: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Deliver the grid map of the windows' probabilities [B', heads, n, n]; return them @ v."""
        self._done = True
        if self.grid is None:
            raise RuntimeError("SAM block input grid not recorded")
        batch, height, width = self.grid
        tokens = probabilities.shape[-1]
        if self.window == 0:
            self.deliver(probabilities)  # the whole grid: [B, heads, N, N]
        else:
            src, dst, real = _window_pairs(height, width, self.window, probabilities.device)
            num_windows = probabilities.shape[0] // batch
            flat = tokens * tokens
            windows = probabilities.reshape(batch, num_windows, self.heads, flat).transpose(1, 2)
            windows = windows.reshape(batch, self.heads, num_windows * flat)
            pairs = windows.index_select(-1, src)
            num_tokens = height * width
            grid_map = probabilities.new_zeros(batch, self.heads, num_tokens * num_tokens)
            if not torch.is_grad_enabled():
                grid_map.index_copy_(-1, dst, pairs)
                self.deliver(grid_map.view(batch, self.heads, num_tokens, num_tokens))
            else:
                square = grid_map.index_copy(-1, dst, pairs).view(batch, self.heads, num_tokens, num_tokens)
                self.deliver(square)
                # The windows again, real pairs read from the delivered map: the same values, and the output
                # depends on that map, so autograd gives its gradient (zero between windows).
                again = square.reshape(batch, self.heads, num_tokens * num_tokens).index_select(-1, dst)
                windows = windows.masked_fill(real, 0.0).index_copy(-1, src, again)
                probabilities = windows.view(batch, self.heads, num_windows, tokens, tokens).transpose(1, 2)
                probabilities = probabilities.reshape(batch * num_windows, self.heads, tokens, tokens)
        output = probabilities @ value.reshape(-1, self.heads, tokens, value.shape[-1])
        return output.reshape(*value.shape[:-1], value.shape[-1])


def _windowed_hooks(session: CaptureSession, layer_index: int, site: AttentionSite) -> Handles:
    assert site.block is not None
    fused = bool(site.owner.fused_attn)
    deliver = functools.partial(session.deliver, layer_index)
    windowed = WindowedAttention(deliver, site.owner.num_heads, int(site.block.window_size), fused)

    def grid_hook(module: nn.Module, args: Any, *_rest: Any) -> None:
        if threading.get_ident() == session.owner:
            windowed.grid = tuple(args[0].shape[:3])  # the block's input [B, H, W, C]
        return None

    return [site.block.register_forward_pre_hook(grid_hook), *session.span_hooks(site, windowed, fused)]


def _site(block: nn.Module, model: nn.Module) -> AttentionSite | None:
    """Windowed (or global) attention over SAM's [B, H, W, C] grid; the block holds the window size."""
    attn = getattr(block, "attn", None)
    if attn is None or type(attn).forward is not SamAttention.forward or type(block).forward is not SamBlock.forward:
        return None
    return AttentionSite(attn, attn.k_norm, False, attn.proj, attn.attn_drop, install=_windowed_hooks, block=block)


READER = Reader("SAM attention (windows over the token grid)", _site)
