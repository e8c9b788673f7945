"""Evaluate a checkpoint on a dataset split: accuracy, per-class accuracy, confusion matrix, on datasets
with object masks the attention-rollout pointing game beside the random-patch baseline, and on the first
`faithfulness_images` images the deletion and insertion AUCs of rollout, gradient rollout and the random map.

The images go through the same preprocessing the studio uses (`training.data.eval_transform`), the rollout
is the registered map method's (`vitviz.methods`: one capture forward gives it and the logits) and the
curves are `vitviz.faithfulness`'s `run_faithfulness` with the same options as `python -m vitviz
faithfulness`, so the numbers here are the ones the app and the CLI give for the same checkpoint and images
(on the same device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from training.data import build_dataset, eval_transform
from training.distributed import resolve_device
from vitviz.analysis.rollout import pointing_game
from vitviz.errors import VitvizError
from vitviz.faithfulness import FaithfulnessOptions, FaithfulnessResult, parse_methods, run_faithfulness
from vitviz.methods import attention_maps_and_logits
from vitviz.models import load_model
from vitviz.tokens import token_layout

FAITHFULNESS_IMAGES = 100  # images whose deletion and insertion curves are computed (2(S+1) forwards per method)
FAITHFULNESS_METHODS = ("rollout", "gradient-rollout", "random")


def evaluate_checkpoint(
    source: str,
    *,
    dataset: str,
    split: str = "test",
    root: str | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    faithfulness_images: int = FAITHFULNESS_IMAGES,
    faithfulness_steps: int | None = None,
    faithfulness_methods: str | Sequence[str] = FAITHFULNESS_METHODS,
) -> dict[str, Any]:
    """Evaluate a model source (checkpoint file or run folder) and return the evaluation JSON document.

    The deletion and insertion curves run on the first `faithfulness_images` images of the split (0: none),
    each costing 2(S+1) forwards per method; `batch_size` is also their forward batch, as `--batch-size` is
    for `python -m vitviz faithfulness` (both default to 64).
    """
    if batch_size <= 0:
        raise VitvizError(f"--batch-size must be positive, got {batch_size}")
    if faithfulness_images < 0:
        raise VitvizError(f"--faithfulness-images must be 0 or more, got {faithfulness_images}")
    if faithfulness_steps is not None and faithfulness_steps < 1:
        raise VitvizError(f"--faithfulness-steps must be at least 1, got {faithfulness_steps}")
    curves = FaithfulnessOptions(
        methods=tuple(parse_methods(faithfulness_methods)), steps=faithfulness_steps, batch_size=batch_size
    )
    loaded = load_model(source)
    model, meta = loaded.model, loaded.meta
    if meta.training.get("objective") == "masked":
        raise VitvizError(f"{source} was trained for masked patch prediction; fine-tune it for classification first")
    data = build_dataset(dataset, split=split, img_size=meta.input_size, root=root, num_samples=num_samples, seed=seed)
    class_names = list(data.class_names)
    if class_names != list(meta.class_names):
        raise VitvizError(
            f"the model predicts {len(meta.class_names)} classes ({_preview(meta.class_names)}) but {dataset} has "
            f"{len(class_names)} ({_preview(class_names)}); evaluate on the dataset it was trained for"
        )
    torch_device = resolve_device(device)
    model.to(torch_device).eval()
    transform = eval_transform(input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std)
    layout = token_layout(model)
    with_masks = bool(getattr(data, "has_masks", False))

    num_classes = len(class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    hits: list[torch.Tensor] = []
    chances: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []  # the first faithfulness_images preprocessed images, for the curves
    for start in range(0, len(data), batch_size):
        indices = range(start, min(start + batch_size, len(data)))
        samples = [data[i] for i in indices]
        images = torch.stack([transform(image) for image, _ in samples]).to(torch_device)  # (B, C, H, W)
        labels = torch.tensor([int(label) for _, label in samples])
        wanted = faithfulness_images - sum(len(k) for k in kept)
        if wanted > 0:
            kept.append(images[:wanted])
        if with_masks:
            maps, logits = attention_maps_and_logits(model, images, ["rollout"])
            masks = torch.stack([_mask_at(data.mask(i), meta.input_size) for i in indices])  # (B, H, W)
            game = pointing_game(maps["rollout"].cpu(), masks, layout.stride)
            hits.append(game.hits)
            chances.append(game.random_chance)
        else:
            with torch.no_grad():
                logits = model(images)
        predictions = logits.argmax(dim=-1).cpu()  # type: ignore[union-attr]
        pairs = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)  # (true, predicted)
        confusion += pairs.reshape(num_classes, num_classes)

    total = int(confusion.sum())
    per_class = {}
    for index, name in enumerate(class_names):
        row = int(confusion[index].sum())
        per_class[name] = float(confusion[index, index]) / row if row else None
    result: dict[str, Any] = {
        "model": source,
        "dataset": dataset,
        "split": split,
        "num_images": total,
        "accuracy": float(confusion.diag().sum()) / total if total else None,
        "per_class_accuracy": per_class,
        "class_names": class_names,
        "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted class
    }
    if with_masks and hits:
        result["pointing_game"] = {
            "rollout": float(torch.cat(hits).double().mean()),
            "random": float(torch.cat(chances).mean()),
            "num_images": total,
        }
    if kept:
        chosen = torch.cat(kept)
        names = [f"{dataset}/{split}/{index}" for index in range(len(chosen))]
        result["faithfulness"] = faithfulness_section(run_faithfulness(model, chosen, names, curves))
    return result


def faithfulness_section(result: FaithfulnessResult) -> dict[str, Any]:
    """The evaluation JSON's "faithfulness" section: the protocol, each method's mean AUCs with their 95%
    paired-bootstrap intervals and the paired comparisons (the numbers of `python -m vitviz faithfulness` on the
    same images, without the per-image curves and maps)."""
    images = len(next(iter(result.methods.values())).per_image)
    return {
        "protocol": {
            "steps": result.steps,
            "baseline": result.baseline,
            "target": "predicted" if result.target_class is None else result.target_class,
        },
        "num_images": images,
        "methods": {
            name: {
                "deletion_auc": method.deletion_auc,
                "insertion_auc": method.insertion_auc,
                **result.summary.interval_json(name),
                "seconds_per_image": method.seconds_per_image,
            }
            for name, method in result.methods.items()
        },
        "comparisons": result.summary.to_json(),
    }


def _mask_at(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """An object mask [H, W] at the model's input size (nearest neighbour, like the image's direct resize)."""
    mask = np.asarray(mask, dtype=bool)
    height, width = size
    if mask.shape != (height, width):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        mask = np.asarray(resized) > 127
    return torch.from_numpy(mask.copy())


def _preview(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")
