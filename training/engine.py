"""The training loop: one engine for train, fine-tune and resume, in one process or under torchrun.

Everything random is a function of the config's seed and the position in the run, so a run stopped at
any step and resumed continues exactly as if it had never stopped (bitwise on CPU):
- the order of epoch e is a permutation seeded by (seed, e); step s of the epoch takes positions
  [s*B, (s+1)*B) of it (drop-last), so resuming at step s skips exactly the batches already seen;
- augmentation of sample i in epoch e runs under torch's RNG seeded by (seed, e, i);
- masking for masked patch prediction at global step t is drawn from a generator seeded by (seed, t);
- dropout and stochastic depth at step t run under torch's RNG seeded by (seed, t, rank);
and the resume state holds the model, the optimiser, the data position (the step; the schedule is a pure
function of it), the running metric sums, the guard's counts, and every global RNG state as well.

The run's resume state is the composition of its components, each saving and restoring itself, declared
once in `training.resume.COMPONENTS`; the step and epoch records, and the sums behind them, are
`training.metrics`; the position and the schedule `training.schedule`; the non-finite-step guard
`training.guard`; this module sets a run up and runs its loop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
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
from training.ema import ModelEma
from training.finetune import (
    Tuned,
    apply_strategy,
    enable_grad_checkpointing,
    export,
    load_base,
    model_geometry,
    model_meta_of,
    rebuild,
    trainable_parameters,
    with_new_head,
)
from training.finetune import freeze_early_layers as freeze_early_layers  # part of this module's interface
from training.guard import StepGuard, TrainingFailed
from training.masked import Corruption, MaskedPatchModel, colour_class_names, colour_targets, sample_corruption
from training.metrics import MetricsLog, StepOutcome
from training.resume import ProcessRng, ResumeState, capture, check_components, restore
from training.runfolder import RunFolder, default_run_id
from training.schedule import DataPosition, Schedule
from training.schedule import lr_factor as lr_factor  # part of this module's interface
from vitviz.errors import VitvizError
from vitviz.models import (
    ModelMeta,
    ViTConfig,
    build_model,
    save_checkpoint,
)
from vitviz.models import load_model as load_model  # part of this module's interface
from vitviz.models.checkpoint import PROJECT_ARCH
from vitviz.tokens import token_layout

logger = logging.getLogger(__name__)

# Salts that keep the seeded streams for different purposes apart.
_ORDER_STREAM, _AUGMENT_STREAM, _MASK_STREAM, _STEP_STREAM, _EVAL_MASK_STREAM, _MIX_STREAM = range(6)


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
        tuned: Tuned | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        # `vit` is the model with timm's parameter names (LoRA layers injected into it for that strategy);
        # `module` is what trains: the masked-prediction wrapper, the peft model of LoRA, or `vit` itself.
        self.vit = tuned.base if tuned is not None else vit
        if cfg.objective == "masked":
            self.module: nn.Module = MaskedPatchModel(vit, cfg.masked)
        else:
            self.module = tuned.module if tuned is not None else vit
        self.lora = tuned.lora if tuned is not None else None
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(self.vit)
        self.module.to(ctx.device)
        # What can have a gradient, in the module's order (walking a peft model's parameters every step costs more
        # than its small steps' optimiser update).
        self._trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.module, self.vit, cfg)
        # Model EMA (evaluation and checkpoints use it when it is on) and Mixup/CutMix, both timm's.
        self.ema = ModelEma(self.module, cfg.ema_decay)
        self.mixup: Mixup | None = None
        if cfg.mixup or cfg.cutmix:
            if (cfg.batch_size // ctx.world_size // cfg.grad_accum) % 2:
                raise VitvizError("mixup and cutmix pair images within a micro-batch: make it an even size")
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=int(self.vit.num_classes),
            )
        self.schedule = Schedule(
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            decay=cfg.schedule.decay,
            min_ratio=cfg.schedule.min_lr_ratio,
        )
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
        factor = self.schedule.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * group["lr_scale"] * factor
        return self.cfg.optim.lr * factor

    def _loss(
        self,
        module: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        corruption: Corruption | None,
        soft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean loss, number correct, number of predictions) for one micro-batch; `soft`: Mixup's targets."""
        if corruption is None:
            with self._autocast():
                logits = module(images)  # (B, classes)
            if soft is not None:  # correct: the argmax against the label of the image mixed into the most
                loss = SoftTargetCrossEntropy()(logits.float(), soft)
            else:
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
        self._seed(mix_seed(self.cfg.seed, _STEP_STREAM, step, self.ctx.rank))
        lr = self.set_lr(step)
        images = images.to(self.ctx.device, non_blocking=True)
        labels = labels.to(self.ctx.device, non_blocking=True)
        corruption = self._step_corruption(step, images.shape[0])
        soft = None
        if self.mixup is not None:  # Mixup draws from numpy's global RNG: seeded by the step, like the rest
            np.random.seed(mix_seed(self.cfg.seed, _MIX_STREAM, step) % 2**32)
            images, soft = self.mixup(images, labels)
        micro = images.shape[0] // self.cfg.grad_accum
        loss_sum, count = torch.zeros((), device=self.ctx.device), 0
        correct = torch.zeros((), dtype=torch.int64, device=self.ctx.device)
        self.optimizer.zero_grad(set_to_none=True)
        for m in range(self.cfg.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            last = m == self.cfg.grad_accum - 1
            # DDP all-reduces gradients only after the last micro-batch.
            sync = nullcontext() if last or not self.ctx.is_distributed else self.wrapped.no_sync()
            with sync:
                loss, hits, n = self._loss(
                    self.wrapped,
                    images[part],
                    labels[part],
                    None if corruption is None else corruption.rows(part),
                    None if soft is None else soft[part],
                )
                (loss / self.cfg.grad_accum).backward()
            loss_sum = loss_sum + loss.detach() * n
            correct = correct + hits
            count += n
        grad_norm = self._grad_norm()
        bad = torch.stack([(~torch.isfinite(loss_sum)).float(), (~torch.isfinite(grad_norm)).float()])
        bad = distributed.all_reduce_sum(bad, self.ctx)
        # The one wait for the device in a step: the skip decision, the loss and the hits come over together
        # (float64 holds the float32 loss and the count exactly).
        flags, loss_value, hits = torch.stack([bad.sum().double(), loss_sum.double(), correct.double()]).tolist()
        skipped = flags > 0
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.ema.update(self.module, step + 1)
        return StepOutcome(loss_sum=loss_value, correct=int(hits), count=count, skipped=skipped, lr=lr)

    def _seed(self, seed: int) -> None:
        """Seed the generators a step draws from (dropout, stochastic depth): the CPU's and, on a GPU, that GPU's.

        What `torch.manual_seed` does for them, without its cost per call: it also queues a seed, with a formatted
        stack, for every other accelerator type torch was built for (CUDA on a CPU run, XPU, MTIA), about 2 ms.
        """
        torch.default_generator.manual_seed(seed)
        if self.ctx.device.type == "cuda":
            with torch.cuda.device(self.ctx.device):
                torch.cuda.manual_seed(seed)

    @property
    def averaged(self) -> nn.Module:
        """The weights evaluated and saved: the EMA's when it is on, else the trained module."""
        return self.ema.module if self.ema.module is not None else self.module

    def checkpoint_model(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The plain model a checkpoint holds (LoRA merged), and the adapter tensors stored beside it."""
        module = self.averaged
        if isinstance(module, MaskedPatchModel):
            return module.vit, {}
        return export(module)

    def _grad_norm(self) -> torch.Tensor:
        params = [p for p in self._trainable if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.ctx.device)
        if self.cfg.grad_clip is None:  # the norm alone, for the guard: scaling by min(1, inf / norm) changes nothing
            return torch.nn.utils.get_total_norm([p.grad for p in params]).detach()
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip).detach()

    @torch.no_grad()
    def evaluate(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Mean loss and accuracy over all ranks' shares of the evaluation split (the EMA's, when it is on)."""
        module = self.averaged
        module.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # loss sum, correct, count
        for index, (images, labels) in enumerate(batches):
            images = images.to(self.ctx.device)
            labels = labels.to(self.ctx.device)
            corruption = None
            if self.cfg.objective == "masked":
                seed = mix_seed(self.cfg.seed, _EVAL_MASK_STREAM, self.ctx.rank, index)
                generator = torch.Generator().manual_seed(seed)
                corruption = sample_corruption(images.shape[0], self._num_patches, self.cfg.masked, generator)
            loss, hits, n = self._loss(module, images, labels, corruption)
            totals += torch.tensor([float(loss) * n, float(hits), n], dtype=torch.float64, device=self.ctx.device)
        totals = distributed.all_reduce_sum(totals, self.ctx)
        count = max(1.0, float(totals[2]))
        return {"loss": float(totals[0]) / count, "accuracy": float(totals[1]) / count, "count": int(totals[2])}


# ---------------------------------------------------------------------------------------------------
# Model and data set-up


@dataclass(frozen=True)
class DataSetup:
    train: Any  # VisionDataset
    eval: Any | None
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]  # (H, W) the model takes
    in_chans: int  # channels the model takes


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
    """A vitviz checkpoint's model at the new input size with a new zero-initialised linear head."""
    model, meta = with_new_head(loaded, cfg, class_names)
    assert meta.config is not None
    return model, meta.config, meta


def _resolve(cfg: TrainConfig) -> tuple[TrainConfig, nn.Module, DataSetup, list[dict[str, Any]]]:
    """Datasets, the initial model and the config with everything decided at start-up filled in
    (classes and channels from the dataset, the fine-tuned architecture, normalisation)."""
    source = None
    input_size = cfg.model.img_size
    if cfg.finetune.source is not None:
        source = load_base(cfg)
        input_size = tuple(cfg.finetune.img_size or source.meta.input_size)  # type: ignore[assignment]
    train_set, eval_set = _build_datasets(cfg, input_size)
    class_names = list(train_set.class_names)
    history: list[dict[str, Any]] = []
    torch.manual_seed(cfg.seed)
    if source is not None:
        vit, model_meta = with_new_head(source, cfg, class_names)
        # A vitviz model keeps its config in `model`; every fine-tune keeps the description it is rebuilt from.
        model_cfg = model_meta.config if model_meta.config is not None else cfg.model
        history = list(model_meta.resolution_history)
        mean, std = tuple(model_meta.mean), tuple(model_meta.std)
        cfg = replace(cfg, finetune=replace(cfg.finetune, model_meta=json.loads(model_meta.to_json())))
    else:
        num_outputs = cfg.masked.num_colour_classes if cfg.objective == "masked" else len(class_names)
        model_cfg = replace(cfg.model, num_classes=num_outputs, in_chans=int(train_set.in_chans))
        mean, std = _normalisation(cfg, model_cfg.in_chans)
        vit = build_model(model_cfg)
    if cfg.objective == "masked":
        class_names = colour_class_names(cfg.masked.colour_bits)
    resolved = replace(cfg, model=model_cfg, data=replace(cfg.data, mean=mean, std=std))
    size, chans = model_geometry(resolved)
    return resolved, vit, DataSetup(train_set, eval_set, class_names, mean, std, size, chans), history


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


def run(cfg: TrainConfig | None, options: RunOptions) -> RunResult:
    """Train (or fine-tune, or resume with `options.resume`) and write the run folder; see module docstring."""
    ctx = distributed.setup(options.device)
    try:
        return _Run.start(cfg, options, ctx).execute()
    finally:
        distributed.teardown(ctx)


def _datasets_for_resolved(cfg: TrainConfig) -> DataSetup:
    """The datasets of a config resolved when its run started (a resumed run)."""
    size, chans = model_geometry(cfg)
    train, evaluation = _build_datasets(cfg, size)
    names = colour_class_names(cfg.masked.colour_bits) if cfg.objective == "masked" else list(train.class_names)
    assert cfg.data.mean is not None and cfg.data.std is not None
    return DataSetup(train, evaluation, names, tuple(cfg.data.mean), tuple(cfg.data.std), size, chans)


def _open_folder(
    cfg: TrainConfig, options: RunOptions, ctx: DistContext, folder: RunFolder | None, *, fresh: bool
) -> RunFolder | None:
    """Rank 0 creates the run folder (or reopens `folder`); every rank learns whether that worked.

    Returns the folder (None on the other ranks of a fresh run). A fresh run starts with empty logs.
    """
    error: VitvizError | None = None
    if ctx.is_main:
        try:
            if folder is None:
                run_id = options.run_id or default_run_id(cfg.preset, options.runs_dir)
                folder = RunFolder.create(options.runs_dir, run_id)
            folder.write_config(cfg.to_dict())
            if fresh:
                folder.truncate_logs({"metrics": 0, "summary": 0})
        except VitvizError as exc:
            error = exc
        except OSError as exc:
            where = folder.path if folder is not None else options.runs_dir
            error = VitvizError(f"cannot write run folder {where}: {exc.strerror or exc}")
    if distributed.broadcast_flag(error is not None, ctx):
        raise error or VitvizError("the main process could not set up the run folder")
    return folder


class ResolutionHistory:
    """The model's resolution history (checkpoint metadata), a component of the resume state so that a
    resumed run writes the same metadata."""

    def __init__(self, entries: Sequence[Mapping[str, Any]] = ()) -> None:
        self.entries = [dict(e) for e in entries]

    def state_dict(self) -> dict[str, Any]:
        return {"resolution_history": list(self.entries)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.entries = [dict(e) for e in state["resolution_history"]]


class _Feed:
    """The batches of a run: this rank's share of an epoch's training steps, and of the evaluation split."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, data: DataSetup) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.data = data
        self.memory: dict[str, InMemoryImages] = {}  # splits prepared in memory, made on first use

    def prepare(self) -> None:
        """Prepare the training split in memory now (when the config asks for it), before the clocks start."""
        if self.cfg.data.in_memory:
            self._in_memory("train")

    def train(self, epoch: int, start: int, stop: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches for steps [start, stop) of epoch `epoch`."""
        cfg, ctx = self.cfg, self.ctx
        order = epoch_order(len(self.data.train), cfg.seed, epoch)
        batches = rank_batches(order, cfg.batch_size, ctx, start, stop)
        if cfg.data.in_memory:
            return map(self._in_memory("train").batch, batches)
        from training.data import train_transform

        transform = train_transform(
            input_size=self.data.input_size, in_chans=self.data.in_chans, mean=self.data.mean, std=self.data.std,
            augment=cfg.data.augment,
        )  # fmt: skip
        samples = EpochSamples(self.data.train, transform, cfg.seed, randomised=cfg.data.augment != "none")
        return make_loader(samples, epoch, batches, cfg.data.num_workers, pin=ctx.device.type == "cuda")

    def eval(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the evaluation split, in batches."""
        from training.data import eval_transform

        cfg = self.cfg
        positions = distributed.shard(range(len(self.data.eval)), self.ctx)
        size = max(1, cfg.batch_size // self.ctx.world_size)
        batches = [positions[i : i + size] for i in range(0, len(positions), size)]
        if cfg.data.in_memory:
            return map(self._in_memory("eval").batch, batches)
        transform = eval_transform(
            input_size=self.data.input_size, in_chans=self.data.in_chans, mean=self.data.mean, std=self.data.std
        )
        samples = EpochSamples(self.data.eval, transform, cfg.seed, randomised=False)
        return iter(make_loader(samples, 0, batches, cfg.data.num_workers, pin=self.ctx.device.type == "cuda"))

    def _in_memory(self, which: str) -> InMemoryImages:
        """The train or eval split prepared once into memory (kept for the rest of the run)."""
        cache = self.memory.get(which)
        if cache is None:
            dataset = self.data.train if which == "train" else self.data.eval
            cache = self.memory[which] = InMemoryImages(
                dataset, input_size=self.data.input_size, in_chans=self.data.in_chans,
                mean=self.data.mean, std=self.data.std, num_workers=self.cfg.data.num_workers,
            )  # fmt: skip
        return cache


class _Run:
    """The step loop of one run, from a set-up run (`_Run.start`) to the final status; only rank 0 writes.

    Its resume state is the composition of its stateful attributes, the components that
    `training.resume.COMPONENTS` declares (checked when the run is made).
    """

    def __init__(
        self,
        *,
        cfg: TrainConfig,
        options: RunOptions,
        ctx: DistContext,
        data: DataSetup,
        history: list[dict[str, Any]],
        folder: RunFolder | None,
        trainer: Trainer,
        steps_per_epoch: int,
    ) -> None:
        self.cfg = cfg  # resolved
        self.options = options
        self.ctx = ctx
        self.data = data
        self.folder = folder  # None on the other ranks of a fresh run
        self.trainer = trainer
        self.feed = _Feed(cfg, ctx, data)
        # The components of the resume state.
        self.position = DataPosition(steps_per_epoch=steps_per_epoch, epochs=cfg.epochs)
        self.schedule = trainer.schedule
        self.model = trainer.module
        self.optimizer = trainer.optimizer
        self.ema = trainer.ema
        self.rng = ProcessRng()
        self.guard = StepGuard(cfg.max_bad_steps)
        self.metrics = MetricsLog(ctx, folder, steps_per_epoch, self.guard)
        self.history = ResolutionHistory(history)
        check_components(self)

    @classmethod
    def start(cls, cfg: TrainConfig | None, options: RunOptions, ctx: DistContext) -> _Run:
        """Set a run up (config, data, model, optimiser, run folder), continued from its resume state when
        `options.resume` names a run folder that has one."""
        folder: RunFolder | None = None
        state: ResumeState | None = None
        if options.resume is not None:
            folder = RunFolder.existing(options.resume)
            cfg = TrainConfig.from_dict(folder.read_config())
            state = ResumeState.from_files(folder)
        elif cfg is None:
            raise ValueError("a config is needed unless resuming")
        _apply_determinism(cfg)
        if cfg.batch_size % (ctx.world_size * cfg.grad_accum):
            raise VitvizError(
                f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                f"({ctx.world_size} x {cfg.grad_accum})"
            )
        history: list[dict[str, Any]] = []
        if state is not None:  # the config was resolved when the run started; the state holds the history
            data = _datasets_for_resolved(cfg)
            vit = rebuild(cfg) if cfg.finetune.source is not None else build_model(cfg.model)
        else:
            cfg, vit, data, history = _resolve(cfg)
        tuned = apply_strategy(vit, cfg)

        steps_per_epoch = len(data.train) // cfg.batch_size
        if steps_per_epoch == 0:
            raise VitvizError(
                f"the training split has {len(data.train)} images, fewer than one batch of {cfg.batch_size}"
            )
        warmup = cfg.schedule.warmup_steps or round(cfg.schedule.warmup_epochs * steps_per_epoch)
        trainer = Trainer(
            cfg, vit, ctx, mean=data.mean, std=data.std, total_steps=cfg.epochs * steps_per_epoch,
            warmup_steps=warmup, tuned=tuned,
        )  # fmt: skip
        folder = _open_folder(cfg, options, ctx, folder, fresh=state is None)
        run = cls(
            cfg=cfg,
            options=options,
            ctx=ctx,
            data=data,
            history=history,
            folder=folder,
            trainer=trainer,
            steps_per_epoch=steps_per_epoch,
        )
        if state is not None:
            restore(run, state)
            logger.info("resuming %s at step %d", folder.path if folder else "", state.step)
        return run

    def execute(self) -> RunResult:
        """Train to the end (or to --max-steps, or to a stop signal); a failure is recorded in status.json."""
        if self.ctx.is_main:
            assert self.folder is not None
            self.folder.write_status("running", progress=self.position.progress())
        try:
            with _StopRequest() as stop:
                return self._loop(stop)
        except TrainingFailed as exc:
            self._status("failed", reason=str(exc))
            raise
        except BaseException as exc:
            self._status("failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
            raise

    def _save_state(self) -> None:
        """Write the resume state at the current step (main process; every rank calls this, at the same steps)."""
        self.metrics.prepare_state()  # a collective: the state holds every rank's sums
        if self.ctx.is_main and self.folder is not None:
            capture(self).to_files(self.folder)

    # --- the loop ------------------------------------------------------------------------------------

    def _loop(self, stop: _StopRequest) -> RunResult:
        """Train from the current step to the end (or to --max-steps, or to a stop signal), then write the
        final status."""
        position = self.position
        total = position.total_steps
        stop_at = total if self.options.max_steps is None else min(total, self.options.max_steps)
        bar = tqdm(
            total=total, initial=position.step, file=sys.stderr, dynamic_ncols=True, unit="step",
            disable=not (self.options.progress and self.ctx.is_main),
        )  # fmt: skip
        # While the bar is shown, log lines go through tqdm so that they do not break it.
        with bar, logging_redirect_tqdm() if not bar.disable else nullcontext():
            signalled = self._train_until(stop_at, stop, bar)
        step = position.step
        run_dir = self.folder.path if self.folder else None
        if step >= total:
            self._status("finished")
            return RunResult(run_dir, "finished", step, self.metrics.final_metrics())
        if position.batch and step % self.cfg.resume_every:  # otherwise saved at this step already
            self._save_state()
        self._save_model(self.folder.last_path if self.folder is not None else None)
        why = "a stop signal" if signalled else f"--max-steps {self.options.max_steps}"
        reason = (
            f"stopped at step {step} of {total} by {why}; continue with: python -m training train --resume {run_dir}"
        )
        self._status("failed", reason=reason, resumable=True)
        return RunResult(run_dir, "stopped", step, self.metrics.final_metrics())

    def _train_until(self, stop_at: int, stop: _StopRequest, bar: tqdm) -> bool:
        """The step loop, advancing the data position; returns whether a stop signal ended it."""
        cfg, ctx, position = self.cfg, self.ctx, self.position
        spe = position.steps_per_epoch
        per_rank = cfg.batch_size // ctx.world_size
        self.feed.prepare()
        self.metrics.start_clocks()
        while position.step < stop_at:
            epoch = position.epoch
            for images, labels in self.feed.train(epoch, position.batch, min(spe, stop_at - epoch * spe)):
                outcome = self.trainer.train_step(images, labels, position.step)
                step = position.advance()
                self.metrics.add(outcome, per_rank)
                self.guard.record(outcome, step)
                bar.update(1)
                if step % cfg.log_every == 0:
                    self._log_step(outcome.lr, bar)
                if position.batch == 0:
                    self._end_epoch(outcome.lr)
                elif step % cfg.resume_every == 0:
                    self._save_state()
                if distributed.broadcast_flag(stop.signal is not None, ctx):
                    return True
        return False

    def _log_step(self, lr: float, bar: tqdm) -> None:
        record = self.metrics.step_record(self.position.step, lr)
        if self.ctx.is_main and self.folder is not None:
            self.folder.write_status("running", progress=self.position.progress(), last=record, durable=False)
            postfix = {"loss": f"{record['loss']:.4f}" if record["loss"] is not None else "nan"}
            if record["accuracy"] is not None:
                postfix["acc"] = f"{record['accuracy']:.3f}"
            if record["images_per_s"] is not None:
                postfix["img/s"] = f"{record['images_per_s']:.0f}"
            bar.set_postfix(postfix, refresh=False)

    def _end_epoch(self, lr: float) -> None:
        """Evaluate when due, record the epoch, write the checkpoints it calls for and a resume state."""
        cfg, step = self.cfg, self.position.step
        epoch = self.position.epoch  # 1-based count of completed epochs
        last_epoch = epoch == cfg.epochs
        evaluation = None
        if self.data.eval is not None and (epoch % cfg.eval_every == 0 or last_epoch):
            evaluation = self.trainer.evaluate(self.feed.eval())
        record, improved = self.metrics.epoch_record(step, lr, evaluation, has_eval_split=self.data.eval is not None)
        if self.ctx.is_main and self.folder is not None:
            if epoch % cfg.checkpoint_every == 0 or last_epoch:
                self._save_model(self.folder.epoch_checkpoint_path(epoch))
            if improved:
                self._save_model(self.folder.best_path)
            self._save_model(self.folder.last_path)
            logger.info(
                "epoch %d/%d: train loss %s acc %s; eval loss %s acc %s",
                epoch,
                cfg.epochs,
                _fmt(record["train_loss"]),
                _fmt(record["train_accuracy"]),
                _fmt(record["eval_loss"]),
                _fmt(record["eval_accuracy"]),
            )
        self._save_state()

    # --- checkpoints and status ------------------------------------------------------------------------

    def _save_model(self, path: Path | None) -> None:
        if not self.ctx.is_main or path is None:
            return
        try:
            model, adapters = self.trainer.checkpoint_model()
            save_checkpoint(path, model, self._meta(), adapters)
        except VitvizError as exc:
            raise TrainingFailed(f"checkpoint not saved: {exc}") from None

    def _meta(self) -> ModelMeta:
        cfg = self.cfg
        training = {
            "run_id": self.folder.run_id if self.folder else None,
            "preset": cfg.preset,
            "dataset": cfg.data.dataset,
            "train_split": cfg.data.train_split,
            "objective": cfg.objective,
            "epochs": self.position.epoch,
            "epochs_planned": cfg.epochs,
            "steps": self.position.step,
            "finetuned_from": cfg.finetune.source,
            "metrics": self.metrics.final_metrics(),
        }
        base = model_meta_of(cfg)
        if base is not None:  # a fine-tune: its lineage, strategy and what trained
            training.update(base.training)
            training.update(strategy=cfg.finetune.strategy, trainable_parameters=trainable_parameters(self.model))
            if self.trainer.lora is not None:
                training["lora"] = dict(self.trainer.lora)
            if cfg.ema_decay is not None:
                training["ema_decay"] = cfg.ema_decay
            return replace(base, training=training, resolution_history=list(self.history.entries))
        return ModelMeta(
            arch=PROJECT_ARCH,
            config=cfg.model,
            class_names=list(self.data.class_names),
            input_size=cfg.model.img_size,
            in_chans=cfg.model.in_chans,
            mean=tuple(self.data.mean),
            std=tuple(self.data.std),
            training=training,
            resolution_history=list(self.history.entries),
        )

    def _status(self, status: str, *, reason: str | None = None, **fields: Any) -> None:
        if not self.ctx.is_main or self.folder is None:
            return
        try:
            progress = self.position.progress()
            self.folder.write_status(
                status, reason=reason, progress=progress, metrics=self.metrics.final_metrics(), **fields
            )
        except OSError as exc:
            if status != "failed":
                raise
            # Reached while reporting another failure (often the same full disk): keep that one in front.
            logger.warning("could not update %s: %s", self.folder.path / "status.json", exc.strerror or exc)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
