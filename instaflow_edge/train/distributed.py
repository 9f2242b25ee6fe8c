"""Multi-process runs with torch.distributed, launched by torchrun: gloo on CPU, NCCL on CUDA.

The training loop averages gradients with DistributedDataParallel (train.loop); this module holds
the process group and the helpers every stage shares (who writes, barriers, a mean for logging)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes (rank 0 writes the shared files)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over all processes (the tensor itself with one process)."""
        if self.size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.size


def init_world(device: str) -> World:
    """Join the process group torchrun describes in the environment; one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def local_device(device: str) -> str:
    """The device of this process: cuda:LOCAL_RANK when several processes share a CUDA host."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
