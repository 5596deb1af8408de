"""torchrun: process group set-up, rank and world, barriers and teardown, written once.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a stage is one process and
every call here is a no-op. A stage that finds no process group creates one (NCCL for CUDA
devices, gloo for the CPU) and tears it down when it ends; a stage called by the pipeline,
which created the group for all of its stages, leaves the group alone.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

__all__ = ["Dist", "dist_env", "distributed", "barrier", "all_gather_object", "is_initialized"]


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. device: the device this rank computes on (for
    CUDA, the GPU of its local rank). owns: this context created the process group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        barrier()


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[Dist]:
    """The job this process belongs to: joins (or creates) the process group under torchrun
    and binds a CUDA device to the local rank. The group is destroyed on exit only if this
    context created it (after a last barrier, so no rank leaves while another still talks)."""
    rank, world, local_rank = dist_env()
    owns = False
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
    d = Dist(rank, world, local_rank, device, owns)
    try:
        yield d
    finally:
        if owns:
            import torch.distributed as dist

            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def barrier() -> None:
    """A barrier across the job's processes; nothing in a single process."""
    if is_initialized():
        import torch.distributed as dist

        if dist.get_world_size() > 1:
            dist.barrier()


def all_gather_object(obj: Any) -> list:
    """Every rank's obj, in rank order; [obj] in a single process."""
    if not is_initialized():
        return [obj]
    import torch.distributed as dist

    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got
