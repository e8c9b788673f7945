"""`ModelMeta`: what a checkpoint holds besides its tensors, validated field by field.

A leaf of vitviz.models (it imports only the config): the checkpoint format, the factory's position-embedding
resampling and the sources all use it without importing each other.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from vitviz.errors import VitvizError
from vitviz.models.config import MAX_CLASSES, MAX_IMG_SIDE, ViTConfig

__all__ = ["FORMAT_VERSION", "PROJECT_ARCH", "ModelMeta"]

FORMAT_VERSION = 2  # the newest format this code reads; a file says the oldest format that describes it
PROJECT_ARCH = "vitviz"  # ModelMeta.arch of models built from a ViTConfig
# Keyword arguments of a timm model that other fields of the meta decide; never stored in `arch_kwargs`.
RESERVED_TIMM_KWARGS = frozenset({"num_classes", "in_chans", "img_size", "pretrained", "pretrained_cfg"})


@dataclass
class ModelMeta:
    """Everything besides the tensors that a checkpoint needs to be rebuilt and used."""

    arch: str  # "vitviz" for project models, the timm model name, or the transformers class name
    config: ViTConfig | None  # the project architecture; None for timm and transformers models
    class_names: list[str]  # one name per classifier output
    input_size: tuple[int, int]  # (H, W) pixels the model takes
    in_chans: int  # 1 (greyscale) or 3 (RGB)
    mean: tuple[float, ...]  # per-channel normalisation mean
    std: tuple[float, ...]  # per-channel normalisation std
    training: dict[str, Any]  # dataset, epochs, steps, final metrics, run_id (free-form JSON)
    resolution_history: list[dict[str, Any]]  # every resampling: {"method", "old_grid", "new_grid"}
    format_version: int = 1  # raised to 2 on validation when a field below is used
    # Format 2. timm models: keyword arguments the model was created with besides classes, channels and size
    # (e.g. {"depth": 2}); transformers models: the model's config document (`config.to_dict()`).
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    hf_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (normalising JSON lists to tuples); raise VitvizError naming the first problem."""
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise VitvizError(f"checkpoint format_version must be an integer, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise VitvizError(
                f"checkpoint format version {self.format_version} is newer than this vitviz reads "
                f"({FORMAT_VERSION}); upgrade vitviz"
            )
        if self.format_version < 1:
            raise VitvizError(f"checkpoint format_version {self.format_version} is not valid")
        if not isinstance(self.arch, str) or not 0 < len(self.arch) <= 200:
            raise VitvizError(f"checkpoint arch must be a non-empty name, got {self.arch!r}")
        if isinstance(self.config, dict):
            self.config = ViTConfig.from_dict(self.config)
        if self.arch == PROJECT_ARCH and not isinstance(self.config, ViTConfig):
            raise VitvizError('a "vitviz" checkpoint must carry its model config')
        if self.arch != PROJECT_ARCH and self.config is not None:
            raise VitvizError(f'only "vitviz" checkpoints carry a config; arch is {self.arch!r}')
        if not isinstance(self.class_names, (list, tuple)) or len(self.class_names) > MAX_CLASSES:
            raise VitvizError("checkpoint class_names must be a list of at most 100000 names")
        if not all(isinstance(name, str) for name in self.class_names):
            raise VitvizError("checkpoint class_names must all be strings")
        self.class_names = list(self.class_names)
        self.input_size = _pair("input_size", self.input_size, 1, MAX_IMG_SIDE)
        if not isinstance(self.in_chans, int) or isinstance(self.in_chans, bool) or not 1 <= self.in_chans <= 16:
            raise VitvizError(f"checkpoint in_chans must be an integer from 1 to 16, got {self.in_chans!r}")
        self.mean = _floats("mean", self.mean, self.in_chans)
        self.std = _floats("std", self.std, self.in_chans)
        if any(s <= 0 for s in self.std):
            raise VitvizError(f"checkpoint std must be positive, got {list(self.std)}")
        if not isinstance(self.training, dict):
            raise VitvizError("checkpoint training summary must be a JSON object")
        if not isinstance(self.arch_kwargs, dict) or not all(isinstance(k, str) for k in self.arch_kwargs):
            raise VitvizError("checkpoint arch_kwargs must be a JSON object of keyword arguments")
        reserved = sorted(RESERVED_TIMM_KWARGS & set(self.arch_kwargs))
        if reserved:
            raise VitvizError(f"checkpoint arch_kwargs may not set {', '.join(reserved)}: other fields decide them")
        if self.arch_kwargs and self.arch == PROJECT_ARCH:
            raise VitvizError('a "vitviz" checkpoint is described by its config, not by arch_kwargs')
        if self.hf_config is not None and (not isinstance(self.hf_config, dict) or self.arch == PROJECT_ARCH):
            raise VitvizError("checkpoint hf_config must be a transformers config document (a JSON object)")
        if self.arch_kwargs and self.hf_config is not None:
            raise VitvizError(
                "a checkpoint is a timm model (arch_kwargs) or a transformers model (hf_config), not both"
            )
        if self.arch_kwargs or self.hf_config is not None:
            self.format_version = max(self.format_version, 2)
        if not isinstance(self.resolution_history, (list, tuple)):
            raise VitvizError("checkpoint resolution_history must be a list")
        self.resolution_history = [_history_entry(entry) for entry in self.resolution_history]
        if self.config is not None:
            cfg = self.config
            if self.input_size != cfg.img_size or self.in_chans != cfg.in_chans:
                raise VitvizError(
                    f"checkpoint meta says input {self.input_size} with {self.in_chans} channels but its config "
                    f"says {cfg.img_size} with {cfg.in_chans}"
                )
            if len(self.class_names) != cfg.num_classes:
                raise VitvizError(
                    f"checkpoint has {len(self.class_names)} class names for {cfg.num_classes} classifier outputs"
                )

    def to_json(self) -> str:
        """The JSON document stored under the "vitviz" header key."""
        doc = dataclasses.asdict(self)
        doc["config"] = None if self.config is None else self.config.to_dict()
        doc["input_size"] = list(self.input_size)
        doc["mean"] = list(self.mean)
        doc["std"] = list(self.std)
        if self.format_version < 2:  # a format-1 document stays exactly what format-1 readers read
            del doc["arch_kwargs"], doc["hf_config"]
        return json.dumps(doc)

    @classmethod
    def from_json(cls, s: str) -> ModelMeta:
        """Parse and validate a meta document; anything malformed raises VitvizError."""
        try:
            doc = json.loads(s)
        except (ValueError, TypeError, RecursionError) as exc:
            raise VitvizError(f"checkpoint metadata is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise VitvizError("checkpoint metadata must be a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in doc if k not in fields)
        if unknown:
            raise VitvizError(f"checkpoint metadata has unknown key(s): {', '.join(unknown)}")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in doc]
        if missing:
            raise VitvizError(f"checkpoint metadata lacks key(s): {', '.join(missing)}")
        return cls(**doc)


def _pair(name: str, value: object, low: int, high: int) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in value)
    ):
        raise VitvizError(f"checkpoint {name} must be two integers from {low} to {high}, got {value!r}")
    return (value[0], value[1])


def _floats(name: str, value: object, length: int) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise VitvizError(f"checkpoint {name} must list {length} numbers (one per channel), got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise VitvizError(f"checkpoint {name} must be finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _history_entry(entry: object) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise VitvizError(f"resolution_history entries need a method, old_grid and new_grid; got {entry!r}")
    out = dict(entry)
    for key in ("old_grid", "new_grid"):
        out[key] = list(_pair(f"resolution_history {key}", entry.get(key), 0, MAX_IMG_SIDE))
    return out
