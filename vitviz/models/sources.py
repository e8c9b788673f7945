"""Every way a user can name a model: a checkpoint file, a run folder, `timm:<name>` (+ local weights), or
`hf:<repo id or local folder>` (Hugging Face transformers, see vitviz.models.hf).

A timm source may carry keyword arguments for `timm.create_model` after a "?", as in a URL:
`timm:vit_base_patch16_224?depth=2&img_size=64` builds the architecture with 2 blocks for 64-pixel inputs (random
or --weights only). The keys are those of TIMM_KWARGS, each an integer within its bounds; the source string, with
the keys sorted (`timm_source`), is what a result or checkpoint records, and it alone determines the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from vitviz.errors import VitvizError, quoted
from vitviz.models.checkpoint import (
    LoadedModel,
    ModelMeta,
    file_sha256,
    load_checkpoint,
    load_state_dict_checked,
    read_state_dict,
)
from vitviz.models.factory import build_timm_model
from vitviz.models.hf import HF_PREFIX, load_hf
from vitviz.models.meta import RESERVED_TIMM_KWARGS
from vitviz.runs import run_checkpoint
from vitviz.tokens import token_layout

TIMM_PREFIX = "timm:"
TIMM_KWARGS: dict[str, tuple[int, int]] = {  # keyword: (least, most)
    "depth": (1, 64),  # transformer blocks
    "img_size": (8, 4096),  # input size in pixels (square)
    "num_classes": (0, 100_000),  # classifier outputs; 0: no head (features only)
}
RANDOM_INIT_SEED = 0  # timm random inits are seeded so one content hash always means the same weights


def load_model(
    source: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    hf_local_folders: bool = True,
) -> LoadedModel:
    """Load a model from any supported source, in eval mode, with its metadata.

    Sources: a project .safetensors checkpoint; a run folder (the checkpoint `vitviz.runs.run_checkpoint`
    picks: best.safetensors, else last.safetensors, else the newest epoch); "timm:<name>" with random
    weights, timm's pretrained weights (`pretrained=True`, needs the network) or a local state dict
    (`weights=FILE`), created with `model_kwargs` (e.g. {"depth": 2}) when given; "hf:<repo id or local
    folder>", a Hugging Face transformers vision transformer (`vitviz.models.hf.load_hf`). With
    `hf_local_folders=False` an hf: name is a Hub id only, never a folder on this machine (the studio, whose
    model names can come from a URL).
    """
    source = str(source)
    if model_kwargs and not source.startswith(TIMM_PREFIX):
        raise VitvizError("model keyword arguments apply only to timm:<name> sources")
    if source.startswith(HF_PREFIX):
        if weights is not None or pretrained:
            raise VitvizError("--weights and pretrained apply only to timm:<name> sources; hf: models bring their own")
        return load_hf(source, local_folders=hf_local_folders)
    if source.startswith(TIMM_PREFIX):
        name, query = parse_timm_source(source)
        return _load_timm(name, query, weights=weights, pretrained=pretrained, model_kwargs=dict(model_kwargs or {}))
    if weights is not None or pretrained:
        raise VitvizError(
            "--weights and pretrained apply only to timm:<name> sources; a checkpoint has its own weights"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        loaded = load_checkpoint(run_checkpoint(path))
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise VitvizError(
                f"{source} is not a vitviz checkpoint (.safetensors); for a state dict use timm:<name> --weights {source}"
            )
        loaded = load_checkpoint(path)
    else:
        raise VitvizError(
            f"no such checkpoint or run folder: {source} (a model is a .safetensors checkpoint, a run folder, "
            "timm:<name> or hf:<repo id or folder>)"
        )
    loaded.source = source
    return loaded


def parse_timm_source(source: str) -> tuple[str, dict[str, int]]:
    """The model name and keyword arguments of "timm:<name>[?key=value&...]" (see the module docstring)."""
    name, sep, query = source[len(TIMM_PREFIX) :].strip().partition("?")
    name = name.strip()
    if not name:
        raise VitvizError("timm: needs a model name, e.g. timm:vit_tiny_patch16_224")
    kwargs: dict[str, int] = {}
    for item in query.split("&") if sep else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in TIMM_KWARGS:
            raise VitvizError(
                f"unknown timm keyword {quoted(key)} in {quoted(source)}: use {', '.join(TIMM_KWARGS)} (as ?depth=2)"
            )
        if key in kwargs:
            raise VitvizError(f"timm keyword {key} is given twice in {quoted(source)}")
        least, most = TIMM_KWARGS[key]
        try:
            number = int(value.strip(), 10) if eq else None
        except ValueError:
            number = None
        if number is None or not least <= number <= most:
            raise VitvizError(f"timm keyword {key} must be an integer from {least} to {most}, got {quoted(value)}")
        kwargs[key] = number
    return name, kwargs


def timm_source(name: str, kwargs: dict[str, int] | None = None) -> str:
    """The canonical source string of a timm model with keyword arguments (keys sorted): what results record."""
    query = "&".join(f"{key}={kwargs[key]}" for key in sorted(kwargs or {}))
    return f"{TIMM_PREFIX}{name}" + (f"?{query}" if query else "")


def _load_timm(
    name: str,
    query: dict[str, int],
    *,
    weights: str | Path | None,
    pretrained: bool,
    model_kwargs: dict[str, Any],
) -> LoadedModel:
    """A timm model from its name, the source's `?key=value` arguments (`query`, recorded in the source) and the
    caller's `model_kwargs` (e.g. fine-tuning's drop_path_rate; never what the source or the data decide)."""
    source = timm_source(name, query)
    if weights is not None and pretrained:
        raise VitvizError("choose either pretrained weights or --weights FILE, not both")
    if pretrained and query:
        raise VitvizError(f"pretrained weights are for the architecture as published: drop the ? part of {source}")
    reserved = sorted(RESERVED_TIMM_KWARGS & set(model_kwargs))
    if reserved:
        raise VitvizError(f"model keyword arguments may not set {', '.join(reserved)}: the source and data decide them")
    kwargs: dict[str, Any] = {**query, **model_kwargs}
    # Every keyword is part of the architecture: it goes into the content hash of a random init.
    described = source + (json.dumps(model_kwargs, sort_keys=True) if model_kwargs else "")
    if weights is not None:
        state = read_state_dict(weights)
        head = state.get("head.weight")
        # Fine-tuned weights often have their own number of classes; size the head from the file.
        if "num_classes" not in kwargs and isinstance(head, torch.Tensor) and head.ndim == 2:
            kwargs = {**kwargs, "num_classes": int(head.shape[0])}
        model = build_timm_model(name, **kwargs)
        load_state_dict_checked(model, state, str(weights))
        content_hash = file_sha256(weights)
    elif pretrained:
        model = build_timm_model(name, pretrained=True, **kwargs)
        tag = getattr(model, "pretrained_cfg", {}).get("tag") or "default"
        content_hash = hashlib.sha256(f"{described}:pretrained:{tag}".encode()).hexdigest()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = build_timm_model(name, **kwargs)
        content_hash = hashlib.sha256(described.encode()).hexdigest()
    model.eval()
    summary = {"source": "timm", "pretrained": pretrained, "weights": None if weights is None else str(weights)}
    if query:
        summary["timm_kwargs"] = dict(sorted(query.items()))
    # The checkpoint rebuilds the model with its own class count and input size, and these keywords.
    arch_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "img_size")}
    meta = timm_meta(name, model, training=summary, arch_kwargs=arch_kwargs)
    extra = {} if weights is None else {"path": str(weights)}
    return LoadedModel(model=model, meta=meta, source=source, content_hash=content_hash, extra=extra)


def timm_meta(
    name: str, model: nn.Module, training: dict | None = None, arch_kwargs: Mapping[str, Any] | None = None
) -> ModelMeta:
    """ModelMeta for a timm model: normalisation from its pretrained config, ImageNet names for 1000 classes."""
    data_config = resolve_data_config(model=model)
    layout = token_layout(model)
    in_chans = int(getattr(model, "in_chans", data_config["input_size"][0]))
    num_classes = int(getattr(model, "num_classes", 0))
    if num_classes == 1000:
        class_names = list(ImageNetInfo().label_descriptions())
    else:
        class_names = [f"class {i}" for i in range(num_classes)]
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    if len(mean) != in_chans:  # e.g. a greyscale model with RGB statistics: average them
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return ModelMeta(
        arch=name,
        config=None,
        class_names=class_names,
        input_size=layout.img_size,
        in_chans=in_chans,
        mean=mean,
        std=std,
        training=dict(training or {}),
        resolution_history=[],
        arch_kwargs=dict(arch_kwargs or {}),
    )
