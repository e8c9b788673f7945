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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitviz.errors import VitvizError
from vitviz.models.checkpoint import LoadedModel, file_sha256
from vitviz.models.meta import ModelMeta
from vitviz.tokens import TokenLayout

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"


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


def _preprocessor_size(processor: dict) -> tuple[int, int] | None:
    """The (H, W) the image processor hands the model: its centre crop, else a fixed resize; None otherwise."""
    candidates = [processor.get("crop_size")] if processor.get("do_center_crop") else []
    candidates.append(processor.get("size"))
    for value in candidates:
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, dict) and "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
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
            repo_id,
            allow_patterns=["*.json", "*.safetensors"],
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except Exception as error:  # offline, unknown repo, gated: all end in the same advice
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VitvizError(
            f"cannot download hf:{repo_id} from the Hugging Face Hub ({type(error).__name__}: {reason}); "
            "pass a local folder instead: hf:/path/to/folder"
        ) from error
    return Path(folder)


def _content_hash(folder: Path) -> str:
    """sha256 over the folder's config, preprocessor config and weight files (name and content hash each)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin"):
            digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


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


def load_hf(source: str) -> LoadedModel:
    """Load `hf:<repo id or local folder>`: a supported transformers vision model, eager attention, eval mode."""
    import transformers

    name = source[len(HF_PREFIX) :].strip() if source.startswith(HF_PREFIX) else source.strip()
    if not name:
        raise VitvizError("hf: needs a repository id or a local folder, e.g. hf:google/vit-base-patch16-224")
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise VitvizError(f"hf:{name} is neither a local model folder nor a Hub repository id (owner/name)")
        folder = _download(name)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise VitvizError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else ""
    if arch not in FAMILIES:
        raise VitvizError(
            f"hf:{name} is a {arch or 'model without architectures in config.json'}; vitviz reads {', '.join(FAMILIES)}"
        )
    processor_path = folder / "preprocessor_config.json"
    if not processor_path.is_file():
        raise VitvizError(f"{folder} has no preprocessor_config.json: vitviz reads the normalisation from it")
    processor = json.loads(processor_path.read_text())
    model_class = getattr(transformers, arch)
    hf_model = model_class.from_pretrained(str(folder), attn_implementation="eager")
    hf_model.eval()
    family = FAMILIES[arch]
    own_size = _pair(hf_model.config.image_size)
    wanted = _preprocessor_size(processor)
    img_size = wanted if (wanted is not None and family.interpolates) else own_size
    if wanted is not None and wanted != img_size:
        logger.warning(
            "%s: the image processor gives %s but the model takes %s; using %s", name, wanted, own_size, own_size
        )
    layout = hf_token_layout(hf_model, img_size)
    model = HFVisionTransformer(hf_model, layout).eval()
    in_chans = model.in_chans
    if processor.get("do_normalize", True):
        mean = tuple(float(v) for v in processor.get("image_mean", ()))
        std = tuple(float(v) for v in processor.get("image_std", ()))
        if len(mean) != in_chans or len(std) != in_chans:
            raise VitvizError(f"{processor_path} needs image_mean and image_std with {in_chans} values each")
    else:
        mean, std = (0.0,) * in_chans, (1.0,) * in_chans
    id2label = getattr(hf_model.config, "id2label", None) or {}
    class_names = [str(id2label.get(i, f"class {i}")) for i in range(model.num_classes)]
    meta = ModelMeta(
        arch=arch,
        config=None,
        class_names=class_names,
        input_size=img_size,
        in_chans=in_chans,
        mean=mean,
        std=std,
        training={"source": "hf", "name": name, "model_type": getattr(hf_model.config, "model_type", "")},
        resolution_history=[],
        hf_config=hf_model.config.to_dict(),
    )
    return LoadedModel(
        model=model, meta=meta, source=source, content_hash=_content_hash(folder), extra={"path": str(folder)}
    )
