"""Hugging Face transformers ViTs as a model source: `hf:<repo id or local folder>`.

The transformers model is wrapped, unchanged apart from running its eager attention path, in `HFVisionTransformer`,
an nn.Module that speaks the vocabulary the rest of vitviz reads from timm models: ``blocks`` (the transformer
layers, each with its attention module as ``attn``), ``norm``, ``head``, ``num_classes``, ``embed_dim``,
``forward(x)`` -> logits (pooled features for backbones) and ``forward_features(x)`` -> the final tokens. The token
layout (image size, patch grid, stride, prefix tokens) is read from the model's embeddings and its folder's
preprocessor_config.json, never from a name; see docs/design.md, "Hugging Face models".

Attention is read where transformers itself reads it for ``output_attentions=True``: every attention module named
by the model's ``_can_record_outputs["attentions"]`` returns ``(output, probabilities)`` on the eager path; capture
(`vitviz.capture`) takes the probabilities from that return value, one layer at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from vitviz.errors import VitvizError
from vitviz.models.meta import ModelMeta
from vitviz.models.weights import LoadedModel, describe_mismatch, file_sha256, first_line, read_state_dict
from vitviz.tokens import TokenLayout

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"

# What a folder is checked against before anything is built (docs/reliability.md, "Hugging Face folders").
MAX_JSON_BYTES = 16 << 20  # config.json, preprocessor_config.json, the shard index: far above any real one
MAX_JSON_DEPTH = 32  # nesting of a JSON document (a real config nests 3-4 deep)
MAX_CLASSES = 100_000  # id2label entries / num_labels (ImageNet-21k has 21,843)
MAX_TOKENS = 65_536  # patches of the input grid
MAX_SHARDS = 1_000
# Sane bounds of the integers that size a model, checked before the architecture is built even on the meta
# device: a ViT-22B is 6144 wide (24576 in its MLP) and 48 layers deep.
CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 16_384),
    "intermediate_size": (1, 65_536),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 256),
    "num_channels": (1, 16),
    "num_register_tokens": (0, 1_024),
    "image_size": (1, 8_192),
    "patch_size": (1, 8_192),
    "num_labels": (0, MAX_CLASSES),
}
PROCESSOR_SIZE_LIMIT = 8_192  # pixels along one side of the processor's size or crop
SAFETENSORS_WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
# What a Hub download fetches: the files `load_hf` reads, nothing else in the repository.
DOWNLOAD_PATTERNS = ["config.json", "preprocessor_config.json", SAFETENSORS_WEIGHTS, SHARD_INDEX, "model-*.safetensors"]


@dataclass(frozen=True)
class _Family:
    """Where one transformers class keeps its final token norm and its class-token head (module paths)."""

    norm: str | None  # the module whose output is the final tokens; None: the last layer's output is
    head: str | None  # a Linear on the class token of ``norm``'s output; None: no per-token readout (logit lens)
    interpolates: bool  # the embeddings resample position embeddings to any input size on their own


# The supported classes. Anything else is refused with one line naming the class.
FAMILIES: dict[str, _Family] = {
    "ViTModel": _Family("layernorm", None, False),
    "ViTForImageClassification": _Family("vit.layernorm", "classifier", False),
    "DeiTModel": _Family("layernorm", None, False),
    "DeiTForImageClassification": _Family("deit.layernorm", "classifier", False),
    # Logits are the mean of a class-token and a distillation-token head: no single per-token readout.
    "DeiTForImageClassificationWithTeacher": _Family("deit.layernorm", None, False),
    "Dinov2Model": _Family("layernorm", None, True),
    # The classifier reads the class token and the mean patch token together.
    "Dinov2ForImageClassification": _Family("dinov2.layernorm", None, True),
    "Dinov2WithRegistersModel": _Family("layernorm", None, True),
    "Dinov2WithRegistersForImageClassification": _Family("dinov2_with_registers.layernorm", None, True),
    "BeitModel": _Family("layernorm", None, False),
    "BeitForImageClassification": _Family("beit.layernorm", None, False),
    # CLIP's post_layernorm acts on the pooled class token only: the last layer's output is the final tokens.
    "CLIPVisionModel": _Family(None, None, False),
    "SiglipVisionModel": _Family("vision_model.post_layernorm", None, False),
}


def _recorded_class(model: nn.Module, key: str) -> type:
    """The module class transformers records for ``output_attentions`` / ``output_hidden_states``."""
    recorded = getattr(type(model), "_can_record_outputs", None) or {}
    target = recorded.get(key)
    target = getattr(target, "target_class", target)  # an OutputRecorder names its class
    if not isinstance(target, type):
        raise VitvizError(f"{type(model).__name__} does not say which modules compute its {key}; not supported")
    return target


class HFVisionTransformer(nn.Module):
    """A transformers vision transformer seen through vitviz's timm vocabulary (the wrapped model is ``hf``)."""

    def __init__(self, hf_model: nn.Module, layout: TokenLayout) -> None:
        super().__init__()
        name = type(hf_model).__name__
        if name not in FAMILIES:
            raise VitvizError(
                f"{name} is not a supported Hugging Face vision transformer (supported: {', '.join(FAMILIES)})"
            )
        if getattr(hf_model.config, "_attn_implementation", None) != "eager":
            raise VitvizError(f"{name} must run its eager attention (attn_implementation='eager') to be read")
        self.hf = hf_model
        self.family = FAMILIES[name]
        self.fixed_token_layout = layout  # read by vitviz.tokens.token_layout
        config = hf_model.config
        self.embed_dim = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads)
        self.in_chans = int(getattr(config, "num_channels", 3))
        classifies = name.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))
        self.num_classes = int(config.num_labels) if classifies else 0
        attention_class = _recorded_class(hf_model, "attentions")
        layer_class = _recorded_class(hf_model, "hidden_states")
        self._attention = [m for m in hf_model.modules() if type(m) is attention_class]
        layers = [m for m in hf_model.modules() if type(m) is layer_class]
        lists = [m for m in hf_model.modules() if isinstance(m, nn.ModuleList) and list(m) == layers]
        if not layers or len(lists) != 1 or len(self._attention) != len(layers):
            raise VitvizError(f"cannot find one attention module per layer in {name}; not supported")
        self.__dict__["_layers"] = lists[0]  # not a submodule: its tensors are named once, under hf.
        for layer, attention in zip(layers, self._attention):
            # Plain attributes, not submodules: the state dict and the module tree stay transformers' own.
            layer.__dict__["attn"] = attention
            if not hasattr(attention, "num_heads"):
                attention.num_heads = self.num_heads

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer layers in order (transformers' own ModuleList)."""
        return self._layers

    @property
    def norm(self) -> nn.Module | None:
        """The module whose output is the final tokens, or None when that is the last layer's output."""
        return None if self.family.norm is None else self.hf.get_submodule(self.family.norm)

    @property
    def head(self) -> nn.Module | None:
        """The classifier applied to the class token of ``norm``'s output, where the logits are just that."""
        return None if self.family.head is None else self.hf.get_submodule(self.family.head)

    @property
    def num_prefix_tokens(self) -> int:
        return self.fixed_token_layout.num_prefix_tokens

    def classifier(self) -> nn.Linear | None:
        """The model's own classification Linear (``classifier``), which fine-tuning replaces; None without one."""
        found = getattr(self.hf, "classifier", None)
        return found if isinstance(found, nn.Linear) else None

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """timm's parameter grouping (`timm.models.group_parameters`): the embeddings are the stem, each layer a
        block, the final norm joins the last block; what timm's layer decay and block freezing read."""
        names = {id(m): n for n, m in self.named_modules()}
        embeddings = re.escape(names[id(_embeddings(self.hf))])
        layers = re.escape(names[id(self._layers)])
        blocks: list[tuple[str, tuple[int, ...] | None]] = [(rf"^{layers}\.(\d+)\.", None)]
        if self.family.norm is not None:
            blocks.append((rf"^{re.escape('hf.' + self.family.norm)}\.", (99999,)))
        return {"stem": rf"^{embeddings}\.", "blocks": rf"^{layers}\.(\d+)\." if coarse else blocks}

    def no_weight_decay(self) -> set[str]:
        """The prefix tokens and position tables of the embeddings (timm keeps weight decay off them)."""
        embeddings = _embeddings(self.hf)
        prefix = {id(m): n for n, m in self.named_modules()}[id(embeddings)]
        own = {name for name, _ in embeddings.named_parameters(recurse=False)}  # tokens and position tables
        own |= {name for name, _ in embeddings.named_parameters() if name.startswith("position_embedding.")}
        return {f"{prefix}.{name}" for name in own}

    def attention_probability_modules(self) -> list[nn.Module]:
        """The attention module of every layer, in order; each returns (output, probabilities [B, H, N, N])."""
        return list(self._attention)

    def patch_projection(self) -> nn.Conv2d:
        """The embeddings' patch convolution (read by `vitviz.analysis.filters`): ViT, DeiT, BEiT and DINOv2's
        ``patch_embeddings.projection``, CLIP and SigLIP's ``patch_embedding``."""
        return _patch_convolution(self.hf)

    def patch_position_table(self) -> torch.Tensor | None:
        """The absolute position embeddings of the patch positions only, [gh*gw, D] in row-major grid order, as
        the embeddings add them for this model's input size (read by `vitviz.models.patch_position_embeddings`).

        ViT, DeiT, DINOv2 and BEiT (with ``use_absolute_position_embeddings``) keep a [1, prefix + n, D]
        parameter ``position_embeddings``; CLIP and SigLIP an ``nn.Embedding`` ``position_embedding`` whose rows
        are the positions in order. The class (and DeiT's distillation) entries come first and are dropped;
        DINOv2's registers have no position. DINOv2 resamples its table to the input's grid with its own
        ``interpolate_pos_encoding`` (bicubic), which gives the table here when the grid differs from the
        trained one. None when the embeddings have no absolute table (BEiT's relative-position bias).
        """
        embeddings = _embeddings(self.hf)
        layout = self.fixed_token_layout
        parameter = getattr(embeddings, "position_embeddings", None)
        embedding = getattr(embeddings, "position_embedding", None)
        if isinstance(parameter, torch.Tensor):
            table = parameter.detach()[0]  # (entries, D)
        elif isinstance(embedding, nn.Embedding):
            table = embedding.weight.detach()
        else:
            return None
        with_position = int(layout.has_class_token) + int(layout.has_dist_token)  # prefix tokens with an entry
        if self.family.interpolates:  # what the embeddings add at this input size (the table itself at its own)
            tokens = torch.zeros(1, with_position + layout.num_patches, table.shape[-1], dtype=table.dtype)
            with torch.no_grad():
                table = embeddings.interpolate_pos_encoding(tokens, *layout.img_size).detach()[0]
        extra = table.shape[0] - layout.num_patches
        if extra != with_position:
            raise VitvizError(
                f"the position-embedding table has {table.shape[0]} entries but the model has a "
                f"{layout.grid[0]}x{layout.grid[1]} patch grid and {with_position} prefix tokens with a position"
            )
        return table[extra:].clone()

    def _base(self) -> nn.Module:
        return self.hf.base_model

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final tokens [B, N, D] (the base model's last_hidden_state)."""
        return self._base()(pixel_values=x).last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for classifiers; the model's pooled features [B, D] for backbones."""
        if self.num_classes:
            return self.hf(pixel_values=x).logits
        out = self.hf(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state.mean(dim=1)


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value  # type: ignore[misc]
    return (int(a), int(b))


def _preprocessor_size(processor: dict, path: Path) -> tuple[int, int] | None:
    """The (H, W) the image processor hands the model: its centre crop, else a fixed resize; None otherwise."""
    candidates = [("crop_size", processor.get("crop_size"))] if processor.get("do_center_crop") else []
    candidates.append(("size", processor.get("size")))
    for key, value in candidates:
        if isinstance(value, dict) and "height" in value and "width" in value:
            value = [value["height"], value["width"]]
        elif not _is_int(value):
            continue  # e.g. {"shortest_edge": 256}: a resize that keeps the aspect ratio, no fixed size
        return _sides(value, key, path, (1, PROCESSOR_SIZE_LIMIT))
    return None


def _embeddings(hf_model: nn.Module) -> nn.Module:
    for name, module in hf_model.named_modules():
        if name.rsplit(".", 1)[-1] == "embeddings":
            return module
    raise VitvizError(f"{type(hf_model).__name__} has no embeddings module; not supported")


def _patch_convolution(hf_model: nn.Module) -> nn.Conv2d:
    """The one Conv2d of the embeddings: the patch projection."""
    convs = [m for m in _embeddings(hf_model).modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != 1:
        raise VitvizError(f"{type(hf_model).__name__} has {len(convs)} convolutions in its embeddings; not supported")
    return convs[0]


def hf_token_layout(hf_model: nn.Module, img_size: tuple[int, int]) -> TokenLayout:
    """The token layout read from the embeddings: the patch convolution's stride, the class token
    (``cls_token`` or CLIP's ``class_embedding``), DeiT's ``distillation_token`` and DINOv2's ``register_tokens``."""
    embeddings = _embeddings(hf_model)
    stride = _pair(_patch_convolution(hf_model).stride)
    has_cls = getattr(embeddings, "cls_token", None) is not None or hasattr(embeddings, "class_embedding")
    has_dist = getattr(embeddings, "distillation_token", None) is not None
    registers = getattr(embeddings, "register_tokens", None)
    num_reg = int(registers.shape[1]) if registers is not None else 0
    return TokenLayout(
        img_size=img_size,
        grid=(img_size[0] // stride[0], img_size[1] // stride[1]),
        stride=stride,
        num_prefix_tokens=int(has_cls) + int(has_dist) + num_reg,
        has_class_token=has_cls,
        has_dist_token=has_dist,
        num_reg_tokens=num_reg,
    )


def _download(repo_id: str) -> Path:
    """The repository's config, preprocessor and weights through huggingface_hub (its cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id, allow_patterns=DOWNLOAD_PATTERNS, cache_dir=os.environ.get("HF_HUB_CACHE") or None
        )
    except Exception as error:  # offline, unknown repo, gated: all end in the same advice
        raise VitvizError(
            f"cannot download hf:{repo_id} from the Hugging Face Hub ({type(error).__name__}: {first_line(error)}); "
            "pass a local folder instead: hf:/path/to/folder"
        ) from error
    return Path(folder)


# --- the checks a folder passes before anything is built ---------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _regular_file(path: Path) -> bool:
    """A regular file (through symbolic links, as the Hub cache makes them): never a FIFO or a device."""
    return path.is_file()


def _depth(value: object) -> int:
    """How deeply a parsed JSON value nests (iteratively: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def read_json_object(path: Path) -> dict[str, Any]:
    """A small JSON object from a model folder: size, encoding, syntax, nesting and type checked, one line each."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise VitvizError(f"{path} is {size:,} bytes; a model folder's JSON files are at most {MAX_JSON_BYTES:,}")
        with open(path, "rb") as handle:
            data = handle.read(MAX_JSON_BYTES + 1)
    except OSError as error:
        raise VitvizError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise VitvizError(f"{path} is not UTF-8 text (byte {error.start})") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise VitvizError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:
        raise VitvizError(f"{path} is not valid JSON ({first_line(error)})") from None
    if not isinstance(document, dict):
        raise VitvizError(f"{path} holds a JSON {type(document).__name__}, not an object")
    if _depth(document) > MAX_JSON_DEPTH:
        raise VitvizError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels")
    return document


def _sides(value: object, key: str, path: Path, bounds: tuple[int, int]) -> tuple[int, int]:
    """An int or a pair of ints (height, width), each within bounds."""
    sides = [value, value] if _is_int(value) else value
    if not isinstance(sides, (list, tuple)) or len(sides) != 2 or not all(_is_int(v) for v in sides):
        raise VitvizError(f"{path}: {key} must be a whole number or a pair of them, not {str(value)[:60]}")
    low, high = bounds
    if not all(low <= v <= high for v in sides):
        raise VitvizError(f"{path}: {key} {sides[0]}x{sides[1]} is outside {low}..{high}")
    return (int(sides[0]), int(sides[1]))


def _check_config(config: dict[str, Any], name: str, path: Path) -> type:
    """The transformers class the config names, after its types and sizes are checked against sane bounds."""
    import transformers

    architectures = config.get("architectures")
    if architectures is None:
        architectures = []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise VitvizError(f"{path}: architectures must be a list of class names, not {str(architectures)[:60]}")
    arch = architectures[0] if architectures else ""
    if arch not in FAMILIES:
        shown = arch[:80] or "model without architectures in config.json"
        raise VitvizError(f"hf:{name} is a {shown}; vitviz reads {', '.join(FAMILIES)}")
    model_class = getattr(transformers, arch)
    model_type = config.get("model_type")
    wanted_type = model_class.config_class.model_type
    if model_type is not None and model_type != wanted_type:
        raise VitvizError(
            f"{path} describes a {str(model_type)[:60]!r} model but names {arch}, which reads {wanted_type!r} configs"
        )
    for key, bounds in CONFIG_BOUNDS.items():
        if key not in config or key in ("image_size", "patch_size"):
            continue
        value = config[key]
        if not _is_int(value) or not bounds[0] <= value <= bounds[1]:
            raise VitvizError(f"{path}: {key} {str(value)[:40]} is outside {bounds[0]}..{bounds[1]}")
    sizes = {
        key: _sides(config[key], key, path, CONFIG_BOUNDS[key]) for key in ("image_size", "patch_size") if key in config
    }
    if len(sizes) == 2:
        image, patch = sizes["image_size"], sizes["patch_size"]
        if image[0] < patch[0] or image[1] < patch[1]:
            raise VitvizError(
                f"{path}: image_size {image[0]}x{image[1]} is smaller than one {patch[0]}x{patch[1]} patch"
            )
        if (image[0] // patch[0]) * (image[1] // patch[1]) > MAX_TOKENS:
            raise VitvizError(f"{path}: image_size / patch_size gives more than {MAX_TOKENS:,} patches")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if _is_int(hidden) and _is_int(heads) and hidden % heads:
        raise VitvizError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    for key in ("id2label", "label2id"):
        labels = config.get(key)
        if labels is None:
            continue
        if not isinstance(labels, dict) or len(labels) > MAX_CLASSES:
            size = f"{len(labels):,} entries" if isinstance(labels, (dict, list)) else type(labels).__name__
            raise VitvizError(f"{path}: {key} must map at most {MAX_CLASSES:,} classes, not {size}")
    id2label = config.get("id2label") or {}
    if not all(isinstance(k, str) and k.strip().isdigit() and isinstance(v, str) for k, v in id2label.items()):
        raise VitvizError(f"{path}: id2label must map class numbers to names")
    return model_class


def _reference_model(model_class: type, config: dict[str, Any], path: Path) -> nn.Module:
    """The architecture the config describes, built on the meta device: shapes only, no memory."""
    try:
        hf_config = model_class.config_class.from_dict(dict(config), attn_implementation="eager")
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return model_class(hf_config)
    except Exception as error:  # a value transformers itself refuses: one line, whichever it is
        raise VitvizError(f"{path} does not describe a {model_class.__name__} ({first_line(error)})") from None


def _weight_files(folder: Path) -> list[Path]:
    """The weight files `from_pretrained` reads for this folder: one safetensors file, the shards its index
    names, or (only without safetensors) pytorch_model.bin."""
    single = folder / SAFETENSORS_WEIGHTS
    if _regular_file(single):
        return [single]
    index_path = folder / SHARD_INDEX
    if _regular_file(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise VitvizError(f"{index_path} has no weight_map of tensor names to shard files")
        names = sorted(set(weight_map.values()))
        if len(names) > MAX_SHARDS:
            raise VitvizError(f"{index_path} names {len(names):,} shards; at most {MAX_SHARDS:,} are read")
        shards = []
        for shard in names:
            path = folder / shard
            if Path(shard).name != shard or not shard.endswith(".safetensors") or not _regular_file(path):
                raise VitvizError(f"{index_path} names {shard[:80]!r}, which is not a .safetensors file in {folder}")
            shards.append(path)
        return [index_path, *shards]
    pickled = folder / PICKLE_WEIGHTS
    if _regular_file(pickled):
        return [pickled]
    raise VitvizError(f"{folder} has no weights ({SAFETENSORS_WEIGHTS}, {SHARD_INDEX} or {PICKLE_WEIGHTS})")


def _found_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers (no tensor data read), or from a state dict that
    `torch.load(weights_only=True)` accepts (`read_state_dict`: a pickle that would run code is refused)."""
    found: dict[str, tuple[int, ...]] = {}
    for path in files:
        if path.name == SHARD_INDEX:
            continue
        if path.suffix != ".safetensors":
            found.update({key: tuple(tensor.shape) for key, tensor in read_state_dict(path).items()})
            continue
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                found.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})  # noqa: SIM118
        except Exception as error:  # safetensors' own error types for truncated, corrupt or foreign files
            raise VitvizError(f"{path} is not a readable .safetensors file ({first_line(error)})") from None
    return found


def _check_weights(reference: nn.Module, found: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Every tensor the model has must be in the weight files, with its shape: transformers would silently
    initialise a missing one at random. The file's names are read as `from_pretrained` reads them (its renamings
    of older checkpoints, the base model's prefix added or dropped); tensors the model does not use are ignored,
    as transformers ignores them. A tensor that transformers converts on loading (several merged into one) is
    only looked for, its shape left to transformers."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    expected = {key: tuple(tensor.shape) for key, tensor in reference.state_dict().items()}
    conversions = get_model_conversion_mapping(reference)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    matched: dict[str, tuple[int, ...]] = {}
    for key, shape in found.items():
        target, converted = rename_source_key(key, renamings, converters, reference.base_model_prefix, expected)
        if target in expected:
            matched[target] = expected[target] if converted is not None else shape
    problem = describe_mismatch(expected, matched)
    if problem:
        raise VitvizError(f"the weights in {folder} do not cover the model its config.json describes: {problem}")


def _content_hash(files: list[Path]) -> str:
    """sha256 over the files the model is read from (name and content hash each), and nothing else."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _check_processor(
    processor: dict[str, Any], path: Path, in_chans: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation (mean, std) the processor applies, checked: finite numbers, one per channel, std > 0."""
    if not processor.get("do_normalize", True):
        return (0.0,) * in_chans, (1.0,) * in_chans
    mean, std = processor.get("image_mean"), processor.get("image_std")
    for key, values in (("image_mean", mean), ("image_std", std)):
        if not isinstance(values, list) or len(values) != in_chans or not all(_is_number(v) for v in values):
            raise VitvizError(f"{path} needs image_mean and image_std with {in_chans} numbers each ({key} is not)")
    if not all(v > 0 for v in std):  # type: ignore[union-attr]
        raise VitvizError(f"{path}: image_std must be positive")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[union-attr]


def build_hf_model(arch: str, config_doc: Mapping[str, Any], img_size: tuple[int, int]) -> HFVisionTransformer:
    """A freshly initialised supported transformers class from its config document, at input size `img_size`:
    how a checkpoint of a transformers model is rebuilt (no download, no remote code: only `FAMILIES`)."""
    import transformers

    if arch not in FAMILIES:
        raise VitvizError(
            f"{arch} is not a supported Hugging Face vision transformer (supported: {', '.join(FAMILIES)})"
        )
    model_class = getattr(transformers, arch)
    try:
        config = model_class.config_class.from_dict(dict(config_doc))
    except (TypeError, ValueError, KeyError) as exc:
        raise VitvizError(f"the {arch} config document in the checkpoint is invalid: {exc}") from None
    hf_model = model_class._from_config(config, attn_implementation="eager")
    return HFVisionTransformer(hf_model, hf_token_layout(hf_model, tuple(img_size))).eval()


def resample_hf_input_size(
    model: HFVisionTransformer, meta: ModelMeta, new_img_size: tuple[int, int]
) -> tuple[HFVisionTransformer, ModelMeta]:
    """A copy of a transformers model that takes `new_img_size` inputs, and its meta (for fine-tuning at a new
    size): the embeddings' absolute table ``position_embeddings`` [1, prefix + gh*gw, D] is resampled in 2D with
    timm's `resample_abs_pos_embed` (bicubic, prefix entries kept) and the config's ``image_size`` follows, so
    the config document rebuilds the model. The resampling is appended to `meta.resolution_history`."""
    from timm.layers import resample_abs_pos_embed

    new_size = (int(new_img_size[0]), int(new_img_size[1]))
    layout = model.fixed_token_layout
    if new_size[0] % layout.stride[0] or new_size[1] % layout.stride[1] or min(new_size) <= 0:
        raise VitvizError(f"new image size {new_size} is not a positive multiple of the stride {layout.stride}")
    new_model = copy.deepcopy(model)
    embeddings = _embeddings(new_model.hf)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Parameter) or table.ndim != 3:
        raise VitvizError(f"{type(model.hf).__name__} has no absolute position table that vitviz can resample")
    new_grid = (new_size[0] // layout.stride[0], new_size[1] // layout.stride[1])
    with torch.no_grad():
        resampled = resample_abs_pos_embed(
            table.detach(),
            new_size=list(new_grid),
            old_size=list(layout.grid),
            num_prefix_tokens=table.shape[1] - layout.num_patches,
        )
    embeddings.position_embeddings = nn.Parameter(resampled)
    new_model.hf.config.image_size = list(new_size) if new_size[0] != new_size[1] else new_size[0]
    for module in embeddings.modules():  # the embeddings and their patch embedding check the input size
        if hasattr(module, "image_size"):
            module.image_size = new_size
        if isinstance(getattr(module, "num_patches", None), int):
            module.num_patches = new_grid[0] * new_grid[1]
    new_model.fixed_token_layout = hf_token_layout(new_model.hf, new_size)
    entry = {"method": "bicubic", "old_grid": list(layout.grid), "new_grid": list(new_grid)}
    new_meta = dataclasses.replace(
        meta,
        input_size=new_size,
        resolution_history=[*meta.resolution_history, entry],
        hf_config=new_model.hf.config.to_dict(),
    )
    return new_model, new_meta


def load_hf(source: str, *, local_folders: bool = True) -> LoadedModel:
    """Load `hf:<repo id or local folder>`: a supported transformers vision model, eager attention, eval mode.

    Everything the folder says is checked before any model is built: the JSON files (size, encoding, nesting,
    types), the config's sizes against sane bounds, and the architecture it implies (built on the meta device)
    against the tensor names and shapes in the weight files' headers. `local_folders=False` reads the name as a
    Hub id only, never as a folder on this machine (the studio, whose names come from URLs).
    """
    name = source[len(HF_PREFIX) :].strip() if source.startswith(HF_PREFIX) else source.strip()
    if not name:
        raise VitvizError("hf: needs a repository id or a local folder, e.g. hf:google/vit-base-patch16-224")
    folder = Path(name).expanduser()
    if not local_folders or not folder.is_dir():
        looks_local = name.startswith((".", "/", "~")) or ".." in name or "\\" in name
        if looks_local or name.count("/") != 1 or (local_folders and folder.exists()):
            raise VitvizError(f"hf:{name} is neither a local model folder nor a Hub repository id (owner/name)")
        folder = _download(name)
    config_path = folder / "config.json"
    if not _regular_file(config_path):
        raise VitvizError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = read_json_object(config_path)
    model_class = _check_config(config, name, config_path)
    arch = model_class.__name__
    processor_path = folder / "preprocessor_config.json"
    if not _regular_file(processor_path):
        raise VitvizError(f"{folder} has no preprocessor_config.json: vitviz reads the normalisation from it")
    processor = read_json_object(processor_path)
    mean, std = _check_processor(processor, processor_path, int(config.get("num_channels", 3)))
    family = FAMILIES[arch]
    wanted = _preprocessor_size(processor, processor_path)
    weights = _weight_files(folder)
    reference = _reference_model(model_class, config, config_path)
    _check_weights(reference, _found_shapes(weights), folder)
    del reference
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local folder loads in a moment: no "Loading weights" bar on stderr
    try:
        hf_model = model_class.from_pretrained(
            str(folder),
            attn_implementation="eager",
            local_files_only=True,
            use_safetensors=weights[0].name != PICKLE_WEIGHTS,
        )
    except Exception as error:  # anything the checks above did not foresee still ends in one line
        raise VitvizError(
            f"transformers could not load hf:{name} ({type(error).__name__}: {first_line(error)})"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    hf_model.eval()
    own_size = _pair(hf_model.config.image_size)
    img_size = wanted if (wanted is not None and family.interpolates) else own_size
    if wanted is not None and wanted != img_size:
        logger.warning(
            "%s: the image processor gives %s but the model takes %s; using %s", name, wanted, own_size, own_size
        )
    layout = hf_token_layout(hf_model, img_size)
    if not 1 <= layout.num_patches <= MAX_TOKENS:
        raise VitvizError(
            f"hf:{name}: a {img_size[0]}x{img_size[1]} input gives {layout.grid[0]}x{layout.grid[1]} patches of "
            f"{layout.stride[0]}x{layout.stride[1]} px; at least 1 and at most {MAX_TOKENS:,} are needed"
        )
    model = HFVisionTransformer(hf_model, layout).eval()
    id2label = getattr(hf_model.config, "id2label", None) or {}
    class_names = [str(id2label.get(i, f"class {i}")) for i in range(model.num_classes)]
    meta = ModelMeta(
        arch=arch,
        config=None,
        class_names=class_names,
        input_size=img_size,
        in_chans=model.in_chans,
        mean=mean,
        std=std,
        training={"source": "hf", "name": name, "model_type": getattr(hf_model.config, "model_type", "")},
        resolution_history=[],
        hf_config=hf_model.config.to_dict(),
    )
    files = [config_path, processor_path, *weights]
    return LoadedModel(
        model=model, meta=meta, source=source, content_hash=_content_hash(files), extra={"path": str(folder)}
    )
