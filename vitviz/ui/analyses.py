"""The image analyses the pages ask for, run through `vitviz.capture` and kept in the on-disk cache.

No streamlit here. Each function feeds the core's streaming consumers (RolloutAccumulator,
DistanceAccumulator, QueryAttention) from one forward, or asks the core for attention gradients, and
returns plain numpy arrays keyed in the disk cache by the model's content hash, the images' content
hashes and every parameter.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vitviz.analysis import (
    DistanceAccumulator,
    RolloutAccumulator,
    gradient_rollout,
    patch_grid,
)
from vitviz.capture import QueryAttention, attention_gradients, capture_attention
from vitviz.images import preprocess, to_display
from vitviz.models import LoadedModel
from vitviz.tokens import token_layout
from vitviz.ui.catalog import cache_dir
from vitviz.ui.diskcache import DiskCache, cache_key

logger = logging.getLogger(__name__)

BATCH_SIZE = 8  # images per forward in the distance analysis


@dataclass(frozen=True)
class InputImage:
    """An image to analyse: decoded upright RGB pixels, a name to show and a content hash for caches."""

    name: str
    digest: str
    pixels: np.ndarray  # uint8 [H, W, 3]


def pixels_digest(pixels: np.ndarray) -> str:
    """Content hash of decoded pixels (for images that do not come from a file)."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def analysis_cache() -> DiskCache:
    return DiskCache(cache_dir() / "analyses")


def model_input(loaded: LoadedModel, image: InputImage) -> torch.Tensor:
    """The image preprocessed for the model (DESIGN.md's preprocessing), [C, H, W]."""
    meta = loaded.meta
    return preprocess(
        Image.fromarray(image.pixels), input_size=meta.input_size, mean=meta.mean, std=meta.std, in_chans=meta.in_chans
    )


def display_picture(loaded: LoadedModel, image: InputImage) -> np.ndarray:
    """What the model sees, as uint8 [H, W, 3] at its input size, for overlays."""
    return to_display(model_input(loaded, image), loaded.meta.mean, loaded.meta.std)


def _device(loaded: LoadedModel) -> torch.device:
    parameter = next(loaded.model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def attention_distance(
    loaded: LoadedModel,
    images: Sequence[InputImage],
    mode: str,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Mean attention distance over `images`: pixels, std, fraction [L, H] and per_image [L, B, H].

    `progress(done, total)` is called after every batch (and once at the end when the result was cached).
    """
    key = cache_key("distance", model=loaded.content_hash, images=[image.digest for image in images], mode=mode)

    def compute() -> dict[str, np.ndarray]:
        layout = token_layout(loaded.model)
        accumulator = DistanceAccumulator(layout, mode=mode)
        device = _device(loaded)
        for start in range(0, len(images), BATCH_SIZE):
            batch = torch.stack([model_input(loaded, image) for image in images[start : start + BATCH_SIZE]])
            capture_attention(loaded.model, batch.to(device), [accumulator], with_logits=False)
            if progress is not None:
                progress(min(start + BATCH_SIZE, len(images)), len(images))
        result = accumulator.result()
        return {
            "pixels": result.pixels.cpu().numpy(),
            "std": result.std.cpu().numpy(),
            "fraction": result.fraction.cpu().numpy(),
            "per_image": result.per_image.cpu().numpy(),
        }

    arrays = analysis_cache().get_or_compute("distance", key, compute)
    if progress is not None:
        progress(len(images), len(images))
    return arrays


def image_attention(
    loaded: LoadedModel,
    image: InputImage,
    *,
    head_fusion: str,
    discard_ratio: float,
    start_layer: int,
    query_index: int,
) -> dict[str, np.ndarray]:
    """One forward: rollout map [gh, gw], class probabilities [K] and the query token's attention [L, H, N]."""
    key = cache_key(
        "image-attention",
        model=loaded.content_hash,
        image=image.digest,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        start_layer=start_layer,
        query_index=query_index,
    )

    def compute() -> dict[str, np.ndarray]:
        layout = token_layout(loaded.model)
        rollout = RolloutAccumulator(
            layout, head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer
        )
        query = QueryAttention(query_index)
        batch = model_input(loaded, image)[None].to(_device(loaded))
        logits = capture_attention(loaded.model, batch, [rollout, query])
        assert logits is not None
        return {
            "rollout": rollout.result()[0].cpu().numpy(),
            "probs": logits.float().softmax(dim=-1)[0].cpu().numpy(),
            "query": query.result()[:, 0].cpu().numpy(),  # (L, H, N)
        }

    return analysis_cache().get_or_compute("image-attention", key, compute)


def gradient_map(loaded: LoadedModel, image: InputImage, target_class: int | None) -> dict[str, np.ndarray]:
    """Gradient-weighted rollout [gh, gw] for `target_class` (None: the predicted class) and the class used."""
    key = cache_key("gradient-rollout", model=loaded.content_hash, image=image.digest, target=target_class)

    def compute() -> dict[str, np.ndarray]:
        layout = token_layout(loaded.model)
        batch = model_input(loaded, image)[None].to(_device(loaded))
        grads = attention_gradients(loaded.model, batch, target_class)
        relevance = gradient_rollout(grads.attentions, grads.gradients, layout)
        return {"map": relevance[0].cpu().numpy(), "target": np.asarray(int(grads.target_class[0]))}

    return analysis_cache().get_or_compute("gradient-rollout", key, compute)


def query_grid(loaded: LoadedModel, query: np.ndarray) -> np.ndarray:
    """A query's attention over all tokens [L, H, N] -> over the patch grid [L, H, gh, gw]."""
    return patch_grid(torch.from_numpy(query), token_layout(loaded.model)).numpy()


def top_classes(probs: np.ndarray, class_names: Sequence[str], k: int = 5) -> list[tuple[int, str, float]]:
    """The k most probable classes as (index, name, probability), most probable first."""
    order = np.argsort(-probs, kind="stable")[: min(k, len(probs))]
    return [(int(i), class_names[i] if i < len(class_names) else str(i), float(probs[i])) for i in order]
