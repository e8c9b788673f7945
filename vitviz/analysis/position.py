"""Position-embedding similarity (ViT paper, Fig. 7 centre).

The input is the table of patch-position embeddings only, [gh*gw, D] in row-major grid order, with prefix
positions already dropped and fixed or factorised embeddings already materialised (the models package
provides it). S[i, j] = <e_i, e_j> / (|e_i| |e_j|), shaped [gh, gw, gh, gw].
"""

from __future__ import annotations

import torch

__all__ = ["position_similarity", "similarity_mosaic"]


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


def similarity_mosaic(similarity: torch.Tensor, *, separator: int = 1, fill: float = float("nan")) -> torch.Tensor:
    """The paper's grid of tiles as one 2-D array: tile (r, c) shows similarity[r, c] (a [gh, gw] map).

    Tiles are separated by ``separator`` rows/columns of ``fill`` (NaN draws as blank in heatmaps), so the
    result is [gh*gh + (gh-1)*separator, gw*gw + (gw-1)*separator].
    """
    gh, gw = similarity.shape[:2]
    if similarity.shape != (gh, gw, gh, gw):
        raise ValueError(f"expected a [gh, gw, gh, gw] similarity, got shape {tuple(similarity.shape)}")
    if separator < 0:
        raise ValueError(f"separator must be >= 0, got {separator}")
    step_h, step_w = gh + separator, gw + separator
    mosaic = torch.full(
        (gh * step_h - separator, gw * step_w - separator), fill, dtype=similarity.dtype, device=similarity.device
    )
    for row in range(gh):
        for col in range(gw):
            mosaic[row * step_h : row * step_h + gh, col * step_w : col * step_w + gw] = similarity[row, col]
    return mosaic
