"""The resume state: one declared schema that is both what is written and what is read back.

`ResumeState` lists every field a run needs to continue exactly. Each field (except `step`, which the run
folder puts into the file names and the JSON itself) carries the codec that stores it: where its tensors
go in the safetensors file and where its JSON goes in the .json file. `encode` and `decode` walk the same
list of fields, so a field cannot be written without being read, or read without being written; a field
declared without a codec fails at import.

The files are the ones `RunFolder.save_state` / `RunFolder.latest_state` write and read (safetensors +
JSON, no pickle); the layout is the one used before this schema existed, so earlier states stay readable:

    tensors  model.<name>                      model state_dict
             optimizer.<param id>.<key>        optimiser state tensors
             rng.torch, rng.cuda.<device>      torch RNG states
    JSON     optimizer {param_groups, scalars}, rng {python, numpy}, scheduler {total_steps, warmup_steps},
             data {steps_per_epoch}, epoch_sums, window_sums, best, consecutive_bad, skipped_total,
             last_eval, last_train, resolution_history, log_sizes
             (scheduler.step, data.epoch and data.batch are written as functions of the step, for people
             reading the file; they are not read back)
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch

from training.runfolder import RunFolder
from vitviz.errors import VitvizError

Tensors = dict[str, torch.Tensor]
Info = dict[str, Any]


class MissingField(KeyError):
    """A resume state file lacks a field of the schema (written by other code)."""


class _Codec(Protocol):
    def encode(self, value: Any, tensors: Tensors, info: Info) -> None: ...

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Any: ...


def _put(info: Info, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        info = info.setdefault(key, {})
    info[path[-1]] = value


def _get(info: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = info
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise MissingField(".".join(path))
        node = node[key]
    return node


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Json:
    """A JSON value at `path` in the .json file; `read` turns the parsed JSON back into the field's type."""

    path: tuple[str, ...]
    read: Any = _identity

    def encode(self, value: Any, tensors: Tensors, info: Info) -> None:
        _put(info, self.path, value)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Any:
        return self.read(_get(info, self.path))


@dataclass(frozen=True)
class _TensorMap:
    """A name -> tensor mapping stored as tensors `<prefix><name>`."""

    prefix: str

    def encode(self, value: Mapping[str, torch.Tensor], tensors: Tensors, info: Info) -> None:
        for name, tensor in value.items():
            tensors[self.prefix + name] = _stored(tensor)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        found = {k[len(self.prefix) :]: v for k, v in tensors.items() if k.startswith(self.prefix)}
        if not found:
            raise MissingField(self.prefix + "*")
        return found


@dataclass(frozen=True)
class _Tensor:
    """One tensor under `key`."""

    key: str

    def encode(self, value: torch.Tensor, tensors: Tensors, info: Info) -> None:
        tensors[self.key] = _stored(value)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> torch.Tensor:
        if self.key not in tensors:
            raise MissingField(self.key)
        return tensors[self.key]


@dataclass(frozen=True)
class _TensorList:
    """A sequence of tensors stored as `<prefix>0`, `<prefix>1`, ... (possibly none)."""

    prefix: str

    def encode(self, value: Sequence[torch.Tensor], tensors: Tensors, info: Info) -> None:
        for index, tensor in enumerate(value):
            tensors[f"{self.prefix}{index}"] = _stored(tensor)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        indices = sorted(int(k[len(self.prefix) :]) for k in tensors if k.startswith(self.prefix))
        return tuple(tensors[f"{self.prefix}{i}"] for i in indices)


@dataclass(frozen=True)
class _Optimizer:
    """A torch optimiser state_dict: its tensors as `optimizer.<param id>.<key>`, the rest as JSON."""

    prefix: str = "optimizer."
    path: tuple[str, ...] = ("optimizer",)

    def encode(self, value: Mapping[str, Any], tensors: Tensors, info: Info) -> None:
        scalars: dict[str, dict[str, Any]] = {}
        for param_id, param_state in value["state"].items():
            for key, item in param_state.items():
                if isinstance(item, torch.Tensor):
                    tensors[f"{self.prefix}{param_id}.{key}"] = _stored(item)
                else:
                    scalars.setdefault(str(param_id), {})[key] = item
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in value["param_groups"]]
        _put(info, self.path, {"param_groups": groups, "scalars": scalars})

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
        stored = _get(info, self.path)
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            if key.startswith(self.prefix):
                param_id, name = key[len(self.prefix) :].split(".", 1)
                state.setdefault(int(param_id), {})[name] = tensor
        for param_id, values in _get(stored, ("scalars",)).items():
            state.setdefault(int(param_id), {}).update(values)
        groups = [dict(g) for g in _get(stored, ("param_groups",))]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        return {"state": state, "param_groups": groups}


@dataclass(frozen=True)
class _PythonRng:
    """`random.getstate()`: (version, 625 ints, gauss) as a JSON list."""

    path: tuple[str, ...] = ("rng", "python")

    def encode(self, value: tuple[Any, ...], tensors: Tensors, info: Info) -> None:
        version, internal, gauss = value
        _put(info, self.path, [version, list(internal), gauss])

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> tuple[Any, ...]:
        version, internal, gauss = _get(info, self.path)
        return (version, tuple(internal), gauss)


_NUMPY_KEYS = ("kind", "keys", "pos", "has_gauss", "cached")


@dataclass(frozen=True)
class _NumpyRng:
    """numpy's legacy global state (kind, keys, pos, has_gauss, cached) as a JSON object."""

    path: tuple[str, ...] = ("rng", "numpy")

    def encode(self, value: tuple[Any, ...], tensors: Tensors, info: Info) -> None:
        kind, keys, pos, has_gauss, cached = value
        doc = {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss)}
        _put(info, self.path, {**doc, "cached": float(cached)})

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> tuple[Any, ...]:
        doc = _get(info, self.path)
        kind, keys, pos, has_gauss, cached = (_get(doc, (k,)) for k in _NUMPY_KEYS)
        return (str(kind), tuple(int(k) for k in keys), int(pos), int(has_gauss), float(cached))


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU, contiguous copy that later training steps cannot change."""
    return tensor.detach().cpu().contiguous().clone()


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}


def _ints(values: Mapping[str, Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.items()}


def _stored_as(codec: _Codec | None) -> dict[str, _Codec | None]:
    """A field's metadata: the codec that writes and reads it."""
    return {"codec": codec}


@dataclass(frozen=True, eq=False)
class ResumeState:
    """Everything a stopped run needs to continue exactly; each field declares how it is stored.

    (`training.runfolder.StoredState` is the raw form of the same files: tensors and JSON as they lie.)
    The learning-rate schedule is a pure function of the step and bf16 autocast needs no loss scaler, so
    neither has state of its own; the epoch and the batch within it are functions of the step as well.
    """

    # Optimiser steps done; the run folder stores it (in the file names and as the JSON's "step").
    step: int = field(metadata=_stored_as(None))
    # The trained module's state_dict, and the torch optimiser's state_dict.
    model: dict[str, torch.Tensor] = field(metadata=_stored_as(_TensorMap("model.")))
    optimizer: dict[str, Any] = field(metadata=_stored_as(_Optimizer()))
    # Process-wide RNGs: torch, CUDA (one per GPU; empty unless CUDA was in use), random, numpy.
    rng_torch: torch.Tensor = field(metadata=_stored_as(_Tensor("rng.torch")))
    rng_cuda: tuple[torch.Tensor, ...] = field(metadata=_stored_as(_TensorList("rng.cuda.")))
    rng_python: tuple[Any, ...] = field(metadata=_stored_as(_PythonRng()))
    rng_numpy: tuple[Any, ...] = field(metadata=_stored_as(_NumpyRng()))
    # What the schedule and the data order were computed from; checked on resume.
    total_steps: int = field(metadata=_stored_as(_Json(("scheduler", "total_steps"), int)))
    warmup_steps: int = field(metadata=_stored_as(_Json(("scheduler", "warmup_steps"), int)))
    steps_per_epoch: int = field(metadata=_stored_as(_Json(("data", "steps_per_epoch"), int)))
    # Metrics: this rank's sums over the epoch so far and since the last step record, the best epoch score
    # (it decides best.safetensors), non-finite steps in a row and in all, the latest evaluation and epoch
    # record ({} before the first).
    epoch_sums: dict[str, float] = field(metadata=_stored_as(_Json(("epoch_sums",), _floats)))
    window_sums: dict[str, float] = field(metadata=_stored_as(_Json(("window_sums",), _floats)))
    best: float | None = field(metadata=_stored_as(_Json(("best",))))
    consecutive_bad: int = field(metadata=_stored_as(_Json(("consecutive_bad",), int)))
    skipped_total: int = field(metadata=_stored_as(_Json(("skipped_total",), int)))
    last_eval: dict[str, Any] = field(metadata=_stored_as(_Json(("last_eval",), dict)))
    last_train: dict[str, Any] = field(metadata=_stored_as(_Json(("last_train",), dict)))
    # The model's resolution history (checkpoint metadata), and the byte length of metrics.jsonl and
    # summary.csv when the state was saved (a resumed run cuts them back to it).
    resolution_history: list[dict[str, Any]] = field(metadata=_stored_as(_Json(("resolution_history",), list)))
    log_sizes: dict[str, int] = field(metadata=_stored_as(_Json(("log_sizes",), _ints)))

    def encode(self) -> tuple[Tensors, Info]:
        """The tensors and the JSON object (without "step") of the files."""
        tensors: Tensors = {}
        info: Info = {}
        for name, codec in _CODECS.items():
            codec.encode(getattr(self, name), tensors, info)
        # Functions of the step, for whoever reads the file; decode does not read them.
        _put(info, ("scheduler", "step"), self.step)
        _put(info, ("data", "epoch"), self.step // self.steps_per_epoch)
        _put(info, ("data", "batch"), self.step % self.steps_per_epoch)
        return tensors, info

    @classmethod
    def decode(cls, step: int, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> ResumeState:
        """The state from the files' tensors and JSON; MissingField when the schema has a field they lack."""
        return cls(step=int(step), **{name: codec.decode(tensors, info) for name, codec in _CODECS.items()})

    def to_files(self, folder: RunFolder) -> None:
        """Write this state into the run folder (replacing older states)."""
        tensors, info = self.encode()
        folder.save_state(self.step, tensors, info)

    @classmethod
    def from_files(cls, folder: RunFolder) -> ResumeState | None:
        """The newest complete state of the run folder, or None when the run never saved one."""
        raw = folder.latest_state()
        if raw is None:
            return None
        try:
            return cls.decode(raw.step, raw.tensors, raw.info)
        except MissingField as exc:
            raise VitvizError(
                f"the resume state of step {raw.step} in {folder.state_dir} has no {exc.args[0]}; "
                "it was written by a different version of the training code"
            ) from None


_CODECS: dict[str, _Codec] = {f.name: f.metadata.get("codec") for f in fields(ResumeState) if f.name != "step"}
_UNDECLARED = [name for name, codec in _CODECS.items() if codec is None]
if _UNDECLARED:
    raise TypeError(f"ResumeState fields {_UNDECLARED} declare no codec (see _stored_as)")


# ---------------------------------------------------------------------------------------------------
# The process-wide random number generators


def rng_states() -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[Any, ...], tuple[Any, ...]]:
    """(torch, cuda, python, numpy) RNG states in the form of the ResumeState fields."""
    cuda: tuple[torch.Tensor, ...] = ()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = tuple(torch.cuda.get_rng_state_all())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy = (str(kind), tuple(int(k) for k in keys), int(pos), int(has_gauss), float(cached))
    return torch.get_rng_state(), cuda, random.getstate(), numpy


def set_rng_states(state: ResumeState) -> None:
    """Put the process-wide RNGs back to the state's (CUDA ones only on the same number of GPUs)."""
    torch.set_rng_state(state.rng_torch)
    if state.rng_cuda and torch.cuda.is_available() and len(state.rng_cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state.rng_cuda))
    random.setstate(state.rng_python)
    kind, keys, pos, has_gauss, cached = state.rng_numpy
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
