"""Model weights on disk and the loaded model: reading a state dict without running code, comparing its tensors
with a model's, hashing a file. Shared by the project checkpoint format (vitviz.models.checkpoint) and the
Hugging Face loader (vitviz.models.hf), which both read weights and return a `LoadedModel`."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from vitviz.errors import VitvizError
from vitviz.models.meta import ModelMeta

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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from .pth/.pt/.bin with torch.load(weights_only=True) only.

    Dicts wrapping the state dict under "model" or "state_dict" are unwrapped, and a DistributedDataParallel
    "module." prefix is removed. Nothing here can run code stored in the file.
    """
    path = existing_file(path)
    name = path.name.lower()
    if name.endswith(".safetensors"):
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:
            raise VitvizError(f"{path} is not a readable .safetensors file ({first_line(exc)})") from None
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


def existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise VitvizError(f"no such file: {path}")
    if not path.is_file():
        raise VitvizError(f"{path} is not a file")
    return path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its class name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
