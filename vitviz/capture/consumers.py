"""Consumers of the captured attention: each gets every layer's [B, H, N, N] in order, 0 to L-1, once per
forward, as soon as it exists, and the tensor is dropped after (analysis/ holds the rollout and distance
accumulators). Consumers may be fed several forwards in a row (batches of one image set); each documents how it
combines them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from vitviz.errors import VitvizError


class AttentionConsumer(Protocol):
    """Receives each layer's attention [B, H, N, N] as it is produced; must not keep it unless it means to, and
    must not change it: the forward goes on with it (its product with v comes after)."""

    def consume(self, layer_index: int, attn: torch.Tensor) -> None: ...

    def result(self) -> Any: ...


class KeepAllAttention:
    """Keeps every layer's attention; for small models and tests. Several forwards concatenate over images."""

    def __init__(self) -> None:
        self._layers: dict[int, list[torch.Tensor]] = {}

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        self._layers.setdefault(layer_index, []).append(attn)

    def result(self) -> list[torch.Tensor]:
        """L tensors [B, H, N, N], layer order (one forward's maps as they were captured, without a copy)."""
        return [_joined(self._layers[layer]) for layer in sorted(self._layers)]


class QueryAttention:
    """Keeps one query token's attention row in every layer and head: attn[:, :, query_index, :].

    Several forwards concatenate over images.
    """

    def __init__(self, query_index: int) -> None:
        self.query_index = query_index
        self._layers: dict[int, list[torch.Tensor]] = {}

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        num_tokens = attn.shape[-1]
        if not -num_tokens <= self.query_index < num_tokens:
            raise VitvizError(f"query token {self.query_index} does not exist: the model has {num_tokens} tokens")
        # clone so the row does not keep the whole [B, H, N, N] storage alive
        self._layers.setdefault(layer_index, []).append(attn[:, :, self.query_index, :].clone())

    def result(self) -> torch.Tensor:
        """[L, B, H, N]: the query's attention over all tokens, prefix tokens first."""
        return torch.stack([_joined(self._layers[layer]) for layer in sorted(self._layers)])


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Several forwards' tensors concatenated over images; one forward's tensor itself (a copy of a [B, H, N, N]
    map per layer costs about a sixth of a ViT-Ti forward at batch 1)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
