"""Process-group setup for ``dynconv.train``: one process, or torchrun's DDP ranks.

Under ``torchrun`` the environment carries ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; the
process group then uses gloo on the CPU and nccl on CUDA. Without them training runs in one
process and every collective here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints tables and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def setup(device: str) -> DistContext:
    """Join torchrun's process group if the environment says so; pick this rank's device.

    ``device`` is ``"cpu"`` or ``"cuda"``; under torchrun each rank takes ``cuda:LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} needs cuda:{local_rank}, but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible"
            )
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank,
                       device=torch_device)


def teardown(ctx: DistContext, barrier: bool = True) -> None:
    """Leave the process group (if one was joined), first waiting for every rank if ``barrier``.

    Pass ``barrier=False`` when leaving on an error: the other ranks may never reach the barrier.
    """
    if ctx.distributed and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op in one process) and return it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor



def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, but the last forward of an
    epoch then updates each rank's running statistics from its own batch: without this, ranks
    would evaluate with slightly different BatchNorm statistics.
    """
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
