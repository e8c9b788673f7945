"""Typed training configuration: nested frozen dataclasses checked on construction.

A run is described by one `TrainConfig`. Presets (presets.py) build one, `--set key=value` overrides
change single fields by dotted key (`optim.lr=1e-3`, `model.depth=4`), and the resolved config is saved
as config.json in the run folder, from which `from_dict` rebuilds it for `--resume`.
Every check raises `VitvizError` with the dotted key in its message, because every bad value comes from a
person (a preset being written, a `--set`, an edited config.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vitviz.errors import VitvizError
from vitviz.models import ViTConfig

Objective = Literal["classify", "masked"]
Precision = Literal["fp32", "bf16"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise VitvizError(message)


def _check_size(value: tuple[int, int] | None, key: str) -> None:
    if value is None:
        return
    _require(len(value) == 2 and all(v > 0 for v in value), f"{key} must be two positive sizes (H, W), got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Which images to train and evaluate on, and how they are prepared."""

    dataset: str = "shapes"  # a name from training.data.DATASET_NAMES
    root: str | None = None  # folder with the dataset's files (mnist, folder, torchvision sets)
    img_size: tuple[int, int] | None = None  # size procedural datasets render at; None: the model's input size
    train_split: str = "train"  # split name, slices allowed: "test[:8000]"
    eval_split: str | None = "test"  # None: no evaluation during training
    num_train_samples: int | None = None  # procedural datasets: images to generate; None: the dataset's default
    num_eval_samples: int | None = None
    augment: str = "none"  # training.data.train_transform recipe: none | light | digits | randaug | a timm policy
    mean: tuple[float, ...] | None = None  # normalisation; None: 0.5 for every channel
    std: tuple[float, ...] | None = None
    download: bool = False  # torchvision datasets only; tests and CI never download
    num_workers: int = 0  # DataLoader worker processes
    in_memory: bool = False  # prepare the training and eval images once into memory (augment=none only)

    def __post_init__(self) -> None:
        _require(bool(self.dataset), "data.dataset must name a dataset")
        _check_size(self.img_size, "data.img_size")
        _require(bool(self.train_split), "data.train_split must name a split")
        for key in ("num_train_samples", "num_eval_samples"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"data.{key} must be positive or none, got {value}")
        _require((self.mean is None) == (self.std is None), "data.mean and data.std must be given together")
        if self.mean is not None and self.std is not None:
            _require(len(self.mean) == len(self.std), "data.mean and data.std must have one value per channel")
            _require(all(s > 0 for s in self.std), f"data.std must be positive, got {self.std}")
        _require(bool(self.augment), "data.augment must name a recipe (none, light, digits, randaug) or a timm policy")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(
            not self.in_memory or self.augment.strip().lower() == "none",
            f"data.in_memory needs data.augment=none (augmentations are random per image), got {self.augment!r}",
        )


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and its parameter groups."""

    name: Literal["adamw", "sgd"] = "adamw"  # AdamW with weight_decay 0 is plain Adam
    lr: float = 1e-3  # peak learning rate, reached after warm-up
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings and prefix tokens
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    momentum: float = 0.9  # sgd only
    eps: float = 1e-8  # adamw only
    layer_decay: float | None = None  # lr scale per block, BEiT-style: head 1, block i layer_decay**(depth-i)

    def __post_init__(self) -> None:
        _require(self.lr > 0 and math.isfinite(self.lr), f"optim.lr must be a positive number, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _require(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _require(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            f"optim.layer_decay must be in (0, 1] or none, got {self.layer_decay}",
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then decay to min_lr_ratio * lr at the last step."""

    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # converted to steps once the epoch length is known; not with warmup_steps
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _require(
            not (self.warmup_steps and self.warmup_epochs),
            "set schedule.warmup_steps or schedule.warmup_epochs, not both",
        )
        _require(0 <= self.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class MaskedConfig:
    """Self-supervised masked patch prediction (ViT paper, appendix B.1.2)."""

    mask_ratio: float = 0.5  # fraction of patch embeddings corrupted per image
    replace_with_mask: float = 0.8  # of the corrupted: replaced by the learnable mask embedding
    replace_with_random: float = 0.1  # of the corrupted: replaced by another patch's embedding; the rest stay
    colour_bits: int = 3  # bits per channel of the mean colour to predict: 2**(3*bits) classes

    def __post_init__(self) -> None:
        _require(0 < self.mask_ratio < 1, f"masked.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        _require(
            self.replace_with_mask >= 0
            and self.replace_with_random >= 0
            and self.replace_with_mask + self.replace_with_random <= 1,
            "masked.replace_with_mask and masked.replace_with_random must be >= 0 and sum to at most 1",
        )
        _require(1 <= self.colour_bits <= 4, f"masked.colour_bits must be in 1..4, got {self.colour_bits}")

    @property
    def num_colour_classes(self) -> int:
        return 2 ** (3 * self.colour_bits)


STRATEGIES = ("full", "linear", "freeze:K", "lora")  # finetune.strategy; K is a number of blocks


@dataclass(frozen=True)
class FinetuneConfig:
    """Start from any model source with a new zero-initialised head, optionally at a new input size, training
    all of it or part of it (`strategy`)."""

    source: str | None = None  # checkpoint file, run folder, timm:<name> or hf:<repo id or folder>; None: from scratch
    img_size: tuple[int, int] | None = None  # new input size; position embeddings are resampled in 2D
    freeze_blocks: int = 0  # freeze the patch embedding, prefix tokens, position embeddings and this many blocks
    strategy: str = "full"  # full | linear (the head only) | freeze:K | lora (low-rank adapters through peft)
    weights: str | None = None  # timm: sources: a local state dict to start from
    pretrained: bool = False  # timm: sources: timm's pretrained weights (needs the network)
    model_kwargs: tuple[str, ...] = ()  # timm: sources: KEY=VALUE keyword arguments of timm.create_model
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # Linear names in the blocks to adapt; empty: the family's attention default
    # Filled in when the run starts (a fine-tune of a timm or transformers model is rebuilt from it on --resume):
    # the checkpoint metadata document of the model being fine-tuned, its lineage under "training".
    model_meta: Any = None

    def __post_init__(self) -> None:
        _check_size(self.img_size, "finetune.img_size")
        _require(self.freeze_blocks >= 0, f"finetune.freeze_blocks must be >= 0, got {self.freeze_blocks}")
        _require(
            self.strategy in ("full", "linear", "lora") or _freeze_count(self.strategy) is not None,
            f"finetune.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}",
        )
        _require(
            self.strategy == "full" or not self.freeze_blocks,
            f"finetune.freeze_blocks is strategy freeze:K; set one of them (strategy is {self.strategy!r})",
        )
        _require(self.lora_rank > 0, f"finetune.lora_rank must be > 0, got {self.lora_rank}")
        _require(
            self.lora_alpha > 0 and math.isfinite(self.lora_alpha),
            f"finetune.lora_alpha must be a positive number, got {self.lora_alpha}",
        )
        _require(
            self.strategy == "lora" or not self.lora_targets,
            "finetune.lora_targets applies to strategy lora only",
        )
        foreign = self.source is None or not self.source.startswith("timm:")
        _require(
            not (foreign and (self.weights or self.pretrained or self.model_kwargs)),
            "--weights, --pretrained and --model-kwargs apply to timm:<name> sources only",
        )
        _require(not (self.weights and self.pretrained), "choose either --pretrained or --weights FILE, not both")
        parse_model_kwargs(self.model_kwargs)
        _require(
            self.model_meta is None or isinstance(self.model_meta, Mapping),
            "finetune.model_meta must be a checkpoint metadata object (it is filled in when the run starts)",
        )

    @property
    def frozen_blocks(self) -> int:
        """Blocks frozen together with the stem: K of freeze:K, or the older freeze_blocks."""
        return _freeze_count(self.strategy) or self.freeze_blocks


def _freeze_count(strategy: str) -> int | None:
    kind, sep, count = strategy.partition(":")
    if kind != "freeze" or not sep or not count.strip().isdigit():
        return None
    return int(count)


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """{key: value} from KEY=VALUE strings; values read as JSON (numbers, true/false, lists), else as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        _require(bool(sep) and key.isidentifier(), f"--model-kwargs expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw.strip()
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a run computes (not where it runs or how it is shown)."""

    model: ViTConfig  # num_classes and in_chans are set from the dataset when the run starts
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    masked: MaskedConfig = field(default_factory=MaskedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    preset: str = "custom"  # the preset this config started from; names runs
    objective: Objective = "classify"
    epochs: int = 10
    batch_size: int = 64  # global: split across processes, then across accumulation steps
    grad_accum: int = 1  # micro-batches per optimiser step
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Mixup alpha (timm.data.Mixup); 0: off
    cutmix: float = 0.0  # CutMix alpha; 0: off (with mixup too, each batch takes one of the two)
    ema_decay: float | None = None  # model EMA (timm.utils.ModelEmaV3); evaluation and checkpoints use it
    grad_clip: float | None = 1.0  # max global gradient norm; none: no clipping
    # Recompute each block's activations in the backward pass instead of keeping them (timm's
    # set_grad_checkpointing, transformers' activation checkpointing): less memory, one more forward.
    grad_checkpointing: bool = False
    precision: Precision = "fp32"  # bf16: autocast where the device supports it
    seed: int = 0  # model init, data order, augmentation and masking all derive from it
    deterministic: bool = False  # torch.use_deterministic_algorithms; slower on GPU
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    checkpoint_every: int = 1  # epochs between checkpoints/epoch-NNN.safetensors (the last is always saved)
    log_every: int = 10  # steps between lines in metrics.jsonl
    resume_every: int = 50  # steps between resume-state saves (also at every epoch end)
    max_bad_steps: int = 5  # stop after this many consecutive steps with a non-finite loss or gradient

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _require(self.grad_accum > 0, f"grad_accum must be > 0, got {self.grad_accum}")
        _require(
            self.batch_size % self.grad_accum == 0,
            f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}",
        )
        _require(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or none, got {self.grad_clip}")
        for key in ("mixup", "cutmix"):
            _require(getattr(self, key) >= 0, f"{key} must be >= 0 (an alpha; 0: off), got {getattr(self, key)}")
        _require(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            f"ema_decay must be in (0, 1) or none, got {self.ema_decay}",
        )
        _require(
            not (self.mixup or self.cutmix) or self.objective == "classify",
            "mixup and cutmix apply to objective=classify",
        )
        for key in ("eval_every", "checkpoint_every", "log_every", "resume_every", "max_bad_steps"):
            _require(getattr(self, key) > 0, f"{key} must be > 0, got {getattr(self, key)}")
        _require(
            self.objective == "classify" or self.finetune.source is None,
            "fine-tuning trains a classifier: use objective=classify",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); `from_dict` inverts it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model":
                out[f.name] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            else:
                out[f.name] = value
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Rebuild and check a config from `to_dict` output; unknown or mistyped keys raise VitvizError."""
        if not isinstance(data, Mapping) or "model" not in data:
            raise VitvizError("config must be an object with at least a 'model' section")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        _require(not unknown, f"unknown config key(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name == "model":
                kwargs[name] = _model_from_dict(value)
            elif dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _dataclass_from_dict(hints[name], value, prefix=name)
            else:
                kwargs[name] = _coerce(value, hints[name], name)
        return cls(**kwargs)


def _model_from_dict(value: Any) -> ViTConfig:
    if not isinstance(value, Mapping):
        raise VitvizError("config section 'model' must be an object")
    try:
        return ViTConfig.from_dict(dict(value))
    except VitvizError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise VitvizError(f"model config is invalid: {exc}") from None


def _dataclass_from_dict(cls: type, value: Any, prefix: str) -> Any:
    if not isinstance(value, Mapping):
        raise VitvizError(f"config section '{prefix}' must be an object")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    _require(not unknown, f"unknown config key(s): {', '.join(f'{prefix}.{k}' for k in unknown)}")
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in value.items()})


# ---------------------------------------------------------------------------------------------------
# Dotted overrides


def apply_overrides(config: TrainConfig, assignments: Sequence[str]) -> TrainConfig:
    """Apply `key=value` strings (dotted keys, e.g. `optim.lr=1e-3`) in order, type-checked per field."""
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise VitvizError(f"--set expects key=value, got '{assignment}'")
        config = set_value(config, key, raw.strip())
    return config


def set_value(config: Any, dotted_key: str, raw: Any, _prefix: str = "") -> Any:
    """Return a copy of a (nested) frozen dataclass with one field replaced, coerced to its declared type."""
    head, _, rest = dotted_key.partition(".")
    full_key = f"{_prefix}{dotted_key}"
    names = {f.name for f in dataclasses.fields(config)}
    if head not in names:
        raise VitvizError(f"unknown config key '{full_key}'; known here: {', '.join(sorted(names))}")
    hint = typing.get_type_hints(type(config))[head]
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise VitvizError(f"config key '{_prefix}{head}' has no sub-keys (got '{full_key}')")
        value = set_value(current, rest, raw, f"{_prefix}{head}.")
    else:
        if dataclasses.is_dataclass(current):
            raise VitvizError(f"config key '{full_key}' is a section; set one of its fields, e.g. {full_key}.<field>")
        value = _coerce(raw, hint, full_key)
    try:
        return dataclasses.replace(config, **{head: value})
    except VitvizError:
        raise
    except (TypeError, ValueError) as exc:
        raise VitvizError(f"invalid value for '{full_key}': {exc}") from None


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a raw `--set` string or a JSON value to the field's declared type, or raise VitvizError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except VitvizError as exc:
                errors.append(str(exc))
        raise VitvizError(errors[0] if len(errors) == 1 else f"{key} cannot take {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise VitvizError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin is tuple:
        variable = len(args) == 2 and args[1] is Ellipsis
        items = _as_sequence(value, key, repeat_to=None if variable else len(args))
        if variable:
            return tuple(_coerce(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise VitvizError(f"{key} needs {len(args)} values, got {len(items)}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise VitvizError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise VitvizError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise VitvizError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise VitvizError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise VitvizError(f"{key} must be a string, got {value!r}")
    if hint is Any:
        return value
    raise VitvizError(f"{key} cannot be set from the command line")


def _as_sequence(value: Any, key: str, repeat_to: int | None) -> list[Any]:
    """Items of a list value; one scalar stands for all items of a fixed-length tuple (like timm's to_2tuple)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")) and text.endswith(("]", ")")):
            text = text[1:-1]
        items: list[Any] = [p.strip() for p in text.split(",") if p.strip()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    else:
        raise VitvizError(f"{key} must be a list of values, got {value!r}")
    if len(items) == 1 and repeat_to:
        items = items * repeat_to
    return items
