"""Position-embedding similarity (ViT paper, Fig. 7 centre).

The input is the table of patch-position embeddings only, [gh*gw, D] in row-major grid order, with prefix
positions already dropped and fixed or factorised embeddings already materialised (the models package
provides it). S[i, j] = <e_i, e_j> / (|e_i| |e_j|), shaped [gh, gw, gh, gw].
"""

from __future__ import annotations

import torch

__all__ = ["position_similarity"]


def position_similarity(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity [gh, gw, gh, gw] (float64) of every patch position with every other.

    A position whose embedding is all zeros has similarity 0 with everything, itself included.
    """
    gh, gw = grid
    if table.dim() != 2 or table.shape[0] != gh * gw:
        raise ValueError(f"expected a [{gh * gw}, D] table for grid {grid}, got shape {tuple(table.shape)}")
    embeddings = table.detach().to(torch.float64)
    norms = embeddings.norm(dim=1, keepdim=True)
    unit = embeddings / torch.where(norms > 0, norms, 1.0)
    similarity = unit @ unit.T  # (gh*gw, gh*gw)
    return similarity.reshape(gh, gw, gh, gw)
