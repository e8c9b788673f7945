"""Fine-tuning any model source: the base model with a new head at the data set's class count (and, when asked, a
new input size), the strategy that decides what trains, and the plain model a checkpoint holds.

Sources are the ones `vitviz.models.load_model` reads: a vitviz checkpoint or run folder, `timm:<name>` (random
init, `--pretrained` or `--weights FILE`, created with `--model-kwargs`), `hf:<repo id or local folder>`. The model
being fine-tuned is described by checkpoint metadata (`vitviz.models.ModelMeta`: the project config, the timm
name and keyword arguments, or the transformers config document), kept in the resolved run config
(`finetune.model_meta`) so that `--resume` rebuilds it without the source, and written into every checkpoint so
that every tool rebuilds it offline.

Strategies (`finetune.strategy`):
- `full`: everything trains;
- `linear`: only the new head trains;
- `freeze:K`: the stem (patch embedding, prefix tokens, position embeddings) and the first K blocks are frozen;
- `lora`: low-rank adapters (`peft`) on the attention projections, and the head, train; everything else is
  frozen. A checkpoint holds the adapters merged into the weights (`merge_and_unload`), so every tool reads a
  plain model, and the adapter matrices beside them (`vitviz.models.checkpoint.ADAPTER_PREFIX`) so that the
  merge W = W0 + (alpha / rank) * B @ A can be checked.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from timm.models import group_parameters
from torch import nn

from training.config import TrainConfig, parse_model_kwargs
from vitviz.errors import VitvizError
from vitviz.models import (
    HFVisionTransformer,
    LoadedModel,
    ModelMeta,
    build_model,
    describe_mismatch,
    load_model,
    model_from_meta,
    resample_hf_input_size,
    resample_input_size,
)
from vitviz.models.checkpoint import ADAPTER_PREFIX
from vitviz.models.meta import PROJECT_ARCH

logger = logging.getLogger(__name__)

# Linear layers of the attention that LoRA adapts when no targets are named, per model family: the first set of
# names found in the blocks wins (timm's fused qkv; transformers' query/value or q_proj/v_proj, as in the LoRA paper).
DEFAULT_LORA_TARGETS = (("qkv",), ("query", "value"), ("q_proj", "v_proj"))


# ---------------------------------------------------------------------------------------------------
# The base model with a new head


def load_base(cfg: TrainConfig) -> LoadedModel:
    """The source model of a fine-tune, as `vitviz.models.load_model` reads it."""
    ft = cfg.finetune
    assert ft.source is not None
    return load_model(
        ft.source,
        weights=ft.weights,
        pretrained=ft.pretrained,
        model_kwargs=parse_model_kwargs(ft.model_kwargs) or None,
    )


def head_module(vit: nn.Module) -> nn.Module:
    """The classifier that fine-tuning replaces: timm's `get_classifier()`, or a transformers model's classifier."""
    if isinstance(vit, HFVisionTransformer):
        head = vit.classifier()
        if head is None:
            raise VitvizError(
                f"{type(vit.hf).__name__} has no single classification layer to replace; fine-tune one of the "
                "*ForImageClassification models"
            )
        return head
    return vit.get_classifier()


def enable_grad_checkpointing(vit: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant, so gradients reach adapters and
    later layers behind frozen inputs): timm's `set_grad_checkpointing` (vitviz's models are timm ones), or
    transformers' `activation_checkpointing_enable` (`gradient_checkpointing_enable` before transformers 5)."""
    if isinstance(vit, HFVisionTransformer):
        if not getattr(vit.hf, "supports_gradient_checkpointing", False):
            raise VitvizError(f"{type(vit.hf).__name__} does not support gradient checkpointing")
        kwargs = {"use_reentrant": False}
        if hasattr(vit.hf, "activation_checkpointing_enable"):  # its name since transformers 5
            vit.hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            vit.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    if not hasattr(vit, "set_grad_checkpointing"):
        raise VitvizError(f"{type(vit).__name__} does not support gradient checkpointing")
    try:
        vit.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as exc:  # timm's families that do not implement it
        raise VitvizError(f"{type(vit).__name__} does not support gradient checkpointing") from exc


def with_new_head(loaded: LoadedModel, cfg: TrainConfig, class_names: list[str]) -> tuple[nn.Module, ModelMeta]:
    """The source model at the fine-tune's input size with a zero-initialised linear head for `class_names`, and
    the metadata that rebuilds it (its lineage under `training`)."""
    model, meta = loaded.model, loaded.meta
    new_size = cfg.finetune.img_size
    if new_size is not None and tuple(new_size) != tuple(meta.input_size):
        resize = resample_hf_input_size if isinstance(model, HFVisionTransformer) else resample_input_size
        model, meta = resize(model, meta, tuple(new_size))
    else:
        model = copy.deepcopy(model)
    n = len(class_names)
    if meta.config is not None:  # a vitviz model: the project config with a linear head
        config = dataclasses.replace(meta.config, num_classes=n, head="linear")
        new_model = build_model(config)
        backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        missing, unexpected = new_model.load_state_dict(backbone, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise VitvizError(
                f"cannot carry the weights of {cfg.finetune.source} over: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model, meta = new_model, dataclasses.replace(meta, config=config, class_names=list(class_names))
    elif isinstance(model, HFVisionTransformer):
        old = head_module(model)
        model.hf.classifier = nn.Linear(old.in_features, n)
        model.num_classes = n
        model.hf.config.num_labels = n
        model.hf.config.id2label = dict(enumerate(class_names))
        model.hf.config.label2id = {name: i for i, name in enumerate(class_names)}
        meta = dataclasses.replace(meta, hf_config=model.hf.config.to_dict(), class_names=list(class_names))
    else:  # timm
        model.reset_classifier(n)
        meta = dataclasses.replace(meta, class_names=list(class_names))
    head = head_module(model)
    nn.init.zeros_(head.weight)  # the paper's zero-initialised D x K head
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    lineage = {
        "base_source": loaded.source,
        "base_arch": loaded.meta.arch,
        "base_content_hash": loaded.content_hash,
    }
    meta = dataclasses.replace(meta, training=lineage)
    _check_rebuildable(model, meta)
    return model.train(), meta


def _check_rebuildable(model: nn.Module, meta: ModelMeta) -> None:
    """Refuse to fine-tune a model that its metadata would not rebuild (its checkpoints could not be read)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        reference = model_from_meta(meta)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    problem = describe_mismatch(expected, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problem:
        raise VitvizError(f"{meta.arch} with a new head cannot be rebuilt from its description: {problem}")


def rebuild(cfg: TrainConfig) -> nn.Module:
    """The architecture of a resolved fine-tune (weights come from the resume state)."""
    meta = model_meta_of(cfg)
    if meta is None or meta.arch == PROJECT_ARCH:
        return build_model(cfg.model)
    return model_from_meta(meta).train()


def model_geometry(cfg: TrainConfig) -> tuple[tuple[int, int], int]:
    """(input size, channels) of the model a resolved config trains."""
    meta = model_meta_of(cfg)
    if meta is None:
        return tuple(cfg.model.img_size), int(cfg.model.in_chans)  # type: ignore[return-value]
    return meta.input_size, meta.in_chans


def model_meta_of(cfg: TrainConfig) -> ModelMeta | None:
    """The stored description of the model a resolved fine-tune trains (None for runs that predate it)."""
    doc = cfg.finetune.model_meta
    return None if doc is None else ModelMeta.from_json(json.dumps(doc))


# ---------------------------------------------------------------------------------------------------
# Strategies


@dataclass
class Tuned:
    """What trains: `module` (the model, or the peft model wrapping it for LoRA) and `base` (the model itself,
    LoRA layers injected, with the parameter names timm's groupings read)."""

    module: nn.Module
    base: nn.Module
    lora: dict[str, Any] | None = None  # rank, alpha, scaling and the adapted module names


def apply_strategy(vit: nn.Module, cfg: TrainConfig) -> Tuned:
    """Freeze or adapt `vit` as `cfg.finetune.strategy` says (the older freeze_blocks as freeze:K)."""
    ft = cfg.finetune
    if ft.source is None:
        return Tuned(vit, vit)
    if ft.strategy == "linear":
        head = {id(p) for p in head_module(vit).parameters()}
        for param in vit.parameters():
            param.requires_grad_(id(param) in head)
    elif ft.strategy == "lora":
        return _lora(vit, cfg)
    elif ft.frozen_blocks:
        freeze_early_layers(vit, ft.frozen_blocks)
    return Tuned(vit, vit)


def freeze_early_layers(vit: nn.Module, num_blocks: int) -> int:
    """Freeze the stem (patch embedding, prefix tokens, position embeddings) and the first `num_blocks` blocks.

    Layers are numbered as timm numbers them for layer decay (stem 0, block i -> i + 1; the final norm
    goes with the last block), so `num_blocks = depth` leaves only the head to train (a linear probe).
    Returns the number of frozen parameter tensors.
    """
    if num_blocks == 0:
        return 0
    depth = len(vit.blocks)
    if num_blocks > depth:
        raise VitvizError(f"--freeze-blocks {num_blocks} is more than the model's {depth} blocks")
    layer_of = group_parameters(vit, vit.group_matcher(coarse=False), reverse=True)
    frozen = 0
    for name, param in vit.named_parameters():
        if layer_of.get(name, depth + 1) <= num_blocks:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def lora_targets(vit: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Full names of the Linear layers in the blocks whose own name is one of `names` (or the family default)."""
    blocks = {id(m): n for n, m in vit.named_modules()}[id(vit.blocks)]
    linears = [
        (name, name.rsplit(".", 1)[-1])
        for name, module in vit.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(blocks + ".")
    ]
    wanted = [set(names)] if names else [set(choice) for choice in DEFAULT_LORA_TARGETS]
    for choice in wanted:
        found = [name for name, last in linears if last in choice]
        if found:
            return found
    known = sorted({last for _, last in linears})
    raise VitvizError(
        f"no Linear layer named {', '.join(names) or 'qkv, query/value or q_proj/v_proj'} in the blocks to adapt; "
        f"--lora-targets takes some of: {', '.join(known)}"
    )


def _lora(vit: nn.Module, cfg: TrainConfig) -> Tuned:
    from peft import LoraConfig, get_peft_model

    ft = cfg.finetune
    targets = lora_targets(vit, ft.lora_targets)
    config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(vit, config)  # injects the adapters into vit and freezes everything else
    for param in head_module(vit).parameters():
        param.requires_grad_(True)  # the new head trains with the adapters
    lora = {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "scaling": ft.lora_alpha / ft.lora_rank, "modules": targets}
    return Tuned(peft_model, peft_model.get_base_model(), lora)


# ---------------------------------------------------------------------------------------------------
# What a checkpoint holds


def export(module: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The plain model a checkpoint holds, and the adapter tensors beside it: for a peft model a merged copy
    (`merge_and_unload`; the live model keeps training) and `lora.<module>.A` / `.B`; otherwise the model itself."""
    if "peft" not in sys.modules:  # no LoRA in this process (peft is slow to import: leave it be)
        return module, {}
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, PeftModel):
        return module, {}
    adapters: dict[str, torch.Tensor] = {}
    for name, layer in module.get_base_model().named_modules():
        if isinstance(layer, LoraLayer):
            for adapter in layer.lora_A:
                adapters[f"{ADAPTER_PREFIX}{name}.A"] = layer.lora_A[adapter].weight.detach().clone()
                adapters[f"{ADAPTER_PREFIX}{name}.B"] = layer.lora_B[adapter].weight.detach().clone()
    merged = copy.deepcopy(module).merge_and_unload()
    return merged, adapters


def trainable_parameters(module: nn.Module) -> int:
    """Parameter elements that the optimiser updates."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
