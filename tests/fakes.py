"""Stand-ins the tests share."""

from __future__ import annotations

import torch
from torch import nn


class OpaqueAttention(nn.Module):
    """An attention vitviz has never seen (no k_norm, no proj, no probabilities to read): capture must refuse it
    in one line naming its class, never crash."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x)
