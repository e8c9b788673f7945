"""The resume state: the composition of the run's stateful components, declared once in `COMPONENTS`.

A component is an object of the run with `state_dict()` and `load_state_dict(state)` (the `Stateful`
idea of torchtitan): the model, the optimiser, the model EMA, the learning-rate schedule, the data position, the process
RNGs, the guard against non-finite steps, the metrics log and the resolution history each save and
restore themselves. `COMPONENTS` names them (by their attribute name on the run) and gives each the codec
that stores its state_dict: where its tensors go in the safetensors file and where its JSON goes in the
.json file. `capture` and `restore` walk that one list, `ResumeState.encode` and `decode` walk it as well,
so a component cannot be saved without being restored, or stored without being read back; and
`check_components` refuses a run whose stateful attributes are not exactly the declared ones.

Adding a component: write it with `state_dict` / `load_state_dict`, make it an attribute of the run, and
add its name and codec to `COMPONENTS`.

The files are the ones `RunFolder.save_state` / `RunFolder.latest_state` write and read (safetensors +
JSON, no pickle); the layout is the one used before components owned their state, so earlier states stay
readable and later code can read what this code writes:

    tensors  model.<name>                      model state_dict
             optimizer.<param id>.<key>        optimiser state tensors
             ema.<name>                        model EMA state_dict (runs with ema_decay only)
             rng.torch, rng.cuda.<device>      torch RNG states
    JSON     step (written by the run folder), optimizer {param_groups, scalars}, rng {python, numpy},
             scheduler {total_steps, warmup_steps}, data {steps_per_epoch}, epoch_sums, window_sums, best,
             consecutive_bad, skipped_total, last_eval, last_train, resolution_history, log_sizes
             (scheduler.step, data.epoch and data.batch are written as functions of the step, for people
             reading the file; they are not read back)
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from training.runfolder import RunFolder
from vitviz.errors import VitvizError

Tensors = dict[str, torch.Tensor]
Info = dict[str, Any]


class MissingField(KeyError):
    """A resume state file lacks a field of the schema (written by other code)."""


class Codec(Protocol):
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
class Json:
    """A JSON value at `path` in the .json file; `read` turns the parsed JSON back into the field's type."""

    path: tuple[str, ...]
    read: Any = _identity

    def encode(self, value: Any, tensors: Tensors, info: Info) -> None:
        _put(info, self.path, value)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Any:
        return self.read(_get(info, self.path))


@dataclass(frozen=True)
class TensorMap:
    """A name -> tensor mapping stored as tensors `<prefix><name>` (`optional`: none stored reads as empty)."""

    prefix: str
    optional: bool = False

    def encode(self, value: Mapping[str, torch.Tensor], tensors: Tensors, info: Info) -> None:
        for name, tensor in value.items():
            tensors[self.prefix + name] = _stored(tensor)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        found = {k[len(self.prefix) :]: v for k, v in tensors.items() if k.startswith(self.prefix)}
        if not found and not self.optional:
            raise MissingField(self.prefix + "*")
        return found


@dataclass(frozen=True)
class Tensor:
    """One tensor under `key`."""

    key: str

    def encode(self, value: torch.Tensor, tensors: Tensors, info: Info) -> None:
        tensors[self.key] = _stored(value)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> torch.Tensor:
        if self.key not in tensors:
            raise MissingField(self.key)
        return tensors[self.key]


@dataclass(frozen=True)
class TensorList:
    """A sequence of tensors stored as `<prefix>0`, `<prefix>1`, ... (possibly none)."""

    prefix: str

    def encode(self, value: Sequence[torch.Tensor], tensors: Tensors, info: Info) -> None:
        for index, tensor in enumerate(value):
            tensors[f"{self.prefix}{index}"] = _stored(tensor)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        indices = sorted(int(k[len(self.prefix) :]) for k in tensors if k.startswith(self.prefix))
        return tuple(tensors[f"{self.prefix}{i}"] for i in indices)


@dataclass(frozen=True)
class OptimizerState:
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


@dataclass(frozen=True)
class Fields:
    """A state_dict of named values, each stored by its own codec; its keys must be exactly the declared ones."""

    codecs: Mapping[str, Codec]

    def encode(self, value: Mapping[str, Any], tensors: Tensors, info: Info) -> None:
        if set(value) != set(self.codecs):
            raise TypeError(f"a state_dict with keys {sorted(value)} where the layout declares {sorted(self.codecs)}")
        for key, codec in self.codecs.items():
            codec.encode(value[key], tensors, info)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
        return {key: codec.decode(tensors, info) for key, codec in self.codecs.items()}


@dataclass(frozen=True)
class _DataPosition:
    """The data position {step, steps_per_epoch}: the step is the JSON's "step" (the run folder writes it and
    names the files after it), the epoch length data.steps_per_epoch; data.epoch, data.batch and
    scheduler.step are written from them for whoever reads the file, and not read back."""

    def encode(self, value: Mapping[str, Any], tensors: Tensors, info: Info) -> None:
        step, steps_per_epoch = int(value["step"]), int(value["steps_per_epoch"])
        _put(info, ("step",), step)
        _put(info, ("scheduler", "step"), step)
        _put(info, ("data", "epoch"), step // steps_per_epoch)
        _put(info, ("data", "batch"), step % steps_per_epoch)
        _put(info, ("data", "steps_per_epoch"), steps_per_epoch)

    def decode(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
        return {"step": int(_get(info, ("step",))), "steps_per_epoch": int(_get(info, ("data", "steps_per_epoch")))}


# ---------------------------------------------------------------------------------------------------
# The process-wide random number generators


class ProcessRng:
    """The process-wide RNGs (torch, CUDA, random, numpy) as a component of the resume state."""

    def state_dict(self) -> dict[str, Any]:
        """torch's state, the CUDA ones (one per GPU; empty unless CUDA was in use), random's, numpy's legacy one."""
        cuda: tuple[torch.Tensor, ...] = ()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        numpy = (str(kind), tuple(int(k) for k in keys), int(pos), int(has_gauss), float(cached))
        return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(), "numpy": numpy}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put the RNGs back (the CUDA ones only on the same number of GPUs)."""
        torch.set_rng_state(state["torch"])
        cuda = state["cuda"]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(list(cuda))
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------------
# The composition


@runtime_checkable
class Stateful(Protocol):
    """A component of the resume state: it saves and restores itself."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


# The run's components, by attribute name, with the codec of each one's state_dict: the one list of what
# a run saves. Restored in this order (the data position and the schedule first: they refuse a state
# that the run could not continue exactly, before anything else is changed).
COMPONENTS: dict[str, Codec] = {
    # Optimiser steps done and the epoch length (checked on resume); the data order follows from them.
    "position": _DataPosition(),
    # What the learning-rate schedule was computed from (checked on resume); it is a function of the step.
    "schedule": Fields(
        {
            "total_steps": Json(("scheduler", "total_steps"), int),
            "warmup_steps": Json(("scheduler", "warmup_steps"), int),
        }
    ),
    # The trained module (the masked-prediction wrapper, for that objective) and the torch optimiser.
    "model": TensorMap("model."),
    "optimizer": OptimizerState(),
    # The model EMA's weights (none when the run has no EMA; states written before EMA existed have none).
    "ema": Fields({"weights": TensorMap("ema.", optional=True)}),
    "rng": Fields(
        {"torch": Tensor("rng.torch"), "cuda": TensorList("rng.cuda."), "python": _PythonRng(), "numpy": _NumpyRng()}
    ),
    # Non-finite steps in a row and in all.
    "guard": Fields(
        {"consecutive_bad": Json(("consecutive_bad",), int), "skipped_total": Json(("skipped_total",), int)}
    ),
    # This rank's sums over the epoch so far and since the last step record, the best epoch score (it decides
    # best.safetensors), the latest evaluation and epoch record, the byte length of metrics.jsonl and summary.csv.
    "metrics": Fields(
        {
            "epoch_sums": Json(("epoch_sums",), _floats),
            "window_sums": Json(("window_sums",), _floats),
            "best": Json(("best",)),
            "last_eval": Json(("last_eval",), dict),
            "last_train": Json(("last_train",), dict),
            "log_sizes": Json(("log_sizes",), _ints),
        }
    ),
    # The model's resolution history (checkpoint metadata).
    "history": Fields({"resolution_history": Json(("resolution_history",), list)}),
}


@dataclass(frozen=True, eq=False)
class ResumeState:
    """Everything a stopped run needs to continue exactly: the state_dict of each component of `COMPONENTS`.

    (`training.runfolder.StoredState` is the raw form of the same files: tensors and JSON as they lie.)
    bf16 autocast needs no loss scaler, so there is no scaler component.
    """

    parts: Mapping[str, Mapping[str, Any]]  # component name -> its state_dict

    def __getitem__(self, component: str) -> Mapping[str, Any]:
        return self.parts[component]

    @property
    def step(self) -> int:
        """Optimiser steps done (the data position's)."""
        return int(self.parts["position"]["step"])

    def encode(self) -> tuple[Tensors, Info]:
        """The tensors and the JSON object (without "step", which the run folder writes) of the files."""
        tensors: Tensors = {}
        info: Info = {}
        for name, codec in COMPONENTS.items():
            codec.encode(self.parts[name], tensors, info)
        info.pop("step")
        return tensors, info

    @classmethod
    def decode(cls, step: int, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> ResumeState:
        """The state from the files' step, tensors and JSON; MissingField when a component's codec finds its
        part missing."""
        info = {**info, "step": int(step)}
        return cls({name: codec.decode(tensors, info) for name, codec in COMPONENTS.items()})

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


def check_components(owner: object) -> None:
    """Refuse an owner whose stateful attributes are not exactly `COMPONENTS` (a component that would be
    lost on resume, or a declared one that the owner lacks)."""
    stateful = {name for name, value in vars(owner).items() if isinstance(value, Stateful)}
    undeclared, absent = sorted(stateful - COMPONENTS.keys()), sorted(COMPONENTS.keys() - stateful)
    if undeclared or absent:
        raise TypeError(
            f"{type(owner).__name__}'s stateful attributes do not match training.resume.COMPONENTS: "
            f"not declared {undeclared}, declared but missing {absent}"
        )


def capture(owner: object) -> ResumeState:
    """The resume state of `owner`: each declared component's state_dict. Its tensors may be the live ones:
    write it before the next step."""
    return ResumeState({name: getattr(owner, name).state_dict() for name in COMPONENTS})


def restore(owner: object, state: ResumeState) -> None:
    """Load each declared component of `owner` from `state`, in the declared order."""
    for name in COMPONENTS:
        getattr(owner, name).load_state_dict(state[name])
