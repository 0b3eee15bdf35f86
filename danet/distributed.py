"""torchrun / DistributedDataParallel helpers. Without torchrun (no WORLD_SIZE in the
environment) everything here is a single-process no-op, so the same command runs both ways."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Context:
    """This process's place among the ranks of a torchrun job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()  # a process outside torchrun


def from_environment(environment: dict[str, str] | None = None) -> Context:
    environment = os.environ if environment is None else environment
    return Context(int(environment.get("RANK", 0)), int(environment.get("WORLD_SIZE", 1)),
                   int(environment.get("LOCAL_RANK", 0)))


def start(context: Context, device: torch.device) -> None:
    """Join the process group: NCCL on CUDA, gloo on the CPU."""
    if context.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(context: Context, device: torch.device) -> torch.device:
    """Each rank of a CUDA job gets the GPU of its local rank."""
    return torch.device("cuda", context.local_rank) if device.type == "cuda" and context.enabled else device


def broadcast(value: Any, context: Context) -> Any:
    """Rank 0's value, on every rank (any picklable object)."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(value: torch.Tensor, context: Context) -> float:
    """The mean of a scalar over ranks (the loss that is logged and checked for NaN)."""
    value = value.detach()
    if context.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= context.world_size
    return float(value)


def any_rank(flag: bool, context: Context, device: torch.device) -> bool:
    """Whether `flag` is set on any rank: a stop request must be agreed on before the next step."""
    if not context.enabled:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
