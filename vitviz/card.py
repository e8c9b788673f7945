"""How a model card reads, for every presenter: `python -m vitviz info`, the studio's overview and the summary
table of /compare. Imports no torch.

A checkpoint's training summary (`ModelCard.training`, written by the training backend) is one flat dict:
scalars (run_id, preset, dataset, train_split, objective, epochs, epochs_planned, steps, finetuned_from; for a
fine-tune also its lineage: base_source, base_arch, base_content_hash, strategy, trainable_parameters, ema_decay)
and the run's final numbers under the one key `metrics` (train_loss, train_accuracy, eval_loss, eval_accuracy,
best_accuracy, skipped_steps). The functions here are the only readers of that schema; a model with no summary
(timm, Hugging Face) reads as empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the card's type only: reading a card needs no torch
    from vitviz.pipeline import ModelCard

METRICS = "metrics"
# Training-summary keys read together as one "checkpoint" row (where in its run a checkpoint was saved).
CHECKPOINT_KEYS = ("epochs", "steps", "epochs_planned")
# Accuracies of `metrics` shown as headline figures, in this order, with their labels.
ACCURACIES = (
    ("eval_accuracy", "Eval accuracy"),
    ("best_accuracy", "Best accuracy"),
    ("train_accuracy", "Train accuracy"),
)
CLASSES_SHOWN = 10  # class names listed on the card's "classes" row before "..."

Row = tuple[str, str]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics(training: Mapping[str, Any]) -> dict[str, Any]:
    """The run's final numbers, from the summary's `metrics`; empty when there are none."""
    found = training.get(METRICS)
    return dict(found) if isinstance(found, Mapping) else {}


def accuracies(training: Mapping[str, Any]) -> dict[str, float]:
    """The recorded accuracies as {label: value}, in `ACCURACIES`' order, those that are numbers."""
    found = metrics(training)
    return {label: float(found[key]) for key, label in ACCURACIES if _is_number(found.get(key))}


def recorded_accuracy(training: Mapping[str, Any]) -> float | None:
    """The accuracy a model is compared by: its run's final eval accuracy, or None."""
    value = metrics(training).get("eval_accuracy")
    return float(value) if _is_number(value) else None


def saved_step(training: Mapping[str, Any]) -> int | None:
    """The optimiser step the checkpoint was saved at, or None."""
    steps = training.get("steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def checkpoint_text(training: Mapping[str, Any], name: str | None = None) -> str | None:
    """Where in its run the checkpoint was saved, from its summary: "best, saved at epoch E step S of a run of
    N epochs" (epochs and steps count at the save, not at the run's end); None when the summary does not say."""
    epoch, step, planned = (training.get(key) for key in CHECKPOINT_KEYS)
    if epoch is None and step is None:
        return None
    text = "saved at " + " ".join(
        f"{what} {value}" for what, value in (("epoch", epoch), ("step", step)) if value is not None
    )
    if planned is not None:
        text += f" of a run of {planned} epoch{'s' if planned != 1 else ''}"
    return f"{name}, {text}" if name else text


def training_rows(training: Mapping[str, Any], checkpoint: str | None = None) -> list[Row]:
    """The summary's scalars as (label, value) rows in the summary's order, epochs and steps first as one
    "checkpoint" row (named `checkpoint`, e.g. "best", when given); `metrics` is left to `metric_text`."""
    rows: list[Row] = []
    where = checkpoint_text(training, checkpoint)
    if where is not None:
        rows.append(("checkpoint", where))
    for key, value in training.items():
        if key in CHECKPOINT_KEYS and where is not None:
            continue
        if isinstance(value, (Mapping, list, tuple)) or value is None or value == "":
            continue
        rows.append((key.replace("_", " "), str(value)))
    return rows


def metric_text(training: Mapping[str, Any]) -> str | None:
    """The final numbers on one line, "eval_accuracy=0.9375, ..." (floats to 4 significant digits), or None."""
    found = metrics(training)
    if not found:
        return None
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in found.items())


def card_rows(card: ModelCard, checkpoint: str | None = None) -> list[Row]:
    """The whole card as ordered (label, value) rows: the model, its geometry, its variant (vitviz models), its
    training summary and final numbers (models that carry them), and each resampling of its position grid."""
    classes = ", ".join(card.class_names[:CLASSES_SHOWN]) + (" ..." if len(card.class_names) > CLASSES_SHOWN else "")
    rows: list[Row] = [
        ("model", f"{card.source}  ({card.arch})"),
        ("parameters", f"{card.parameters:,}"),
        ("input", f"{card.img_size[0]}x{card.img_size[1]} px, {card.in_chans} channel(s)"),
        (
            "tokens",
            f"{card.grid[0]}x{card.grid[1]} patches of {card.stride[0]}x{card.stride[1]} px"
            f" + {card.num_prefix_tokens} prefix token(s)",
        ),
        ("transformer", f"depth {card.depth}, {card.num_heads} heads, width {card.embed_dim}"),
        ("classes", f"{card.num_classes}: {classes}"),
    ]
    if card.config is not None:
        cfg = card.config
        rows.append(
            ("variant", f"position embedding {cfg['pos_embed']}, stem {cfg['stem']}, pooling {cfg['global_pool']}")
        )
    rows += training_rows(card.training, checkpoint)
    numbers = metric_text(card.training)
    if numbers is not None:
        rows.append(("metrics", numbers))
    rows += [
        ("resampled", f"{entry.get('old_grid')} -> {entry.get('new_grid')} ({entry.get('method')})")
        for entry in card.resolution_history
    ]
    return rows
