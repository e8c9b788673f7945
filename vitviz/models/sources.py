"""Every way a user can name a model: a checkpoint file, a run folder, `timm:<name>` (+ local weights), or
`hf:<repo id or local folder>` (Hugging Face transformers, see vitviz.models.hf)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from vitviz.errors import VitvizError
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
        name = source[len(TIMM_PREFIX) :].strip()
        return _load_timm(source, name, weights=weights, pretrained=pretrained, kwargs=dict(model_kwargs or {}))
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


def _load_timm(
    source: str, name: str, *, weights: str | Path | None, pretrained: bool, kwargs: dict[str, Any]
) -> LoadedModel:
    if not name:
        raise VitvizError("timm: needs a model name, e.g. timm:vit_tiny_patch16_224")
    if weights is not None and pretrained:
        raise VitvizError("choose either pretrained weights or --weights FILE, not both")
    reserved = sorted(RESERVED_TIMM_KWARGS & set(kwargs))
    if reserved:
        raise VitvizError(f"model keyword arguments may not set {', '.join(reserved)}: the source and data decide them")
    # The kwargs are part of the architecture: they go into the content hash of a random init.
    described = f"{TIMM_PREFIX}{name}" + (json.dumps(kwargs, sort_keys=True) if kwargs else "")
    if weights is not None:
        state = read_state_dict(weights)
        head = state.get("head.weight")
        # Fine-tuned weights often have their own number of classes; size the head from the file.
        sized = {"num_classes": int(head.shape[0])} if isinstance(head, torch.Tensor) and head.ndim == 2 else {}
        model = build_timm_model(name, **sized, **kwargs)
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
    meta = timm_meta(name, model, training=summary, arch_kwargs=kwargs)
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
