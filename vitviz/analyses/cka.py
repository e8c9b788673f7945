"""Linear CKA between every block of model A and every block of model B over the same images (docs/design.md,
"Linear CKA"): which of B's layers represent the images as which of A's do (Kornblith et al. 2019)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, PairContext, PairStream
from vitviz.errors import VitvizError

if TYPE_CHECKING:
    import torch

    from vitviz.models import LoadedModel

MIN_BATCH = 4  # the unbiased HSIC divides by b(b - 3) and (b - 1)(b - 2)


@dataclass(frozen=True)
class CkaResult:
    """CKA of block l of model A with block m of model B, [L_A, L_B], over `num_images` images in minibatches."""

    matrix: np.ndarray  # [L_A, L_B] float64 (NaN where a layer's representation is constant over the images)
    batch_size: int  # b: images per minibatch
    num_images: int  # images that entered the estimate
    dropped_images: int  # the last minibatch's images when it held fewer than MIN_BATCH

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "matrix": self.matrix,
            "batch_size": np.asarray(self.batch_size),
            "num_images": np.asarray(self.num_images),
            "dropped_images": np.asarray(self.dropped_images),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> CkaResult:
        return cls(
            matrix=np.asarray(arrays["matrix"], dtype=np.float64),
            batch_size=int(arrays["batch_size"]),
            num_images=int(arrays["num_images"]),
            dropped_images=int(arrays["dropped_images"]),
        )


def unbiased_hsic(grams_k: torch.Tensor, grams_l: torch.Tensor) -> torch.Tensor:
    """HSIC₁ (Song et al. 2012) of every Gram matrix K of `grams_k` [P, b, b] with every L of `grams_l` [Q, b, b]:
    [P, Q].

    With K̃, L̃ the Gram matrices with their diagonals set to 0:
    [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((b−1)(b−2)) − 2/(b−2) · 1ᵀK̃L̃1] / (b(b−3)). Gram matrices are symmetric, so
    tr(K̃L̃) is the sum of the elementwise product and 1ᵀK̃L̃1 the dot product of the row sums.
    """
    import torch

    b = grams_k.shape[-1]
    eye = torch.eye(b, dtype=torch.bool)
    k = grams_k.masked_fill(eye, 0.0)
    m = grams_l.masked_fill(eye, 0.0)
    trace = torch.einsum("pij,qij->pq", k, m)
    rows_k, rows_l = k.sum(dim=2), m.sum(dim=2)
    totals = torch.outer(rows_k.sum(dim=1), rows_l.sum(dim=1)) / ((b - 1) * (b - 2))
    cross = rows_k @ rows_l.T
    return (trace + totals - 2.0 / (b - 2) * cross) / (b * (b - 3))


class _Grams:
    """Each block's Gram matrix X Xᵀ [b, b] of the current batch: tokens flattened, float32 then float64."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.grams: dict[int, torch.Tensor] = {}

    def consume(self, layer: int, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(x.shape[0], -1).double().cpu()
        self.grams[layer] = flat @ flat.T

    def take(self) -> torch.Tensor:
        """[depth, b, b], and forget them."""
        import torch

        missing = [layer for layer in range(self.depth) if layer not in self.grams]
        if missing:
            raise RuntimeError(f"no output was seen from block(s) {missing}")
        stacked = torch.stack([self.grams[layer] for layer in range(self.depth)])
        self.grams.clear()
        return stacked


class _CkaStream(PairStream):
    """Per minibatch, HSIC₁ of every pair of layers (and of each layer with itself) added to float64 sums."""

    def __init__(self, context: PairContext) -> None:
        import torch

        self.batch_size = int(context.options.batch_size)
        self.a, self.b = _Grams(_depth(context.loaded_a)), _Grams(_depth(context.loaded_b))
        self.blocks_a, self.blocks_b = (self.a,), (self.b,)
        self.xy = torch.zeros(self.a.depth, self.b.depth, dtype=torch.float64)
        self.xx = torch.zeros(self.a.depth, dtype=torch.float64)
        self.yy = torch.zeros(self.b.depth, dtype=torch.float64)
        self.num_images = 0
        self.dropped = 0

    def after_batch(self, size: int) -> None:
        grams_a, grams_b = self.a.take(), self.b.take()
        if size < MIN_BATCH:  # only the last minibatch can be this small
            self.dropped += size
            return
        self.xy += unbiased_hsic(grams_a, grams_b)
        self.xx += unbiased_hsic(grams_a, grams_a).diagonal()
        self.yy += unbiased_hsic(grams_b, grams_b).diagonal()
        self.num_images += size

    def result(self) -> CkaResult:
        if self.num_images == 0:
            raise VitvizError(f"linear CKA needs at least {MIN_BATCH} images, got {self.dropped}")
        denominator = (self.xx[:, None] * self.yy[None, :]).sqrt()
        matrix = (self.xy / denominator).numpy()  # the minibatch count cancels out of the means
        matrix[~(denominator.numpy() > 0)] = np.nan
        return CkaResult(matrix, self.batch_size, self.num_images, self.dropped)


def _depth(loaded: LoadedModel) -> int:
    return len(getattr(loaded.model, "blocks", []))


def _no_blocks(loaded: LoadedModel) -> str | None:
    return None if _depth(loaded) else "the model has no transformer blocks"


def _check(_loaded: LoadedModel, options: Any) -> None:
    if options.batch_size < MIN_BATCH:
        raise VitvizError(
            f"--batch-size must be at least {MIN_BATCH} for linear CKA (the unbiased HSIC of a minibatch of b "
            f"images divides by b(b-3)), got {options.batch_size}"
        )


def _json(result: CkaResult, _images: Sequence[str]) -> dict[str, Any]:
    return {
        "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in result.matrix],
        "batch_size": result.batch_size,
        "num_images": result.num_images,
        "dropped_images": result.dropped_images,
    }


def _figures(result: CkaResult, context: FigureContext) -> Figures:
    from vitviz.plots import comparison

    other = context.other if context.other is not None else context.loaded
    yield "cka", comparison.cka_figure(result.matrix, name_a=context.loaded.source, name_b=other.source)


ANALYSIS = register(
    Analysis(
        name="cka",
        section="cka",
        summary="linear CKA of every block of model A with every block of model B (same images)",
        order=10,
        pair=_CkaStream,
        not_applicable=_no_blocks,
        check_model=_check,
        to_json=_json,
        figures=_figures,
        from_arrays=CkaResult.from_arrays,
    )
)
