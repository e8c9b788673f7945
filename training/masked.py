"""Self-supervised masked patch prediction (ViT paper, appendix B.1.2).

Half of the patch embeddings of every image are corrupted: of those, 80% are replaced by a learnable
[mask] embedding, 10% by the embedding of another (random) patch of the same image and 10% are left as
they are. The model predicts each corrupted patch's mean colour, quantised to 3 bits per channel (512
classes), from its output token through a linear head.

The corruption is applied to the output of the model's own `patch_embed` (a forward hook for the length
of one call), and the rest is the model's own `forward_features`. So this runs through the same timm
modules as classification, whatever the position-embedding variant or stem, and the trained model is an
ordinary project ViT (its `head` has 512 outputs) that `finetune` can start from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from training.config import MaskedConfig
from vitviz.tokens import token_layout


@dataclass(frozen=True)
class Corruption:
    """Which patch embeddings to corrupt and how, for a batch; all shaped [B, N] over patch tokens."""

    corrupted: torch.Tensor  # bool: the patches whose colour is predicted
    use_mask: torch.Tensor  # bool: replaced by the [mask] embedding
    use_random: torch.Tensor  # bool: replaced by the embedding of patch `random_source`
    random_source: torch.Tensor  # long: another patch of the same image

    def to(self, device: torch.device) -> Corruption:
        return Corruption(*(t.to(device) for t in (self.corrupted, self.use_mask, self.use_random, self.random_source)))

    def rows(self, index: torch.Tensor | slice) -> Corruption:
        """The corruption of a subset of the images (e.g. one rank's or one micro-batch's)."""
        return Corruption(
            self.corrupted[index], self.use_mask[index], self.use_random[index], self.random_source[index]
        )


def sample_corruption(batch_size: int, num_patches: int, cfg: MaskedConfig, generator: torch.Generator) -> Corruption:
    """Draw a corruption on CPU: exactly round(mask_ratio * N) corrupted patches per image, then 80/10/10."""
    num_corrupted = max(1, round(cfg.mask_ratio * num_patches))
    order = torch.rand(batch_size, num_patches, generator=generator).argsort(dim=1)  # (B, N) random permutation
    corrupted = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    corrupted.scatter_(1, order[:, :num_corrupted], True)
    kind = torch.rand(batch_size, num_patches, generator=generator)  # (B, N) uniform in [0, 1)
    use_mask = corrupted & (kind < cfg.replace_with_mask)
    use_random = corrupted & (kind >= cfg.replace_with_mask) & (kind < cfg.replace_with_mask + cfg.replace_with_random)
    # Another patch of the same image: a non-zero offset modulo N never points at the patch itself.
    offset = torch.randint(1, max(2, num_patches), (batch_size, num_patches), generator=generator)
    random_source = (torch.arange(num_patches)[None, :] + offset) % num_patches
    return Corruption(corrupted, use_mask, use_random, random_source)


def colour_targets(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, stride: tuple[int, int], bits: int
) -> torch.Tensor:
    """Class of each patch's mean colour: images [B, C, H, W] normalised -> long [B, gh*gw].

    Pixels are un-normalised back to [0, 1]; the mean R, G, B of each patch (grey images count as R = G = B)
    is quantised to `bits` bits each, and the class is (r << 2*bits) | (g << bits) | b.
    """
    pixels = (images.float() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    means = F.avg_pool2d(pixels[:, :3], kernel_size=stride, stride=stride)  # (B, 3, gh, gw)
    levels = 2**bits
    quantised = (means * levels).floor().clamp(0, levels - 1).long()  # (B, 3, gh, gw)
    classes = (quantised[:, 0] << (2 * bits)) | (quantised[:, 1] << bits) | quantised[:, 2]  # (B, gh, gw)
    return classes.flatten(1)  # (B, gh*gw)


def colour_class_names(bits: int) -> list[str]:
    """Names of the colour classes, "rgb-R-G-B" with each level in 0 .. 2**bits - 1."""
    levels = 2**bits
    return [f"rgb-{r}-{g}-{b}" for r in range(levels) for g in range(levels) for b in range(levels)]


class MaskedPatchModel(nn.Module):
    """A project ViT plus the learnable [mask] embedding; forward gives colour logits for every patch."""

    def __init__(self, vit: nn.Module, cfg: MaskedConfig) -> None:
        super().__init__()
        self.vit = vit
        self.cfg = cfg
        self.layout = token_layout(vit)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))  # (1, 1, D)
        trunc_normal_(self.mask_token, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.layout.num_patches

    def forward(
        self,
        images: torch.Tensor,
        use_mask: torch.Tensor,
        use_random: torch.Tensor,
        random_source: torch.Tensor,
    ) -> torch.Tensor:
        """Colour logits [B, N, classes] for every patch token, with the given corruption applied."""

        def corrupt(_module: nn.Module, _inputs: object, tokens: torch.Tensor) -> torch.Tensor:
            # tokens: (B, N, D) patch embeddings, before position embeddings and prefix tokens.
            source = torch.gather(tokens, 1, random_source[..., None].expand(-1, -1, tokens.shape[-1]))
            tokens = torch.where(use_random[..., None], source, tokens)
            return torch.where(use_mask[..., None], self.mask_token.to(tokens.dtype), tokens)

        handle = self.vit.patch_embed.register_forward_hook(corrupt)
        try:
            features = self.vit.forward_features(images)  # (B, prefix + N, D)
        finally:
            handle.remove()
        patches = features[:, self.layout.num_prefix_tokens :]  # (B, N, D)
        return self.vit.head(self.vit.head_drop(self.vit.fc_norm(patches)))  # (B, N, classes)
