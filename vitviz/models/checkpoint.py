"""The project checkpoint format: one .safetensors file whose header metadata key "vitviz" holds `ModelMeta`.

Writes are atomic (temporary file in the same folder, fsync, rename, fsync the folder), so a crash never
leaves a half-written checkpoint under the real name. Reads never unpickle arbitrary objects: safetensors
holds raw tensors only, and foreign .pth/.bin files go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from vitviz.errors import VitvizError
from vitviz.fileio import atomic_path
from vitviz.models.factory import build_model, build_timm_model
from vitviz.models.meta import FORMAT_VERSION, PROJECT_ARCH, ModelMeta
from vitviz.models.weights import (
    LoadedModel,
    describe_mismatch,
    existing_file,
    file_sha256,
    first_line,
    read_state_dict,
)

logger = logging.getLogger(__name__)

# ModelMeta, FORMAT_VERSION and PROJECT_ARCH live in vitviz.models.meta (a leaf module); imported here too.
__all__ = [
    "ADAPTER_PREFIX",
    "FORMAT_VERSION",
    "PROJECT_ARCH",
    "LoadedModel",
    "ModelMeta",
    "describe_mismatch",
    "file_sha256",
    "load_checkpoint",
    "load_state_dict_checked",
    "model_from_meta",
    "read_adapters",
    "read_checkpoint_meta",
    "read_state_dict",
    "save_checkpoint",
]

META_KEY = "vitviz"
# Tensors beside the model's under this prefix (a fine-tune's LoRA matrices, `lora.<module>.A` and `.B`): kept for
# checking, never part of the model's state dict.
ADAPTER_PREFIX = "lora."


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: ModelMeta, adapters: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Write `model`'s tensors and `meta` to one .safetensors file, atomically; `adapters` (names starting with
    `ADAPTER_PREFIX`) are stored beside the model's tensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise VitvizError(f"checkpoint files end in .safetensors; got {path.name}")
    meta.validate()
    _check_meta_fits_model(meta, model)
    state = model.state_dict()
    clash = [k for k in state if k.startswith(ADAPTER_PREFIX)] + [k for k in adapters or {} if k in state]
    if clash or not all(k.startswith(ADAPTER_PREFIX) for k in adapters or {}):
        raise VitvizError(f"adapter tensors are named {ADAPTER_PREFIX}<module>.A/B, apart from the model's")
    tensors = _tensors_for_saving({**state, **(adapters or {})})
    metadata = {META_KEY: meta.to_json()}
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise VitvizError(f"cannot save checkpoint: folder {folder} does not exist")
    try:
        with atomic_path(path) as tmp_path:
            safetensors.torch.save_file(tensors, str(tmp_path), metadata=metadata)
    except OSError as exc:
        raise VitvizError(f"could not write checkpoint {path}: {exc.strerror or exc}") from exc
    logger.info("saved checkpoint %s (%d tensors)", path, len(tensors))


def read_checkpoint_meta(path: str | Path) -> ModelMeta:
    """Read and validate only the header of a project checkpoint (cheap: no tensors are loaded)."""
    path = existing_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt or foreign files
        raise VitvizError(f"{path} is not a readable .safetensors file ({first_line(exc)})") from None
    if META_KEY not in header:
        raise VitvizError(
            f"{path} is a safetensors file without vitviz metadata; for a bare state dict use "
            "timm:<name> with --weights"
        )
    return ModelMeta.from_json(header[META_KEY])


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Rebuild the model described by a project checkpoint and load its weights strictly (eval mode)."""
    path = existing_file(path)
    meta = read_checkpoint_meta(path)
    # Compare the file's tensor shapes with the architecture on the meta device first: a small file whose
    # header describes a huge model must be refused before gigabytes are allocated for it.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        reference = model_from_meta(meta)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    found = {k: v for k, v in _header_shapes(path).items() if not k.startswith(ADAPTER_PREFIX)}
    problem = describe_mismatch(expected, found)
    if problem:
        raise VitvizError(f"weights in {path} do not fit the model its metadata describes: {problem}")
    model = model_from_meta(meta)
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(ADAPTER_PREFIX)}
    load_state_dict_checked(model, state, f"{path}")
    model.eval()
    return LoadedModel(
        model=model, meta=meta, source=str(path), content_hash=file_sha256(path), extra={"path": str(path)}
    )


def read_adapters(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors stored beside a checkpoint's model (`ADAPTER_PREFIX` names; empty for most files)."""
    return {k: v for k, v in read_state_dict(path).items() if k.startswith(ADAPTER_PREFIX)}


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading any tensor data."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:
        raise VitvizError(f"{path} is not a readable .safetensors file ({first_line(exc)})") from None


def model_from_meta(meta: ModelMeta) -> nn.Module:
    """A freshly initialised model with the architecture `meta` describes: the project config, a transformers
    config document (no download, no remote code), or a timm name with the keyword arguments it was made with."""
    if meta.config is not None:
        return build_model(meta.config)
    if meta.hf_config is not None:
        from vitviz.models.hf import build_hf_model

        return build_hf_model(meta.arch, meta.hf_config, meta.input_size)
    return build_timm_model(
        meta.arch,
        num_classes=len(meta.class_names),
        in_chans=meta.in_chans,
        img_size=meta.input_size,
        **meta.arch_kwargs,
    )


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load `state` into `model`; any mismatch raises one line naming the first bad keys/shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = describe_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise VitvizError(f"weights in {source} do not fit the model: {problem}")
    bad = _first_non_finite(state)
    if bad is not None:
        raise VitvizError(f"weights in {source} contain NaN or infinite values (first: {bad})")
    model.load_state_dict(dict(state), strict=True)


def _tensors_for_saving(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses tied weights), all finite."""
    bad = _first_non_finite(state)
    if bad is not None:
        raise VitvizError(f"refusing to save a checkpoint with NaN or infinite weights (first: {bad})")
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[str, int]] = set()
    for key, tensor in state.items():
        tensor = tensor.detach()
        storage = (tensor.device.type, tensor.untyped_storage().data_ptr())
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        # Tied or sliced tensors get their own copy, so every key is in the file and any model
        # (tied or not) loads it strictly.
        if storage in seen_storages or not whole:
            tensor = tensor.clone()
        seen_storages.add(storage)
        out[key] = tensor.cpu().contiguous()
    return out


def _first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor.detach()).all()):
            return key
    return None


def _check_meta_fits_model(meta: ModelMeta, model: nn.Module) -> None:
    """Refuse to write a checkpoint that could not be loaded back (meta describing another model)."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and tuple(img_size) != tuple(meta.input_size):
        raise VitvizError(f"meta says input size {meta.input_size} but the model takes {tuple(img_size)}")
    if meta.config is None:
        return
    # Shapes only: build on the meta device (no memory, no effect on the caller's random state).
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        reference = build_model(meta.config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    problem = describe_mismatch(expected, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problem:
        raise VitvizError(f"the model does not match meta.config, so the checkpoint could not be loaded: {problem}")
