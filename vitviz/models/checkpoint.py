"""The project checkpoint format: one .safetensors file whose header metadata key "vitviz" holds `ModelMeta`.

Writes are atomic (temporary file in the same folder, fsync, rename, fsync the folder), so a crash never
leaves a half-written checkpoint under the real name. Reads never unpickle arbitrary objects: safetensors
holds raw tensors only, and foreign .pth/.bin files go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from vitviz.errors import VitvizError
from vitviz.fileio import atomic_path
from vitviz.models.factory import build_model, build_timm_model
from vitviz.models.meta import FORMAT_VERSION, PROJECT_ARCH, ModelMeta

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
TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
MAX_MESSAGE_KEYS = 3  # how many offending keys a one-line error names


@dataclass
class LoadedModel:
    """A model ready for analysis, with what is needed to preprocess inputs and name its outputs."""

    model: nn.Module  # eval mode
    meta: ModelMeta
    source: str  # what the user asked for
    content_hash: str  # sha256 hex of the file bytes, or of "timm:<name>" for random init; caches key on it
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"path": resolved checkpoint path}


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
    path = _existing_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt or foreign files
        raise VitvizError(f"{path} is not a readable .safetensors file ({_first_line(exc)})") from None
    if META_KEY not in header:
        raise VitvizError(
            f"{path} is a safetensors file without vitviz metadata; for a bare state dict use "
            "timm:<name> with --weights"
        )
    return ModelMeta.from_json(header[META_KEY])


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Rebuild the model described by a project checkpoint and load its weights strictly (eval mode)."""
    path = _existing_file(path)
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
        raise VitvizError(f"{path} is not a readable .safetensors file ({_first_line(exc)})") from None


def model_from_meta(meta: ModelMeta) -> nn.Module:
    """A freshly initialised model with the architecture `meta` describes: the project config, a transformers
    config document (no download, no remote code), or a timm name with the keyword arguments it was made with."""
    if meta.config is not None:
        return build_model(meta.config)
    if meta.hf_config is not None:
        from vitviz.models.hf import build_hf_model  # hf reads this module's LoadedModel

        return build_hf_model(meta.arch, meta.hf_config, meta.input_size)
    return build_timm_model(
        meta.arch,
        num_classes=len(meta.class_names),
        in_chans=meta.in_chans,
        img_size=meta.input_size,
        **meta.arch_kwargs,
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from .pth/.pt/.bin with torch.load(weights_only=True) only.

    Dicts wrapping the state dict under "model" or "state_dict" are unwrapped, and a DistributedDataParallel
    "module." prefix is removed. Nothing here can run code stored in the file.
    """
    path = _existing_file(path)
    name = path.name.lower()
    if name.endswith(".safetensors"):
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:
            raise VitvizError(f"{path} is not a readable .safetensors file ({_first_line(exc)})") from None
    if not name.endswith(TORCH_PICKLE_SUFFIXES):
        raise VitvizError(f"{path.name}: weights must be .safetensors, .pth, .pt or .bin")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        raise VitvizError(
            f"refused to read {path}: it is not a plain PyTorch state dict (corrupt, or it holds Python objects "
            "other than tensors, which could run code); re-save it as a state dict or .safetensors"
        ) from None
    return _unwrap_state_dict(obj, path)


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


def describe_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str | None:
    """One line naming the first missing, unexpected and wrongly shaped keys, or None when all fit."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong_shape = [
        f"{k} {list(found[k])} vs model {list(expected[k])}" for k in expected if k in found and found[k] != expected[k]
    ]  # in the model's order, so the first named key is the earliest layer that does not fit
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:MAX_MESSAGE_KEYS]) + (", ..." if len(keys) > MAX_MESSAGE_KEYS else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(problems) or None


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(2):  # e.g. {"model": {...}} or {"state_dict": {...}}, as training scripts save them
        if isinstance(obj, dict):
            for wrapper in ("model", "state_dict"):
                if isinstance(obj.get(wrapper), dict):
                    obj = obj[wrapper]
                    break
    if not isinstance(obj, dict) or not obj:
        raise VitvizError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise VitvizError(
            f"{path} is not a plain state dict: {', '.join(not_tensors[:MAX_MESSAGE_KEYS])} are not tensors"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise VitvizError(f"no such file: {path}")
    if not path.is_file():
        raise VitvizError(f"{path} is not a file")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
