"""Process-group set-up for `torchrun`, and the few collectives the training loop needs.

One process is the degenerate case of the same code: every helper here is a no-op when the world has one
process, so the loop has no "if distributed" branches beyond wrapping the model in DDP.

Data sharding follows torch's DistributedSampler: rank r takes positions r, r + W, r + 2W, ... of the
epoch's order. With a global batch B divisible by the world size W, the ranks' batches at step s together
are exactly positions [s*B, (s+1)*B) of that order, which is the batch one process would take, so the
mean of the per-rank gradients (what DDP computes) equals the single-process gradient.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from vitviz.errors import VitvizError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> this process's GPU when there is one, else CPU; "cuda" without a GPU is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise VitvizError("--device cuda was asked for, but no CUDA GPU is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise VitvizError(f"unknown device {name!r}; use auto, cpu or cuda")


def setup(device: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment (or stay a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        logger.info("joined %s process group: rank %d of %d on %s", backend, rank, world_size, torch_device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def teardown(ctx: DistContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(positions: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of `positions`: every world_size-th item starting at its rank."""
    return list(positions[ctx.rank :: ctx.world_size])


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (in place and returned); identity for one process."""
    if ctx.is_distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when any rank passes True (e.g. "stop now")."""
    if not ctx.is_distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
