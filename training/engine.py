"""The training loop: one engine for train, fine-tune and resume, in one process or under torchrun.

Everything random is a function of the config's seed and the position in the run, so a run stopped at
any step and resumed continues exactly as if it had never stopped (bitwise on CPU):
- the order of epoch e is a permutation seeded by (seed, e); step s of the epoch takes positions
  [s*B, (s+1)*B) of it (drop-last), so resuming at step s skips exactly the batches already seen;
- augmentation of sample i in epoch e runs under torch's RNG seeded by (seed, e, i);
- masking for masked patch prediction at global step t is drawn from a generator seeded by (seed, t);
- dropout and stochastic depth at step t run under torch's RNG seeded by (seed, t, rank);
and the resume state holds the model, the optimiser, the step (the schedule is a pure function of it),
the running metric sums, and every global RNG state as well.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training import distributed
from training.config import TrainConfig
from training.data.memory import InMemoryImages
from training.distributed import DistContext
from training.masked import Corruption, MaskedPatchModel, colour_class_names, colour_targets, sample_corruption
from training.runfolder import RunFolder
from vitviz.errors import VitvizError
from vitviz.models import (
    ModelMeta,
    ViTConfig,
    build_model,
    load_model,
    resample_input_size,
    save_checkpoint,
)
from vitviz.models.checkpoint import PROJECT_ARCH
from vitviz.tokens import token_layout

logger = logging.getLogger(__name__)

# Salts that keep the seeded streams for different purposes apart.
_ORDER_STREAM, _AUGMENT_STREAM, _MASK_STREAM, _STEP_STREAM, _EVAL_MASK_STREAM = range(5)


class TrainingFailed(Exception):
    """A run that had to stop (e.g. the loss stayed non-finite); the message is one line for the user."""


@dataclass(frozen=True)
class RunOptions:
    """How and where a run executes; none of it changes what the run computes."""

    runs_dir: Path = Path("runs")
    run_id: str | None = None  # default: <preset>-<date>-<time>
    resume: Path | None = None  # an existing run folder to continue
    max_steps: int | None = None  # stop (resumably) once this many steps of the whole run are done
    device: str = "auto"
    progress: bool = False  # tqdm bar on stderr


@dataclass(frozen=True)
class RunResult:
    """What a finished (or stopped) run reports back."""

    run_dir: Path | None  # None on non-main ranks of a fresh distributed run
    status: str  # "finished", or "stopped" when max_steps or a signal ended it early
    step: int
    metrics: dict[str, float | None]


# ---------------------------------------------------------------------------------------------------
# Seeds, data order and samples


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from several non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) >> 1


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of an epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(mix_seed(seed, _ORDER_STREAM, epoch))
    return torch.randperm(num_samples, generator=generator).tolist()


def rank_batches(order: Sequence[int], batch_size: int, ctx: DistContext, start: int, stop: int) -> list[list[int]]:
    """This rank's batches for steps [start, stop) of an epoch (DistributedSampler sharding, drop-last)."""
    mine = distributed.shard(order, ctx)
    per_rank = batch_size // ctx.world_size
    return [mine[s * per_rank : (s + 1) * per_rank] for s in range(start, stop)]


class EpochSamples(Dataset):
    """Transformed samples keyed by (epoch, index); random augmentation is seeded by (seed, epoch, index).

    Seeding per sample (instead of relying on the RNG state of whichever process loads it) makes the data
    independent of DataLoader workers, of the world size and of where a run was resumed.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor], seed: int, randomised: bool) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.randomised = randomised

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        image, label = self.dataset[index]
        if not self.randomised:
            return self.transform(image), int(label)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, _AUGMENT_STREAM, epoch, index))
            return self.transform(image), int(label)


def make_loader(samples: EpochSamples, epoch: int, batches: list[list[int]], num_workers: int, pin: bool) -> DataLoader:
    keyed = [[(epoch, i) for i in batch] for batch in batches]
    return DataLoader(samples, batch_sampler=keyed, num_workers=num_workers, pin_memory=pin)


# ---------------------------------------------------------------------------------------------------
# Losses, schedule, optimiser


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on raw logits (no softmax in front), in float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at (0-based) optimiser step `step`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


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


def build_optimizer(module: nn.Module, vit: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters: no weight decay on 1D parameters, position embeddings
    and prefix tokens; per-layer lr scales (`lr_scale`) when layer decay is on."""
    skip = set(vit.no_weight_decay()) if hasattr(vit, "no_weight_decay") else set()
    if cfg.optim.layer_decay is not None:
        groups = param_groups_layer_decay(
            vit, weight_decay=cfg.optim.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.optim.layer_decay
        )
    else:
        groups = param_groups_weight_decay(vit, weight_decay=cfg.optim.weight_decay, no_weight_decay_list=skip)
    vit_params = {id(p) for p in vit.parameters()}
    extra = [p for p in module.parameters() if p.requires_grad and id(p) not in vit_params]
    if extra:  # e.g. the [mask] embedding of masked patch prediction
        groups.append({"params": extra, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)


# ---------------------------------------------------------------------------------------------------
# One step, evaluation, state


@dataclass(frozen=True)
class StepOutcome:
    """What one optimiser step did, summed over this rank's images."""

    loss_sum: float  # sum over predictions of the loss (mean loss * count)
    correct: int
    count: int  # predictions: images (classify) or corrupted patches (masked)
    skipped: bool  # loss or gradient not finite: the update was not applied
    lr: float


class Trainer:
    """Model, optimiser and objective of a run; one `train_step` per global batch."""

    def __init__(
        self,
        cfg: TrainConfig,
        vit: nn.Module,
        ctx: DistContext,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        total_steps: int,
        warmup_steps: int,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.vit = vit
        self.module: nn.Module = MaskedPatchModel(vit, cfg.masked) if cfg.objective == "masked" else vit
        self.module.to(ctx.device)
        self.optimizer = build_optimizer(self.module, vit, cfg)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.mean = torch.tensor(mean, dtype=torch.float32, device=ctx.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=ctx.device)
        self._wrapped: nn.Module | None = None
        self._num_patches = token_layout(vit).num_patches
        self._bf16_supported = ctx.device.type != "cuda" or torch.cuda.is_bf16_supported()
        if cfg.precision == "bf16" and not self._bf16_supported:
            logger.warning("this GPU has no bfloat16 support; training in float32")

    @property
    def wrapped(self) -> nn.Module:
        """The module the forward pass goes through: DDP-wrapped under torchrun (made on first use, so a
        resume state is loaded into the plain module first)."""
        if self._wrapped is None:
            if self.ctx.is_distributed:
                device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
                self._wrapped = DistributedDataParallel(self.module, device_ids=device_ids)
            else:
                self._wrapped = self.module
        return self._wrapped

    def _autocast(self) -> Any:
        if self.cfg.precision == "bf16" and self._bf16_supported:
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def set_lr(self, step: int) -> float:
        factor = lr_factor(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            decay=self.cfg.schedule.decay,
            min_ratio=self.cfg.schedule.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * group["lr_scale"] * factor
        return self.cfg.optim.lr * factor

    def _loss(
        self, module: nn.Module, images: torch.Tensor, labels: torch.Tensor, corruption: Corruption | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean loss, number correct, number of predictions) for one micro-batch."""
        if corruption is None:
            with self._autocast():
                logits = module(images)  # (B, classes)
            loss = classification_loss(logits, labels, self.cfg.label_smoothing)
            return loss, (logits.argmax(-1) == labels).sum(), int(labels.numel())
        c = corruption.to(self.ctx.device)
        with self._autocast():
            logits = module(images, c.use_mask, c.use_random, c.random_source)  # (B, N, colours)
        stride = token_layout(self.vit).stride
        targets = colour_targets(images, self.mean, self.std, stride, self.cfg.masked.colour_bits)  # (B, N)
        picked, targets = logits[c.corrupted], targets[c.corrupted]  # (M, colours), (M,)
        loss = classification_loss(picked, targets, 0.0)
        return loss, (picked.argmax(-1) == targets).sum(), int(targets.numel())

    def _step_corruption(self, step: int, local_size: int) -> Corruption | None:
        """The corruption of this rank's images at a step, drawn for the whole global batch (so it does not
        depend on the world size) and cut to this rank's rows r, r + W, ..."""
        if self.cfg.objective != "masked":
            return None
        generator = torch.Generator().manual_seed(mix_seed(self.cfg.seed, _MASK_STREAM, step))
        whole = sample_corruption(self.cfg.batch_size, self._num_patches, self.cfg.masked, generator)
        rows = torch.arange(self.ctx.rank, self.cfg.batch_size, self.ctx.world_size)[:local_size]
        return whole.rows(rows)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> StepOutcome:
        """Forward/backward over the micro-batches of this rank's batch, then one guarded optimiser step."""
        self.module.train()
        torch.manual_seed(mix_seed(self.cfg.seed, _STEP_STREAM, step, self.ctx.rank))
        lr = self.set_lr(step)
        images = images.to(self.ctx.device, non_blocking=True)
        labels = labels.to(self.ctx.device, non_blocking=True)
        corruption = self._step_corruption(step, images.shape[0])
        micro = images.shape[0] // self.cfg.grad_accum
        loss_sum, correct, count = torch.zeros((), device=self.ctx.device), 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for m in range(self.cfg.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            last = m == self.cfg.grad_accum - 1
            # DDP all-reduces gradients only after the last micro-batch.
            sync = nullcontext() if last or not self.ctx.is_distributed else self.wrapped.no_sync()
            with sync:
                loss, hits, n = self._loss(
                    self.wrapped, images[part], labels[part], None if corruption is None else corruption.rows(part)
                )
                (loss / self.cfg.grad_accum).backward()
            loss_sum = loss_sum + loss.detach() * n
            correct += int(hits)
            count += n
        grad_norm = self._grad_norm()
        bad = torch.stack([(~torch.isfinite(loss_sum)).float(), (~torch.isfinite(grad_norm)).float()])
        bad = distributed.all_reduce_sum(bad, self.ctx)
        skipped = bool(bad.sum().item() > 0)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        return StepOutcome(loss_sum=float(loss_sum), correct=correct, count=count, skipped=skipped, lr=lr)

    def _grad_norm(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.ctx.device)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()

    @torch.no_grad()
    def evaluate(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Mean loss and accuracy over all ranks' shares of the evaluation split."""
        self.module.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # loss sum, correct, count
        for index, (images, labels) in enumerate(batches):
            images = images.to(self.ctx.device)
            labels = labels.to(self.ctx.device)
            corruption = None
            if self.cfg.objective == "masked":
                seed = mix_seed(self.cfg.seed, _EVAL_MASK_STREAM, self.ctx.rank, index)
                generator = torch.Generator().manual_seed(seed)
                corruption = sample_corruption(images.shape[0], self._num_patches, self.cfg.masked, generator)
            loss, hits, n = self._loss(self.module, images, labels, corruption)
            totals += torch.tensor([float(loss) * n, float(hits), n], dtype=torch.float64, device=self.ctx.device)
        totals = distributed.all_reduce_sum(totals, self.ctx)
        count = max(1.0, float(totals[2]))
        return {"loss": float(totals[0]) / count, "accuracy": float(totals[1]) / count, "count": int(totals[2])}

    # --- resume state -----------------------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Model, optimiser and RNG states as tensors plus JSON-able info (no pickles)."""
        tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in self.module.state_dict().items()}
        optim_tensors, optim_info = _optimizer_state(self.optimizer)
        tensors.update(optim_tensors)
        rng_tensors, rng_info = _rng_state()
        tensors.update(rng_tensors)
        return tensors, {"optimizer": optim_info, "rng": rng_info}

    def load_state(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.module.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(_optimizer_state_dict(tensors, info["optimizer"]))
        _set_rng_state(tensors, info["rng"])


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_state_dict(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, values in info["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = [dict(g) for g in info["param_groups"]]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    info = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    return tensors, info


def _set_rng_state(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = info["numpy"]
    keys = np.array(numpy["keys"], dtype=np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))


# ---------------------------------------------------------------------------------------------------
# Model and data set-up


@dataclass(frozen=True)
class DataSetup:
    train: Any  # VisionDataset
    eval: Any | None
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _build_datasets(cfg: TrainConfig, input_size: tuple[int, int]) -> tuple[Any, Any | None]:
    from training.data import build_dataset

    data = cfg.data
    common = dict(img_size=data.img_size or input_size, root=data.root, seed=cfg.seed, download=data.download)
    train = build_dataset(data.dataset, split=data.train_split, num_samples=data.num_train_samples, **common)
    evaluation = None
    if data.eval_split:
        evaluation = build_dataset(data.dataset, split=data.eval_split, num_samples=data.num_eval_samples, **common)
    return train, evaluation


def _normalisation(cfg: TrainConfig, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.data.mean is None or cfg.data.std is None:
        return (0.5,) * in_chans, (0.5,) * in_chans
    if len(cfg.data.mean) != in_chans:
        raise VitvizError(f"data.mean/std give {len(cfg.data.mean)} channel(s) but the model takes {in_chans}")
    return tuple(cfg.data.mean), tuple(cfg.data.std)


def _finetune_model(loaded: Any, cfg: TrainConfig, class_names: list[str]) -> tuple[nn.Module, ViTConfig, ModelMeta]:
    """The source checkpoint's model at the new input size with a new zero-initialised linear head."""
    model, meta = loaded.model, loaded.meta
    if cfg.finetune.img_size is not None and tuple(cfg.finetune.img_size) != tuple(meta.input_size):
        model, meta = resample_input_size(model, meta, tuple(cfg.finetune.img_size))
    new_cfg = replace(meta.config, num_classes=len(class_names), head="linear")
    new_model = build_model(new_cfg)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = new_model.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise VitvizError(
            f"cannot carry the weights of {cfg.finetune.source} over: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    nn.init.zeros_(new_model.head.weight)  # the paper's zero-initialised D x K head
    nn.init.zeros_(new_model.head.bias)
    return new_model, new_cfg, meta


def _resolve(cfg: TrainConfig) -> tuple[TrainConfig, nn.Module, DataSetup, list[dict[str, Any]]]:
    """Datasets, the initial model and the config with everything decided at start-up filled in
    (classes and channels from the dataset, the fine-tuned architecture, normalisation)."""
    source = None
    input_size = cfg.model.img_size
    if cfg.finetune.source is not None:
        source = load_model(cfg.finetune.source)
        if source.meta.config is None:
            raise VitvizError(
                f"{cfg.finetune.source} is a timm model ({source.meta.arch}); fine-tuning starts from a vitviz "
                "checkpoint or run folder"
            )
        input_size = tuple(cfg.finetune.img_size or source.meta.input_size)  # type: ignore[assignment]
    train_set, eval_set = _build_datasets(cfg, input_size)
    class_names = list(train_set.class_names)
    history: list[dict[str, Any]] = []
    torch.manual_seed(cfg.seed)
    if source is not None:
        vit, model_cfg, source_meta = _finetune_model(source, cfg, class_names)
        history = list(source_meta.resolution_history)
        mean, std = tuple(source_meta.mean), tuple(source_meta.std)
    else:
        num_outputs = cfg.masked.num_colour_classes if cfg.objective == "masked" else len(class_names)
        model_cfg = replace(cfg.model, num_classes=num_outputs, in_chans=int(train_set.in_chans))
        mean, std = _normalisation(cfg, model_cfg.in_chans)
        vit = build_model(model_cfg)
    if cfg.objective == "masked":
        class_names = colour_class_names(cfg.masked.colour_bits)
    resolved = replace(cfg, model=model_cfg, data=replace(cfg.data, mean=mean, std=std))
    return resolved, vit, DataSetup(train_set, eval_set, class_names, mean, std), history


def _apply_determinism(cfg: TrainConfig) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# ---------------------------------------------------------------------------------------------------
# The run


class _StopRequest:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary (with a resume state)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Sums:
    """Running sums of loss, correct and count (and images, skipped steps) over a window of steps."""

    def __init__(self, values: Mapping[str, float] | None = None) -> None:
        self.values = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "images": 0.0, "skipped": 0.0, "steps": 0.0}
        if values:
            self.values.update(values)

    def add(self, outcome: StepOutcome, images: int) -> None:
        if not outcome.skipped:
            self.values["loss_sum"] += outcome.loss_sum
            self.values["correct"] += outcome.correct
            self.values["count"] += outcome.count
        self.values["images"] += images
        self.values["skipped"] += int(outcome.skipped)
        self.values["steps"] += 1

    def reduced(self, ctx: DistContext) -> dict[str, float]:
        keys = ("loss_sum", "correct", "count", "images")
        totals = torch.tensor([self.values[k] for k in keys], dtype=torch.float64, device=ctx.device)
        totals = distributed.all_reduce_sum(totals, ctx)
        out = dict(zip(keys, (float(t) for t in totals)))
        count = out["count"]
        return {
            "loss": out["loss_sum"] / count if count else None,
            "accuracy": out["correct"] / count if count else None,
            "images": out["images"],
            "skipped": self.values["skipped"],
        }


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def default_run_id(preset: str, runs_dir: Path) -> str:
    """<preset>-<date>-<time>, with a counter when that folder exists already."""
    base = f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, counter = base, 1
    while (Path(runs_dir) / candidate).exists():
        counter += 1
        candidate = f"{base}-{counter}"
    return candidate


def run(cfg: TrainConfig | None, options: RunOptions) -> RunResult:
    """Train (or fine-tune, or resume with `options.resume`) and write the run folder; see module docstring."""
    ctx = distributed.setup(options.device)
    try:
        return _Run(cfg, options, ctx).execute()
    finally:
        distributed.teardown(ctx)


class _Run:
    """One run from start-up to the final status; only rank 0 touches the run folder."""

    def __init__(self, cfg: TrainConfig | None, options: RunOptions, ctx: DistContext) -> None:
        self.options = options
        self.ctx = ctx
        self.state = None
        if options.resume is not None:
            folder = RunFolder.existing(options.resume)
            self.cfg = TrainConfig.from_dict(folder.read_config())
            self.folder: RunFolder | None = folder
            self.state = folder.latest_state()
        else:
            if cfg is None:
                raise ValueError("a config is needed unless resuming")
            self.cfg = cfg
            self.folder = None

    def execute(self) -> RunResult:
        ctx = self.ctx
        _apply_determinism(self.cfg)
        world = ctx.world_size
        if self.cfg.batch_size % (world * self.cfg.grad_accum):
            raise VitvizError(
                f"batch_size {self.cfg.batch_size} must be divisible by processes x grad_accum "
                f"({world} x {self.cfg.grad_accum})"
            )
        if self.state is not None:
            cfg = self.cfg  # already resolved when the run started
            self.data = self._datasets_for_resolved(cfg)
            vit = build_model(cfg.model)
            history = list(self.state.info["resolution_history"])
        else:
            cfg, vit, self.data, history = _resolve(self.cfg)
        self.cfg, self.history = cfg, history
        if cfg.finetune.source is not None and cfg.finetune.freeze_blocks:
            freeze_early_layers(vit, cfg.finetune.freeze_blocks)

        self.memory: dict[str, InMemoryImages] = {}
        self.steps_per_epoch = len(self.data.train) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise VitvizError(
                f"the training split has {len(self.data.train)} images, fewer than one batch of {cfg.batch_size}"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup = cfg.schedule.warmup_steps or round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.trainer = Trainer(
            cfg, vit, ctx, mean=self.data.mean, std=self.data.std, total_steps=self.total_steps, warmup_steps=warmup
        )

        self._open_folder()
        step = 0
        self.epoch_sums, self.window = _Sums(), _Sums()
        self.best: float | None = None
        self.consecutive_bad = 0
        self.skipped_total = 0
        self.last_eval: dict[str, Any] = {}
        self.last_train: dict[str, Any] = {}
        if self.state is not None:
            step = self._restore(self.state)
        self.step = step
        if ctx.is_main:
            assert self.folder is not None
            self.folder.write_status("running", **self._progress(step))
        try:
            with _StopRequest() as stop:
                return self._loop(step, stop)
        except TrainingFailed as exc:
            self._status("failed", reason=str(exc), step=self.step)
            raise
        except BaseException as exc:
            self._status("failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0], step=self.step)
            raise

    def _datasets_for_resolved(self, cfg: TrainConfig) -> DataSetup:
        train, evaluation = _build_datasets(cfg, cfg.model.img_size)
        names = colour_class_names(cfg.masked.colour_bits) if cfg.objective == "masked" else list(train.class_names)
        assert cfg.data.mean is not None and cfg.data.std is not None
        return DataSetup(train, evaluation, names, tuple(cfg.data.mean), tuple(cfg.data.std))

    def _open_folder(self) -> None:
        """Rank 0 creates the run folder (or reopens it); every rank learns whether that worked."""
        error: VitvizError | None = None
        if self.ctx.is_main:
            try:
                if self.folder is None:
                    run_id = self.options.run_id or default_run_id(self.cfg.preset, self.options.runs_dir)
                    self.folder = RunFolder.create(self.options.runs_dir, run_id)
                self.folder.write_config(self.cfg.to_dict())
                if self.state is None:
                    self.folder.truncate_logs({"metrics": 0, "summary": 0})
            except VitvizError as exc:
                error = exc
            except OSError as exc:
                error = VitvizError(
                    f"cannot write run folder {self.folder.path if self.folder else self.options.runs_dir}: {exc.strerror or exc}"
                )
        if distributed.broadcast_flag(error is not None, self.ctx):
            raise error or VitvizError("the main process could not set up the run folder")

    def _restore(self, state: Any) -> int:
        info = state.info
        if info["data"]["steps_per_epoch"] != self.steps_per_epoch:
            raise VitvizError(
                f"cannot resume exactly: the training split now gives {self.steps_per_epoch} steps per epoch, "
                f"but the run started with {info['data']['steps_per_epoch']} (did the dataset files change?)"
            )
        self.trainer.load_state(state.tensors, info)
        self.epoch_sums = _Sums(info["epoch_sums"])
        self.window = _Sums(info["window_sums"])
        self.best = info["best"]
        self.consecutive_bad = info["consecutive_bad"]
        self.skipped_total = info["skipped_total"]
        self.last_eval = info["last_eval"]
        self.last_train = info["last_train"]
        if self.ctx.is_main and self.folder is not None:
            self.folder.truncate_logs(info["log_sizes"])
        logger.info("resuming %s at step %d", self.folder.path if self.folder else "", state.step)
        return state.step

    # --- the loop ------------------------------------------------------------------------------------

    def _loop(self, step: int, stop: _StopRequest) -> RunResult:
        """Train from `step` to the end (or to --max-steps, or to a stop signal), then write the final status."""
        stop_at = self.total_steps if self.options.max_steps is None else min(self.total_steps, self.options.max_steps)
        bar = tqdm(
            total=self.total_steps, initial=step, file=sys.stderr, dynamic_ncols=True, unit="step",
            disable=not (self.options.progress and self.ctx.is_main),
        )  # fmt: skip
        # While the bar is shown, log lines go through tqdm so that they do not break it.
        with bar, logging_redirect_tqdm() if not bar.disable else nullcontext():
            step, signalled = self._train_until(step, stop_at, stop, bar)
        run_dir = self.folder.path if self.folder else None
        if step >= self.total_steps:
            self._status("finished", step=step)
            return RunResult(run_dir, "finished", step, self._final_metrics())
        if step % self.steps_per_epoch and step % self.cfg.resume_every:  # otherwise saved at this step already
            self._save_state(step)
        self._save_model(self._last_path(), step)
        why = "a stop signal" if signalled else f"--max-steps {self.options.max_steps}"
        reason = (
            f"stopped at step {step} of {self.total_steps} by {why}; "
            f"continue with: python -m training train --resume {run_dir}"
        )
        self._status("failed", reason=reason, step=step, resumable=True)
        return RunResult(run_dir, "stopped", step, self._final_metrics())

    def _train_until(self, step: int, stop_at: int, stop: _StopRequest, bar: tqdm) -> tuple[int, bool]:
        """The step loop; returns the step reached and whether a stop signal ended it."""
        cfg, ctx, spe = self.cfg, self.ctx, self.steps_per_epoch
        randomised = cfg.data.augment != "none"
        samples = EpochSamples(self.data.train, self._train_transform(), cfg.seed, randomised=randomised)
        memory = self._in_memory("train") if cfg.data.in_memory else None
        per_rank = cfg.batch_size // ctx.world_size
        window_start = self.epoch_start = time.perf_counter()
        while step < stop_at:
            epoch = step // spe
            order = epoch_order(len(self.data.train), cfg.seed, epoch)
            batches = rank_batches(order, cfg.batch_size, ctx, step % spe, min(spe, stop_at - epoch * spe))
            if memory is not None:
                loader: Iterable[tuple[torch.Tensor, torch.Tensor]] = map(memory.batch, batches)
            else:
                loader = make_loader(samples, epoch, batches, cfg.data.num_workers, pin=ctx.device.type == "cuda")
            for images, labels in loader:
                outcome = self.trainer.train_step(images, labels, step)
                step = self.step = step + 1
                self._guard(outcome, step)
                self.epoch_sums.add(outcome, per_rank)
                self.window.add(outcome, per_rank)
                bar.update(1)
                if step % cfg.log_every == 0:
                    self._log_step(step, outcome.lr, time.perf_counter() - window_start, bar)
                    window_start = time.perf_counter()
                if step % spe == 0:
                    self._end_epoch(step, outcome.lr)
                elif step % cfg.resume_every == 0:
                    self._save_state(step)
                if distributed.broadcast_flag(stop.signal is not None, ctx):
                    return step, True
        return step, False

    def _in_memory(self, which: str) -> InMemoryImages:
        """The train or eval split prepared once into memory (kept for the rest of the run)."""
        cache = self.memory.get(which)
        if cache is None:
            dataset = self.data.train if which == "train" else self.data.eval
            cache = self.memory[which] = InMemoryImages(
                dataset, input_size=self.cfg.model.img_size, in_chans=self.cfg.model.in_chans,
                mean=self.data.mean, std=self.data.std, num_workers=self.cfg.data.num_workers,
            )  # fmt: skip
        return cache

    def _train_transform(self) -> Callable[[Any], torch.Tensor]:
        from training.data import train_transform

        return train_transform(
            input_size=self.cfg.model.img_size,
            in_chans=self.cfg.model.in_chans,
            mean=self.data.mean,
            std=self.data.std,
            augment=self.cfg.data.augment,
        )

    def _guard(self, outcome: StepOutcome, step: int) -> None:
        """Count skipped (non-finite) steps; stop the run after max_bad_steps in a row."""
        if not outcome.skipped:
            self.consecutive_bad = 0
            return
        self.consecutive_bad += 1
        self.skipped_total += 1
        logger.warning("step %d: loss or gradient not finite; update skipped (%d in a row)", step, self.consecutive_bad)
        if self.consecutive_bad >= self.cfg.max_bad_steps:
            raise TrainingFailed(
                f"loss or gradient was not finite for {self.consecutive_bad} steps in a row (last at step {step}); "
                "lower optim.lr, set grad_clip, or check the data"
            )

    def _log_step(self, step: int, lr: float, elapsed: float, bar: tqdm) -> None:
        reduced = self.window.reduced(self.ctx)
        self.window = _Sums()
        images_per_s = reduced["images"] / elapsed if elapsed > 0 else None
        record = {
            "kind": "step",
            "step": step,
            "epoch": step / self.steps_per_epoch,
            "loss": _finite_or_none(reduced["loss"]),
            "accuracy": reduced["accuracy"],
            "lr": lr,
            "images_per_s": images_per_s,
            "skipped_steps": self.skipped_total,
        }
        if self.ctx.is_main and self.folder is not None:
            self.folder.append_metrics(record)
            self.folder.write_status("running", **self._progress(step), last=record)
            postfix = {"loss": f"{record['loss']:.4f}" if record["loss"] is not None else "nan"}
            if record["accuracy"] is not None:
                postfix["acc"] = f"{record['accuracy']:.3f}"
            if images_per_s is not None:
                postfix["img/s"] = f"{images_per_s:.0f}"
            bar.set_postfix(postfix, refresh=False)

    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from training.data import eval_transform

        transform = eval_transform(
            input_size=self.cfg.model.img_size, in_chans=self.cfg.model.in_chans, mean=self.data.mean, std=self.data.std
        )
        samples = EpochSamples(self.data.eval, transform, self.cfg.seed, randomised=False)
        positions = distributed.shard(range(len(self.data.eval)), self.ctx)
        size = max(1, self.cfg.batch_size // self.ctx.world_size)
        batches = [positions[i : i + size] for i in range(0, len(positions), size)]
        if self.cfg.data.in_memory:
            return map(self._in_memory("eval").batch, batches)
        return iter(make_loader(samples, 0, batches, self.cfg.data.num_workers, pin=self.ctx.device.type == "cuda"))

    def _end_epoch(self, step: int, lr: float) -> None:
        cfg = self.cfg
        epoch = step // self.steps_per_epoch  # 1-based count of completed epochs
        train = self.epoch_sums.reduced(self.ctx)
        self.epoch_sums = _Sums()
        last_epoch = epoch == cfg.epochs
        evaluation: dict[str, Any] = {}
        if self.data.eval is not None and (epoch % cfg.eval_every == 0 or last_epoch):
            evaluation = self.trainer.evaluate(self._eval_batches())
            self.last_eval = {"epoch": epoch, **evaluation}
        record = {
            "kind": "epoch",
            "epoch": epoch,
            "step": step,
            "train_loss": _finite_or_none(train["loss"]),
            "train_accuracy": train["accuracy"],
            "eval_loss": evaluation.get("loss"),
            "eval_accuracy": evaluation.get("accuracy"),
            "lr": lr,
            "skipped_steps": self.skipped_total,
            "seconds": round(time.perf_counter() - self.epoch_start, 3),  # wall time of the epoch (this process)
        }
        self.epoch_start = time.perf_counter()
        self.last_train = record
        score = evaluation.get("accuracy") if self.data.eval is not None else train["accuracy"]
        improved = score is not None and (self.best is None or score > self.best)
        if improved:
            self.best = score
        if self.ctx.is_main and self.folder is not None:
            self.folder.append_metrics(record)
            self.folder.append_summary(record)
            if epoch % cfg.checkpoint_every == 0 or last_epoch:
                self._save_model(self.folder.epoch_checkpoint_path(epoch), step)
            if improved:
                self._save_model(self.folder.best_path, step)
            self._save_model(self.folder.last_path, step)
            logger.info(
                "epoch %d/%d: train loss %s acc %s; eval loss %s acc %s",
                epoch,
                cfg.epochs,
                _fmt(record["train_loss"]),
                _fmt(record["train_accuracy"]),
                _fmt(record["eval_loss"]),
                _fmt(record["eval_accuracy"]),
            )
        self._save_state(step)

    def _last_path(self) -> Path | None:
        return self.folder.last_path if self.folder is not None else None

    def _save_model(self, path: Path | None, step: int) -> None:
        if not self.ctx.is_main or path is None:
            return
        try:
            save_checkpoint(path, self.trainer.vit, self._meta(step))
        except VitvizError as exc:
            raise TrainingFailed(f"checkpoint not saved: {exc}") from None

    def _meta(self, step: int) -> ModelMeta:
        cfg = self.cfg
        training = {
            "run_id": self.folder.run_id if self.folder else None,
            "preset": cfg.preset,
            "dataset": cfg.data.dataset,
            "train_split": cfg.data.train_split,
            "objective": cfg.objective,
            "epochs": step // self.steps_per_epoch,
            "epochs_planned": cfg.epochs,
            "steps": step,
            "finetuned_from": cfg.finetune.source,
            "metrics": self._final_metrics(),
        }
        return ModelMeta(
            arch=PROJECT_ARCH,
            config=cfg.model,
            class_names=list(self.data.class_names),
            input_size=cfg.model.img_size,
            in_chans=cfg.model.in_chans,
            mean=tuple(self.data.mean),
            std=tuple(self.data.std),
            training=training,
            resolution_history=list(self.history),
        )

    def _final_metrics(self) -> dict[str, float | None]:
        last = self.last_train
        return {
            "train_loss": last.get("train_loss"),
            "train_accuracy": last.get("train_accuracy"),
            "eval_loss": self.last_eval.get("loss"),
            "eval_accuracy": self.last_eval.get("accuracy"),
            "best_accuracy": self.best,
            "skipped_steps": self.skipped_total,
        }

    def _save_state(self, step: int) -> None:
        if not self.ctx.is_main or self.folder is None:
            return
        tensors, info = self.trainer.state_tensors()
        info.update(
            epoch_sums=self.epoch_sums.values,
            window_sums=self.window.values,
            best=self.best,
            consecutive_bad=self.consecutive_bad,
            skipped_total=self.skipped_total,
            last_eval=self.last_eval,
            last_train=self.last_train,
            resolution_history=self.history,
            log_sizes=self.folder.log_sizes(),
            # The schedule and the data position are functions of the step; recorded to check the resume.
            scheduler={"step": step, "total_steps": self.total_steps, "warmup_steps": self.trainer.warmup_steps},
            data={
                "epoch": step // self.steps_per_epoch,
                "batch": step % self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
            },
        )
        self.folder.save_state(step, tensors, info)

    def _progress(self, step: int) -> dict[str, Any]:
        return {
            "progress": {
                "step": step,
                "total_steps": self.total_steps,
                "epoch": step // self.steps_per_epoch,
                "epochs": self.cfg.epochs,
                "fraction": step / self.total_steps if self.total_steps else 0.0,
            }
        }

    def _status(self, status: str, *, reason: str | None = None, step: int = 0, **fields: Any) -> None:
        if self.ctx.is_main and self.folder is not None and hasattr(self, "total_steps"):
            progress = self._progress(step)
            try:
                self.folder.write_status(status, reason=reason, **progress, metrics=self._final_metrics(), **fields)
            except OSError as exc:
                if status != "failed":
                    raise
                # Reached while reporting another failure (often the same full disk): keep that one in front.
                logger.warning("could not update %s: %s", self.folder.path / "status.json", exc.strerror or exc)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
